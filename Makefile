# The two entry points of the README. Both create .venv, install what CI installs, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export METAOPT_DATA_DIR ?= $(abspath ../shared/data)
export NO_MKDOCS_2_WARNING = 1

.PHONY: install demo test test-fast lint docs

$(STAMP): pyproject.toml requirements/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements/ci.txt
	touch $(STAMP)

install: $(STAMP)

## The main job: a continual-learning comparison on embedded scikit-learn digits.
demo: $(STAMP)
	$(BIN)/metaopt bench --suite quick

## Everything CI checks: lint, the fast and the slow tests, the docs build.
## Tests run in parallel processes (pytest-xdist, one per core, at most 4; a test file
## stays in one process so that its compiled graphs are built once).
XDIST := -n auto --maxprocesses 4 --dist loadfile
test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow"
	$(BIN)/python -m pytest -q $(XDIST) -m slow --durations=15
	$(BIN)/mkdocs build --strict

## Fast selection only (no slow tests).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

docs: $(STAMP)
	$(BIN)/mkdocs build --strict
