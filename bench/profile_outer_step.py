#!/usr/bin/env python
"""Where a meta-training outer step's CPU time goes, by operator: the profile behind the CPU-speed notes.

    python bench/profile_outer_step.py                       # same32 workload (8 identical MLPs), 1 thread
    python bench/profile_outer_step.py --workload default    # the default preset's mixed tasks
    python bench/profile_outer_step.py --out docs/cpu_speed/profile_outer_step.md

Runs ``--warmup`` outer steps, then profiles ``--steps`` more with ``torch.profiler`` (CPU activity only)
and writes a table of operator calls and self CPU time per outer step, by count and by time. The
workloads are ``bench/cpu_speed.py``'s (one process; the default preset otherwise). The profiler's own
overhead inflates per-call times; the counts are exact.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def profile_rows(workload: str, warmup: int, steps: int, same_batch: int) -> tuple[float, list[tuple[str, float, float]]]:
    """(operator calls per outer step, [(operator, calls per step, self CPU ms per step)])."""
    from torch.profiler import ProfilerActivity, profile

    from cpu_speed import default_run_config
    from meta.trainer import MetaTrainer

    trainer = MetaTrainer(default_run_config(workload, warmup + steps, same_batch))
    for _ in range(warmup):
        trainer.train_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
    events = prof.key_averages()
    rows = [(e.key, e.count / steps, e.self_cpu_time_total / 1000.0 / steps) for e in events]
    return sum(r[1] for r in rows), rows


def cpu_name() -> str:
    """The CPU's model name where Linux says it, else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(workload: str, total_calls: float, rows: list[tuple[str, float, float]], top: int) -> str:
    def table(sorted_rows):
        out = ["| operator | calls per step | self CPU ms per step |", "|---|---|---|"]
        out += [f"| `{k}` | {c:,.0f} | {ms:.1f} |" for k, c, ms in sorted_rows[:top]]
        return out

    lines = [f"# Profile of one outer step: workload `{workload}`, 1 thread", "",
             f"Machine: {cpu_name()}, torch {torch.__version__}. "
             f"Operator calls per outer step: **{total_calls:,.0f}**; self CPU time per step "
             f"{sum(r[2] for r in rows):.0f} ms (profiler overhead included).", "",
             "## By number of calls", "", *table(sorted(rows, key=lambda r: -r[1])), "",
             "## By self CPU time", "", *table(sorted(rows, key=lambda r: -r[2])), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=("same32", "default"), default="same32")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--same-batch", type=int, default=128, help="batch size of the same32 tasks")
    ap.add_argument("--top", type=int, default=25, help="rows per table")
    ap.add_argument("--out", type=Path, help="write the markdown table here (default: print it)")
    a = ap.parse_args(argv)
    if a.warmup < 0 or a.steps < 1:
        ap.error("--warmup must be >= 0 and --steps >= 1")
    torch.set_num_threads(1)
    total, rows = profile_rows(a.workload, a.warmup, a.steps, a.same_batch)
    text = markdown(a.workload, total, rows, a.top)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        print(f"wrote {a.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
