"""Hyper-parameter selection on validation accuracy, and aggregation over seeds.

Selection never looks at test accuracies: a setting is scored by the validation ACC
(mean over tasks of the final validation accuracies, ``row["val"]["acc"]``) averaged
over seeds. Two reports:

- **tuned**: for each (stream, model, optimizer), the setting with the best score.
- **shared**: for each optimizer, the one setting with the best score averaged over every
  (stream, model) of the suite — what a user without a sweep of their own gets.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["METRICS", "aggregate", "select_shared", "select_tuned", "summary_rows"]

Row = dict[str, Any]

METRICS = ("acc", "bwt", "fwt", "forgetting", "learning_acc")
"""Metrics reported per row (see :mod:`metaopt.continual.metrics`)."""


def _val_score(rows: Iterable[Row]) -> float:
    scores = [r["val"]["acc"] for r in rows if r.get("val")]
    return statistics.fmean(scores) if scores else float("-inf")


def select_tuned(rows: Sequence[Row]) -> dict[tuple[str, str, str], str]:
    """Best setting label per ``(stream, model, optimizer)`` by mean validation ACC."""
    groups: dict[tuple[str, str, str], dict[str, list[Row]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for r in rows:
        groups[(r["stream"], r["model"], r["optimizer"])][r["setting"]].append(r)
    return {
        key: max(sorted(by_setting), key=lambda s: _val_score(by_setting[s]))
        for key, by_setting in groups.items()
    }


def select_shared(rows: Sequence[Row]) -> dict[str, str]:
    """One setting label per optimizer: best validation ACC averaged over all
    (stream, model) pairs (each pair weighs the same, whatever its number of seeds).

    Only settings that were run on every (stream, model) pair of that optimizer compete.
    """
    cells: dict[str, dict[str, dict[tuple[str, str], list[Row]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in rows:
        cells[r["optimizer"]][r["setting"]][(r["stream"], r["model"])].append(r)
    chosen = {}
    for optimizer, by_setting in cells.items():
        pairs = set().union(*(set(c) for c in by_setting.values()))
        complete = {s: c for s, c in by_setting.items() if set(c) == pairs}
        candidates = complete or by_setting
        chosen[optimizer] = max(
            sorted(candidates),
            key=lambda s: statistics.fmean(_val_score(v) for v in candidates[s].values()),
        )
    return chosen


def aggregate(rows: Sequence[Row], split: str = "test") -> dict[str, tuple[float, float]]:
    """Mean and standard deviation (0 for one seed) over rows of each metric of ``split``."""
    out = {}
    for metric in METRICS:
        values = [r[split][metric] for r in rows]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        out[metric] = (statistics.fmean(values), std)
    return out


def summary_rows(rows: Sequence[Row], mode: str = "tuned") -> list[Row]:
    """Test metrics (mean, std over seeds) of the selected setting per
    (stream, model, optimizer), for ``mode`` ``"tuned"`` or ``"shared"``.

    Each returned dict has ``stream, model, optimizer, setting, mode, n_seeds`` and
    ``<metric>_mean`` / ``<metric>_std`` for every metric of :data:`METRICS`, plus
    ``val_acc`` (the selection score).
    """
    if mode not in ("tuned", "shared"):
        raise ValueError(f"mode must be 'tuned' or 'shared', got {mode!r}")
    tuned = select_tuned(rows)
    shared = select_shared(rows)
    out = []
    for stream, model, optimizer in sorted(tuned, key=_order):
        setting = tuned[(stream, model, optimizer)] if mode == "tuned" else shared[optimizer]
        chosen = [
            r for r in rows if (r["stream"], r["model"], r["setting"]) == (stream, model, setting)
        ]
        if not chosen:
            continue
        summary: Row = {
            "stream": stream,
            "model": model,
            "optimizer": optimizer,
            "setting": setting,
            "mode": mode,
            "n_seeds": len(chosen),
            "val_acc": _val_score(chosen),
        }
        for metric, (mean, std) in aggregate(chosen).items():
            summary[f"{metric}_mean"] = mean
            summary[f"{metric}_std"] = std
        out.append(summary)
    return out


_OPTIMIZER_ORDER = {"sgd": 0, "adam": 1, "ewc": 2, "si": 3, "learned": 4}


def _order(key: tuple[str, str, str]) -> tuple[str, str, int, str]:
    stream, model, optimizer = key
    return stream, model, _OPTIMIZER_ORDER.get(optimizer, 99), optimizer
