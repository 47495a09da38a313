"""Download path against a local HTTP server on 127.0.0.1 serving the shared data files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from metaopt.continual.data import DataFileError, load_mnist
from metaopt.continual.download import SHA256, ChecksumError, download_dataset, verify_file
from tests.continual.http_server import serve, serve_folder

FILES = sorted(f"{stem}.gz" for stem in SHA256["mnist"])


def test_download_verifies_and_is_idempotent(data_dir: Path, tmp_path: Path) -> None:
    with serve(serve_folder(data_dir / "mnist")) as (url, requests):
        paths = download_dataset("mnist", tmp_path, base_url=url, timeout=10)
        assert sorted(p.name for p in paths) == FILES
        assert sorted(r.lstrip("/") for r in requests) == FILES
        download_dataset("mnist", tmp_path, base_url=url, timeout=10)
        assert len(requests) == 4  # verified files are kept, nothing fetched again
    assert not list((tmp_path / "mnist").glob("*.part"))
    x, y = load_mnist("mnist", tmp_path, "test")
    x_ref, y_ref = load_mnist("mnist", data_dir, "test")
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_corrupt_download_leaves_nothing(data_dir: Path, tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name in FILES:
        shutil.copy(data_dir / "mnist" / name, mirror / name)
    bad = mirror / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-1] + b"\x07"))
    dest = tmp_path / "dest"
    with (
        serve(serve_folder(mirror)) as (url, _),
        pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte") as caught,
    ):
        download_dataset("mnist", dest, base_url=url, timeout=10)
    # the message names the destination, not the temporary file that is gone
    assert str(dest / "mnist" / "t10k-labels-idx1-ubyte.gz") in str(caught.value)
    assert ".part" not in str(caught.value)
    assert not (dest / "mnist" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list((dest / "mnist").glob(".*part"))


def test_local_corrupt_file_is_replaced_and_missing_url_fails(
    data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"not mnist"))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        verify_file(
            folder / "train-labels-idx1-ubyte.gz", SHA256["mnist"]["train-labels-idx1-ubyte"]
        )
    with serve(serve_folder(data_dir / "mnist")) as (url, requests):
        download_dataset("mnist", tmp_path, base_url=url, timeout=10)
        assert "train-labels-idx1-ubyte.gz" in requests
    verify_file(folder / "train-labels-idx1-ubyte.gz", SHA256["mnist"]["train-labels-idx1-ubyte"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve(serve_folder(empty)) as (url, _), pytest.raises(DataFileError, match="404"):
        download_dataset("fashion-mnist", tmp_path / "other", base_url=url, timeout=10)
    with pytest.raises(ValueError, match="unknown dataset"):
        download_dataset("cifar10", tmp_path)
