"""Named task distributions (presets). ``digits_mlp`` is the embedded default.

Presets that need only embedded or synthetic data (``digits_mlp``, ``digits_mixed``, ``quadratics``,
``regression``, ``sequence``, ``mixed``) work anywhere. ``mnist_mlp``, ``fashion_mnist_mlp`` and
``cifar10_mlp`` read local files (see :mod:`tasks.data`): creating the distribution and sampling its
configs touches no files, building a task raises :class:`tasks.data.DatasetError` if the files are
missing. Their images are downsampled to 8x8 or 16x16 (equal weight) to keep CPU meta-training cheap,
in the spirit of learned_optimization's small image MLP tasks.

``digits_mlp``'s definition must not change: its configs (and thus checkpoints naming its tasks)
depend on exactly this family list and weight.
"""

from __future__ import annotations

from typing import Any, Callable

from tasks.base import TaskConfigError, TaskDistribution


def _image_mlp(name: str, dataset: str) -> Callable[..., TaskDistribution]:
    def make(seed: int = 0) -> TaskDistribution:
        return TaskDistribution(name, [("image_mlp", {"dataset": dataset, "image_size": 8}, 1.0),
                                       ("image_mlp", {"dataset": dataset, "image_size": 16}, 1.0)], seed=seed)

    return make


_DIGITS_MIXED = [
    ("image_mlp", {"dataset": "digits"}, 1.0),
    ("image_conv", {"dataset": "digits"}, 1.0),
    ("regression", {"kinds": ["logistic"], "datasets": ["digits"]}, 0.5),
]
_SYNTHETIC = [
    ("quadratic", {}, 1.0),
    ("regression", {}, 1.0),
    ("tiny_transformer", {}, 1.0),
]

# The broad meta-training distribution: image MLPs of very different widths (4..64) and depths (1..3),
# conv nets, regression, quadratics and the tiny transformer, a quarter of the tasks reparameterised
# (parameter scales 1e-2..1e2) and a tenth with additive gradient noise (tasks/augment.py).
_BROAD = [
    ("image_mlp", {"dataset": "digits", "min_width": 4, "max_width": 64, "min_depth": 1, "max_depth": 3}, 2.0),
    ("image_conv", {"dataset": "digits", "max_channels": 16, "max_depth": 2}, 1.0),
    ("regression", {}, 0.5),
    ("quadratic", {}, 0.5),
    ("tiny_transformer", {}, 0.5),
]
_BROAD_AUGMENT = {"reparam_prob": 0.25, "grad_noise_prob": 0.1}

DISTRIBUTIONS: dict[str, Callable[..., TaskDistribution]] = {
    "digits_mlp": lambda seed=0: TaskDistribution(
        "digits_mlp", [("image_mlp", {"dataset": "digits"}, 1.0)], seed=seed
    ),
    "digits_mixed": lambda seed=0: TaskDistribution("digits_mixed", _DIGITS_MIXED, seed=seed),
    "quadratics": lambda seed=0: TaskDistribution("quadratics", [("quadratic", {}, 1.0)], seed=seed),
    "regression": lambda seed=0: TaskDistribution("regression", [("regression", {}, 1.0)], seed=seed),
    "sequence": lambda seed=0: TaskDistribution("sequence", [("tiny_transformer", {}, 1.0)], seed=seed),
    # everything that needs no files: image nets on digits plus the synthetic families
    "mixed": lambda seed=0: TaskDistribution("mixed", _DIGITS_MIXED + _SYNTHETIC, seed=seed),
    "broad": lambda seed=0: TaskDistribution("broad", _BROAD, seed=seed, augment=dict(_BROAD_AUGMENT)),
    # digits_mlp, plus (meta-training only) meta-training a tiny learned optimizer: the outer job of
    # the recursion in the distribution (tasks/learned_optimizer_task.py); evaluation splits are
    # exactly digits_mlp's
    "digits_mlp_outer": lambda seed=0: TaskDistribution(
        "digits_mlp_outer", [("image_mlp", {"dataset": "digits"}, 1.0)], seed=seed,
        train_families=[("learned_optimizer", {}, 1.0)], train_prob=0.125),
    # digits_mlp with a quarter of the meta_train tasks given additive gradient noise of 0.3x..30x a
    # digits MLP's gradient RMS at init (signal-to-noise ratios down to those of the outer job's
    # meta-gradients); evaluation splits are exactly digits_mlp's
    "digits_mlp_noisy": lambda seed=0: TaskDistribution(
        "digits_mlp_noisy", [("image_mlp", {"dataset": "digits"}, 1.0)], seed=seed,
        train_augment={"grad_noise_prob": 0.25, "grad_noise_range": (1e-2, 1.0)}),
    "mnist_mlp": _image_mlp("mnist_mlp", "mnist"),
    "fashion_mnist_mlp": _image_mlp("fashion_mnist_mlp", "fashion_mnist"),
    "cifar10_mlp": _image_mlp("cifar10_mlp", "cifar10"),
}


def get_distribution(name: str, seed: int = 0, overrides: dict[str, Any] | None = None) -> TaskDistribution:
    """A preset by name. ``overrides`` are merged into every config (e.g. ``{"data_root": ...}``;
    they change the distribution's digest, so prefer ``$OUROBOROS_DATA`` for machine-specific paths)."""
    if name not in DISTRIBUTIONS:
        raise TaskConfigError(f"unknown task distribution {name!r}; known: {sorted(DISTRIBUTIONS)}")
    dist = DISTRIBUTIONS[name](seed=seed)
    if overrides:
        dist.overrides.update(overrides)
    return dist
