"""Datasets in the MNIST layout other than MNIST: any folder of IDX files in the data
directory, through the loader, the stream builder and ``metaopt bench``."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaopt.cli import main
from metaopt.continual.data import (
    DataFileError,
    check_dataset,
    dataset_classes,
    load_dataset,
    load_digits_tensors,
    load_idx_dataset,
)
from metaopt.continual.models import build_model
from metaopt.continual.streams import n_outputs
from metaopt.continual.suite import Budget, build_stream, check_stream, parse_stream
from tests.cli_args import TINY_BENCH
from tests.idx_files import toy_idx_dataset as _toy
from tests.idx_files import write_idx_dataset as _write


@pytest.mark.parametrize(
    ("shape", "dtype", "expected"),
    [((12, 10), np.uint8, (1, 12, 10)), ((3, 8, 8), np.uint8, (3, 8, 8)),
     ((9, 9), np.float32, (1, 9, 9))],
)
def test_any_folder_loads_as_images_and_labels(
    tmp_path: Path, shape: tuple[int, ...], dtype: type, expected: tuple[int, ...]
) -> None:
    images = _toy(tmp_path, "emnist-like", shape, dtype=dtype)
    x, y = load_idx_dataset("emnist-like", tmp_path, "test")
    assert x.shape == (80, *expected) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.shape == (80,) and int(y.max()) <= 3
    scale = 255.0 if dtype is np.uint8 else 1.0
    want = torch.from_numpy(images["test"] / scale).float()
    assert torch.allclose(x.reshape(80, -1), want.reshape(80, -1))
    assert torch.equal(load_dataset("emnist-like", tmp_path, "test")[0], x)
    assert dataset_classes("emnist-like", tmp_path) == 4
    assert dataset_classes("mnist", tmp_path) == 10  # named ones: without reading
    check_dataset("emnist-like", tmp_path)


def test_bad_folder_names_and_contents(tmp_path: Path) -> None:
    for bad in ("../toy", ".toy", "a/b", "", "digits/"):
        with pytest.raises(ValueError, match="unknown dataset"):
            load_idx_dataset(bad, tmp_path)
    with pytest.raises(ValueError, match="scikit-learn"):
        load_idx_dataset("digits", tmp_path)
    with pytest.raises(DataFileError, match=r"missing .*nothere.*put train-images"):
        check_dataset("nothere", tmp_path)
    with pytest.raises(DataFileError, match="put train-images"):
        load_idx_dataset("nothere", tmp_path)
    labels = {"train": np.zeros(4, np.uint8), "test": np.zeros(4, np.uint8)}
    _write(tmp_path, "ints", {k: np.zeros((4, 5, 5), np.int16) for k in labels}, labels)
    with pytest.raises(DataFileError, match="int16; expected uint8"):
        load_idx_dataset("ints", tmp_path)
    negative = {k: np.array([0, 1, -1, 2], np.int8) for k in labels}
    _write(tmp_path, "neg", {k: np.zeros((4, 5, 5), np.uint8) for k in labels}, negative)
    with pytest.raises(DataFileError, match="non-negative integers"):
        load_idx_dataset("neg", tmp_path)
    _write(tmp_path, "empty", {k: np.zeros((0, 5, 5), np.uint8) for k in labels},
           {k: np.zeros(0, np.uint8) for k in labels})
    with pytest.raises(DataFileError, match="no images"):
        load_idx_dataset("empty", tmp_path)
    _write(tmp_path, "flat", {k: np.zeros((4, 25), np.uint8) for k in labels}, labels)
    with pytest.raises(DataFileError, match=r"expected images \[N, H, W\]"):
        load_idx_dataset("flat", tmp_path)


@pytest.mark.parametrize("stream", ["split-toy-domain", "split-toy-task", "permuted-toy",
                                    "rotated-toy"])
def test_streams_and_models_on_a_non_square_folder_dataset(tmp_path: Path, stream: str) -> None:
    _toy(tmp_path)  # 12 x 10 images, 4 classes
    spec = parse_stream(stream, n_tasks=2)
    check_stream(spec, tmp_path)
    tasks = build_stream(spec, Budget(n_train=40, n_val=10, n_test=20), seed=0,
                         data_dir=str(tmp_path))
    assert len(tasks) == 2 and tasks[0].x_train.shape[1:] == (1, 12, 10)
    classes = 2 if spec.kind == "split" else 4
    assert all(t.n_classes == classes for t in tasks)
    assert all(int(t.y_train.max()) < classes for t in tasks)
    for name in ("mlp", "cnn", "transformer"):
        model = build_model(name, (1, 12, 10), n_outputs(tasks))
        assert model(tasks[0].x_test[:3]).shape == (3, n_outputs(tasks))


def test_split_classes_must_divide_before_any_run(tmp_path: Path) -> None:
    _toy(tmp_path, n_classes=4)
    with pytest.raises(ValueError, match="4 classes of 'toy' cannot be split into 3"):
        check_stream(parse_stream("split-toy-domain", n_tasks=3), tmp_path)
    check_stream(parse_stream("permuted-toy", n_tasks=3), tmp_path)  # any count


def test_bench_on_a_folder_dataset_equals_the_builtin_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """scikit-learn's digits written as a folder of IDX files (float32 images, so the
    tensors are bit-identical) give the very accuracy matrices of the built-in digits."""
    images, labels = {}, {}
    for split in ("train", "test"):
        x, y = load_digits_tensors(split)
        images[split], labels[split] = x[:, 0].numpy(), y.numpy().astype(np.uint8)
    _write(tmp_path / "data", "my-digits", images, labels)
    argv = [*TINY_BENCH, "--data-dir", str(tmp_path / "data"), "--epochs", "4",
            "--train-per-task", "150", "--optimizers", "adam", "--lrs", "0.01"]
    argv[argv.index("--streams") + 1] = "split-digits-task"
    assert main([*argv, "--out", str(tmp_path / "builtin")]) == 0
    argv[argv.index("--streams") + 1] = "split-my-digits-task"
    assert main([*argv, "--out", str(tmp_path / "folder")]) == 0
    (builtin,) = json.loads((tmp_path / "builtin" / "results.json").read_text())["rows"]
    (folder,) = json.loads((tmp_path / "folder" / "results.json").read_text())["rows"]
    assert folder["stream"] == "split-my-digits-task"
    assert folder["R"] == builtin["R"] and folder["b"] == builtin["b"]
    assert folder["test"]["learning_acc"] > 0.8  # learnt, not only equal
    # an indivisible split fails before anything runs, naming the stream
    with pytest.raises(SystemExit):
        main([*argv, "--streams", "permuted-my-digits", "split-my-digits-domain", "--n-tasks",
              "3", "--out", str(tmp_path / "none")])
    assert "split-my-digits-domain" in capsys.readouterr().err
    assert not (tmp_path / "none" / "results.json").exists()


@settings(max_examples=40, deadline=None)
@given(
    side=st.tuples(st.integers(4, 13), st.integers(4, 13)),
    channels=st.sampled_from([1, 3]),
    n_classes=st.integers(2, 8),
    as_float=st.booleans(),
    kind=st.sampled_from(["split", "permuted", "rotated"]),
    scenario=st.sampled_from(["task", "domain", "class"]),
)
def test_any_shape_channels_and_classes_round_trip_into_streams_and_models(
    side: tuple[int, int], channels: int, n_classes: int, as_float: bool, kind: str,
    scenario: str,
) -> None:
    """Whatever the image size, channels, pixel type and number of classes of a folder
    dataset: its pixels load back exactly, every stream kind builds tasks with labels in
    their heads' range, and every model maps its images to ``n_outputs`` logits."""
    shape = side if channels == 1 else (channels, *side)
    n_tasks = next(t for t in (3, 2, 1) if n_classes % t == 0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = _toy(root, "set", shape, n_classes, n=(60, 30),
                      dtype=np.float32 if as_float else np.uint8)
        x, y = load_idx_dataset("set", root, "train")
        assert y.dtype == torch.int64 and int(y.max()) < n_classes
        scale = 1.0 if as_float else 255.0
        want = torch.from_numpy(images["train"] / scale).float().reshape(x.shape)
        assert x.shape == (60, channels, *side) and torch.allclose(x, want)
        spec = parse_stream(f"{kind}-set" + (f"-{scenario}" if kind == "split" else ""),
                            n_tasks=n_tasks)
        check_stream(spec, root)
        tasks = build_stream(spec, Budget(n_train=8, n_val=2, n_test=5), seed=0,
                             data_dir=str(root))
    assert len(tasks) == n_tasks
    outputs = n_outputs(tasks)
    for task in tasks:
        assert task.x_train.shape[1:] == (channels, *side)
        labels = torch.cat([task.y_train, task.y_test])
        assert int(labels.min()) >= 0 and int(labels.max()) < task.n_classes
        assert task.logit_offset + task.n_classes <= outputs
    for name in ("mlp", "cnn", "transformer"):
        model = build_model(name, (channels, *side), outputs)
        assert model(tasks[-1].x_test[:2]).shape == (2, outputs)


@pytest.mark.parametrize("problem", ["cut-short images", "class without test examples"])
def test_bench_finds_data_problems_before_any_run(tmp_path: Path, problem, capsys) -> None:
    """They surfaced when the stream's turn came, after every earlier stream's runs."""
    _toy(tmp_path, n_classes=4)
    folder = tmp_path / "toy"
    if problem == "cut-short images":
        raw = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
        (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    else:
        labels = folder / "t10k-labels-idx1-ubyte"
        data = bytearray(labels.read_bytes())
        data[8:] = bytes(b if b < 2 else 0 for b in data[8:])  # none of the second task
        labels.write_bytes(bytes(data))
    argv = ["bench", "--streams", "split-digits-domain", "split-toy-domain", "--n-tasks", "2",
            "--models", "mlp", "--optimizers", "sgd", "--lrs", "0.1", "--seeds", "0",
            "--steps", "1", "--train-per-task", "20", "--val-per-task", "2",
            "--test-per-task", "10", "--no-progress", "--data-dir", str(tmp_path),
            "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    captured = capsys.readouterr()
    assert "runs; results" not in captured.out  # nothing ran
    assert "toy" in captured.err
