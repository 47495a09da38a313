"""Results files and presentation: JSON (rows), CSV (rows and summaries), text table, plots."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metaopt._files import replace_atomically
from metaopt.continual.selection import METRICS, summary_rows
from metaopt.continual.suite import row_key

__all__ = [
    "format_markdown",
    "format_table",
    "load_results",
    "merge_rows",
    "plot_results",
    "save_results",
    "write_csv",
]

Row = dict[str, Any]

_HEADERS = {
    "acc": "ACC",
    "bwt": "BWT",
    "fwt": "FWT",
    "forgetting": "Forget",
    "learning_acc": "LA",
}


_ROW_KEYS = ("stream", "model", "optimizer", "setting", "seed", "test")
"""Keys every result row has (its identity, and what selection and tables read)."""


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results JSON (``{"meta": {...}, "rows": [...]}``); empty if absent.

    Raises:
        ValueError: ``path`` is a folder, not JSON, or not a results file (the message
            names it and what is wrong).
    """
    path = Path(path)
    if not path.exists():
        return {"meta": {}, "rows": []}
    if not path.is_file():
        raise ValueError(f"{path}: not a results file (a folder?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a metaopt results file (no 'rows' list)")
    if not isinstance(data.get("meta", {}), dict):
        raise ValueError(f"{path}: not a metaopt results file ('meta' is not an object)")
    for i, row in enumerate(data["rows"]):
        if not isinstance(row, dict) or not all(k in row for k in _ROW_KEYS):
            raise ValueError(f"{path}: row {i} is not a result row (needs {', '.join(_ROW_KEYS)})")
    return data


def merge_rows(old: Sequence[Row], new: Sequence[Row]) -> list[Row]:
    """``old`` rows updated with ``new`` ones; a new row replaces an old one of equal key
    ``(stream, model, setting, seed)``. Order: old rows first, new keys appended."""
    merged = {row_key(r): r for r in old}
    merged.update({row_key(r): r for r in new})
    return list(merged.values())


def save_results(path: str | os.PathLike[str], meta: dict[str, Any], rows: Sequence[Row]) -> None:
    """Write ``{"meta", "rows"}`` as JSON atomically (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replace_atomically(path, "w") as handle:
        json.dump({"meta": meta, "rows": list(rows)}, handle, indent=1)


def write_csv(path: str | os.PathLike[str], rows: Sequence[Row]) -> None:
    """Write one CSV line per row (nested ``test``/``val`` metrics flattened, matrices
    omitted), or per summary row (``summary_rows`` output) as they are."""
    flat = []
    for r in rows:
        line = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        for split in ("test", "val"):
            if isinstance(r.get(split), dict):
                line.update({f"{split}_{k}": v for k, v in r[split].items()})
        if "hyper" in r:
            line["hyper"] = json.dumps(r["hyper"], sort_keys=True)
        flat.append(line)
    fields = list(dict.fromkeys(k for line in flat for k in line))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)


def format_table(rows: Sequence[Row], mode: str = "tuned") -> str:
    """A text table of mean +- std over seeds (in %) per stream x model x optimizer."""
    summary = summary_rows(rows, mode)
    header = ["stream", "model", "optimizer", "setting", "seeds"] + [_HEADERS[m] for m in METRICS]
    lines = [header]
    for s in summary:
        cells = [s["stream"], s["model"], s["optimizer"], s["setting"], str(s["n_seeds"])]
        for m in METRICS:
            cells.append(f"{100 * s[f'{m}_mean']:6.1f} ±{100 * s[f'{m}_std']:4.1f}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    previous = None
    for n, line in enumerate(lines):
        group = tuple(line[:2])
        if n > 1 and group != previous:
            text.append("")
        previous = group
        text.append(
            "  ".join(
                c.ljust(w) if i < 4 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            text.append("-" * len(text[-1]))
    return "\n".join(text)


def format_markdown(rows: Sequence[Row], mode: str = "tuned") -> str:
    """A Markdown table of mean ± std over seeds (in %) per stream x model x optimizer."""
    header = ["stream", "model", "optimizer", "setting", "seeds"] + [_HEADERS[m] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for s in summary_rows(rows, mode):
        cells = [s["stream"], s["model"], s["optimizer"], f"`{s['setting']}`", str(s["n_seeds"])]
        cells += [f"{100 * s[f'{m}_mean']:.1f} ± {100 * s[f'{m}_std']:.1f}" for m in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(
    rows: Sequence[Row], out_dir: str | os.PathLike[str], mode: str = "tuned"
) -> list[Path]:
    """Save PNGs per (stream, model): seed-averaged test accuracy matrices of the selected
    setting of each optimizer, and the accuracy of each task over time.

    Returns:
        The written files.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summary_rows(rows, mode)
    pairs = sorted({(s["stream"], s["model"]) for s in summary})
    written = []
    for stream, model in pairs:
        chosen = [s for s in summary if (s["stream"], s["model"]) == (stream, model)]
        mats = []
        for s in chosen:
            runs = [
                r
                for r in rows
                if (r["stream"], r["model"], r["setting"]) == (stream, model, s["setting"])
            ]
            mats.append((s["optimizer"], s["setting"], np.mean([r["R"] for r in runs], axis=0)))
        n = len(mats)
        fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0), squeeze=False, layout="constrained")
        for ax, (_, setting, R) in zip(axes[0], mats, strict=True):
            ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
            T = R.shape[0]
            for i in range(T):
                for j in range(T):
                    color = "white" if R[i, j] < 0.6 else "black"
                    ax.text(
                        j,
                        i,
                        f"{100 * R[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=color,
                    )
            ax.set_title(setting, fontsize=8)
            ax.set_xlabel("evaluated task")
            ax.set_ylabel("after training task")
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
        fig.suptitle(f"{stream} / {model}: test accuracy R (%), {mode} settings", fontsize=9)
        path = out_dir / f"{stream}_{model}_matrix.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, axes = plt.subplots(
            1, n, figsize=(2.6 * n, 2.8), squeeze=False, sharey=True, layout="constrained"
        )
        for ax, (_, setting, R) in zip(axes[0], mats, strict=True):
            T = R.shape[0]
            for j in range(T):
                ax.plot(range(j, T), R[j:, j], marker="o", ms=3, label=f"task {j}")
            ax.set_title(setting, fontsize=8)
            ax.set_xlabel("after training task")
            ax.set_ylim(0, 1.02)
            ax.set_xticks(range(T))
        axes[0][0].set_ylabel("test accuracy")
        axes[0][-1].legend(fontsize=6, loc="lower left")
        fig.suptitle(f"{stream} / {model}: accuracy of each task over time", fontsize=9)
        path = out_dir / f"{stream}_{model}_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
