"""Plots of evaluation results (matplotlib Agg canvas, imported lazily inside the function)."""

from __future__ import annotations

import os
from pathlib import Path

from meta import stats
from meta.results import EvalResults


def plot_curves(results: EvalResults, path: str | os.PathLike) -> Path:
    """PNG of the mean full-train-loss curves over tasks (log-x), one panel per horizon.

    Each panel shows every optimizer's mean (over tasks) normalised full-train loss at the recorded
    steps up to that horizon, on log-log axes, with the 25-75th percentile band across tasks shaded
    (a t-interval of the mean can go below zero, which a log axis cannot show). The tuned baselines
    use the learning rate chosen for that horizon, so their curves differ between panels.
    """
    # the Agg canvas directly: no pyplot, so the caller's global backend is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    meta = results.meta
    horizons = meta.horizons
    steps_all = meta.curve_steps
    fig = Figure(figsize=(6 * len(horizons), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(horizons), squeeze=False)
    for ax, (label, T) in zip(axes[0], horizons.items()):
        steps = [s for s in steps_all if s <= T]
        xs = [s + 1 for s in steps]  # log-x: step s drawn at s + 1
        for name in results.optimizers:
            curves = [r.curve for r in results.runs(name, label)]
            means, los, his = [], [], []
            for k in range(len(steps)):
                column = [c[k] for c in curves]
                means.append(stats.mean_ci(column)["mean"])
                los.append(stats.percentile(column, 25))
                his.append(stats.percentile(column, 75))
            style = "--" if name.startswith("tuned_") else "-"
            (line,) = ax.plot(xs, means, style, label=name)
            ax.fill_between(xs, los, his, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step + 1")
        ax.set_ylabel("full-train loss (normalised): mean, IQR band")
        ax.set_title(f"{meta.distribution} / {meta.split}: {label} = {T} steps")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
