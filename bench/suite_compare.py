"""Several learned optimizers side by side on the generalisation suite (paired: same tasks, same
tuned-Adam runs), e.g. the digits-trained default against one meta-trained on the broad distribution.

    python bench/suite_compare.py default=optimizers/pretrained/default broad=runs/broad/learned_optimizer \
        [--split test] [--tasks 4] [--factors 10] [--out docs/suite_compare]

The suite is built around ``digits_mlp`` for every optimizer (8x wider / 2x deeper MLPs than its
widest / deepest, other families), so the rows compare like with like whatever each optimizer was
meta-trained on; ``--split test`` (default) draws tasks no design choice was made on. Writes
``OUT/results.{json,md}`` and ``OUT/ratios.png`` (:func:`meta.generalisation.write_suite_report`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("optimizers", nargs="+", metavar="NAME=PATH", help="learned-optimizer checkpoints")
    p.add_argument("--split", default="test", choices=["held_out", "test"])
    p.add_argument("--tasks", type=int, default=4, help="tasks per group")
    p.add_argument("--factors", default="10", help="long horizons as multiples of H ('' for H only)")
    p.add_argument("--horizon", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("docs/suite_compare"))
    args = p.parse_args(argv)

    import torch

    from meta.generalisation import parse_factors, run_suite, write_suite_report
    from optimizers import checkpoint as ckpt
    from tasks import get_distribution

    opts = {}
    for item in args.optimizers:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"expected NAME=PATH, got {item!r}")
        lopt, theta, _ = ckpt.load_learned_optimizer(path)
        opts[name] = lopt.bind(theta)
    torch.set_num_threads(1)
    t0 = time.time()
    with torch.no_grad():
        res = run_suite(opts, get_distribution("digits_mlp"), args.horizon, tasks_per_group=args.tasks,
                        factors=parse_factors(args.factors), split=args.split)
    res["meta"]["checkpoints"] = dict(item.partition("=")[::2] for item in args.optimizers)
    write_suite_report(res, args.out)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
