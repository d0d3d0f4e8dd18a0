#!/usr/bin/env python
"""The shipped learned optimizer as a new user meets it: ``LearnedOptimizerTorch.from_pretrained`` in
plain ``torch`` training loops written here, on models and data that none of ``tasks/`` builds.

    python bench/drop_in_trial.py                       # 6 tasks x H, 10H x 3 seeds; ~25 min at 1 thread
    python bench/drop_in_trial.py --tasks char_gru,wide_spirals --horizons 200 --seeds 1
    python bench/drop_in_trial.py --checkpoint runs/default/learned_optimizer --out runs/drop_in_trial
    python bench/drop_in_trial.py --tasks char_gru --horizons 2000 --lr 3e-3   # the user's remedy where it fails

Each run trains one model for ``T`` steps of minibatch SGD-style updates (``zero_grad``, ``backward``,
``step``), as a user's loop would, then measures the training loss (first 1,024 training examples) and the
validation loss in eval mode. Baselines: ``torch.optim.Adam`` at its default ``lr=1e-3`` (what a user
tries first) and Adam tuned per task, seed and horizon over the governor's grid (1e-4..1e-1, best final
training loss: an oracle). The learned optimizer gets ``total_steps=T`` and nothing else (its own
learned rate, no tuning). Scores are ``log(L_learned / L_adam)`` of final losses floored at 1e-3 x
the loss at initialisation (the governor's floor; negative: the learned optimizer is better); a run
whose loss goes non-finite counts as diverged and is left out of the means (the count is in the table).

The tasks are out of the meta-training distribution (8x8-digit MLPs of width 16-64) on purpose: a
network 10x wider than any meta-training layer, a recurrent character-level language model (on a fixed
text, ``bench/data/char_corpus.txt``), a convolutional net with batch norm, an autoencoder, a small
regression MLP and a convex problem. Writes ``OUT/results.json`` and ``OUT/results.md``.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from meta import stats  # noqa: E402
from optimizers import LearnedOptimizerTorch  # noqa: E402
from tasks.data import get_dataset  # noqa: E402

ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the governor's (meta.config GovernorConfig.adam_lrs)
# the language model's text: a fixed snapshot (this repository's README at commit 734106f), so that every run
# reads the same characters whatever the README says today
CORPUS = ROOT / "bench" / "data" / "char_corpus.txt"
TASKS = ("logreg_synth", "sine_regression", "digits_autoencoder", "digits_bn_cnn", "char_gru", "wide_spirals")


def _spirals(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.rand(n, generator=g) * 3 * math.pi + 0.5
    cls = torch.randint(0, 2, (n,), generator=g)
    r = t / (3 * math.pi)
    x = torch.stack([r * torch.cos(t + math.pi * cls), r * torch.sin(t + math.pi * cls)], 1)
    return x + 0.02 * torch.randn(n, 2, generator=g), cls


class CharGRU(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed, self.rnn = nn.Embedding(vocab, 32), nn.GRU(32, 128, batch_first=True)
        self.out = nn.Linear(128, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.embed(x))[0])


def _sequence_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@functools.lru_cache(maxsize=1)
def _char_windows(length: int = 48) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(inputs, next-character targets, vocabulary size): :data:`CORPUS` cut into windows of ``length``."""
    text = CORPUS.read_text(encoding="utf8")
    index = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([index[c] for c in text])
    n = (len(ids) - 1) // length
    return ids[:n * length].view(n, length), ids[1:n * length + 1].view(n, length), len(index)


