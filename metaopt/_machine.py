"""Which CPU a measurement ran on, for benchmark headers and result metadata.

Ratios such as "learned step / fused Adam" depend on the processor, not only on the
code: the same commit measured 1.2-1.3x on one CPU model and 2.2-2.4x on another (see
``docs/learned.md``), so every benchmark names the CPU it ran on.
"""

from __future__ import annotations

import platform
from pathlib import Path

__all__ = ["cpu_model"]

_CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = _CPUINFO) -> str:
    """The processor's model name: the first ``model name`` line of ``cpuinfo`` (Linux),
    else :func:`platform.processor`, else ``"unknown CPU"``."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
