"""Extract and run the code blocks of a Markdown page, in order, in one namespace.

``python`` blocks are executed; ``bash`` blocks whose command is ``metaopt ...`` are run
through :func:`metaopt.cli.main` (other shell commands are not run). A block preceded by
the line ``<!-- no-test -->`` is skipped (for code that needs several processes or a GPU).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (docs/, examples/)."""

_FENCE = re.compile(
    r"(?P<skip><!-- no-test -->\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```", re.S
)


@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, code and first line in the page (1-based)."""

    lang: str
    code: str
    line: int


def blocks(path: Path) -> list[Block]:
    """The runnable blocks of ``path`` in page order (skipped blocks left out)."""
    text = path.read_text()
    found = []
    for match in _FENCE.finditer(text):
        if match.group("skip"):
            continue
        line = text.count("\n", 0, match.start("code")) + 1
        found.append(Block(match.group("lang"), match.group("code"), line))
    return found


def metaopt_commands(code: str) -> list[list[str]]:
    """The ``metaopt`` command lines of a bash block, as argv lists (without ``metaopt``)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0] == "metaopt":
            commands.append(words[1:])
    return commands


def run_page(path: Path) -> dict:
    """Run every block of ``path``; returns the namespace the python blocks shared.

    Raises whatever a block raises (with the page's line numbers in the traceback) and
    ``AssertionError`` when a ``metaopt`` command exits with a non-zero status.
    """
    from metaopt.cli import main

    namespace: dict = {"__name__": f"docs:{path.name}"}
    for block in blocks(path):
        if block.lang == "python":
            source = "\n" * (block.line - 1) + block.code
            exec(compile(source, str(path), "exec"), namespace)
        else:
            for argv in metaopt_commands(block.code):
                status = main(argv)
                assert status == 0, f"{path}:{block.line}: metaopt {shlex.join(argv)} -> {status}"
    return namespace
