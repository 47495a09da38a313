"""Datasets in the MNIST layout (IDX files) written for the tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.float32): 0x0D,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` as an IDX file (big-endian values)."""
    header = bytes([0, 0, _CODES[array.dtype], array.ndim])
    dims = b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + dims + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx_dataset(
    root: Path, name: str, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]
) -> None:
    """``root/name/`` with the four IDX files (images gzip-compressed, labels raw) of the
    ``"train"`` and ``"test"`` arrays."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images_file = folder / f"{prefix}-images-idx3-ubyte.gz"
        images_file.write_bytes(gzip.compress(idx_bytes(images[split])))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels[split]))


def toy_idx_dataset(
    root: Path,
    name: str = "toy",
    shape: tuple[int, ...] = (12, 10),
    n_classes: int = 4,
    n: tuple[int, int] = (240, 80),
    dtype: type = np.uint8,
) -> dict[str, np.ndarray]:
    """A dataset whose images' mean brightness tells the class; returns the images."""
    rng = np.random.default_rng(0)
    images, labels = {}, {}
    for split, count in zip(("train", "test"), n, strict=True):
        y = rng.integers(0, n_classes, count).astype(np.uint8)
        level = (y.astype(np.float64) * 200 / max(n_classes - 1, 1)).reshape(-1, *[1] * len(shape))
        x = np.clip(level + rng.integers(0, 50, (count, *shape)), 0, 255)
        images[split] = x.astype(dtype) if dtype is np.uint8 else (x / 255).astype(dtype)
        labels[split] = y
    write_idx_dataset(root, name, images, labels)
    return images
