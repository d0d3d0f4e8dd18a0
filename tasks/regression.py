"""Linear and logistic regression (family ``regression``).

Convex problems with known structure are the cheapest way to show a learned optimizer ill-conditioned
curvature: the feature covariance has a chosen condition number, so the same family spans easy and
hard problems. Config key ``kind`` picks the model:

* ``"linear"``: least squares ``0.5 * mean((x @ w + b - y)^2)`` on a synthetic dataset.
* ``"logistic"``: softmax regression, on ``dataset: "synthetic"`` (a random teacher) or on an image
  dataset (``"digits"``, ``"mnist"``, ...; then it is an :class:`ImageClassificationTask`).

Synthetic data is generated at build time from ``data_seed`` (default: the task ``seed``), so a config
fully determines its dataset. Features are ``z * sqrt(spectrum) @ Q`` with ``z`` standard normal, a
log-spaced ``spectrum`` from 1 down to ``1 / condition`` rescaled to mean 1 (so ``trace = dim``), and
``Q`` a random rotation (features are correlated; no coordinate is special).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from optimizers.tree import Params
from tasks.base import (Batch, Task, TaskConfig, TaskConfigError, TaskFamily, choice, log_int, log_uniform,
                        register_family, seeded)
from tasks.image_mlp import ImageClassificationTask
from tasks.validation import cfg_choice, cfg_float, cfg_int, data_split

KINDS = ("linear", "logistic")


def conditioned_features(g: torch.Generator, n: int, dim: int, condition: float, rotation: Tensor) -> Tensor:
    """``n`` samples with covariance ``Q^T diag(spectrum) Q``; spectrum log-spaced, mean 1."""
    spectrum = torch.logspace(0.0, -math.log10(condition), dim) if dim > 1 else torch.ones(1)
    spectrum = spectrum * (dim / spectrum.sum())
    return (torch.randn(n, dim, generator=g) * spectrum.sqrt()) @ rotation


def random_rotation(g: torch.Generator, dim: int) -> Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign fix)."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


class _SyntheticTask(Task):
    """Shared fixed-dataset handling: config parsing, data generation, batching."""

    def __init__(self, config: TaskConfig):
        self.config = dict(config)
        self.dim = cfg_int(config, "dim", 16, lo=1, hi=4096)
        self.condition = cfg_float(config, "condition", 10.0, lo=1.0, hi=1e8)
        self.batch_size = cfg_int(config, "batch_size", 64, lo=1)
        self.init_scale = cfg_float(config, "init_scale", 0.5, lo=0.0)
        self.n_train = cfg_int(config, "n_train", 1024, lo=1, hi=1_000_000)
        self.n_valid = cfg_int(config, "n_valid", 512, lo=1, hi=1_000_000)
        self.data_seed = cfg_int(config, "data_seed", self.seed)
        g = seeded("regression-data", self.data_seed)
        rotation = random_rotation(g, self.dim)
        x = conditioned_features(g, self.n_train + self.n_valid, self.dim, self.condition, rotation)
        y = self.targets(g, x)
        self.x_train, self.x_valid = x[: self.n_train], x[self.n_train:]
        self.y_train, self.y_valid = y[: self.n_train], y[self.n_train:]

    def targets(self, g: torch.Generator, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        x, y = self.full_batch(split)
        idx = torch.randint(len(x), (self.batch_size,), generator=generator)
        return x[idx], y[idx]

    def full_batch(self, split: str) -> Batch:
        if data_split(split) == "train":
            return self.x_train, self.y_train
        return self.x_valid, self.y_valid


class LinearRegressionTask(_SyntheticTask):
    """Least squares; targets ``x @ w* + noise * eps`` rescaled to unit variance on the train split."""

    def __init__(self, config: TaskConfig):
        self.noise = cfg_float(config, "noise", 0.1, lo=0.0, hi=100.0)
        super().__init__(config)

    def targets(self, g: torch.Generator, x: Tensor) -> Tensor:
        w_star = torch.randn(self.dim, generator=g) / math.sqrt(self.dim)
        y = x @ w_star + self.noise * torch.randn(len(x), generator=g)
        return y / y[: self.n_train].std().clamp_min(1e-6)

    def init(self, generator: torch.Generator) -> Params:
        return {"w": torch.randn(self.dim, generator=generator) * (self.init_scale / math.sqrt(self.dim)),
                "b": torch.zeros(())}

    def loss(self, params: Params, batch: Batch) -> Tensor:
        x, y = batch
        return 0.5 * ((x @ params["w"] + params["b"] - y) ** 2).mean()

    @property
    def max_loss(self) -> float:
        # Expected loss at initialisation is 0.5 * (var(y) + init_scale^2) = 0.5 * (1 + s^2) since the
        # features have trace-normalised covariance; 1.5x that (as 1.5 * log K for classifiers).
        return 1.5 * 0.5 * (1.0 + self.init_scale**2)


class LogisticRegressionTask(_SyntheticTask):
    """Softmax regression; labels sampled from a random linear teacher ``softmax(snr * x @ W*)``."""

    def __init__(self, config: TaskConfig):
        self.num_classes = cfg_int(config, "num_classes", 2, lo=2, hi=1000)
        self.snr = cfg_float(config, "snr", 3.0, lo=0.0, hi=1e3)
        super().__init__(config)

    def targets(self, g: torch.Generator, x: Tensor) -> Tensor:
        w_star = torch.randn(self.dim, self.num_classes, generator=g) / math.sqrt(self.dim)
        probs = torch.softmax(self.snr * (x @ w_star), dim=-1)
        return torch.multinomial(probs, 1, generator=g).squeeze(-1)

    def init(self, generator: torch.Generator) -> Params:
        return {"w": torch.randn(self.dim, self.num_classes, generator=generator)
                * (self.init_scale / math.sqrt(self.dim)),
                "b": torch.zeros(self.num_classes)}

    def loss(self, params: Params, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(x @ params["w"] + params["b"], y)

    @property
    def max_loss(self) -> float:
        return 1.5 * math.log(self.num_classes)


class ImageLogisticTask(ImageClassificationTask):
    """Softmax regression on flattened images (``image_mlp`` without hidden layers)."""

    def init(self, generator: torch.Generator) -> Params:
        c, h, w = self.data.image_shape
        d = c * h * w
        return {"w": torch.randn(d, self.data.num_classes, generator=generator) * (self.init_scale / math.sqrt(d)),
                "b": torch.zeros(self.data.num_classes)}

    def logits(self, params: Params, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


@register_family("regression")
class RegressionFamily(TaskFamily):
    """Linear regression (synthetic) and logistic regression (synthetic or image datasets).

    ``datasets`` applies to logistic regression only (linear regression is always synthetic)."""

    def __init__(self, kinds=KINDS, datasets=("synthetic",), min_dim: int = 2, max_dim: int = 64,
                 condition=(1.0, 1e3), noise=(0.01, 1.0), snr=(1.0, 10.0), num_classes=(2, 10),
                 batch_sizes=(16, 32, 64, 128), init_scale=(0.1, 1.0), image_size: int | None = None):
        for k in kinds:
            if k not in KINDS:
                raise TaskConfigError(f"regression kind must be one of {list(KINDS)}, got {k!r}")
        self.kinds, self.datasets = tuple(kinds), tuple(datasets)
        self.dim, self.condition, self.noise, self.snr = (min_dim, max_dim), condition, noise, snr
        self.num_classes, self.batch_sizes, self.init_scale = num_classes, tuple(batch_sizes), init_scale
        self.image_size = image_size

    def sample(self, g: torch.Generator) -> TaskConfig:
        kind = choice(g, self.kinds)
        cfg: TaskConfig = {"kind": kind}
        dataset = "synthetic" if kind == "linear" else choice(g, self.datasets)
        cfg["dataset"] = dataset
        if dataset == "synthetic":
            cfg["dim"] = log_int(g, *self.dim)
            cfg["condition"] = round(log_uniform(g, *self.condition), 4)
            if kind == "linear":
                cfg["noise"] = round(log_uniform(g, *self.noise), 4)
            else:
                cfg["num_classes"] = int(torch.randint(self.num_classes[0], self.num_classes[1] + 1, (),
                                                       generator=g))
                cfg["snr"] = round(log_uniform(g, *self.snr), 4)
        elif self.image_size is not None:
            cfg["image_size"] = self.image_size
        cfg["batch_size"] = int(choice(g, self.batch_sizes))
        cfg["init_scale"] = round(log_uniform(g, *self.init_scale), 4)
        return cfg

    def build(self, config: TaskConfig) -> Task:
        kind = cfg_choice(config, "kind", None, KINDS)
        dataset = config.get("dataset", "synthetic")
        if kind == "linear":
            if dataset != "synthetic":
                raise TaskConfigError(f"regression config key 'dataset' must be 'synthetic' for linear "
                                      f"regression, got {dataset!r}")
            return LinearRegressionTask(config)
        if dataset == "synthetic":
            return LogisticRegressionTask(config)
        return ImageLogisticTask(config)
