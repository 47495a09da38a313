"""Files: every file metaopt writes (checkpoints, downloads, results, histories, plots)
goes through :func:`replace_atomically`; :func:`load_failure` says why a checkpoint could
not be read."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["load_failure", "replace_atomically"]


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


_UNPICKLER_ERROR = "WeightsUnpickler error:"


def load_failure(error: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in a few words.

    For a file that is no weights-only pickle torch's message advises re-running with
    ``weights_only=False`` and filing an issue, which is wrong advice for a corrupt or
    foreign file; only the unpickler's own reason (``Unsupported operand 103``,
    ``Unsupported global: ...``) is kept. Other errors are returned as they are.
    """
    message = str(error)
    if _UNPICKLER_ERROR not in message:
        return message
    reason = message.split(_UNPICKLER_ERROR, 1)[1].split("\n\nCheck the documentation", 1)[0]
    return f"not a weights-only torch file ({' '.join(reason.split())})"
