"""Shared test configuration: hypothesis profiles and the offline data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# At most two intra-op threads per test process; under pytest-xdist (make test) the
# workers share the cores instead of each taking all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def _data_dir() -> Path | None:
    env = os.environ.get("METAOPT_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for path in candidates:
        if (path / "mnist").is_dir():
            return path
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The offline MNIST / Fashion-MNIST directory (``METAOPT_DATA_DIR`` or ../shared/data)."""
    path = _data_dir()
    if path is None:
        pytest.skip("no MNIST data directory: set METAOPT_DATA_DIR")
    return path
