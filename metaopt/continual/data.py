"""Dataset loaders returning tensors: scikit-learn digits, MNIST and Fashion-MNIST.

Images come back as ``float32`` tensors of shape ``[N, 1, H, W]`` with values in
``[0, 1]`` and labels as ``int64`` tensors of shape ``[N]``. MNIST-style datasets are
read from IDX files (gzip-compressed or raw) in a data directory given explicitly or by
the ``METAOPT_DATA_DIR`` environment variable; no torchvision needed.
"""

from __future__ import annotations

import gzip
import math
import os
import sys
import zlib
from pathlib import Path

import torch

__all__ = [
    "DATASETS",
    "IDX_FILES",
    "N_CLASSES",
    "DataFileError",
    "check_dataset",
    "load_dataset",
    "load_digits_tensors",
    "load_mnist",
    "read_idx",
    "resolve_data_dir",
]

DATA_DIR_ENV = "METAOPT_DATA_DIR"

IDX_FILES: dict[str, dict[str, str]] = {
    "train": {"images": "train-images-idx3-ubyte", "labels": "train-labels-idx1-ubyte"},
    "test": {"images": "t10k-images-idx3-ubyte", "labels": "t10k-labels-idx1-ubyte"},
}
"""IDX file names (without ``.gz``) per split, as in the original MNIST layout."""

MNIST_LIKE = ("mnist", "fashion-mnist")
DATASETS = ("digits", *MNIST_LIKE)
"""Names accepted by :func:`load_dataset`."""
N_CLASSES: dict[str, int] = dict.fromkeys(DATASETS, 10)
"""Number of classes of each dataset of :data:`DATASETS`."""

_IDX_DTYPES = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}
"""IDX type codes; multi-byte values are stored big-endian."""
_DIGITS_TEST_FRACTION = 0.25


class DataFileError(FileNotFoundError):
    """A dataset file is missing or corrupt; the message names the file and how to get it."""


def _how_to_get(name: str) -> str:
    return (
        f"get it with `metaopt download {name} --data-dir DIR` (needs internet) or point "
        f"{DATA_DIR_ENV} / data_dir= at a directory holding {name}/<idx files>"
    )


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$METAOPT_DATA_DIR``.

    Raises:
        DataFileError: neither is set.
    """
    if data_dir is None:
        env = os.environ.get(DATA_DIR_ENV)
        if not env:
            raise DataFileError(
                f"no data directory: pass data_dir= (CLI: --data-dir) or set {DATA_DIR_ENV}"
            )
        data_dir = env
    return Path(data_dir).expanduser()


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataFileError(f"{path}: corrupt gzip file ({exc})") from exc
    return raw


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read one IDX file (gzip-compressed or raw) into a tensor (no numpy needed).

    Args:
        path: the file.

    Returns:
        A tensor of the file's type (``uint8`` for MNIST) with the shape in its header.

    Raises:
        DataFileError: the file is missing, truncated or not an IDX file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{path}: no such file")
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataFileError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFileError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[data[2]]
    itemsize = dtype.itemsize
    expected = header + math.prod(shape) * itemsize
    if len(data) != expected:
        raise DataFileError(f"{path}: corrupt IDX file ({len(data)} bytes, header says {expected})")
    if expected == header:  # no items: torch.frombuffer rejects an empty buffer
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    if itemsize > 1 and sys.byteorder == "little":
        raw = raw.reshape(-1, itemsize).flip(-1).reshape(-1)
    return raw.view(dtype).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataFileError(f"missing {folder / stem}[.gz]")


def check_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> None:
    """Check, without reading them, that the files of dataset ``name`` can be found.

    Args:
        name: one of :data:`DATASETS` (``"digits"`` ships with scikit-learn: always there).
        data_dir: folder holding ``name/``; default ``$METAOPT_DATA_DIR``.

    Raises:
        ValueError: unknown ``name``.
        DataFileError: no data directory, or a file is missing (the message says how to
            get it).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if name not in MNIST_LIKE:
        return
    folder = resolve_data_dir(data_dir) / name
    try:
        for files in IDX_FILES.values():
            for stem in files.values():
                _find_idx(folder, stem)
    except DataFileError as exc:
        raise DataFileError(f"{exc}; {_how_to_get(name)}") from exc


def load_mnist(
    name: str = "mnist",
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST from IDX files in ``data_dir/name/``.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: folder holding ``name/``; default ``$METAOPT_DATA_DIR``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).

    Returns:
        ``(x, y)``: ``x`` float32 ``[N, 1, 28, 28]`` in ``[0, 1]``, ``y`` int64 ``[N]``.

    Raises:
        ValueError: unknown ``name`` or ``split``.
        DataFileError: a file is missing or corrupt (the message says how to get it).
    """
    if name not in MNIST_LIKE:
        raise ValueError(f"unknown dataset {name!r}; expected one of {MNIST_LIKE}")
    if split not in IDX_FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    folder = resolve_data_dir(data_dir) / name
    try:
        images = read_idx(_find_idx(folder, IDX_FILES[split]["images"]))
        labels = read_idx(_find_idx(folder, IDX_FILES[split]["labels"]))
    except DataFileError as exc:
        raise DataFileError(f"{exc}; {_how_to_get(name)}") from exc
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataFileError(
            f"{folder}: images {images.shape} and labels {labels.shape} do not match; "
            + _how_to_get(name)
        )
    x = (images.to(torch.float32) / 255.0).unsqueeze(1)
    return x, labels.to(torch.int64)


def load_digits_tensors(split: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), always available offline.

    Args:
        split: ``None`` for all images, or ``"train"`` / ``"test"`` for a fixed
            (seed-independent) 75% / 25% split.

    Returns:
        ``(x, y)``: ``x`` float32 ``[N, 1, 8, 8]`` in ``[0, 1]``, ``y`` int64 ``[N]``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (torch.tensor(digits.images, dtype=torch.float32) / 16.0).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    if split is None:
        return x, y
    if split not in IDX_FILES:
        raise ValueError(f"unknown split {split!r}; expected None, 'train' or 'test'")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = round(_DIGITS_TEST_FRACTION * len(y))
    index = order[:n_test] if split == "test" else order[n_test:]
    return x[index], y[index]


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load any dataset of :data:`DATASETS` by name (see :func:`load_mnist`)."""
    if name == "digits":
        return load_digits_tensors(split)
    return load_mnist(name, data_dir, split)
