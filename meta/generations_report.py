"""Report of a generations run: a table and a plot of held-out score by generation, read from the lineage.

Scores are the governor's normalised losses (``log`` of the final training loss over tuned Adam's,
per held-out task; 0 = tuned Adam, lower is better), so every generation, its predecessor, its
Adam-trained control and tuned Adam are on one axis. Intervals are paired bootstrap intervals over
tasks. Everything is recomputed from the lineage and each generation's ``review.json``; the report holds
no state of its own and can be regenerated at any time (``train.py lineage RUN``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from meta import stats
from meta.evidence import Evidence
from meta.lineage import ADOPTED, PENDING, REJECTED, Lineage

STATUS_COLORS = {ADOPTED: "tab:green", REJECTED: "tab:red", PENDING: "tab:orange"}


def _mean_ci(x: list[float]) -> dict:
    return stats.bootstrap_ci(x, 0.95, n_boot=2000, seed=0) if len(x) > 1 else {"mean": x[0], "lo": None, "hi": None}


def generation_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """One row per generation: status, provenance, and score intervals for each arm at each horizon."""
    lineage = Lineage(run_dir)
    entries = lineage.verify()
    st = lineage.state(entries)
    rows = []
    for g in sorted(st.records):
        rec = st.records[g]
        review = Path(run_dir) / f"gen-{g:04d}" / "review.json"
        ev = Evidence.from_json(json.loads(review.read_text())["evidence"] if review.exists() else {})
        row: dict[str, Any] = {
            "generation": g, "status": st.status[g], "decision": rec["verdict"]["decision"],
            "trained_by": rec["trained_by"], "parent": rec["parent"], "num_theta": rec["num_theta"],
            "outer_steps": rec["outer_steps"], "hash": rec["hash"][:12], "reasons": rec["verdict"]["reasons"],
            "incumbent_now": st.incumbent == g, "scores": {}, "vs_control": {}, "vs_predecessor": {},
        }
        if rec.get("search") is not None:  # the architecture was chosen by search (meta/search.py)
            row["search"] = rec["search"]
        for label, per in (ev.held_out.horizons if ev.held_out is not None else {}).items():
            row["scores"][label] = {name: _mean_ci(run.scores) for name, run in per.items()}
            cand = per["candidate"].scores
            for key, other in (("vs_control", "control"), ("vs_predecessor", "incumbent")):
                if other in per:
                    diff = [b - a for a, b in zip(cand, per[other].scores)]  # > 0: candidate better
                    row[key][label] = _mean_ci(diff)
        rows.append(row)
    return rows


def _fmt(ci: dict | None) -> str:
    if not ci:
        return "-"
    if ci.get("lo") is None:
        return f"{ci['mean']:+.3f}"
    return f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"


def markdown(rows: list[dict[str, Any]], run_dir: str | Path) -> str:
    lines = [
        f"# Generations: {Path(run_dir).name}",
        "",
        ("Held-out (decision split) score = mean over tasks of log(final train loss / tuned Adam's); 0 is "
        "per-task tuned Adam, lower is better; 95% bootstrap intervals over tasks. *Improvement* columns are "
        "paired (other minus candidate): > 0 means the candidate is better."),
        "",
        ("| gen | status | trained by | candidate H | predecessor H | control H | cand. vs control H | "
        "cand. vs predecessor H | candidate long | control long |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["scores"]
        H = s.get("H", {})
        L = next((v for k, v in s.items() if k != "H"), {})
        pred = H.get("incumbent") or H.get("tuned_adam")
        star = " (incumbent)" if r["incumbent_now"] else ""
        lines.append(
            f"| {r['generation']} | {r['status']}{star} | {r['trained_by']} | {_fmt(H.get('candidate'))} | "
            f"{_fmt(pred)}{'' if 'incumbent' in H else ' (tuned Adam)'} | {_fmt(H.get('control'))} | "
            f"{_fmt(r['vs_control'].get('H'))} | {_fmt(r['vs_predecessor'].get('H'))} | "
            f"{_fmt(L.get('candidate'))} | {_fmt(L.get('control'))} |")
    lines += ["", "## Verdicts", ""]
    for r in rows:
        lines.append(f"- **gen {r['generation']}** ({r['decision']} -> {r['status']}, {r['num_theta']} weights, "
                     f"{r['outer_steps']} outer steps, entry {r['hash']}):")
        lines += [f"  - {reason}" for reason in r["reasons"]]
    lines += search_section(rows)
    lines += safety_section(run_dir)
    return "\n".join(lines) + "\n"


def search_section(rows: list[dict[str, Any]]) -> list[str]:
    """A table per searched generation: every proposal, its size, and its selection score at each rung."""
    out: list[str] = []
    for r in rows:
        s = r.get("search")
        if not s:
            continue
        if not out:
            out += ["", "## Successor search", "",
                    ("Selection score = mean over selection-split tasks (disjoint from the decision split) of "
                     "log(final train loss / tuned Adam's) after the rung's outer steps; lower is better.")]
        out += ["", f"**gen {r['generation']}**: {len(s['proposals'])} proposal(s), meta-trained by "
                    f"{s.get('outer')}, scored on {s.get('selection_tasks')} selection task(s), "
                    f"{s.get('outer_steps_spent')} outer steps in all; winner: proposal {s['winner']}", "",
                "| proposal | changes | weights | FLOPs/element | bounds | rungs (outer steps: score) | |",
                "|---|---|---|---|---|---|---|"]
        for p in s["proposals"]:
            changes = ", ".join(f"{k}={v}" for k, v in p["changes"].items()) or "(the base)"
            rungs = "; ".join(f"{x['budget']}: " + (f"{x['score']:+.3f}" if x["score"] is not None else "non-finite")
                              + (f" ({x['diverged']} diverged)" if x.get("diverged") else "")
                              for x in p["rungs"]) or "-"
            bounds = "in" if p["in_bounds"] else f"out: {p['reason']}"
            mark = "**winner**" if p["index"] == s["winner"] else ""
            out.append(f"| {p['index']} | {changes} | {p.get('num_theta', '-')} | {p.get('flops_per_element', '-')} | "
                       f"{bounds} | {rungs} | {mark} |")
    return out


def safety_section(run_dir: str | Path) -> list[str]:
    """The safety layer's record: alerts, freezes, sustained-gain checks, goal changes, why the run stopped."""
    from meta import safety

    run_dir = Path(run_dir)
    lineage = Lineage(run_dir)
    entries = lineage.entries()
    st = lineage.state(entries)
    out = ["", "## Safety", ""]
    if st.frozen:
        f = st.freeze
        out.append(f"- **FROZEN** since lineage entry {f['index']} (by {f.get('by')}): {f.get('reason')}. Nothing is "
                   f"adopted until `python train.py unfreeze {run_dir} --by NAME --reason TEXT`.")
    for a in safety.read_alerts(run_dir):
        out.append(f"- **ALERT** {a.get('time', '')}: {a.get('title')}: {a.get('text')}")
    for e in entries:
        kind = e.get("kind")
        if kind == "freeze":
            rev = ""
            if "revert_to" in e:
                to = e["revert_to"]
                rev = f"; incumbent reverted to {'gen ' + str(to) if to is not None else 'tuned Adam'}"
            out.append(f"- entry {e['index']}: frozen by {e.get('by')}: {e.get('reason')}{rev}")
        elif kind == "unfreeze":
            out.append(f"- entry {e['index']}: unfrozen by {e.get('by')}: {e.get('reason')}")
        elif kind == "sustain":
            par = f"gen {e['parent']}" if e.get("parent") is not None else "tuned Adam"
            act = (f" -> **rolled back** to {'gen ' + str(e['to']) if e.get('to') is not None else 'tuned Adam'}"
                   if e.get("action") == "rollback" else (" -> sustained" if e.get("passed") else " -> not significant"))
            out.append(f"- entry {e['index']}: before gen {e.get('generation')}, gen {e.get('incumbent')} re-checked "
                       f"against {par} on test tasks {e['task_indices'][0]}..{e['task_indices'][-1]}: "
                       f"{e.get('reason')}{act}")
        elif kind == "goal":
            out.append(f"- entry {e['index']}: goal changed by {e.get('by')}: {e.get('reason')} "
                       f"(goal {str(e.get('goal_hash'))[:12]})")
    cfg_path = run_dir / "config.json"
    patience = 0
    if cfg_path.is_file():
        try:
            patience = int(json.loads(cfg_path.read_text()).get("gen", {}).get("patience", 0))
        except (ValueError, TypeError, json.JSONDecodeError):
            patience = 0
    idle = safety.generations_without_adoption(st)
    if patience and idle >= patience and not st.frozen:
        out.append(f"- **stopped for diminishing returns**: no adoption in the last {idle} generation(s) "
                   f"(gen.patience {patience})")
    if len(out) == 3:
        out.append("- no alert, freeze, rollback or goal change")
    return out


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(rows[0]["scores"] if rows and rows[0]["scores"] else ["H"], key=lambda k: (k != "H", k))
    fig, axes = plt.subplots(1, max(len(labels), 1), figsize=(5.5 * max(len(labels), 1), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        ax.axhline(0.0, color="k", lw=1, ls="--", label="tuned Adam")
        for r in rows:
            s = r["scores"].get(label, {})
            g = r["generation"]
            for name, dx, marker, color in (("candidate", 0.0, "o", STATUS_COLORS[r["status"]]),
                                            ("control", 0.15, "x", "tab:blue"),
                                            ("incumbent", -0.15, "s", "tab:gray")):
                ci = s.get(name)
                if not ci:
                    continue
                err = None
                if ci.get("lo") is not None:
                    err = [[ci["mean"] - ci["lo"]], [ci["hi"] - ci["mean"]]]
                ax.errorbar([g + dx], [ci["mean"]], yerr=err, fmt=marker, color=color, capsize=3)
        ax.set_xlabel("generation")
        ax.set_ylabel("held-out score (log loss / tuned Adam)")
        ax.set_title(f"horizon {label}")
        ax.set_xticks([r["generation"] for r in rows])
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", ls="", label=f"candidate ({s})") for s, c in STATUS_COLORS.items()]
    handles += [Line2D([], [], color="tab:blue", marker="x", ls="", label="control (Adam-trained)"),
                Line2D([], [], color="tab:gray", marker="s", ls="", label="predecessor"),
                Line2D([], [], color="k", ls="--", label="tuned Adam")]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: str | Path) -> dict[str, Path]:
    from optimizers.checkpoint import atomic_write_bytes

    run_dir = Path(run_dir)
    rows = generation_rows(run_dir)
    md = run_dir / "report.md"
    atomic_write_bytes(md, markdown(rows, run_dir).encode())
    png = plot(rows, run_dir / "report.png")
    atomic_write_bytes(run_dir / "report.json", (json.dumps(rows, indent=2) + "\n").encode())
    return {"md": md, "png": png}
