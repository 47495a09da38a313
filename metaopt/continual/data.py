"""Dataset loaders returning tensors: scikit-learn digits, MNIST, Fashion-MNIST and any
other dataset stored in the MNIST layout.

Images come back as ``float32`` tensors of shape ``[N, C, H, W]`` (``C = 1`` for
MNIST) with values in ``[0, 1]`` and labels as ``int64`` tensors of shape ``[N]``.
MNIST-style datasets are read from IDX files (gzip-compressed or raw) in a data
directory given explicitly or by the ``METAOPT_DATA_DIR`` environment variable; no
torchvision needed. Besides the named ones, any folder of that directory holding the
four IDX files (:data:`IDX_FILES`; e.g. KMNIST or EMNIST) is a dataset named after the
folder (see :func:`load_idx_dataset`).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = [
    "DATASETS",
    "IDX_FILES",
    "N_CLASSES",
    "DataFileError",
    "check_dataset",
    "check_dataset_name",
    "dataset_classes",
    "load_dataset",
    "load_digits_tensors",
    "load_idx_dataset",
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
"""The named datasets of :func:`load_dataset` (besides these, any folder of IDX files in
the data directory, see :func:`load_idx_dataset`)."""
N_CLASSES: dict[str, int] = dict.fromkeys(DATASETS, 10)
"""Number of classes of each dataset of :data:`DATASETS`."""
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
"""A dataset folder's name: one path component, no leading dot (so never ``..``)."""

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
    if name not in MNIST_LIKE:
        files = ", ".join(f"{stem}[.gz]" for split in IDX_FILES.values() for stem in split.values())
        return f"put {files} into <data dir>/{name}/ and point {DATA_DIR_ENV} / data_dir= at it"
    return (
        f"get it with `metaopt download {name} --data-dir DIR` (needs internet) or point "
        f"{DATA_DIR_ENV} / data_dir= at a directory holding {name}/<idx files>"
    )


def check_dataset_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is a named dataset (:data:`DATASETS`) or can
    be the folder of one in the data directory (letters, digits, ``_ . -``; no path
    separator, no leading dot)."""
    if not isinstance(name, str) or not (name in DATASETS or _FOLDER_NAME.fullmatch(name)):
        raise ValueError(
            f"unknown dataset {name!r}; expected one of {DATASETS} or the name of a folder "
            "of the data directory holding IDX files (letters, digits, '_', '.', '-')"
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


@contextlib.contextmanager
def _explained(name: str) -> Iterator[None]:
    """Re-raise a ``DataFileError`` (a missing or corrupt file of dataset ``name``) with
    how to get the dataset appended to its message."""
    try:
        yield
    except DataFileError as exc:
        raise DataFileError(f"{exc}; {_how_to_get(name)}") from exc


def check_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> None:
    """Check, without reading them, that the files of dataset ``name`` can be found.

    Args:
        name: one of :data:`DATASETS` (``"digits"`` ships with scikit-learn: always there)
            or a folder of IDX files in the data directory.
        data_dir: folder holding ``name/``; default ``$METAOPT_DATA_DIR``.

    Raises:
        ValueError: ``name`` can be neither (see :func:`check_dataset_name`).
        DataFileError: no data directory, or a file is missing (the message says how to
            get it).
    """
    check_dataset_name(name)
    if name == "digits":
        return
    folder = resolve_data_dir(data_dir) / name
    with _explained(name):
        for files in IDX_FILES.values():
            for stem in files.values():
                _find_idx(folder, stem)


def dataset_classes(name: str, data_dir: str | os.PathLike[str] | None = None) -> int:
    """How many distinct labels the training split of dataset ``name`` holds: 10 for the
    named ones (:data:`N_CLASSES`), read from the labels file of a folder's dataset.

    Raises:
        ValueError: a bad ``name``.
        DataFileError: its labels file is missing or corrupt.
    """
    check_dataset_name(name)
    if name in N_CLASSES:
        return N_CLASSES[name]
    folder = resolve_data_dir(data_dir) / name
    with _explained(name):
        labels = read_idx(_find_idx(folder, IDX_FILES["train"]["labels"]))
    return len(torch.unique(labels))


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
    return load_idx_dataset(name, data_dir, split)


def load_idx_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load any dataset in the MNIST layout: the IDX files of :data:`IDX_FILES` in
    ``data_dir/name/`` (KMNIST, EMNIST and Fashion-MNIST are distributed that way).

    Images are an IDX array ``[N, H, W]`` (one channel) or ``[N, C, H, W]`` of
    ``uint8`` (scaled by 1/255) or floats (kept as they are); labels ``[N]`` of
    non-negative integers (class ``k`` is label ``k``).

    Args:
        name: the folder's name (see :func:`check_dataset_name`).
        data_dir: folder holding ``name/``; default ``$METAOPT_DATA_DIR``.
        split: ``"train"`` or ``"test"``.

    Returns:
        ``(x, y)``: ``x`` float32 ``[N, C, H, W]``, ``y`` int64 ``[N]``.

    Raises:
        ValueError: a bad ``name`` or ``split``.
        DataFileError: a file is missing or corrupt, or its arrays are not images and
            labels as above (the message names the file).
    """
    check_dataset_name(name)
    if name == "digits":
        raise ValueError("'digits' comes with scikit-learn, not as IDX files: use load_dataset")
    if split not in IDX_FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    folder = resolve_data_dir(data_dir) / name
    with _explained(name):
        images_path = _find_idx(folder, IDX_FILES[split]["images"])
        labels_path = _find_idx(folder, IDX_FILES[split]["labels"])
        images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
        raise DataFileError(
            f"{folder}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not "
            "match (expected images [N, H, W] or [N, C, H, W] and labels [N]); "
            + _how_to_get(name)
        )
    if not len(images):
        raise DataFileError(f"{images_path}: no images")
    if images.dtype == torch.uint8:
        x = images.to(torch.float32) / 255.0
    elif images.is_floating_point():
        x = images.to(torch.float32)
    else:
        raise DataFileError(
            f"{images_path}: images of type {images.dtype}; expected uint8 (0-255) or floats"
        )
    if labels.is_floating_point() or (len(labels) and int(labels.min()) < 0):
        raise DataFileError(f"{labels_path}: labels must be non-negative integers")
    return (x.unsqueeze(1) if x.ndim == 3 else x), labels.to(torch.int64)


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
    """Load a dataset by name: ``"digits"`` (:func:`load_digits_tensors`), or MNIST,
    Fashion-MNIST or another folder of IDX files in the data directory
    (:func:`load_idx_dataset`)."""
    if name == "digits":
        return load_digits_tensors(split)
    return load_idx_dataset(name, data_dir, split)
