"""IDX / digits loaders and their error messages."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from metaopt.continual.data import (
    DataFileError,
    load_dataset,
    load_digits_tensors,
    load_mnist,
    read_idx,
    resolve_data_dir,
)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def _write_dataset(root: Path, name: str, n: int, compress: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder = root / name
    folder.mkdir(parents=True)
    for split in ("train", "t10k"):
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            raw = _idx_bytes(array)
            stem = f"{split}-{kind}-ubyte"
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / stem).write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("compress", [True, False])
def test_idx_roundtrip_gzip_and_raw(tmp_path: Path, compress: bool) -> None:
    images, labels = _write_dataset(tmp_path, "mnist", 6, compress)
    x, y = load_mnist("mnist", tmp_path, "train")
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.from_numpy(images / 255.0).float())
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert 0.0 <= x.min() and x.max() <= 1.0


@pytest.mark.parametrize(
    ("code", "dtype"), [(0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")]
)
def test_multibyte_big_endian_types(tmp_path: Path, code: int, dtype: str) -> None:
    values = np.array([[-3, 1, 2], [1000 if dtype != ">i1" else 100, -7, 0]]).astype(dtype)
    header = bytes([0, 0, code, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    path = tmp_path / "typed-idx"
    path.write_bytes(header + values.tobytes())
    got = read_idx(path)
    assert got.shape == (2, 3)
    assert got.tolist() == values.astype(float).tolist()


def test_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_dataset(tmp_path, "fashion-mnist", 3, True)
    monkeypatch.setenv("METAOPT_DATA_DIR", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert load_dataset("fashion-mnist", split="test")[0].shape == (3, 1, 28, 28)
    monkeypatch.delenv("METAOPT_DATA_DIR")
    with pytest.raises(DataFileError, match="METAOPT_DATA_DIR"):
        load_mnist("mnist")


def test_missing_file_names_it_and_how_to_get_it(tmp_path: Path) -> None:
    _write_dataset(tmp_path, "mnist", 3, True)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataFileError, match=r"t10k-labels-idx1-ubyte.*metaopt download mnist"):
        load_mnist("mnist", tmp_path, "test")
    with pytest.raises(DataFileError, match="metaopt download fashion-mnist"):
        load_mnist("fashion-mnist", tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated IDX header"),
        (b"PK\x03\x04 not idx", "bad magic"),
    ],
)
def test_corrupt_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=message):
        read_idx(path)


def test_truncated_data_and_mismatched_lengths(tmp_path: Path) -> None:
    _write_dataset(tmp_path, "mnist", 4, False)
    images = tmp_path / "mnist" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte: corrupt IDX file"):
        load_mnist("mnist", tmp_path)
    labels = tmp_path / "mnist" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataFileError, match="do not match"):
        load_mnist("mnist", tmp_path, "test")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        load_mnist("cifar10", ".")
    with pytest.raises(ValueError, match="unknown split"):
        load_mnist("mnist", ".", "validation")


def test_digits_split_is_fixed_and_disjoint() -> None:
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert float(x.max()) == 1.0 and float(x.min()) == 0.0
    xtr, ytr = load_digits_tensors("train")
    xte, yte = load_digits_tensors("test")
    assert len(ytr) + len(yte) == 1797 and len(yte) == 449
    assert torch.equal(load_digits_tensors("test")[0], xte)
    train_rows = {r.numpy().tobytes() for r in xtr.flatten(1)}
    overlap = sum(r.numpy().tobytes() in train_rows for r in xte.flatten(1))
    assert overlap < 5  # only exact duplicate images in the dataset itself


def test_shared_mnist_files(data_dir: Path) -> None:
    x, y = load_mnist("mnist", data_dir, "test")
    assert x.shape == (10_000, 1, 28, 28)
    assert torch.equal(torch.bincount(y, minlength=10) > 800, torch.ones(10, dtype=torch.bool))
