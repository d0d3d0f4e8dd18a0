#!/usr/bin/env python
"""Benchmark (not a test): meta-training outer steps per second under torchrun, 1..N processes.

    python bench/bench_distributed.py                    # 1 and 2 processes (more if the cores allow)
    python bench/bench_distributed.py --procs 1,2,4 --steps 15

For each process count it launches ``torchrun --standalone --nproc-per-node N train.py meta-train
--preset default`` with fewer outer steps and reads the per-step times rank 0 logs (``step_time`` in
metrics.jsonl: estimate + all-reduce + outer update, i.e. the whole outer step; the first ``--warmup``
steps are dropped). For every population in ``--populations`` (default 8, the default preset's, and
16) the same run is timed on 1..N processes: the members are split over the processes, the maths is
unchanged. (Comparing *different* populations per member is misleading: members own different tasks of
different sizes.)

Each process runs one torch thread (the default preset's setting). It prints a table and writes
``bench/distributed_<host>.json``. Speed-up = steps/s(N) / steps/s(1) at the same population;
efficiency = speed-up / N. With ``--repeat R`` the sweep is repeated, interleaved, and the median run
per setting is reported (all repeats are kept in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def run(n: int, population: int, steps: int, warmup: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
               str(ROOT / "train.py"), "meta-train", "--preset", "default", "--quiet", "--wandb", "disabled",
               "--meta.outer_steps", str(steps), "--meta.population", str(population),
               "--checkpoint-every", "100000", "--out-dir", str(out), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{n} processes failed:\n{r.stderr[-3000:]}")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rows[warmup:]
    times = [row["step_time"] for row in timed]
    per_s = len(times) / sum(times)
    out = {"procs": n, "population": population, "steps_timed": len(times), "steps_per_s": per_s,
           "members_per_s": per_s * population, "median_step_s": statistics.median(times),
           "wall_s": wall, "meta_loss_last": rows[-1]["meta_loss"]}
    if "shard_seconds_max" in timed[0]:  # logged under a process group: where the step time goes
        slow = sum(row["shard_seconds_max"] for row in timed)
        fast = sum(row["shard_seconds_min"] for row in timed)
        out.update(slowest_shard_fraction=slow / sum(times),  # of the step spent on the slowest rank's work
                   imbalance=slow / fast)  # slowest / fastest rank's member work, summed over steps
    return out


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:  # pragma: no cover
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", default="", help="comma-separated process counts (default 1,2,4,.. <= cores)")
    ap.add_argument("--steps", type=int, default=14, help="outer steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    ap.add_argument("--populations", default="8,16", help="comma-separated population sizes")
    ap.add_argument("--repeat", type=int, default=1,
                    help="interleaved repetitions of the whole sweep; the median per setting is reported "
                         "(use >1 on a shared machine)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/distributed_<host>.json)")
    args, extra = ap.parse_known_args()  # unknown flags go to train.py (e.g. --meta.estimator pes)
    c = cores()
    pops = [int(x) for x in args.populations.split(",") if x]
    procs = [int(x) for x in args.procs.split(",") if x] or [n for n in (1, 2, 4, 8, 16) if n <= max(c, 2)]
    import torch

    machine = {"host": socket.gethostname(), "platform": platform.platform(), "processor": platform.processor(),
               "cores": c, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
               "load_average_before": load_average()}
    runs: dict[tuple[str, int], list[dict]] = {}
    for rep in range(args.repeat):  # interleaved, so slow drifts in background load hit every setting
        for n in procs:
            for pop in pops:
                row = run(n, pop, args.steps, args.warmup, extra)
                row["load_average_1min_after"] = (load_average() or [None])[0]
                runs.setdefault((pop, n), []).append(row)
                print(f"  rep {rep} population={pop} procs={n}: {row['steps_per_s']:.3f} steps/s "
                      f"(load {row['load_average_1min_after']})", flush=True)
    machine["load_average_after"] = load_average()
    results: dict[str, list[dict]] = {str(p): [] for p in pops}
    for (pop, _n), rows in runs.items():
        best = sorted(rows, key=lambda r: r["steps_per_s"])[len(rows) // 2]  # the median run
        results[str(pop)].append({**best, "repeats_steps_per_s": [r["steps_per_s"] for r in rows]})
    for rows in results.values():
        base = rows[0]
        for row in rows:
            row["speedup"] = row["steps_per_s"] / base["steps_per_s"]
            row["efficiency"] = row["speedup"] / row["procs"] * base["procs"]
    report = {"benchmark": "outer steps/s of train.py meta-train --preset default under torchrun (gloo, CPU)",
              "machine": machine, "steps": args.steps, "warmup": args.warmup, "train_py_extra": extra,
              "results": results, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = args.out or ROOT / "bench" / f"distributed_{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"machine: {c} cores, {machine['platform']}, torch {machine['torch']}, "
          f"load average before {machine['load_average_before']}")
    print("| population | processes | outer steps/s | median step (s) | speed-up | efficiency | "
          "slowest/fastest rank's work | slowest rank's work / step |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in results.values():
        for row in rows:
            extra_cols = (f"{row['imbalance']:.2f} | {row['slowest_shard_fraction']:.0%}"
                          if "imbalance" in row else "- | -")
            print(f"| {row['population']} | {row['procs']} | {row['steps_per_s']:.3f} | "
                  f"{row['median_step_s']:.3f} | {row['speedup']:.2f} | {row['efficiency']:.0%} | {extra_cols} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
