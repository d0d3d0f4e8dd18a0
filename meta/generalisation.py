"""Generalisation suite: learned optimizers on tasks outside their meta-training distribution.

:func:`suite_groups` derives task groups from the meta-training distribution; :func:`run_suite` runs
the optimizers and per-task tuned Adam (the oracle of :mod:`meta.evaluate`) on every group at the
horizon ``H`` and at ``f x H`` for each ``factors`` entry; :func:`write_suite_report` writes
``results.json``, ``results.md`` and ``ratios.png``. ``train.py evaluate --suite generalisation`` is
the command line. Everything runs on the embedded digits and on generated data (unless the
meta-training distribution itself reads local files: the wide/deep groups use its dataset).

Groups (``widest``/``deepest`` = the largest ``max_width``/``max_depth`` over the distribution's
``image_mlp`` entries, family kwargs or the :class:`~tasks.image_mlp.ImageMLPFamily` defaults):

``wide``      image MLPs on the same dataset(s), hidden width ``8 x widest``, depth the *smallest*
              trained depth (inside the trained range; the cheapest choice: at width 512 a second
              hidden layer makes a task ~8x more expensive for a per-parameter learned optimizer);
``deep``      image MLPs on the same dataset(s), ``2 x deepest`` hidden layers, widths in the trained range;
``image_conv`` conv nets on the embedded digits; ``linear_regression``, ``logistic_regression``
              (synthetic data), ``quadratic``, ``tiny_transformer``: the other families. A family (for
              regression: a kind) that the meta-training distribution contains is still run, with the
              distribution's own family kwargs, and marked ``in_distribution``.

Score. Per task and horizon, for the final full-training-set loss and the validation loss (both
normalised by ``task.normalizer``, i.e. clipped to ``[0, max_loss]``, divergence = ``max_loss``):

    ratio = log((L_opt + f) / (L_tuned_adam + f)),   f = floor x tuned Adam's initial loss (floor = 1e-3)

(the governor's score, :meth:`meta.results.TaskResult.score`: differences below a thousandth of where
training started are not told apart, so a task Adam drives to ~0 cannot dominate the mean).

0 is "as good as tuned Adam", negative better (``exp(ratio)`` is the loss as a multiple of tuned
Adam's). Per group, horizon and optimizer: mean ratio with a 95% t-interval over tasks
(:func:`meta.stats.mean_ci`), wins (tasks with ratio < 0), and divergences. ``overall`` pools the
tasks of all out-of-distribution groups. Tuned Adam is tuned per task and per horizon on the *train*
loss (its validation loss is that of the chosen learning rate), so it is favoured on train loss.

Cost: one :func:`meta.evaluate.evaluate` call over all groups' tasks (tasks spread over the cores) for
``H`` and the first factor, then one call per further factor (at that horizon only). SGD-momentum is
not run. A learned optimizer whose updates depend on the run length (``horizon_aware``) is run once
per horizon with ``T`` = that horizon.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from meta import stats
from meta.evaluate import DEFAULT_ADAM_LRS, TUNED_ADAM, evaluate, horizon_labels, write_outputs
from meta.results import TaskResult
from optimizers.base import Optimizer
from tasks.base import TaskConfigError, TaskDistribution

__all__ = [
    "SuiteGroup", "suite_groups", "run_suite", "write_suite_report", "GROUP_NAMES", "LOSS_FLOOR",
    "parse_factors",
]

GROUP_NAMES = ("wide", "deep", "image_conv", "linear_regression", "logistic_regression", "quadratic",
               "tiny_transformer")
LOSS_FLOOR = 1e-3  # relative to tuned Adam's initial loss, as the governor's score
WIDTH_FACTOR = 8
DEPTH_FACTOR = 2


@dataclass
class SuiteGroup:
    name: str
    description: str
    dist: TaskDistribution
    in_distribution: bool = False
    notes: list[str] = field(default_factory=list)
    derived: dict[str, Any] = field(default_factory=dict)  # widest/deepest etc. of the meta distribution

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "in_distribution": self.in_distribution,
                "families": [[f, dict(kw), w] for f, kw, w in self.dist.families],
                "overrides": dict(self.dist.overrides), "digest": self.dist.digest(), "notes": list(self.notes)}


def _defaults(family: str) -> dict[str, Any]:
    from tasks.base import FAMILIES

    sig = inspect.signature(FAMILIES[family].__init__)
    return {k: p.default for k, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}


def _entries(dist: TaskDistribution, family: str) -> list[tuple[dict[str, Any], float]]:
    return [(dict(kw), float(w)) for f, kw, w in dist.families if f == family]


def suite_groups(meta_dist: TaskDistribution, *, width_factor: int = WIDTH_FACTOR,
                 depth_factor: int = DEPTH_FACTOR, wide_depth: int | None = None,
                 names: Sequence[str] | None = None) -> list[SuiteGroup]:
    """The suite's groups for a meta-training distribution (see the module docstring).

    ``wide_depth``: hidden layers of the ``wide`` group (default: the smallest trained depth).
    ``names``: a subset of :data:`GROUP_NAMES` (default all), returned in :data:`GROUP_NAMES` order."""
    wanted = list(GROUP_NAMES) if names is None else list(names)
    unknown = [n for n in wanted if n not in GROUP_NAMES]
    if unknown or not wanted:
        raise TaskConfigError(f"unknown or no suite groups {unknown or wanted}; known: {list(GROUP_NAMES)}")
    if width_factor < 1 or depth_factor < 1:
        raise TaskConfigError(f"width_factor and depth_factor must be >= 1, got {width_factor}, {depth_factor}")
    base = f"{meta_dist.name}/generalisation"
    groups: list[SuiteGroup] = []

    # -- wide / deep: image MLPs derived from the distribution's image_mlp entries (or the defaults)
    mlp_defaults = _defaults("image_mlp")
    mlp = _entries(meta_dist, "image_mlp")
    notes: list[str] = []
    overrides = dict(meta_dist.overrides)
    if not mlp:
        mlp = [({"dataset": "digits"}, 1.0)]
        overrides = {}
        notes.append(f"{meta_dist.name} has no image_mlp family: widths/depths from ImageMLPFamily defaults, "
                     "digits data (the whole group is then out of the trained family)")
    full = [{**mlp_defaults, **kw} for kw, _ in mlp]
    widest = max(int(kw["max_width"]) for kw in full)
    deepest = max(int(kw["max_depth"]) for kw in full)
    shallowest = min(int(kw["min_depth"]) for kw in full)
    wd = shallowest if wide_depth is None else int(wide_depth)
    if wd < 1:
        raise TaskConfigError(f"wide_depth must be >= 1, got {wd}")
    width, depth = widest * width_factor, deepest * depth_factor
    datasets = sorted({str(kw.get("dataset")) for kw in full})
    if "wide" in wanted:
        fams = [("image_mlp", {**kw, "min_width": width, "max_width": width, "min_depth": wd, "max_depth": wd}, w)
                for kw, w in mlp]
        groups.append(SuiteGroup(
            "wide", f"image MLPs on {'/'.join(datasets)}: width {width} ({width_factor}x the widest trained, "
                    f"{widest}), {wd} hidden layer(s)", TaskDistribution(f"{base}/wide", fams, meta_dist.seed, dict(overrides)),
            notes=list(notes)))
    if "deep" in wanted:
        fams = [("image_mlp", {**kw, "min_depth": depth, "max_depth": depth}, w) for kw, w in mlp]
        lo = min(int(kw["min_width"]) for kw in full)
        groups.append(SuiteGroup(
            "deep", f"image MLPs on {'/'.join(datasets)}: {depth} hidden layers ({depth_factor}x the deepest "
                    f"trained, {deepest}), widths {lo}-{widest}", TaskDistribution(f"{base}/deep", fams, meta_dist.seed,
                                                                                   dict(overrides)),
            notes=list(notes)))

    # -- other families; a family the distribution contains is run with its own kwargs (in-distribution)
    def family_group(name: str, family: str, default_kw: dict[str, Any], desc: str,
                     own: list[tuple[dict[str, Any], float]] | None = None) -> SuiteGroup:
        own = _entries(meta_dist, family) if own is None else own
        if own:
            dist = TaskDistribution(f"{base}/{name}", [(family, kw, w) for kw, w in own], meta_dist.seed,
                                    dict(meta_dist.overrides))
            return SuiteGroup(name, f"{desc} (in the meta-training distribution: its own {family} settings)",
                              dist, in_distribution=True,
                              notes=[f"{family} is part of {meta_dist.name}: not out-of-distribution"])
        return SuiteGroup(name, desc, TaskDistribution(f"{base}/{name}", [(family, default_kw, 1.0)], meta_dist.seed))

    reg_defaults = _defaults("regression")
    reg = _entries(meta_dist, "regression")

    def reg_own(kind: str) -> list[tuple[dict[str, Any], float]]:
        return [({**kw, "kinds": [kind]}, w) for kw, w in reg if kind in kw.get("kinds", reg_defaults["kinds"])]

    specs = {
        "image_conv": lambda: family_group("image_conv", "image_conv", {"dataset": "digits"},
                                           "conv nets on the embedded 8x8 digits"),
        "linear_regression": lambda: family_group("linear_regression", "regression", {"kinds": ["linear"]},
                                                  "linear least squares on synthetic data",
                                                  reg_own("linear")),
        "logistic_regression": lambda: family_group("logistic_regression", "regression", {"kinds": ["logistic"]},
                                                    "softmax regression on synthetic data",
                                                    reg_own("logistic")),
        "quadratic": lambda: family_group("quadratic", "quadratic", {}, "noisy quadratics (synthetic)"),
        "tiny_transformer": lambda: family_group("tiny_transformer", "tiny_transformer", {},
                                                 "tiny transformers on generated sequence tasks"),
    }
    groups += [specs[n]() for n in GROUP_NAMES[2:] if n in wanted]
    derived = {"widest": widest, "deepest": deepest, "shallowest": shallowest, "wide_width": width,
               "wide_depth": wd, "deep_depth": depth, "datasets": datasets}
    for g in groups:
        g.derived = dict(derived)
    return groups


# ---- running ---------------------------------------------------------------------------------------
class _SuiteTasks:
    """All groups' tasks as one indexable "distribution" for :func:`meta.evaluate.evaluate`:
    index ``g * n + j`` is task ``j`` of group ``g``'s ``split`` (so one process pool serves all groups)."""

    def __init__(self, name: str, groups: Sequence[SuiteGroup], n: int):
        self.name, self.groups, self.n = name, list(groups), int(n)

    def task(self, split: str, i: int):
        return self.groups[i // self.n].dist.task(split, i % self.n)

    def digest(self) -> str:
        import hashlib

        blob = json.dumps([g.dist.digest() for g in self.groups] + [self.n])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_factors(text: str) -> tuple[int, ...]:
    """``"10,30"`` -> ``(10, 30)``: integers > 1, strictly increasing; ``""`` -> ``()`` (H only)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        out = tuple(int(t) for t in items)
    except ValueError:
        raise ValueError(f"horizon factors must be integers separated by commas (e.g. 10,30), got {text!r}") from None
    if any(f <= 1 for f in out) or list(out) != sorted(set(out)):
        raise ValueError(f"horizon factors must be integers > 1 in increasing order (e.g. 10,30), got {text!r}")
    return out


def _ratio(x: float, ref: float, floor: float) -> float:
    return math.log((max(float(x), 0.0) + floor) / (max(float(ref), 0.0) + floor))


def _slim(rec: TaskResult, names: Sequence[str], label_map: Mapping[str, str], floor: float) -> dict:
    """Per-task record without curves; ``label_map``: evaluate's label -> suite label."""
    out: dict[str, dict] = {}
    adam_h = rec.results[TUNED_ADAM].horizons.get("H")
    start = float(adam_h.curve[0]) if adam_h is not None and adam_h.curve else 1.0
    floor = floor * max(start, 1e-12)  # absolute floor of this task
    for name in [TUNED_ADAM, *names]:
        per = {}
        for src, dst in label_map.items():
            r = rec.results[name][src]
            per[dst] = {"train_loss": r.train_loss, "valid_loss": r.valid_loss, "diverged": r.diverged,
                        "diverged_step": r.diverged_step}
            if name == TUNED_ADAM:
                per[dst]["lr"] = r.lr
            else:
                ref = rec.results[TUNED_ADAM][src]
                per[dst]["train_ratio"] = _ratio(r.train_loss, ref.train_loss, floor)
                per[dst]["valid_ratio"] = _ratio(r.valid_loss, ref.valid_loss, floor)
                per[dst]["floor"] = floor
        out[name] = per
    return out


def _summarize(records: Sequence[dict], names: Sequence[str], labels: Sequence[str], level: float,
               method: str) -> dict:
    """``summary[label][name]``: ratio intervals, wins, divergences (and tuned Adam's)."""
    summary: dict[str, dict] = {}
    for label in labels:
        per = {}
        adam = [r["results"][TUNED_ADAM][label] for r in records]
        for name in names:
            rows = [r["results"][name][label] for r in records]
            per[name] = {
                "n": len(rows),
                "train_ratio": stats.mean_ci([x["train_ratio"] for x in rows], level, method),
                "valid_ratio": stats.mean_ci([x["valid_ratio"] for x in rows], level, method),
                "wins_train": sum(x["train_ratio"] < 0 for x in rows),
                "wins_valid": sum(x["valid_ratio"] < 0 for x in rows),
                "diverged": sum(bool(x["diverged"]) for x in rows),
                "train_loss": stats.mean_ci([x["train_loss"] for x in rows], level, method)["mean"],
                "valid_loss": stats.mean_ci([x["valid_loss"] for x in rows], level, method)["mean"],
                "tuned_adam_train_loss": stats.mean_ci([a["train_loss"] for a in adam], level, method)["mean"],
                "tuned_adam_valid_loss": stats.mean_ci([a["valid_loss"] for a in adam], level, method)["mean"],
                "tuned_adam_diverged": sum(bool(a["diverged"]) for a in adam),
            }
        summary[label] = per
    return summary


def run_suite(
    optimizers: Mapping[str, Optimizer],
    meta_dist: TaskDistribution,
    horizon: int,
    *,
    tasks_per_group: int = 4,
    factors: Sequence[int] = (10,),
    groups: Sequence[str] | None = None,
    adam_lrs: Sequence[float] = DEFAULT_ADAM_LRS,
    split: str = "held_out",
    seed: int = 0,
    floor: float = LOSS_FLOOR,
    level: float = 0.95,
    ci_method: str = "t",
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Run ``optimizers`` and tuned Adam on the suite's groups at ``H`` and ``f x H`` (``f`` in ``factors``).

    Returns JSON-able results: ``meta`` (horizons, settings, ``runtime_s``), ``groups`` (descriptions),
    ``optimizers``, ``tasks[group]`` (per-task losses, ratios, tuned Adam's lr), ``summary[group][label]
    [name]`` (see :func:`_summarize`), ``overall[label][name]`` (all out-of-distribution groups pooled)
    and ``warnings``."""
    import torch

    if horizon < 1 or tasks_per_group < 1:
        raise ValueError(f"need horizon >= 1 and tasks_per_group >= 1, got {horizon}, {tasks_per_group}")
    factors = parse_factors(",".join(str(int(f)) for f in factors))
    if not floor > 0:
        raise ValueError(f"floor must be positive, got {floor}")
    names = list(optimizers)
    suite = suite_groups(meta_dist, names=groups)
    for g in suite:  # build one task per group now: bad settings / missing data fail before any work
        g.dist.task(split, 0)
    view = _SuiteTasks(f"{meta_dist.name}/generalisation", suite, tasks_per_group)
    n_all = len(suite) * tasks_per_group
    # calls: (H, f1 H) with labels H and f1H, then one single-horizon call per further factor
    calls: list[tuple[int, int, dict[str, str]]] = []
    if factors:
        first = list(horizon_labels(horizon, factors[0] * horizon))  # evaluate's labels: "H", "10H"
        calls.append((horizon, factors[0] * horizon, dict(zip(first, ["H", f"{factors[0]}H"]))))
        calls += [(f * horizon, f * horizon, {"H": f"{f}H"}) for f in factors[1:]]
    else:
        calls.append((horizon, horizon, {"H": "H"}))
    horizons = {"H": horizon, **{f"{f}H": f * horizon for f in factors}}

    import torch._dynamo  # noqa: F401  (vmapped grads import it lazily, ~3 s: once here, not in every fork)

    t0 = time.perf_counter()
    records: list[dict] = [{} for _ in range(n_all)]
    call_meta = []
    used_workers = None
    for h, long_h, label_map in calls:
        with torch.no_grad():
            res = evaluate(optimizers, view, split=split, num_tasks=n_all, horizon=h, long_horizon=long_h,
                           adam_lrs=adam_lrs, sgdm_lrs=None, seed=seed, progress=progress, curve_points=2,
                           workers=workers)
        used_workers = res.meta.workers
        call_meta.append({"horizon": h, "long_horizon": long_h, "labels": dict(label_map),
                          "runtime_s": res.meta.runtime_s})
        for i, rec in enumerate(res.tasks):
            slim = _slim(rec, names, label_map, floor)
            r = records[i]
            if not r:
                r.update(index=i % tasks_per_group, seed=rec.seed, config=rec.config,
                         max_loss=rec.max_loss, run_seconds=0.0, results={n: {} for n in slim})
            r["run_seconds"] += rec.run_seconds
            for n, per in slim.items():
                r["results"][n].update(per)
    runtime = time.perf_counter() - t0

    labels = list(horizons)
    tasks = {g.name: records[k * tasks_per_group:(k + 1) * tasks_per_group] for k, g in enumerate(suite)}
    summary = {g.name: _summarize(tasks[g.name], names, labels, level, ci_method) for g in suite}
    ood = [r for g in suite if not g.in_distribution for r in tasks[g.name]]
    overall = _summarize(ood, names, labels, level, ci_method) if ood else {}
    warnings: list[str] = []
    lo, hi = min(adam_lrs), max(adam_lrs)
    for g in suite:
        n = len(tasks[g.name])
        edges = []
        for label in labels:
            chosen = [r["results"][TUNED_ADAM][label]["lr"] for r in tasks[g.name]]
            n_lo, n_hi = sum(c == lo for c in chosen), sum(c == hi for c in chosen)
            if (n_lo or n_hi) and len(adam_lrs) > 1:
                edges.append(f"{label}: {n_lo} low, {n_hi} high")
        if edges:
            warnings.append(f"{g.name}: tuned Adam's best lr at the edge of the grid {lo:.3g}..{hi:.3g} "
                            f"({'; '.join(edges)} of {n} tasks); widen adam_lrs for a fully tuned baseline")
        for name in names + [TUNED_ADAM]:
            div = [f"{label}: {d}/{n}" for label in labels
                   if (d := sum(bool(r["results"][name][label]["diverged"]) for r in tasks[g.name]))]
            if div:
                warnings.append(f"{name} diverged on {g.name} tasks ({'; '.join(div)})")
    derived = suite[0].derived
    return {
        "meta": {
            "suite": "generalisation",
            "meta_distribution": meta_dist.name,
            "meta_distribution_digest": meta_dist.digest(),
            "derived": derived,
            "split": split,
            "tasks_per_group": tasks_per_group,
            "horizon": horizon,
            "factors": list(factors),
            "horizons": horizons,
            "adam_lrs": [float(x) for x in adam_lrs],
            "seed": seed,
            "floor": floor,
            "level": level,
            "ci_method": ci_method,
            "ratio_definition": (f"log((L + f) / (L_tuned_adam + f)), f = {floor:g} x tuned Adam's initial loss, of the final normalised "
                                 "full-train (train_ratio) or validation (valid_ratio) loss; < 0: better than "
                                 "tuned Adam"),
            "tuning": "tuned Adam: per-task, per-horizon oracle over adam_lrs on the final full-train loss",
            "calls": call_meta,
            "workers": used_workers,
            "runtime_s": runtime,
        },
        "groups": [g.to_dict() for g in suite],
        "optimizers": names,
        "tasks": tasks,
        "summary": summary,
        "overall": overall,
        "warnings": warnings,
    }


# ---- report ----------------------------------------------------------------------------------------
def _f(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def _ci(ci: dict) -> str:
    if ci.get("lo") is None:
        return _f(ci["mean"])
    return f"{_f(ci['mean'])} [{_f(ci['lo'])}, {_f(ci['hi'])}]"


def _markdown(results: dict) -> str:
    meta = results["meta"]
    pct = int(round(100 * meta["level"]))
    hz = ", ".join(f"{k}={v}" for k, v in meta["horizons"].items())
    lines = [
        f"# Generalisation suite: {', '.join(results['optimizers'])} vs tuned Adam",
        "",
        f"Meta-training distribution `{meta['meta_distribution']}`; {meta['tasks_per_group']} `{meta['split']}` "
        f"task(s) per group; horizons {hz}; eval seed {meta['seed']}; runtime {meta['runtime_s']:.1f} s "
        f"({meta['workers']} worker(s)).",
        "",
        f"Score per task: `{meta['ratio_definition']}`. Table: mean over the group's tasks with a {pct}% "
        f"{meta['ci_method']}-interval; `x Adam` = exp(mean), the loss as a (geometric-mean) multiple of "
        f"tuned Adam's; wins = tasks with ratio < 0. Tuned Adam: per-task, per-horizon oracle over lr "
        f"{min(meta['adam_lrs']):.3g}..{max(meta['adam_lrs']):.3g} ({len(meta['adam_lrs'])} points), tuned on "
        "the train loss.",
        "",
        "## Groups",
        "",
    ]
    for g in results["groups"]:
        tag = " **(in-distribution)**" if g["in_distribution"] else ""
        lines.append(f"- `{g['name']}`{tag}: {g['description']}")
    lines += [
        "",
        "## Log-loss ratio vs tuned Adam",
        "",
        "| group | horizon | optimizer | train ratio | x Adam | valid ratio | x Adam | wins train | wins valid "
        "| diverged | tuned Adam diverged |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def rows(group: str, per_label: dict, mark: str = "") -> None:
        for label, T in meta["horizons"].items():
            for name in results["optimizers"]:
                e = per_label[label][name]
                n = e["n"]
                lines.append(
                    f"| {group}{mark} | {label}={T} | {name} | {_ci(e['train_ratio'])} | "
                    f"{math.exp(e['train_ratio']['mean']):.3g} | {_ci(e['valid_ratio'])} | "
                    f"{math.exp(e['valid_ratio']['mean']):.3g} | {e['wins_train']}/{n} | {e['wins_valid']}/{n} | "
                    f"{e['diverged']}/{n} | {e['tuned_adam_diverged']}/{n} |")

    for g in results["groups"]:
        rows(g["name"], results["summary"][g["name"]], " (in-dist)" if g["in_distribution"] else "")
    if results.get("overall"):
        rows("**all out-of-distribution**", results["overall"])
    lines += ["", "## Mean normalised losses", "",
              "| group | horizon | optimizer | train | tuned Adam train | valid | tuned Adam valid |",
              "|---|---|---|---|---|---|---|"]
    for g in results["groups"]:
        for label, T in meta["horizons"].items():
            for name in results["optimizers"]:
                e = results["summary"][g["name"]][label][name]
                lines.append(f"| {g['name']} | {label}={T} | {name} | {e['train_loss']:.4g} | "
                             f"{e['tuned_adam_train_loss']:.4g} | {e['valid_loss']:.4g} | "
                             f"{e['tuned_adam_valid_loss']:.4g} |")
    if results.get("warnings"):
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"


def _plot(results: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [g["name"] for g in results["groups"]]
    in_dist = {g["name"]: g["in_distribution"] for g in results["groups"]}
    summary = dict(results["summary"])
    if results.get("overall"):
        groups.append("all OOD")
        in_dist["all OOD"] = False
        summary["all OOD"] = results["overall"]
    labels = list(results["meta"]["horizons"])
    names = results["optimizers"]
    series = [(label, name) for name in names for label in labels]
    fig = Figure(figsize=(max(7.0, 1.3 * len(groups) + 2), 7.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 1, squeeze=False)[:, 0]
    width = 0.8 / max(len(series), 1)
    for ax, key, title in ((axes[0], "train_ratio", "final full-train loss"),
                           (axes[1], "valid_ratio", "final validation loss")):
        for k, (label, name) in enumerate(series):
            xs, ys, err = [], [], [[], []]
            for gi, g in enumerate(groups):
                ci = summary[g][label][name][key]
                xs.append(gi - 0.4 + width * (k + 0.5))
                ys.append(ci["mean"])
                lo = ci["lo"] if ci["lo"] is not None else ci["mean"]
                hi = ci["hi"] if ci["hi"] is not None else ci["mean"]
                err[0].append(ci["mean"] - lo)
                err[1].append(hi - ci["mean"])
            tag = f"{name} @ {label}" if len(names) > 1 else f"{label} = {results['meta']['horizons'][label]}"
            ax.bar(xs, ys, width=width * 0.9, yerr=err, capsize=2, label=tag)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([g + ("\n(in-dist)" if in_dist[g] else "") for g in groups], fontsize=8)
        ax.set_ylabel("log(loss / tuned Adam's)")
        ax.set_title(f"{title}: mean log-ratio vs tuned Adam, {int(100 * results['meta']['level'])}% CI "
                     "(< 0: better)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def write_suite_report(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``ratios.png`` into ``out_dir``; returns their paths."""
    return write_outputs(results, out_dir, _markdown(results), _plot, "ratios.png")
