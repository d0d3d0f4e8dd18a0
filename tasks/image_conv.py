"""Small convolutional classifiers on image data (family ``image_conv``).

Conv nets give a learned optimizer parameter tensors with a different shape and gradient statistics
than MLPs (4-d kernels with weight sharing, small fan-in), which is why they belong in a training
distribution even at toy scale. Everything is written with ``torch.nn.functional.conv2d`` on
parameters taken from the dict, so ``torch.func.grad``/``vmap`` apply unchanged.

Config keys (beyond the dataset keys of :class:`ImageClassificationTask`):

* ``channels``: output channels per 3x3 conv layer (1-4 layers, each 1..256).
* ``downsample``: ``"stride"`` (stride-2 convs), ``"avgpool"`` or ``"maxpool"`` (2x2 pool after each
  conv); downsampling stops once the feature map is 1x1, so deep nets on 8x8 images stay valid.
* ``activation``, ``batch_size``, ``init_scale`` as for ``image_mlp``.

The head flattens the last feature map into a linear classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from optimizers.tree import Params
from tasks.base import TaskConfig, TaskFamily, choice, log_int, log_uniform, register_family
from tasks.image_mlp import ACTIVATIONS, ImageClassificationTask
from tasks.validation import cfg_choice, cfg_int_list

DOWNSAMPLE = ("stride", "avgpool", "maxpool")


class ImageConvTask(ImageClassificationTask):
    def __init__(self, config: TaskConfig):
        super().__init__(config)
        self.channels = cfg_int_list(config, "channels", [16], lo=1, hi=256, min_len=1, max_len=4)
        self.act = ACTIVATIONS[cfg_choice(config, "activation", "relu", sorted(ACTIVATIONS))]
        self.downsample = cfg_choice(config, "downsample", "stride", DOWNSAMPLE)
        c, h, w = self.data.image_shape
        # Static plan (Python ints only), so logits() has no shape-dependent control flow at trace time.
        self.plan: list[tuple[int, int, bool]] = []  # (stride, in_channels, pool?) per layer
        for out in self.channels:
            shrink = min(h, w) >= 2
            if self.downsample == "stride":
                self.plan.append((2 if shrink else 1, c, False))
                h, w = ((h - 1) // 2 + 1, (w - 1) // 2 + 1) if shrink else (h, w)
            else:
                self.plan.append((1, c, shrink))
                h, w = (h // 2, w // 2) if shrink else (h, w)
            c = out
        self.features = c * h * w

    def batch_key(self) -> tuple:
        """Channels, activation, downsampling, batch and image shape, class count: what the loss reads
        besides ``params`` and the batch's data (the layer plan follows from them)."""
        act = self.config.get("activation", "relu")
        return ("image_conv", tuple(self.channels), act, self.downsample, self.batch_size,
                tuple(self.data.image_shape), self.data.num_classes)

    def init(self, generator: torch.Generator) -> Params:
        params: Params = {}
        for i, ((_, cin, _), cout) in enumerate(zip(self.plan, self.channels)):
            fan_in = cin * 9
            params[f"c{i}.w"] = torch.randn(cout, cin, 3, 3, generator=generator) * (
                self.init_scale / math.sqrt(fan_in))
            params[f"c{i}.b"] = torch.zeros(cout)
        params["head.w"] = torch.randn(self.features, self.data.num_classes, generator=generator) * (
            self.init_scale / math.sqrt(self.features))
        params["head.b"] = torch.zeros(self.data.num_classes)
        return params

    def logits(self, params: Params, x: Tensor) -> Tensor:
        h = x
        for i, (stride, _, pool) in enumerate(self.plan):
            h = self.act(F.conv2d(h, params[f"c{i}.w"], params[f"c{i}.b"], stride=stride, padding=1))
            if pool:
                h = F.avg_pool2d(h, 2) if self.downsample == "avgpool" else F.max_pool2d(h, 2)
        return h.reshape(h.shape[0], -1) @ params["head.w"] + params["head.b"]


@register_family("image_conv")
class ImageConvFamily(TaskFamily):
    """1..3 conv layers with channels log-int in [min_channels, max_channels] each."""

    def __init__(self, dataset: str = "digits", min_channels: int = 4, max_channels: int = 32,
                 min_depth: int = 1, max_depth: int = 3, activations=("relu", "tanh", "gelu"),
                 downsample=DOWNSAMPLE, batch_sizes=(32, 64, 128), init_scale=(0.5, 2.0),
                 image_size: int | None = None):
        self.kw = dict(dataset=dataset, image_size=image_size)
        self.channels = (min_channels, max_channels)
        self.depth = (min_depth, max_depth)
        self.activations = tuple(activations)
        self.downsample = tuple(downsample)
        self.batch_sizes = tuple(batch_sizes)
        self.init_scale = tuple(init_scale)

    def sample(self, g: torch.Generator) -> TaskConfig:
        depth = int(torch.randint(self.depth[0], self.depth[1] + 1, (), generator=g))
        return {
            **{k: v for k, v in self.kw.items() if v is not None},
            "channels": [log_int(g, *self.channels) for _ in range(depth)],
            "activation": choice(g, self.activations),
            "downsample": choice(g, self.downsample),
            "batch_size": int(choice(g, self.batch_sizes)),
            "init_scale": round(log_uniform(g, *self.init_scale), 4),
        }

    def build(self, config: TaskConfig) -> ImageConvTask:
        return ImageConvTask(config)