def make_task(name: str, seed: int) -> tuple[nn.Module, Callable, tuple[torch.Tensor, ...], int]:
    """(model, loss_fn, (x_train, y_train, x_valid, y_valid), batch size); the model's initialisation and
    the data depend on ``seed`` only."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "logreg_synth":  # convex: logistic regression on 50 Gaussian features
        w = torch.randn(50, generator=g)
        x, xv = torch.randn(2048, 50, generator=g), torch.randn(1024, 50, generator=g)
        y = (x @ w + 0.5 * torch.randn(2048, generator=g) > 0).long()
        return nn.Linear(50, 2), F.cross_entropy, (x, y, xv, (xv @ w > 0).long()), 128
    if name == "sine_regression":  # 1-d regression, tanh MLP, noisy targets
        x, xv = torch.rand(1024, 1, generator=g) * 6 - 3, torch.rand(512, 1, generator=g) * 6 - 3
        y = torch.sin(3 * x) + 0.1 * torch.randn(1024, 1, generator=g)
        model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        return model, F.mse_loss, (x, y, xv, torch.sin(3 * xv)), 64
    if name in ("digits_autoencoder", "digits_bn_cnn"):
        d = get_dataset("digits")  # the embedded 8x8 digits (cached)
        if name == "digits_autoencoder":  # reconstruction (MSE) through an 8-wide bottleneck
            x, xv = d.x_train.flatten(1), d.x_valid.flatten(1)
            model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32),
                                  nn.ReLU(), nn.Linear(32, 64))
            return model, F.mse_loss, (x, x, xv, xv), 64
        model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                              nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        return model, F.cross_entropy, (d.x_train, d.y_train, d.x_valid, d.y_valid), 64
    if name == "char_gru":  # next-character prediction on :data:`CORPUS`, 48-character windows
        xs, ys, vocab = _char_windows()
        perm = torch.randperm(len(xs), generator=g)
        nv = len(xs) // 10
        return CharGRU(vocab), _sequence_ce, (xs[perm[nv:]], ys[perm[nv:]], xs[perm[:nv]], ys[perm[:nv]]), 32
    if name == "wide_spirals":  # two spirals, ReLU MLP 640 wide: 10x the widest meta-training layer
        x, y = _spirals(2048, g)
        xv, yv = _spirals(1024, g)
        model = nn.Sequential(nn.Linear(2, 640), nn.ReLU(), nn.Linear(640, 640), nn.ReLU(), nn.Linear(640, 2))
        return model, F.cross_entropy, (x, y, xv, yv), 128
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")


def _losses(model: nn.Module, loss_fn: Callable, data: tuple[torch.Tensor, ...]) -> tuple[float, float]:
    x, y, xv, yv = data
    model.eval()
    with torch.no_grad():
        return float(loss_fn(model(x[:1024]), y[:1024])), float(loss_fn(model(xv), yv))


def initial_losses(name: str, seed: int) -> tuple[float, float]:
    """(training, validation) loss at initialisation (the same for every optimizer of a seed)."""
    model, loss_fn, data, _ = make_task(name, seed)
    return _losses(model, loss_fn, data)


def train(name: str, seed: int, steps: int, make_opt: Callable) -> tuple[float, float]:
    """Final (training, validation) loss of one run; (inf, inf) if a loss went non-finite."""
    model, loss_fn, data, batch = make_task(name, seed)
    x, y = data[:2]
    opt = make_opt(model.parameters(), steps)
    g = torch.Generator().manual_seed(seed + 1000)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(x), (batch,), generator=g)
        loss = loss_fn(model(x[i]), y[i])
        if not torch.isfinite(loss):
            return math.inf, math.inf
        opt.zero_grad()
        loss.backward()
        opt.step()
    tr, va = _losses(model, loss_fn, data)
    return (tr, va) if math.isfinite(tr) and math.isfinite(va) else (math.inf, math.inf)


FLOOR = 1e-3  # losses floored at FLOOR x the loss at initialisation, as the governor's scores are


def _log_ratio(a: float, b: float, initial: float) -> float | None:
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    floor = FLOOR * initial
    return math.log(max(a, floor) / max(b, floor))


def _summary(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) < 2:
        return f"{vals[0]:+.3f}"
    ci = stats.mean_ci(vals, 0.95, "t")
    return f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"


def write_report(rows: list[dict], out: Path, checkpoint: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"checkpoint": checkpoint, "runs": rows}, indent=1))
    lines = [f"# Drop-in trial: `{checkpoint}` vs Adam on tasks outside `tasks/`", "",
             "Regenerate: `python bench/drop_in_trial.py` (see its docstring). Mean over seeds of "
             "`log(L_learned / L_adam)` (final losses floored at 1e-3 x the loss at initialisation, as the governor's "
             "scores; negative: the learned optimizer is better), "
             "95% t-interval over seeds; `div`: runs whose loss went non-finite (learned / tuned Adam).", "",
             "| task | T | vs tuned Adam, train | vs tuned Adam, valid | vs Adam 1e-3, train | vs Adam 1e-3, valid "
             "| tuned Adam's lr | div |", "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["task"], r["T"]) for r in rows}, key=lambda k: (TASKS.index(k[0]) if k[0] in TASKS else 99, k[1]))
    for task, T in keys:
        rs = [r for r in rows if r["task"] == task and r["T"] == T]

        def col(ref: str, i: int) -> str:  # i: 0 training, 1 validation loss
            return _summary([_log_ratio(r["learned"][i], r[ref][i], r["initial"][i]) for r in rs])

        def diverged(key: str) -> int:
            return sum(not math.isfinite(r[key][0]) for r in rs)

        lrs = ", ".join(f"{r['tuned_lr']:g}" for r in rs)
        div = f"{diverged('learned')} / {diverged('adam_tuned')}"
        lines.append(f"| {task} | {T} | {col('adam_tuned', 0)} | {col('adam_tuned', 1)} | {col('adam_default', 0)} "
                     f"| {col('adam_default', 1)} | {lrs} | {div} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, from: " + ", ".join(TASKS))
    p.add_argument("--horizons", default="200,2000", help="comma-separated run lengths T")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per task and horizon")
    p.add_argument("--checkpoint", default="default",
                   help="a shipped name (from_pretrained) or a checkpoint directory (from_checkpoint)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "drop_in_trial")
    p.add_argument("--lr", type=float, default=None,
                   help="the learned optimizer's lr (Adam units; default: its own learned rate)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    tasks = [t for t in args.tasks.split(",") if t]
    for t in tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    horizons = [int(h) for h in args.horizons.split(",") if h]
    if args.seeds < 1 or not horizons or min(horizons) < 1:
        p.error("--seeds and every horizon must be positive")
    torch.set_num_threads(args.threads)

    if args.lr is not None and args.lr <= 0:
        p.error("--lr must be positive")
    extra = {} if args.lr is None else {"lr": args.lr}

    def learned(params, steps):
        if Path(args.checkpoint).is_dir():
            return LearnedOptimizerTorch.from_checkpoint(params, args.checkpoint, total_steps=steps, **extra)
        return LearnedOptimizerTorch.from_pretrained(args.checkpoint, params, total_steps=steps, **extra)

    rows = []
    for task, T, seed in itertools.product(tasks, horizons, range(args.seeds)):
        t0 = time.time()
        adam = {lr: train(task, seed, T, lambda ps, _, lr=lr: torch.optim.Adam(ps, lr=lr)) for lr in ADAM_GRID}
        finite = [lr for lr in ADAM_GRID if math.isfinite(adam[lr][0])]
        best = min(finite, key=lambda lr: adam[lr][0]) if finite else ADAM_GRID[0]
        row = dict(task=task, T=T, seed=seed, learned=train(task, seed, T, learned), adam_tuned=adam[best],
                   tuned_lr=best, initial=initial_losses(task, seed), adam_default=adam[1e-3],
                   adam_all={f"{lr:g}": adam[lr] for lr in ADAM_GRID})
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"{task} T={T} seed={seed}: learned {row['learned'][0]:.4g} / {row['learned'][1]:.4g}, tuned Adam "
              f"({best:g}) {row['adam_tuned'][0]:.4g} / {row['adam_tuned'][1]:.4g}, Adam 1e-3 "
              f"{row['adam_default'][0]:.4g} / {row['adam_default'][1]:.4g}  [{row['seconds']} s]", flush=True)
        write_report(rows, args.out, args.checkpoint + ("" if args.lr is None else f" at lr={args.lr:g}"))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
