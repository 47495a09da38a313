"""``metaopt bench`` (continual-learning benchmark) and ``metaopt download`` commands."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import logging
import math
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from metaopt._machine import cpu_model
from metaopt._version import __version__
from metaopt.continual import suite as suite_module
from metaopt.continual.data import DATASETS
from metaopt.continual.report import (
    format_markdown,
    format_table,
    load_results,
    merge_rows,
    plot_results,
    save_results,
    write_csv,
)
from metaopt.continual.selection import summary_rows
from metaopt.continual.suite import (
    OPTIMIZERS,
    SUITES,
    Budget,
    SuiteSpec,
    check_stream,
    row_key,
    run_suite,
    suite_from_preset,
)

__all__ = ["register"]

logger = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _finite_float(text: str) -> float:
    """argparse type: a finite number (a NaN or infinite learning rate or strength would
    train to NaN and be reported as a result)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` and ``download`` commands to a top-level ``metaopt`` parser."""
    bench = subparsers.add_parser(
        "bench",
        help="run the continual-learning benchmark",
        description=(
            "Train models sequentially on continual-learning streams with several optimizers "
            "and report ACC, BWT, FWT, forgetting and learning accuracy (LA, mean diagonal "
            "of R), mean ± std over seeds, in %. Hyper-parameters of the baselines are "
            "chosen on validation splits held out from the training data."
        ),
    )
    bench.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default="quick",
        help="preset (default quick); the options below override its values",
    )
    bench.add_argument(
        "--streams",
        nargs="+",
        metavar="NAME",
        help="streams <kind>-<dataset>[-<scenario>], kind in split/permuted/rotated, "
        f"dataset in {'/'.join(DATASETS)} or the name of a folder of the data directory "
        "holding IDX files in the MNIST layout, scenario in task/domain/class "
        "(e.g. split-mnist-domain permuted-mnist split-kmnist-task)",
    )
    bench.add_argument("--n-tasks", type=_positive_int, help="tasks per stream (default 5)")
    bench.add_argument("--models", nargs="+", choices=["mlp", "cnn", "transformer"])
    bench.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        metavar="OPT",
        help=f"subset of {', '.join(OPTIMIZERS)}",
    )
    bench.add_argument("--lrs", nargs="+", type=_finite_float, help="SGD/Adam learning-rate grid")
    bench.add_argument("--ewc-strengths", nargs="+", type=_finite_float, help="EWC lambda grid")
    bench.add_argument("--si-strengths", nargs="+", type=_finite_float, help="SI c grid")
    bench.add_argument(
        "--learned-checkpoint",
        metavar="NAME_OR_PT",
        help="learned optimizer checkpoint: a shipped name (default: 'default') or a .pt file; "
        "other than 'default' it is reported as optimizer learned[<file stem>]",
    )
    bench.add_argument("--seeds", nargs="+", type=int, help="seeds (e.g. 0 1 2)")
    budget = bench.add_argument_group("budget (defaults from the suite)")
    budget.add_argument("--train-per-task", type=_positive_int, help="training examples per task")
    budget.add_argument("--val-per-task", type=_positive_int, help="validation examples per task")
    budget.add_argument("--test-per-task", type=_positive_int, help="test examples per task")
    budget.add_argument("--epochs", type=_positive_int, help="epochs per task")
    budget.add_argument(
        "--steps", type=_positive_int, help="optimizer steps per task (overrides epochs)"
    )
    budget.add_argument("--batch-size", type=_positive_int)
    bench.add_argument("--data-dir", help="MNIST data directory (default $METAOPT_DATA_DIR)")
    bench.add_argument("--out", default="metaopt-bench", help="output folder (default %(default)s)")
    bench.add_argument(
        "--merge-into",
        metavar="JSON",
        help="results file to update: its rows are kept and rows of this run replace those "
        "with the same (stream, model, setting, seed); default OUT/results.json (fresh)",
    )
    bench.add_argument(
        "--resume", action="store_true", help="skip runs already in the results file"
    )
    bench.add_argument("--plot", action="store_true", help="save PNG plots into OUT")
    bench.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    bench.add_argument("--device", help="torch device for training, e.g. cuda (default cpu)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=bench_command)

    download = subparsers.add_parser(
        "download", help="download MNIST / Fashion-MNIST IDX files (checksum-verified)"
    )
    download.add_argument("dataset", choices=["mnist", "fashion-mnist"])
    download.add_argument("--data-dir", help="destination root (default $METAOPT_DATA_DIR)")
    download.add_argument("--base-url", help="mirror URL (default: canonical source)")
    download.add_argument("--force", action="store_true", help="download even if present")
    download.set_defaults(func=download_command)


def _budget(args: argparse.Namespace) -> Budget:
    base: Budget = SUITES[args.suite]["budget"]
    return Budget(
        n_train=args.train_per_task if args.train_per_task is not None else base.n_train,
        n_val=args.val_per_task if args.val_per_task is not None else base.n_val,
        n_test=args.test_per_task if args.test_per_task is not None else base.n_test,
        epochs=args.epochs if args.epochs is not None else base.epochs,
        steps=args.steps if args.steps is not None else base.steps,
        batch_size=args.batch_size if args.batch_size is not None else base.batch_size,
    )


def _version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _meta(args: argparse.Namespace, argv_used: list[str]) -> dict[str, Any]:
    return {
        "command": "metaopt " + shlex.join(argv_used),
        "suite": args.suite,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {
            "metaopt": __version__,
            "torch": torch.__version__,
            "numpy": _version_of("numpy"),
            "python": platform.python_version(),
        },
        "machine": (
            f"{platform.machine()} {platform.system()}, {cpu_model()}, "
            f"torch threads {args.threads}"
        ),
    }


def _checkpoint_info(name: str) -> dict[str, Any]:
    """Provenance of a learned-optimizer checkpoint (shipped name or path): file, SHA-256,
    metadata."""
    import hashlib

    from metaopt.learned.checkpoint import CHECKPOINT_DIR, load_checkpoint

    shipped = Path(name).suffix != ".pt"
    path = CHECKPOINT_DIR / f"{name}.pt" if shipped else Path(name)
    _, metadata = load_checkpoint(path)
    return {
        "path": f"metaopt/learned/checkpoints/{name}.pt" if shipped else str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "metadata": metadata,
    }


def _check_device(name: str | None) -> None:
    """Raise ``ValueError`` unless ``name`` (``--device``) is a device usable here."""
    if name is None:
        return
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a torch device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    if device.type == "meta":
        raise ValueError("--device meta holds no values: nothing can be trained or measured")
    try:  # the index too (cuda:7 on a one-GPU machine), and mps / xpu builds
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        text = str(exc).strip()
        reason = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        raise ValueError(f"--device {name!r} is not usable on this machine: {reason}") from exc


def _check_n_tasks(results_path: Path, rows: list[dict[str, Any]], streams: dict[str, int]) -> None:
    """Raise ``ValueError`` if a stored row of one of ``streams`` (name -> number of tasks)
    was run with another number of tasks (the name does not tell them apart)."""
    for row in rows:
        expected = streams.get(row["stream"])
        if expected is not None and row.get("n_tasks", expected) != expected:
            raise ValueError(
                f"{results_path} holds {row['stream']} runs with {row['n_tasks']} tasks, this "
                f"run uses {expected}: merged or resumed rows must share the number of tasks "
                "(--n-tasks)"
            )


def _planned(suite: SuiteSpec) -> set[tuple[str, str, str, int]]:
    """The row keys of every run of ``suite``."""
    return {
        (spec.name, model, setting.label, seed)
        for spec in suite.streams
        for model in suite.models
        for setting in suite.settings
        for seed in suite.seeds
    }


def _check_checkpoints(
    results_path: Path,
    rows: list[dict[str, Any]],
    stored: dict[str, dict[str, Any]],
    infos: dict[str, dict[str, Any]],
    to_run: set[tuple[str, str, str, int]],
) -> None:
    """Raise ``ValueError`` if rows of a learned-optimizer label would stay in the results
    next to (or instead of) this run's, though they come from another checkpoint file (the
    label ``learned[<stem>]`` holds only the file stem)."""
    for label, info in infos.items():
        old = stored.get(label)
        if old is None or old["sha256"] == info["sha256"]:
            continue
        if any(r["setting"] == label and row_key(r) not in to_run for r in rows):
            raise ValueError(
                f"{results_path} holds {label} rows of checkpoint {old['path']} (sha256 "
                f"{old['sha256'][:12]}...), not of {info['path']} (sha256 "
                f"{info['sha256'][:12]}...) and this run would keep some of them: re-run all "
                "of them without --resume, rename the checkpoint file or use another results "
                "file"
            )


def bench_command(args: argparse.Namespace) -> int:
    """Run ``metaopt bench``; returns the exit status."""
    _check_device(args.device)
    torch.set_num_threads(args.threads)
    suite = suite_from_preset(
        args.suite,
        streams=args.streams,
        models=args.models,
        optimizers=args.optimizers,
        lrs=args.lrs,
        ewc_strengths=args.ewc_strengths,
        si_strengths=args.si_strengths,
        seeds=args.seeds,
        n_tasks=args.n_tasks,
        budget=_budget(args),
        learned_checkpoint=args.learned_checkpoint,
    )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is not a folder")
    results_path = Path(args.merge_into) if args.merge_into else out / "results.json"
    # before any run, not after the first one: where the results go must be writable
    for folder, option in ((out, "--out"), (results_path.parent, "--merge-into")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            raise ValueError(f"{option}: cannot write into {folder} ({exc})") from exc
    if args.merge_into and not results_path.exists():
        logger.warning("--merge-into %s: no such file yet, this run starts it", results_path)
    if not (args.merge_into or args.resume) and results_path.is_file():
        logger.warning(
            "%s exists and this run replaces it; pass --resume or --merge-into %s to keep "
            "its rows",
            results_path,
            results_path,
        )
    existing = load_results(results_path) if (args.merge_into or args.resume) else {"rows": []}
    rows: list[dict[str, Any]] = list(existing["rows"])
    skip = {row_key(r) for r in rows} if args.resume else set()
    old_meta = existing.get("meta", {})
    meta = {**old_meta, **_meta(args, getattr(args, "argv", sys.argv[1:]))}
    # every command that contributed rows, oldest first (merges keep the history)
    history = old_meta.get("commands", [old_meta["command"]] if "command" in old_meta else [])
    meta["commands"] = [*history, meta["command"]]
    meta["budget"] = dataclasses.asdict(suite.budget)
    if old_meta.get("budget", meta["budget"]) != meta["budget"]:
        raise ValueError(
            f"{results_path} holds runs with budget {old_meta['budget']}, this run uses "
            f"{meta['budget']}: merged rows must share one budget (same --suite and budget options)"
        )
    _check_n_tasks(results_path, rows, {s.name: s.n_tasks for s in suite.streams})
    to_run = _planned(suite) - skip
    streams_to_run = {key[0] for key in to_run}
    # before any run, not when a stream's turn comes: every stream's files here, what only
    # the data can tell after the other checks (below)
    specs = [spec for spec in suite.streams if spec.name in streams_to_run]
    for spec in specs:
        check_stream(spec, args.data_dir)
    learned = [s for s in suite.settings if s.optimizer == "learned"]
    if learned:
        infos = {s.label: _checkpoint_info(s.checkpoint) for s in learned}
        stored = old_meta.get("learned_checkpoints", {})
        _check_checkpoints(results_path, rows, stored, infos, to_run)
        meta["learned_checkpoints"] = {**stored, **infos}

    # each stream built once for the first seed (a few seconds): unreadable images, a task
    # without test examples or too few examples for the budget stop here, before any run
    for spec in specs:
        suite_module.build_stream(spec, suite.budget, suite.seeds[0], args.data_dir)

    from tqdm import tqdm

    total = len(to_run)
    for setting in learned:
        info = meta["learned_checkpoints"][setting.label]
        description = info["metadata"].get("description", "no description")
        print(f"{setting.label}: checkpoint {info['path']} ({description})")
    print(
        f"metaopt bench --suite {args.suite}: {len(suite.streams)} streams x "
        f"{len(suite.models)} models x {len(suite.settings)} settings x {len(suite.seeds)} "
        f"seeds = {total} runs; results -> {results_path}",
        flush=True,
    )
    bar = tqdm(total=total, disable=args.no_progress, unit="run", dynamic_ncols=True)
    for row in run_suite(
        suite, args.data_dir, skip=skip, on_start=bar.set_description_str, device=args.device
    ):
        rows = merge_rows(rows, [row])
        save_results(results_path, meta, rows)
        bar.update(1)
    bar.close()

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "runs.csv", rows)
    write_csv(out / "summary.csv", summary_rows(rows, "tuned") + summary_rows(rows, "shared"))
    for mode, title in (
        ("tuned", "TUNED PER BENCHMARK (best validation ACC per stream x model)"),
        ("shared", "SHARED SETTING (best mean validation ACC over the whole suite)"),
    ):
        print(f"\n{title}; test metrics in %, mean ± std over seeds")
        print(format_table(rows, mode))
    (out / "summary.md").write_text(
        "\n\n".join(f"### {mode}\n\n{format_markdown(rows, mode)}" for mode in ("tuned", "shared"))
        + "\n"
    )
    print(
        "\nACC: final mean accuracy; BWT: backward transfer; FWT: forward transfer; Forget: "
        "forgetting; LA: mean accuracy of each task right after training it."
    )
    if args.plot:
        written = plot_results(rows, out, "tuned")
        print(f"\n{len(written)} plots written to {out}/")
    print(f"\nresults: {results_path}, {out}/runs.csv, summary.csv, summary.md")
    return 0


def download_command(args: argparse.Namespace) -> int:
    """Run ``metaopt download``; returns the exit status."""
    from metaopt.continual.download import download_dataset

    paths = download_dataset(args.dataset, args.data_dir, base_url=args.base_url, force=args.force)
    for path in paths:
        print(path)
    return 0
