"""Dataset loaders: fake IDX / CIFAR files in tmp_path must load correctly, bad ones must fail clearly."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch


from tasks import build_task, get_distribution  # noqa: E402
from tasks.data import ENV_VAR, DatasetError, get_dataset, read_idx, resize  # noqa: E402

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


# ---- writers for fake files ------------------------------------------------------------------
def idx_bytes(array: torch.Tensor) -> bytes:
    """An unsigned-byte IDX file for ``array``: magic 0x000008NN, NN big-endian sizes, data."""
    header = struct.pack(">I", 0x0800 | array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    return header + array.to(torch.uint8).contiguous().numpy().tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def fake_idx_split(n: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose constant pixel value encodes the label (so image/label pairing is checkable)."""
    labels = (torch.arange(n) + offset) % 10
    images = (labels * 25).to(torch.uint8).reshape(n, 1, 1).expand(n, 28, 28).clone()
    images[:, 0, 0] = 255  # a little spatial structure, identical everywhere
    return images, labels


def make_idx_dir(directory: Path, gz: bool | None = None, n_train: int = 20, n_test: int = 10) -> Path:
    """The four MNIST IDX files; ``gz=None`` mixes gzipped images with raw labels."""
    xt, yt = fake_idx_split(n_train, 0)
    xv, yv = fake_idx_split(n_test, 3)
    for name, arr in zip(IDX_NAMES, (xt, yt, xv, yv)):
        zipped = ("images" in name) if gz is None else gz
        write(directory / name, idx_bytes(arr), zipped)
    return directory


def cifar_bytes(labels: torch.Tensor) -> bytes:
    """CIFAR-10 records: label byte, then constant red=10*label, green=100, blue=200 planes."""
    n = len(labels)
    rec = torch.empty(n, 3073, dtype=torch.uint8)
    rec[:, 0] = labels
    rec[:, 1:1025] = (10 * labels).reshape(n, 1)
    rec[:, 1025:2049] = 100
    rec[:, 2049:] = 200
    return rec.numpy().tobytes()


def make_cifar_dir(directory: Path, per_batch: int = 4) -> Path:
    for i in range(1, 6):
        labels = (torch.arange(per_batch) + i) % 10
        write(directory / f"data_batch_{i}.bin", cifar_bytes(labels), False)
    write(directory / "test_batch.bin", cifar_bytes(torch.arange(3) % 10), False)
    return directory


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


# ---- loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True, None], ids=["raw", "gzip", "mixed"])
def test_mnist_idx_loads_with_shapes_labels_and_standardization(tmp_path, gz, no_env):
    make_idx_dir(tmp_path / "mnist", gz=gz)
    data = get_dataset("mnist", str(tmp_path))
    assert data.x_train.shape == (20, 1, 28, 28) and data.x_valid.shape == (10, 1, 28, 28)
    assert data.x_train.dtype == torch.float32 and data.num_classes == 10
    assert data.y_train.tolist() == [i % 10 for i in range(20)]
    assert data.y_valid.tolist() == [(i + 3) % 10 for i in range(10)]
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3
    # valid uses the train statistics: equal pixel values map to equal floats in both splits
    assert torch.allclose(data.x_valid[0], data.x_train[3])


def test_resize_matches_area_interpolation_and_keeps_pairs(tmp_path, no_env):
    make_idx_dir(tmp_path / "mnist")
    full = get_dataset("mnist", str(tmp_path))
    for size in (8, 16):
        small = get_dataset("mnist", str(tmp_path), size)
        assert small.x_train.shape == (20, 1, size, size) and small.x_valid.shape == (10, 1, size, size)
        assert torch.allclose(small.x_train, resize(full.x_train, size), atol=1e-5)
        assert torch.equal(small.y_train, full.y_train)
    assert get_dataset("mnist", str(tmp_path), 8) is get_dataset("mnist", str(tmp_path), 8)  # cached


def test_max_examples_subsamples_fixed_pairs(tmp_path, no_env):
    make_idx_dir(tmp_path / "mnist")
    a = get_dataset("mnist", str(tmp_path), 8, 7)
    assert a.x_train.shape[0] == 7 and a.x_valid.shape[0] == 7
    # pixel value encodes the label: the per-image mean must be the same affine function of the label
    means = a.x_train.mean(dim=(1, 2, 3))
    slope = (means[:, None] - means[None, :]) / (a.y_train[:, None] - a.y_train[None, :]).float()
    finite = slope[torch.isfinite(slope)]
    assert len(finite) > 0 and torch.allclose(finite, finite[0].expand_as(finite), rtol=1e-4)
    b = get_dataset("mnist", str(tmp_path), 8, 7)
    assert torch.equal(a.y_train, b.y_train)


def test_fashion_mnist_from_env_var_and_dotted_names(tmp_path, monkeypatch):
    d = make_idx_dir(tmp_path / "fashion_mnist", gz=True)
    (d / "train-images-idx3-ubyte.gz").rename(d / "train-images.idx3-ubyte.gz")  # a common mirror spelling
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    data = get_dataset("fashion_mnist", None, 16)
    assert data.name == "fashion_mnist" and data.x_train.shape == (20, 1, 16, 16)


