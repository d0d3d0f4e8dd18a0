"""Image datasets: the embedded default (8x8 digits, no download) and loaders for local files.

The embedded default is the UCI "optical recognition of handwritten digits" set as shipped by
scikit-learn (1797 8x8 images, pixels 0..16; CC BY 4.0), stored in ``tasks/data/digits.csv.gz`` so
the default run never touches the network.

MNIST, Fashion-MNIST and CIFAR-10 are read from local files only (this package never downloads). The
root directory is the ``data_root`` argument (a task config's ``"data_root"`` key) or, when that is
unset, the environment variable ``OUROBOROS_DATA``; the environment variable keeps task configs
portable between machines, the config key pins one run to one directory. Expected layout::

    $OUROBOROS_DATA/mnist/          train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
                                    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]
    $OUROBOROS_DATA/fashion_mnist/  (the same four IDX files)
    $OUROBOROS_DATA/cifar10/        data_batch_1.bin .. data_batch_5.bin  test_batch.bin
                                    (optionally inside cifar-10-batches-bin/)

torchvision's layouts (``MNIST/raw``, ``FashionMNIST/raw``) are accepted as well. Anything missing
or malformed raises :class:`DatasetError` naming the expected path(s) and format, at the time a task
is *built* (importing this module or creating a TaskDistribution touches no files).

Memory: files are parsed to uint8, optionally subsampled (``max_examples``), and converted to float
chunk by chunk straight into the (optionally downsampled) result, so a float copy at native
resolution is never made when a smaller ``size`` is asked for.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor

from optimizers.errors import UserError

DATA_DIR = Path(__file__).resolve().parent / "data"
ENV_VAR = "OUROBOROS_DATA"


class DatasetError(UserError, FileNotFoundError):
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


# ---- raw file parsing ------------------------------------------------------------------------
IDX_FORMAT = (
    "IDX format: 4-byte big-endian magic 0x000008NN (two zero bytes, type code 0x08 = unsigned byte, "
    "NN = number of dimensions), then NN big-endian uint32 sizes, then the data"
)
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then 1024 red, 1024 green, 1024 blue bytes
CIFAR_FORMAT = (
    f"CIFAR-10 binary format: records of {CIFAR_RECORD} bytes (1 label byte 0..9, then 3072 pixel "
    "bytes: 32x32 red, green, blue planes)"
)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name says)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: corrupt or truncated gzip file ({e})") from e
    if path.suffix == ".gz":
        raise DatasetError(f"{path}: named .gz but is not gzip-compressed (no 1f 8b magic bytes)")
    return raw


def read_idx(path: Path, ndim: int) -> Tensor:
    """Parse an unsigned-byte IDX file with ``ndim`` dimensions into a uint8 tensor of its shape.

    The header is checked (magic, dimension count) and the payload size must equal the product of
    the dimensions exactly, so a truncated download or a file of the wrong kind fails here and not
    as a silent reshape into garbage images."""
    path = Path(path)
    raw = _read_bytes(path)
    magic = 0x0800 | ndim
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated: {len(raw)} bytes, no IDX header (expected {IDX_FORMAT})")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(
            f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"(unsigned-byte IDX with {ndim} dimension{'s' * (ndim > 1)}; {IDX_FORMAT})"
        )
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header: {len(raw)} bytes, need {header} ({IDX_FORMAT})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected, actual = math.prod(dims), len(raw) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise DatasetError(
            f"{path}: {what}: header says shape {tuple(dims)} = {expected} bytes of data, file has "
            f"{actual} ({IDX_FORMAT})"
        )
    if expected == 0:
        raise DatasetError(f"{path}: empty IDX file (shape {tuple(dims)})")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=header).reshape(dims)


def read_cifar_batch(path: Path, num_classes: int = 10) -> tuple[Tensor, Tensor]:
    """Parse one CIFAR-10 ``.bin`` batch into uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) == 0 or len(raw) % CIFAR_RECORD:
        raise DatasetError(
            f"{path}: truncated or malformed: {len(raw)} bytes is not a positive multiple of "
            f"{CIFAR_RECORD} ({CIFAR_FORMAT})"
        )
    records = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].long()
    if int(labels.max()) >= num_classes:
        raise DatasetError(f"{path}: label {int(labels.max())} out of range 0..{num_classes - 1} ({CIFAR_FORMAT})")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


