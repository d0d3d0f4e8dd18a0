"""Worker for tests/test_distributed.py: the same computation with or without a process group.

``python -m torch.distributed.run --nproc-per-node 2 tests/_distributed_worker.py OUT`` runs it sharded
over 2 gloo processes; ``compute()`` called in the test process is the single-process reference.
Each rank writes ``OUT/rank{r}.pt`` (its view of every result) so the test can check the ranks agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

K_STEPS = 3
CASES = {  # case -> (estimator, population, overrides); 3: uneven shards 2 + 1; 4: 2 + 2, another summation order
    "tbptt": ("tbptt", 3, {}),
    "pes": ("pes", 4, {}),
    # curated task sampling: every rank must fold the same episodes into the same statistics and draw
    # the same tasks (refreshed every step here, so a divergence would show at once)
    "curated": ("tbptt", 3, {"meta.curation": "trailing", "meta.curation_every": 1}),
}


class RecordingOuter:
    """Adam that records the (clipped) meta-gradient it is given at every outer step."""

    def __init__(self, inner):
        self.inner, self.grads = inner, []

    def init(self, params):
        return self.inner.init(params)

    def update(self, grads, state, params, **kw):
        self.grads.append({k: v.detach().clone() for k, v in grads.items()})
        return self.inner.update(grads, state, params, **kw)


def config(case: str, out_dir: str):
    from meta.config import RunConfig, apply_overrides

    estimator, population, over = CASES[case]
    return apply_overrides(RunConfig(), {
        "meta.estimator": estimator, "meta.population": population, "meta.truncation": 3,
        "meta.horizon": 5, "meta.outer_steps": K_STEPS, "lo.hidden_width": 8, "lo.hidden_layers": 1,
        "out_dir": out_dir, "wandb": "disabled", "meta.distribution": "quadratics", **over,
    })


def compute(out_dir: str) -> dict:
    from meta import distributed as D
    from meta.evaluate import evaluate
    from meta.trainer import MetaTrainer
    from optimizers.hand import Adam
    from optimizers.learned import LearnedOptimizer, LOConfig
    from tasks import get_distribution

    res: dict = {"rank": D.rank(), "world": D.world_size(), "out_dir": out_dir}
    for est in CASES:
        cfg = config(est, f"{out_dir}/{est}")
        outer = RecordingOuter(Adam(lr=cfg.meta.outer_lr))
        tr = MetaTrainer(cfg, outer=outer)
        metrics = [tr.train_step() for _ in range(K_STEPS)]
        tr.save()
        again = MetaTrainer.load(tr.checkpoint_path)  # resume under this number of processes
        res[est] = {"grads": outer.grads, "theta": tr.theta, "member_ids": tr.member_ids,
                    "meta_loss": [m["meta_loss"] for m in metrics],
                    "members_used": [m["members_used"] for m in metrics],
                    "member_scalars": tr.member_scalars(),  # collective: every member on every rank
                    "reloaded_theta": again.theta,
                    "reloaded_members": [m is not None for m in again.est_state.members]}
        if tr.sampler.curated:  # the sampler's statistics and task history, and their restored copy
            res[est]["sampler"] = {k: getattr(tr.sampler, k) for k in ("progress", "counts", "probs", "history")}
            res[est]["reloaded_sampler"] = {k: getattr(again.sampler, k) for k in ("progress", "counts", "probs",
                                                                                   "history")}
    lopt = LearnedOptimizer(LOConfig(hidden_width=8, hidden_layers=1))
    theta = lopt.init_theta(0)
    with torch.no_grad():
        ev = evaluate({"learned": lopt.bind(theta)}, get_distribution("quadratics"), num_tasks=3, horizon=4,
                      long_horizon=8, adam_lrs=(1e-2, 1e-1), sgdm_lrs=(1e-2,), progress=False, workers=1)
    res["evaluate"] = ev.to_json()
    return res


def main() -> None:
    from meta import distributed as D

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    D.init()
    try:
        res = compute(str(out))
        torch.save(res, out / f"rank{D.rank()}.pt")
        D.barrier()
    finally:
        D.shutdown()


if __name__ == "__main__":
    main()