@pytest.mark.parametrize("subfolder", [True, False])
def test_cifar10_binary_loads(tmp_path, subfolder, no_env):
    base = tmp_path / "cifar10"
    make_cifar_dir(base / "cifar-10-batches-bin" if subfolder else base)
    data = get_dataset("cifar10", str(tmp_path))
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_valid.shape == (3, 3, 32, 32)
    assert data.y_train[:4].tolist() == [1, 2, 3, 4] and data.y_valid.tolist() == [0, 1, 2]
    # planes are red, green, blue in that order (green=100 < blue=200 everywhere)
    assert bool((data.x_train[:, 1] < data.x_train[:, 2]).all())
    red = data.x_train[:, 0, 0, 0]
    assert torch.equal(red.argsort(stable=True), data.y_train.argsort(stable=True))
    assert get_dataset("cifar10", str(tmp_path), 8).x_train.shape == (20, 3, 8, 8)


def test_digits_still_embedded():
    data = get_dataset("digits")
    assert data.x_train.shape == (1438, 1, 8, 8) and data.x_valid.shape == (359, 1, 8, 8)
    assert get_dataset("digits", None, 4).x_train.shape == (1438, 1, 4, 4)


# ---- errors ----------------------------------------------------------------------------------
def test_no_root_anywhere_says_how_to_configure(no_env):
    with pytest.raises(DatasetError) as e:
        get_dataset("mnist")
    assert ENV_VAR in str(e.value) and "data_root" in str(e.value)


def test_missing_root_directory(tmp_path, no_env):
    with pytest.raises(DatasetError, match="does not exist") as e:
        get_dataset("mnist", str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(e.value)


def test_missing_dataset_directory_names_expected_path(tmp_path, no_env):
    (tmp_path / "fashion_mnist").mkdir()  # the wrong dataset is not a substitute
    with pytest.raises(DatasetError) as e:
        get_dataset("mnist", str(tmp_path))
    assert str(tmp_path / "mnist") in str(e.value)


def test_missing_file_names_every_missing_path(tmp_path, no_env):
    d = make_idx_dir(tmp_path / "mnist", gz=False)
    (d / "t10k-labels-idx1-ubyte").unlink()
    (d / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DatasetError) as e:
        get_dataset("mnist", str(tmp_path))
    msg = str(e.value)
    assert str(d / "t10k-labels-idx1-ubyte") in msg and str(d / "train-images-idx3-ubyte") in msg
    assert "[.gz]" in msg and "IDX" in msg


def test_bad_magic(tmp_path, no_env):
    d = make_idx_dir(tmp_path / "mnist", gz=False)
    images, _ = fake_idx_split(10, 3)
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(images))  # images where labels belong
    with pytest.raises(DatasetError) as e:
        get_dataset("mnist", str(tmp_path))
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and "magic" in msg
    assert "0x00000803" in msg and "0x00000801" in msg  # found vs expected


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx(tmp_path, gz, no_env):
    d = make_idx_dir(tmp_path / "mnist", gz=False)
    raw = (d / "train-images-idx3-ubyte").read_bytes()
    (d / "train-images-idx3-ubyte").unlink()
    if gz:  # a download cut short: the gzip stream itself is incomplete
        packed = gzip.compress(raw)
        write(d / "train-images-idx3-ubyte", packed[: len(packed) // 2], False)
        (d / "train-images-idx3-ubyte").rename(d / "train-images-idx3-ubyte.gz")
        expected = "gzip"
    else:  # complete file, but fewer bytes than the header's dimensions promise
        write(d / "train-images-idx3-ubyte", raw[:-100], False)
        expected = "truncated"
    with pytest.raises(DatasetError) as e:
        get_dataset("mnist", str(tmp_path))
    assert "train-images-idx3-ubyte" in str(e.value) and expected in str(e.value)


def test_truncated_header_and_label_mismatch(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(b"\x00\x00\x08\x01\x00")
    with pytest.raises(DatasetError, match="truncated IDX header"):
        read_idx(p, 1)
    d = make_idx_dir(tmp_path / "mnist", gz=False)
    write(d / "t10k-labels-idx1-ubyte", idx_bytes(torch.arange(4)), False)
    with pytest.raises(DatasetError, match="10 images but .* 4 labels"):
        get_dataset("mnist", str(tmp_path))


def test_cifar_missing_and_truncated(tmp_path, no_env):
    d = make_cifar_dir(tmp_path / "cifar10")
    (d / "data_batch_3.bin").unlink()
    with pytest.raises(DatasetError) as e:
        get_dataset("cifar10", str(tmp_path))
    assert str(d / "data_batch_3.bin") in str(e.value)
    make_cifar_dir(d)
    (d / "test_batch.bin").write_bytes(cifar_bytes(torch.arange(3))[:-7])
    with pytest.raises(DatasetError) as e:
        get_dataset("cifar10", str(tmp_path))
    assert "test_batch.bin" in str(e.value) and "3073" in str(e.value)


def test_unknown_dataset_and_bad_size():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'.*known"):
        get_dataset("imagenet")
    with pytest.raises(ValueError, match="image size"):
        get_dataset("digits", None, 0)


def test_file_presets_fail_only_when_a_task_is_built(tmp_path, no_env):
    for name in ("mnist_mlp", "fashion_mnist_mlp", "cifar10_mlp"):
        dist = get_distribution(name)
        cfg = dist.config("meta_train", 0)  # sampling configs touches no files
        with pytest.raises(DatasetError, match=ENV_VAR):
            build_task(cfg)
    make_idx_dir(tmp_path / "mnist")
    task = get_distribution("mnist_mlp", overrides={"data_root": str(tmp_path)}).task("meta_train", 0)
    assert task.data.name == "mnist" and task.data.image_shape[1] in (8, 16)