# ---- locating files --------------------------------------------------------------------------
def resolve_root(root: str | Path | None, dataset: str = "this dataset") -> Path:
    """The data root: ``root`` if given, else ``$OUROBOROS_DATA``; it must be an existing directory."""
    if root is None or str(root) == "":
        env = os.environ.get(ENV_VAR, "")
        if not env:
            raise DatasetError(
                f"{dataset} needs local files but no data directory is set: set the task config key "
                f"'data_root' or the environment variable "
                f"{ENV_VAR} to a directory containing mnist/, fashion_mnist/ or cifar10/ "
                "(see tasks/data.py for the file layout; nothing is downloaded)"
            )
        root = env
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(
            f"{dataset}: data directory {path} does not exist or is not a directory; expected a directory "
            f"containing mnist/, fashion_mnist/ or cifar10/ with the original files (IDX files such as "
            f"train-images-idx3-ubyte[.gz] for MNIST / Fashion-MNIST, data_batch_1.bin .. test_batch.bin "
            f"for CIFAR-10)"
        )
    return path


def _find_dir(root: Path, candidates: tuple[str, ...], what: str) -> Path:
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise DatasetError(
        f"{what} directory not found: expected {root / candidates[0]} "
        f"(also tried {', '.join(str(root / c) for c in candidates[1:])})"
    )


def _find_file(directory: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz``; also the ``train-images.idx3-ubyte`` spelling some mirrors use."""
    names = [stem, stem + ".gz"]
    if "-idx" in stem:
        alt = stem.replace("-idx", ".idx")
        names += [alt, alt + ".gz"]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    return None


IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)

RawSplits = tuple[Tensor, Tensor, Tensor, Tensor]  # x_train (uint8 N,C,H,W), y_train, x_valid, y_valid


def load_idx_dir(directory: Path, num_classes: int = 10) -> RawSplits:
    """The four MNIST-style IDX files of ``directory`` as uint8 images (N, 1, H, W) and labels."""
    found = {stem: _find_file(directory, stem) for stem in IDX_FILES}
    missing = [stem for stem, p in found.items() if p is None]
    if missing:
        raise DatasetError(
            f"missing IDX file(s) in {directory}: "
            + ", ".join(f"{directory / m}[.gz]" for m in missing)
            + f" ({IDX_FORMAT})"
        )
    out = []
    for images, labels in (IDX_FILES[:2], IDX_FILES[2:]):
        x, y = read_idx(found[images], 3), read_idx(found[labels], 1)  # type: ignore[arg-type]
        if len(x) != len(y):
            raise DatasetError(
                f"{found[images]} has {len(x)} images but {found[labels]} has {len(y)} labels"
            )
        if int(y.max()) >= num_classes:
            raise DatasetError(f"{found[labels]}: label {int(y.max())} out of range 0..{num_classes - 1}")
        out += [x.unsqueeze(1), y.long()]
    return tuple(out)  # type: ignore[return-value]


def load_cifar10_dir(directory: Path) -> RawSplits:
    """CIFAR-10's binary batches of ``directory`` (or its ``cifar-10-batches-bin/``)."""
    if not (directory / CIFAR_FILES[0]).is_file() and (directory / "cifar-10-batches-bin").is_dir():
        directory = directory / "cifar-10-batches-bin"
    missing = [f for f in CIFAR_FILES if not (directory / f).is_file()]
    if missing:
        raise DatasetError(
            f"missing CIFAR-10 file(s) in {directory}: "
            + ", ".join(str(directory / m) for m in missing)
            + f" (optionally inside cifar-10-batches-bin/; the binary version, cifar-10-binary.tar.gz, "
            f"extracted; {CIFAR_FORMAT})"
        )
    train = [read_cifar_batch(directory / f) for f in CIFAR_FILES[:5]]
    x_valid, y_valid = read_cifar_batch(directory / CIFAR_FILES[5])
    x_train = torch.cat([x for x, _ in train])
    y_train = torch.cat([y for _, y in train])
    return x_train, y_train, x_valid, y_valid


# ---- uint8 -> standardized float, once ---------------------------------------------------------
def _subsample(x: Tensor, y: Tensor, max_examples: int | None, salt: int) -> tuple[Tensor, Tensor]:
    """At most ``max_examples`` rows, by a fixed permutation (the same subset on every machine)."""
    if max_examples is None or max_examples >= len(x):
        return x, y
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(4321 + salt))[:max_examples]
    idx = idx.sort().values
    return x[idx], y[idx]


