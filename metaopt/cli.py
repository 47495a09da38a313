"""The ``metaopt`` command line: ``metaopt bench``, ``metaopt download``, ``metaopt meta-train``.

Each subsystem registers its commands through a ``register(subparsers)`` function; a
command sets ``func(args) -> int`` as its handler.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

_COMMAND_MODULES = ("metaopt.continual.cli", "metaopt.meta.cli")
_OPTIONAL = {"metaopt.meta.cli"}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    from metaopt._version import __version__

    parser = argparse.ArgumentParser(
        prog="metaopt", description="A learned optimizer for continual learning."
    )
    parser.add_argument("--version", action="version", version=f"metaopt {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # an optional subsystem that is absent; a broken one still raises
            if name not in _OPTIONAL or exc.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``metaopt`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # -v/-vv turn up metaopt's own logging only (not that of matplotlib, torch, ...)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("metaopt").setLevel(logging.WARNING - 10 * min(args.verbose, 2))
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        parser.exit(1, f"metaopt {args.command}: error: {exc}\n")
    except KeyboardInterrupt:  # Ctrl-C: what was saved has been logged; no traceback
        parser.exit(130, f"metaopt {args.command}: interrupted\n")


if __name__ == "__main__":
    sys.exit(main())
