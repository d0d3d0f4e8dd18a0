"""Noisy quadratics (family ``quadratic``): the noisy quadratic model of Zhang et al. (2019).

``loss(x, z) = 0.5 * sum_i h_i * ((Q (x - c))_i - s_i z_i)^2`` with curvatures ``h`` (the spectrum),
centre ``c``, an optional random rotation ``Q`` (identity when ``rotate`` is false, giving the separable
``0.5 * sum h_i (x_i - c_i)^2``) and the batch ``z ~ N(0, I / batch_size)``. With
``s_i = noise / sqrt(h_i)`` the gradient noise in eigen-coordinate ``i`` has standard deviation
``noise * sqrt(h_i / batch_size)``: noise proportional to curvature, as for minibatch gradients near a
minimum. The loss is never negative (important for the log meta-loss).

The ``valid`` split has no noise (``z = 0``): it measures the noise-free objective, whose minimum 0 is
at ``x = c``. Config keys: ``dim`` (2..100 by default), ``condition`` (``h_max / h_min``, ``h_max = 1``),
``spectrum`` (``"logspace"``, ``"linspace"`` or ``"random"`` log-uniform draws with both ends pinned),
``rotate``, ``noise``, ``batch_size``, ``init_scale`` (``x0 ~ N(0, init_scale^2 I)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from optimizers.tree import Params
from tasks.base import Batch, Task, TaskConfig, TaskFamily, choice, log_int, log_uniform, register_family, seeded
from tasks.regression import random_rotation
from tasks.validation import cfg_bool, cfg_choice, cfg_float, cfg_int, data_split

SPECTRA = ("logspace", "linspace", "random")


def curvature_spectrum(kind: str, dim: int, condition: float, g: torch.Generator) -> Tensor:
    """``dim`` curvatures in ``[1 / condition, 1]``, largest first; both ends are always present."""
    if dim == 1:
        return torch.ones(1)
    if kind == "logspace":
        return torch.logspace(0.0, -math.log10(condition), dim)
    if kind == "linspace":
        return torch.linspace(1.0, 1.0 / condition, dim)
    inner = torch.exp(-math.log(condition) * torch.rand(dim - 2, generator=g)).sort(descending=True).values
    return torch.cat([torch.ones(1), inner, torch.full((1,), 1.0 / condition)])


class QuadraticTask(Task):
    def __init__(self, config: TaskConfig):
        self.config = dict(config)
        self.dim = cfg_int(config, "dim", 10, lo=1, hi=100_000)
        self.condition = cfg_float(config, "condition", 10.0, lo=1.0, hi=1e12)
        self.spectrum = cfg_choice(config, "spectrum", "logspace", SPECTRA)
        self.rotate = cfg_bool(config, "rotate", False)
        self.noise = cfg_float(config, "noise", 0.1, lo=0.0, hi=1e3)
        self.batch_size = cfg_int(config, "batch_size", 32, lo=1)
        self.init_scale = cfg_float(config, "init_scale", 1.0, lo=0.0)
        g = seeded("quadratic", self.seed)
        self.h = curvature_spectrum(self.spectrum, self.dim, self.condition, g)
        self.center = torch.randn(self.dim, generator=g)
        self.rotation = random_rotation(g, self.dim) if self.rotate else None
        self.noise_scale = self.noise / self.h.sqrt()  # s_i

    def init(self, generator: torch.Generator) -> Params:
        return {"x": torch.randn(self.dim, generator=generator) * self.init_scale}

    def loss(self, params: Params, batch: Batch) -> Tensor:
        (z,) = batch
        r = params["x"] - self.center
        if self.rotation is not None:  # a config constant, not a tensor: fine under vmap/grad
            r = self.rotation @ r
        return 0.5 * (self.h * (r - self.noise_scale * z) ** 2).sum()

    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        if data_split(split) == "valid":
            return (torch.zeros(self.dim),)
        return (torch.randn(self.dim, generator=generator) / math.sqrt(self.batch_size),)

    def full_batch(self, split: str) -> Batch:
        # Train: the expected loss differs from the noise-free loss only by a constant, so the
        # noise-free batch is the natural fixed evaluation batch for both splits.
        data_split(split)
        return (torch.zeros(self.dim),)

    @property
    def max_loss(self) -> float:
        """Twice the expected loss at initialisation (training that ends above it has failed).

        ``E[loss(x0, z)] = 0.5 * sum h_i (init_scale^2 + (Q c)_i^2) + 0.5 * dim * noise^2 / batch``;
        twice (not 1.5x as for classifiers) because with few dimensions one draw of ``x0`` varies a lot
        around that mean."""
        qc = self.center if self.rotation is None else self.rotation @ self.center
        expected = 0.5 * float((self.h * (self.init_scale**2 + qc**2)).sum())
        expected += 0.5 * self.dim * self.noise**2 / self.batch_size
        return 2.0 * max(expected, 1e-6)


@register_family("quadratic")
class QuadraticFamily(TaskFamily):
    """Dimension log-int in [min_dim, max_dim]; condition, noise and init scale log-uniform."""

    def __init__(self, min_dim: int = 2, max_dim: int = 100, condition=(1.0, 1e4), spectra=SPECTRA,
                 rotate=(False, True), noise=(0.01, 1.0), batch_sizes=(1, 8, 32, 128),
                 init_scale=(0.3, 3.0)):
        self.dims, self.condition = (min_dim, max_dim), condition
        self.spectra, self.rotate = tuple(spectra), tuple(rotate)
        self.noise, self.batch_sizes, self.init_scale = noise, tuple(batch_sizes), init_scale

    def sample(self, g: torch.Generator) -> TaskConfig:
        return {
            "dim": log_int(g, *self.dims),
            "condition": round(log_uniform(g, *self.condition), 4),
            "spectrum": choice(g, self.spectra),
            "rotate": bool(choice(g, self.rotate)),
            "noise": round(log_uniform(g, *self.noise), 5),
            "batch_size": int(choice(g, self.batch_sizes)),
            "init_scale": round(log_uniform(g, *self.init_scale), 4),
        }

    def build(self, config: TaskConfig) -> QuadraticTask:
        return QuadraticTask(config)
