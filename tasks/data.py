"""Image datasets: the embedded default (8x8 digits, no download) and loaders for local files.

The embedded default is the UCI "optical recognition of handwritten digits" set as shipped by
scikit-learn (1797 8x8 images, pixels 0..16; CC BY 4.0), stored in ``tasks/data/digits.csv.gz`` so
the default run never touches the network.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

DATA_DIR = Path(__file__).resolve().parent / "data"


class DatasetError(FileNotFoundError):
    """A dataset directory or file is missing or malformed; the message says what is expected."""


@dataclass(frozen=True)
class ImageData:
    """Images as float tensors (N, C, H, W) scaled to roughly zero mean / unit variance."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_valid: Tensor
    y_valid: Tensor
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "train":
            return self.x_train, self.y_train
        if split in ("valid", "validation", "test"):
            return self.x_valid, self.y_valid
        raise ValueError(f"unknown data split {split!r}; use 'train' or 'valid'")


def _standardize(x_train: Tensor, x_valid: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)
    return (x_train - mean) / std, (x_valid - mean) / std


def load_digits(valid_fraction: float = 0.2) -> ImageData:
    """The embedded 8x8 digits; a fixed permutation splits train / valid."""
    path = DATA_DIR / "digits.csv.gz"
    if not path.exists():
        raise DatasetError(f"embedded dataset missing: expected {path} (reinstall the package)")
    with gzip.open(path, "rt") as f:
        rows = [list(map(int, line.split(","))) for line in f if line.strip()]
    t = torch.tensor(rows, dtype=torch.float32)
    x, y = t[:, :64].reshape(-1, 1, 8, 8) / 16.0, t[:, 64].long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    x, y = x[perm], y[perm]
    n_valid = int(len(x) * valid_fraction)
    xt, xv = _standardize(x[n_valid:], x[:n_valid])
    return ImageData("digits", xt, y[n_valid:], xv, y[:n_valid], 10)


def resize(x: Tensor, size: int) -> Tensor:
    """Downsample (area) or upsample (bilinear) square images to ``size`` x ``size``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    mode = "area" if size < x.shape[-1] else "bilinear"
    return torch.nn.functional.interpolate(x, size=(size, size), mode=mode)


# Loaders keyed by name. Each takes (root: Path | None) and returns ImageData at native resolution.
LOADERS = {"digits": lambda root: load_digits()}


@lru_cache(maxsize=16)
def get_dataset(name: str, root: str | None = None, size: int | None = None) -> ImageData:
    """Load (and cache) a dataset, optionally resized to ``size`` x ``size``."""
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    data = LOADERS[name](Path(root) if root else None)
    if size is not None:
        xt, xv = resize(data.x_train, size), resize(data.x_valid, size)
        data = ImageData(data.name, xt, data.y_train, xv, data.y_valid, data.num_classes)
    return data
