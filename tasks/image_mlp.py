"""MLP classifiers on image data: the embedded default family.

:class:`ImageClassificationTask` holds what every image classifier shares (dataset loading from the
config's ``dataset``/``data_root``/``image_size``/``max_examples`` keys, batching, the
``1.5 * log(num_classes)`` loss cap); subclasses only define ``init`` and ``logits``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from optimizers.tree import Params
from tasks.base import Batch, Task, TaskConfig, TaskConfigError, TaskFamily, choice, log_int, log_uniform, register_family
from tasks.data import get_dataset

ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu}


class ImageClassificationTask(Task):
    """Shared data handling for image classifiers (MLP and conv)."""

    def __init__(self, config: TaskConfig):
        self.config = dict(config)
        try:
            self.data = get_dataset(
                config.get("dataset", "digits"), config.get("data_root"), config.get("image_size"),
                config.get("max_examples"),
            )
        except (TypeError, ValueError) as e:  # unhashable/odd config values (DatasetError passes)
            raise TaskConfigError(f"bad dataset settings in {config}: {e}") from e
        self.batch_size = int(config.get("batch_size", 64))
        if self.batch_size < 1:
            raise TaskConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        self.init_scale = float(config.get("init_scale", 1.0))

    @property
    def max_loss(self) -> float:
        return 1.5 * math.log(self.data.num_classes)

    def sample_batch(self, split: str, generator: torch.Generator) -> Batch:
        x, y = self.data.split(split)
        idx = torch.randint(len(x), (self.batch_size,), generator=generator)
        return x[idx], y[idx]

    def full_batch(self, split: str) -> Batch:
        return self.data.split(split)

    def accuracy(self, params: Params, batch: Batch) -> Tensor:
        return (self.logits(params, batch[0]).argmax(-1) == batch[1]).float().mean()

    def logits(self, params: Params, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, params: Params, batch: Batch) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.logits(params, x), y)


class ImageMLPTask(ImageClassificationTask):
    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.hidden = [int(h) for h in config.get("hidden", [32])]
        act = config.get("activation", "relu")
        if act not in ACTIVATIONS:
            raise TaskConfigError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
        self.act = ACTIVATIONS[act]
        c, h, w = self.data.image_shape
        self.sizes = [c * h * w, *self.hidden, self.data.num_classes]

    def batch_key(self) -> tuple:
        """Layer sizes, activation, batch and image shape, class count (the loss cap): everything the
        loss reads besides ``params`` and the batch's data."""
        return ("image_mlp", tuple(self.sizes), self.config.get("activation", "relu"), self.batch_size,
                tuple(self.data.image_shape), self.data.num_classes)

    def init(self, generator: torch.Generator) -> Params:
        params: Params = {}
        for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            params[f"l{i}.w"] = torch.randn(a, b, generator=generator) * (self.init_scale / math.sqrt(a))
            params[f"l{i}.b"] = torch.zeros(b)
        return params

    def logits(self, params: Params, x: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], -1)
        n = len(self.sizes) - 1
        for i in range(n):
            h = h @ params[f"l{i}.w"] + params[f"l{i}.b"]
            if i < n - 1:
                h = self.act(h)
        return h


@register_family("image_mlp")
class ImageMLPFamily(TaskFamily):
    """Hidden width log-int in [min_width, max_width], depth in [min_depth, max_depth]."""

    def __init__(self, dataset: str = "digits", min_width: int = 16, max_width: int = 64,
                 min_depth: int = 1, max_depth: int = 2, activations=("relu", "tanh", "gelu"),
                 batch_sizes=(32, 64, 128), init_scale=(0.5, 2.0), image_size: int | None = None):
        self.kw = dict(dataset=dataset, image_size=image_size)
        self.width = (min_width, max_width)
        self.depth = (min_depth, max_depth)
        self.activations = tuple(activations)
        self.batch_sizes = tuple(batch_sizes)
        self.init_scale = tuple(init_scale)

    def sample(self, g: torch.Generator) -> TaskConfig:
        depth = int(torch.randint(self.depth[0], self.depth[1] + 1, (), generator=g))
        width = log_int(g, *self.width)
        return {
            **{k: v for k, v in self.kw.items() if v is not None},
            "hidden": [width] * depth,
            "activation": choice(g, self.activations),
            "batch_size": int(choice(g, self.batch_sizes)),
            "init_scale": round(log_uniform(g, *self.init_scale), 4),
        }

    def build(self, config: TaskConfig) -> Task:
        return ImageMLPTask(config)
