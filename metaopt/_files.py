"""Atomic file replacement: every file metaopt writes (checkpoints, downloads, results,
histories, plots) goes through :func:`replace_atomically`."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["replace_atomically"]


@contextlib.contextmanager
def replace_atomically(
    dest: Path, mode: str = "wb", check: Callable[[Path], None] | None = None
) -> Iterator[IO[Any]]:
    """Write ``dest`` through a temporary sibling moved into place only on success.

    The block writes into the yielded handle; when it ends without error the temporary
    file is flushed to disk (``fsync``), closed, passed to ``check`` (which may raise to
    reject it) and moved onto ``dest`` with :func:`os.replace`. Whatever fails, the
    temporary file is removed and ``dest`` keeps its previous content. The file gets the
    permissions of any new file (``0o666`` minus the umask), unlike
    :func:`tempfile.mkstemp`'s private ``0o600``.

    Args:
        dest: the final path.
        mode: ``"wb"`` or ``"w"``.
        check: called with the temporary file's path before the move.
    """
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
