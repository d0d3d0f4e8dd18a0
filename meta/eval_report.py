"""What the evaluation reports: the summary across tasks, warnings, and the files it writes.

Separate from the protocol (:mod:`meta.eval_protocol`, what runs on one task) and the worker pool
(:mod:`meta.eval_pool`, where it runs), so that a change to a table or a statistic cannot change a
number that was measured, and a saved ``results.json`` can be re-reported
(:meth:`meta.results.EvalResults.from_json`, then :func:`write_report`) without running anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from meta import stats
from meta.eval_protocol import GRID_RESULT_NAME
from meta.results import TUNED_ADAM, EvalResults, SummaryEntry, TaskResult


def summarize(task_records: Sequence[TaskResult], names: Sequence[str], labels: Sequence[str], *,
              level: float = 0.95, method: str = "t") -> dict[str, dict[str, SummaryEntry]]:
    """Aggregate per-task results: ``summary[label][name]`` is a :class:`~meta.results.SummaryEntry` with

    * ``train_loss``, ``valid_loss``: ``{mean, lo, hi, n, level, method}`` (final normalised losses);
    * ``speedup``: the same plus ``median``, ``p10``, ``p90`` and ``censored`` (count of lower bounds);
    * ``diverged``: number of tasks on which the run diverged by that horizon;
    * ``diff_vs_tuned_adam`` (all but tuned Adam itself): paired per-task differences (this optimizer
      minus tuned Adam) of ``train_loss`` and ``valid_loss``, each an interval plus ``excludes_zero``.
      A negative difference whose interval excludes zero means "better than tuned Adam".
    """
    summary: dict[str, dict[str, SummaryEntry]] = {}
    for label in labels:
        per: dict[str, SummaryEntry] = {}
        ref = [r.results[TUNED_ADAM][label] for r in task_records]
        ref_loss = {"train_loss": [x.train_loss for x in ref], "valid_loss": [x.valid_loss for x in ref]}
        for name in names:
            rows = [r.results[name][label] for r in task_records]
            losses = {"train_loss": [x.train_loss for x in rows], "valid_loss": [x.valid_loss for x in rows]}
            entry = SummaryEntry(
                train_loss=stats.mean_ci(losses["train_loss"], level, method),
                valid_loss=stats.mean_ci(losses["valid_loss"], level, method),
                speedup={**stats.describe([x.speedup for x in rows], level, method),
                         "censored": sum(bool(x.speedup_censored) for x in rows)},
                diverged=sum(bool(x.diverged) for x in rows),
            )
            if name != TUNED_ADAM:
                diff = {}
                for key in ("train_loss", "valid_loss"):
                    ci = stats.paired_diff_ci(losses[key], ref_loss[key], level, method)
                    ci["excludes_zero"] = stats.excludes_zero(ci)
                    diff[key] = ci
                entry.diff_vs_tuned_adam = diff
            per[name] = entry
        summary[label] = per
    return summary


def chosen_lrs(task_records: Sequence[TaskResult], grids: Sequence[str], labels: Sequence[str]) -> dict:
    """``chosen_lrs[grid][label]``: every task's chosen grid learning rate."""
    return {g: {label: [r.grids[g].chosen_lr[label] for r in task_records] for label in labels} for g in grids}


def report_warnings(results: EvalResults, grids: Mapping[str, Sequence[float]]) -> list[str]:
    """Best grid learning rate at the edge of a grid (the baseline may not be fully tuned), diverged runs."""
    out: list[str] = []
    horizons = results.meta.horizons
    n = results.meta.num_tasks
    for g, lrs in grids.items():
        if len(lrs) < 2:
            continue
        lo, hi = min(lrs), max(lrs)
        for label, T in horizons.items():
            chosen = results.chosen_lrs[g][label]
            n_lo = sum(c == lo for c in chosen)
            n_hi = sum(c == hi for c in chosen)
            if n_lo or n_hi:
                out.append(
                    f"{GRID_RESULT_NAME[g]} at {label}={T}: best learning rate at the edge of the grid on "
                    f"{n_lo + n_hi}/{n} tasks ({n_lo} at the lowest {lo:.3g}, {n_hi} at the highest "
                    f"{hi:.3g}); widen {g}_lrs for a fully tuned baseline"
                )
    for label, per in results.summary.items():
        for name, entry in per.items():
            if entry.diverged:
                out.append(f"{name} diverged on {entry.diverged}/{n} tasks by {label}={horizons[label]}")
    return out


