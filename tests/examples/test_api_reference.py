"""The built site documents every public name (``__all__``) of every public module."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

from tests.examples.doc_blocks import ROOT

MODULES = [
    "metaopt", "metaopt.rules", "metaopt.optim", "metaopt.learned", "metaopt.meta",
    "metaopt.compile", "metaopt.continual", "metaopt.tree", "metaopt.cli",
]


def test_every_public_name_has_an_api_entry(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    ids = set()
    for page in site.rglob("*.html"):
        ids.update(re.findall(r'id="(metaopt[\w.]*)"', page.read_text()))
    missing = []
    for name in MODULES:
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", []):
            if public.startswith("__"):
                continue
            if not any(i.startswith(name) and i.endswith(f".{public}") for i in ids):
                missing.append(f"{name}.{public}")
    assert missing == [], f"public names without an API entry: {missing}"
