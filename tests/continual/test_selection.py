"""Selection on validation (never test), shared settings, merging and the text table."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaopt.continual.report import format_table, load_results, merge_rows, save_results, write_csv
from metaopt.continual.selection import select_shared, select_tuned, summary_rows


def _row(stream: str, setting: str, seed: int, val: float, test: float) -> dict:
    optimizer = setting.split()[0]
    metrics = {"acc": test, "bwt": -0.1, "fwt": 0.0, "forgetting": 0.1, "learning_acc": 0.9}
    return {
        "stream": stream,
        "model": "mlp",
        "optimizer": optimizer,
        "setting": setting,
        "seed": seed,
        "test": metrics,
        "val": {**metrics, "acc": val},
        "R": [[test]],
    }


ROWS = [
    # stream A: lr=0.1 best on validation, lr=0.01 best on test (must not be chosen)
    _row("A", "adam lr=0.1", 0, 0.9, 0.70),
    _row("A", "adam lr=0.1", 1, 0.8, 0.72),
    _row("A", "adam lr=0.01", 0, 0.6, 0.95),
    _row("A", "adam lr=0.01", 1, 0.6, 0.97),
    # stream B: lr=0.01 best; averaged over streams lr=0.01 wins (0.75 vs 0.625)
    _row("B", "adam lr=0.1", 0, 0.4, 0.5),
    _row("B", "adam lr=0.01", 0, 0.9, 0.8),
    _row("A", "learned", 0, 0.5, 0.6),
    _row("B", "learned", 0, 0.5, 0.6),
]


def test_tuned_and_shared_use_validation_only() -> None:
    tuned = select_tuned(ROWS)
    assert tuned[("A", "mlp", "adam")] == "adam lr=0.1"
    assert tuned[("B", "mlp", "adam")] == "adam lr=0.01"
    assert select_shared(ROWS) == {"adam": "adam lr=0.01", "learned": "learned"}
    summary = {(s["stream"], s["optimizer"]): s for s in summary_rows(ROWS, "tuned")}
    assert summary[("A", "adam")]["acc_mean"] == pytest.approx(0.71)
    assert summary[("A", "adam")]["acc_std"] == pytest.approx(0.0141421, abs=1e-6)
    assert summary[("A", "adam")]["n_seeds"] == 2
    shared = {(s["stream"], s["optimizer"]): s for s in summary_rows(ROWS, "shared")}
    assert shared[("A", "adam")]["acc_mean"] == pytest.approx(0.96)
    with pytest.raises(ValueError, match="mode"):
        summary_rows(ROWS, "best")


def test_shared_ignores_settings_missing_on_some_stream() -> None:
    rows = [*ROWS, _row("A", "adam lr=1", 0, 1.0, 1.0)]  # only run on stream A
    assert select_shared(rows)["adam"] == "adam lr=0.01"


def test_merge_replaces_equal_keys_and_files_roundtrip(tmp_path: Path) -> None:
    rerun = _row("A", "learned", 0, 0.55, 0.65)
    merged = merge_rows(ROWS, [rerun, _row("C", "learned", 0, 0.1, 0.1)])
    assert len(merged) == len(ROWS) + 1
    assert next(r for r in merged if r["setting"] == "learned")["test"]["acc"] == 0.65
    path = tmp_path / "r.json"
    save_results(path, {"command": "x"}, merged)
    assert load_results(path)["rows"] == merged
    assert load_results(tmp_path / "absent.json") == {"meta": {}, "rows": []}
    write_csv(tmp_path / "r.csv", merged)
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert len(lines) == len(merged) + 1 and "test_acc" in lines[0] and "val_acc" in lines[0]


def test_table_lists_selected_settings_in_percent() -> None:
    table = format_table(ROWS, "tuned")
    line = next(x for x in table.splitlines() if x.startswith("A ") and " adam " in x)
    assert "adam lr=0.1" in line and "71.0 ± 1.4" in line