# ---- markdown --------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _fmt_ci(ci: dict, digits: int = 4) -> str:
    if ci.get("lo") is None:
        return _fmt(ci["mean"], digits)
    return f"{_fmt(ci['mean'], digits)} [{_fmt(ci['lo'], digits)}, {_fmt(ci['hi'], digits)}]"


def _grid_str(lrs: Sequence[float]) -> str:
    return f"{min(lrs):.3g}..{max(lrs):.3g} ({len(lrs)} points)" if lrs else "-"


def markdown(results: EvalResults) -> str:
    """``results.md``: the summary table, the paired differences and the chosen learning rates."""
    meta = results.meta
    pct = int(round(100 * meta.level))
    lines = [
        f"# Evaluation on {meta.distribution} / {meta.split}",
        "",
        f"{meta.num_tasks} tasks (indices {meta.task_indices[0]}..{meta.task_indices[-1]}), "
        f"horizons {', '.join(f'{k}={v}' for k, v in meta.horizons.items())}, eval seed {meta.seed}, "
        f"runtime {meta.runtime_s:.1f} s ({meta.workers} worker(s)).",
        "",
        f"Mean over tasks with {pct}% {meta.ci_method}-interval. Losses are normalised "
        "(`task.normalizer`): full training split and validation split at the final step.",
        f"Tuned Adam: per-task oracle over lr {_grid_str(meta.adam_lrs)}"
        + (f"; tuned SGDM (momentum {meta.sgdm_momentum}) over {_grid_str(meta.sgdm_lrs)}."
           if meta.sgdm_lrs else "."),
        f"Speed-up over tuned Adam: {meta.speedup_definition}.",
        "",
        "| optimizer | horizon | train loss | valid loss | speed-up vs tuned Adam | censored | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    n = meta.num_tasks
    for name in results.optimizers:
        for label, T in meta.horizons.items():
            e = results.summary[label][name]
            lines.append(
                f"| {name} | {label}={T} | {_fmt_ci(e.train_loss)} | {_fmt_ci(e.valid_loss)} | "
                f"{_fmt_ci(e.speedup, 3)} (median {_fmt(e.speedup['median'], 3)}) | "
                f"{e.speedup['censored']}/{n} | {e.diverged}/{n} |"
            )
    lines += [
        "",
        f"## Paired difference vs tuned Adam (optimizer minus tuned Adam, per task; {pct}% interval)",
        "",
        "| optimizer | horizon | train loss diff | excludes 0 | valid loss diff | excludes 0 |",
        "|---|---|---|---|---|---|",
    ]
    for name in results.optimizers:
        if name == TUNED_ADAM:
            continue
        for label, T in meta.horizons.items():
            d = results.summary[label][name].diff_vs_tuned_adam or {}
            lines.append(
                f"| {name} | {label}={T} | {_fmt_ci(d['train_loss'])} | {'yes' if d['train_loss']['excludes_zero'] else 'no'} "
                f"| {_fmt_ci(d['valid_loss'])} | {'yes' if d['valid_loss']['excludes_zero'] else 'no'} |"
            )
    lines += ["", "## Chosen learning rates (tasks per grid point)", ""]
    for g, per in results.chosen_lrs.items():
        grid = meta.adam_lrs if g == "adam" else meta.sgdm_lrs
        for label, chosen in per.items():
            counts = ", ".join(f"{lr:.3g}: {sum(c == lr for c in chosen)}" for lr in grid)
            lines.append(f"- {GRID_RESULT_NAME[g]} at {label}: {counts}")
    if results.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in results.warnings]
    return "\n".join(lines) + "\n"


# ---- files -----------------------------------------------------------------------------------
def write_outputs(results: dict, out_dir: str | os.PathLike, markdown: str, plot: Callable[[dict, Path], Any],
                  png: str) -> dict[str, Path]:
    """``results.json`` (the JSON dict ``results``), ``results.md`` (``markdown``) and ``png`` (drawn by
    ``plot(results, path)``) in ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / png}
    paths["json"].write_text(json.dumps(results, indent=1, allow_nan=False))
    paths["md"].write_text(markdown)
    plot(results, paths["png"])
    return paths


def write_report(results: EvalResults | Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``curves.png`` into ``out_dir``; returns their paths.
    ``results``: an :class:`~meta.results.EvalResults`, or its JSON (e.g. a ``results.json`` read back)."""
    from meta.plots import plot_curves

    typed = results if isinstance(results, EvalResults) else EvalResults.from_json(results)
    return write_outputs(typed.to_json(), out_dir, markdown(typed), lambda _, path: plot_curves(typed, path),
                         "curves.png")


__all__ = ["chosen_lrs", "markdown", "report_warnings", "summarize", "write_outputs", "write_report"]
