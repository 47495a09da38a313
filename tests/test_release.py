"""Release check: ``python -m build`` makes an sdist and a wheel that ship the pretrained
checkpoint and ``py.typed``; the wheel installs into a fresh virtual environment and the
README quickstart runs there against the installed package (not the source tree)."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import metaopt

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

# The README's quickstart trains on ``tasks``, "your sequence of tasks"; here: two tasks of
# 100 minibatches each from fixed random linear teachers (learnable, 10 classes).
TASKS_PREAMBLE = """
import torch
torch.manual_seed(0)
def make_task(seed):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(64, 10, generator=gen)
    xs = [torch.randn(32, 64, generator=gen) for _ in range(100)]
    return [(x, (x @ teacher).argmax(1)) for x in xs]
tasks = [make_task(1), make_task(2)]
"""

# After the quickstart: where metaopt came from, and what the training did.
CHECKS = """
import math, pathlib, sys
import torch.nn.functional as F
assert pathlib.Path(metaopt.__file__).is_relative_to(sys.prefix), metaopt.__file__
x, y = tasks[-1][-1]
with torch.no_grad():
    final_loss = F.cross_entropy(model(x), y).item()
assert final_loss < math.log(10) - 0.2, final_loss  # chance level: log(10)
assert opt.task_index == len(tasks), opt.task_index
print("QUICKSTART-OK", metaopt.__version__, round(final_loss, 3))
"""


def readme_quickstart() -> str:
    """The first ``python`` block after the README's ``## Quickstart`` heading."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md has no python block under '## Quickstart'"
    return match.group(1)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def test_version_comes_from_one_place(dists):
    version = metaopt.__version__
    assert (ROOT / "metaopt" / "_version.py").read_text().strip() == f'__version__ = "{version}"'
    assert dists["wheel"].name.startswith(f"metaopt-{version}-py3-none-any")
    assert dists["sdist"].name == f"metaopt-{version}.tar.gz"
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {version}" in changelog


def test_wheel_contents(dists):
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = set(wheel.namelist())
        info = f"metaopt-{metaopt.__version__}.dist-info"
        metadata = wheel.read(f"{info}/METADATA").decode()
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
        shipped = wheel.read("metaopt/learned/checkpoints/default.pt")
    assert {"metaopt/py.typed", "metaopt/learned/checkpoints/default.pt"} <= names
    assert f"{info}/licenses/LICENSE" in names
    assert shipped == (ROOT / "metaopt/learned/checkpoints/default.pt").read_bytes()
    assert not any(n.startswith(("tests/", "examples/", "docs/")) for n in names)
    assert "metaopt = metaopt.cli:main" in entry_points
    assert "Requires-Dist: torch>=2.4" in metadata
    assert "Provides-Extra: integrations" in metadata
    assert "Project-URL: Documentation" in metadata
    assert "License-Expression: MIT" in metadata


def test_sdist_contents(dists):
    with tarfile.open(dists["sdist"]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "metaopt/py.typed",
            "metaopt/learned/checkpoints/default.pt"} <= names


def test_wheel_installs_and_readme_quickstart_runs(dists, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    # torch lives in the development environment, not in the base interpreter that
    # --system-site-packages exposes: add that site directory as a plain path (its .pth
    # files, among them the editable install of metaopt, are not processed).
    torch_site = Path(torch.__file__).resolve().parents[1]
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    Path(site, "dev_site_packages.pth").write_text(f"{torch_site}\n")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(dists["wheel"])],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    script = tmp_path / "quickstart.py"
    script.write_text(
        textwrap.dedent(TASKS_PREAMBLE) + readme_quickstart() + textwrap.dedent(CHECKS)
    )
    run = subprocess.run(
        [str(python), str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"QUICKSTART-OK {metaopt.__version__}" in run.stdout

    cli = subprocess.run(
        [str(venv / "bin" / "metaopt"), "--version"], capture_output=True, text=True
    )
    assert cli.stdout.strip() == f"metaopt {metaopt.__version__}"
