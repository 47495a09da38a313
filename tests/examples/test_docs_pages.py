"""The code on the home page and the how-to guides runs as written; every page is in the
site's navigation."""

from __future__ import annotations

import re

import pytest

from tests.examples.doc_blocks import ROOT, blocks, run_page

DOCS = ROOT / "docs"
PAGES = [DOCS / "index.md", *sorted((DOCS / "howto").glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    namespace = run_page(page)
    if any(block.lang == "python" for block in blocks(page)):
        assert "metaopt" in namespace      # the page imported the package and ran


def test_home_quickstart_marks_task_boundaries(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    namespace = run_page(DOCS / "index.md")
    assert namespace["opt"].task_index == len(namespace["tasks"]) == 2


def test_every_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text()
    nav = config[config.index("\nnav:") :]
    listed = set(re.findall(r"([\w/.-]+\.md)\s*$", nav, re.M))
    # docs/results/ holds files written by `metaopt bench` (included by results.md)
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    pages = {p for p in pages if not p.startswith("results/")}
    assert pages - listed == set(), "pages missing from mkdocs.yml's nav"
    assert listed - pages == set(), "nav entries without a page"