def _uint8_stats(x: Tensor, chunk: int = 1024) -> tuple[float, float]:
    """Mean and (unbiased) std of a uint8 tensor from its histogram: exact, no float copy."""
    counts = torch.zeros(256, dtype=torch.float64)
    for part in x.reshape(len(x), -1).split(chunk):
        counts += torch.bincount(part.reshape(-1).long(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64)
    n = counts.sum()
    mean = (counts * values).sum() / n
    var = (counts * (values - mean) ** 2).sum() / (n - 1).clamp_min(1)
    return float(mean), max(float(var.sqrt()), 1e-6)


def _to_float(x: Tensor, mean: float, std: float, size: int | None, chunk: int = 2048) -> Tensor:
    """Standardize and resize uint8 images chunk by chunk into one float tensor.

    Standardizing with the native-resolution statistics and then area-downsampling equals
    downsampling first (both are affine), which matches what :func:`get_dataset` does for digits."""
    n, c, h, w = x.shape
    oh, ow = (h, w) if size is None else (size, size)
    out = torch.empty(n, c, oh, ow)
    for start in range(0, n, chunk):
        part = (x[start:start + chunk].float() - mean) / std
        out[start:start + chunk] = part if size is None else resize(part, size)
    return out


def _finish(name: str, raw: RawSplits, num_classes: int, size: int | None,
            max_examples: int | None) -> ImageData:
    x_train, y_train = _subsample(raw[0], raw[1], max_examples, 0)
    x_valid, y_valid = _subsample(raw[2], raw[3], max_examples, 1)
    mean, std = _uint8_stats(x_train)
    return ImageData(name, _to_float(x_train, mean, std, size), y_train.clone(),
                     _to_float(x_valid, mean, std, size), y_valid.clone(), num_classes)


class Loader(Protocol):
    """``loader(root, size=None, max_examples=None) -> ImageData``; ``root`` may be None (env)."""

    def __call__(self, root: Path | None, size: int | None = None,
                 max_examples: int | None = None) -> ImageData: ...


def _load_digits(root: Path | None, size: int | None = None, max_examples: int | None = None) -> ImageData:
    data = load_digits()
    xt, yt = _subsample(data.x_train, data.y_train, max_examples, 0)
    xv, yv = _subsample(data.x_valid, data.y_valid, max_examples, 1)
    if size is not None:
        xt, xv = resize(xt, size), resize(xv, size)
    return ImageData(data.name, xt, yt, xv, yv, data.num_classes)


def _file_loader(name: str, dirs: tuple[str, ...], read: Callable[[Path], RawSplits]) -> Loader:
    def load(root: Path | None, size: int | None = None, max_examples: int | None = None) -> ImageData:
        directory = _find_dir(resolve_root(root, name), dirs, name)
        return _finish(name, read(directory), 10, size, max_examples)

    load.__doc__ = f"{name} from {dirs[0]}/ under the data root."
    return load


# Loaders keyed by name: ``(root, size=None, max_examples=None) -> ImageData``.
LOADERS: dict[str, Loader] = {
    "digits": _load_digits,
    "mnist": _file_loader("mnist", ("mnist", "MNIST/raw", "MNIST"), load_idx_dir),
    "fashion_mnist": _file_loader(
        "fashion_mnist", ("fashion_mnist", "fashion-mnist", "FashionMNIST/raw", "FashionMNIST"), load_idx_dir
    ),
    "cifar10": _file_loader("cifar10", ("cifar10", "cifar-10-batches-bin"), load_cifar10_dir),
}
NEEDS_FILES = frozenset({"mnist", "fashion_mnist", "cifar10"})


@lru_cache(maxsize=16)
def _cached(name: str, root: str | None, size: int | None, max_examples: int | None) -> ImageData:
    return LOADERS[name](Path(root) if root else None, size=size, max_examples=max_examples)


def get_dataset(name: str, root: str | None = None, size: int | None = None,
                max_examples: int | None = None) -> ImageData:
    """Load (and cache) a dataset, optionally resized to ``size`` x ``size`` and capped at
    ``max_examples`` per split (a fixed subset).

    The root is resolved (``root`` or ``$OUROBOROS_DATA``) *before* the cache lookup, so changing
    the environment variable is honoured; failures are not cached."""
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(LOADERS)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"image size must be a positive integer or None, got {size!r}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    resolved = str(resolve_root(root, name)) if name in NEEDS_FILES else None
    return _cached(name, resolved, size, max_examples)


get_dataset.cache_clear = _cached.cache_clear  # type: ignore[attr-defined]  # old lru_cache API
