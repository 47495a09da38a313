"""Optional download of MNIST / Fashion-MNIST IDX files, checksum-verified and atomic.

Each file is fetched into a temporary file next to its destination, its length (against
the announced ``Content-Length``) and checksum are checked, and only then is it moved into
place with :func:`os.replace`, so an interrupted or corrupt download never leaves a
half-written file under the final name, nor a temporary one. The checksum
is the SHA-256 of the *decompressed* IDX content, so a re-compressed mirror is accepted
as long as the data are identical.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import urllib.request
import zlib
from pathlib import Path

from metaopt._files import replace_atomically
from metaopt.continual.data import IDX_FILES, DataFileError, resolve_data_dir

__all__ = ["BASE_URLS", "SHA256", "ChecksumError", "download_dataset", "verify_file"]

logger = logging.getLogger(__name__)

BASE_URLS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
}
"""Canonical download locations (the torchvision mirror for MNIST; Zalando's for Fashion)."""

SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": (
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
        ),
        "train-labels-idx1-ubyte": (
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"
        ),
        "t10k-images-idx3-ubyte": (
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"
        ),
        "t10k-labels-idx1-ubyte": (
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"
        ),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": (
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
        ),
        "train-labels-idx1-ubyte": (
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
        ),
        "t10k-images-idx3-ubyte": (
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
        ),
        "t10k-labels-idx1-ubyte": (
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
        ),
    },
}
"""SHA-256 of the decompressed IDX content of each official file."""


class ChecksumError(DataFileError):
    """A downloaded or local file does not have the expected checksum."""


def _content_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        compressed = handle.read(2) == b"\x1f\x8b"
    digest = hashlib.sha256()
    try:
        with (gzip.open if compressed else open)(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError, zlib.error) as exc:
        raise ChecksumError(f"{path}: unreadable ({exc})") from exc
    return digest.hexdigest()


def verify_file(
    path: str | os.PathLike[str],
    expected_sha256: str,
    *,
    shown_as: str | os.PathLike[str] | None = None,
) -> None:
    """Raise :class:`ChecksumError` unless the decompressed content of ``path`` matches.

    ``shown_as`` names the file in the message instead of ``path`` (a download's
    temporary file is gone by the time anyone reads it)."""
    path = Path(path)
    got = _content_sha256(path)
    if got != expected_sha256:
        raise ChecksumError(
            f"{shown_as or path}: checksum mismatch (sha256 of content {got}, expected "
            f"{expected_sha256})"
        )


def _fetch(url: str, dest: Path, expected: str, timeout: float) -> None:
    try:
        with (
            replace_atomically(
                dest, check=lambda tmp: verify_file(tmp, expected, shown_as=dest)
            ) as out,
            urllib.request.urlopen(url, timeout=timeout) as resp,
        ):
            announced = resp.headers.get("Content-Length")
            received = 0
            for block in iter(lambda: resp.read(1 << 20), b""):
                out.write(block)
                received += len(block)
            if announced is not None and received != int(announced):
                raise DataFileError(
                    f"incomplete download: received {received} of {announced} bytes"
                )
    except ChecksumError as exc:
        raise ChecksumError(f"download of {url} failed: {exc}") from exc
    except http.client.IncompleteRead as exc:
        raise DataFileError(f"download of {url} failed: incomplete download ({exc})") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DataFileError(f"download of {url} into {dest} failed: {exc}") from exc


def download_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    base_url: str | None = None,
    timeout: float = 60.0,
    force: bool = False,
) -> list[Path]:
    """Download the four IDX files of ``name`` into ``data_dir/name/`` (``.gz`` names).

    Files already present with the right checksum are kept (unless ``force``).

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: destination root; default ``$METAOPT_DATA_DIR``.
        base_url: override the canonical URL (a mirror; tests use a local server).
        timeout: seconds per HTTP request.
        force: download even when a valid file exists.

    Returns:
        The paths of the four files.

    Raises:
        ValueError: unknown dataset.
        ChecksumError: a downloaded file has the wrong content (nothing is written).
        DataFileError: the download failed.
    """
    if name not in SHA256:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(SHA256)}")
    base = base_url if base_url is not None else BASE_URLS[name]
    if not base.endswith("/"):
        base += "/"
    folder = resolve_data_dir(data_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for files in IDX_FILES.values():
        for stem in files.values():
            dest = folder / f"{stem}.gz"
            expected = SHA256[name][stem]
            if dest.is_file() and not force:
                try:
                    verify_file(dest, expected)
                    logger.info("%s: present and verified", dest)
                    paths.append(dest)
                    continue
                except ChecksumError:
                    logger.warning("%s: checksum mismatch, downloading again", dest)
            logger.info("downloading %s%s.gz -> %s", base, stem, dest)
            _fetch(f"{base}{stem}.gz", dest, expected, timeout)
            paths.append(dest)
    return paths
