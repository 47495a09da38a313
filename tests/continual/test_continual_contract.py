"""Adversarial contract tests of ``metaopt.continual``: what a user running it on their own
data and machines relies on (hand-computed values, bad input, resumed and merged runs)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gzip
import http.server
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from metaopt.cli import main
from metaopt.continual import suite as suite_module
from metaopt.continual.baselines import EWC, SI
from metaopt.continual.data import DataFileError, load_mnist, read_idx
from metaopt.continual.download import SHA256, download_dataset, verify_file
from metaopt.continual.models import build_model
from metaopt.continual.runner import TaskContext, run_stream
from metaopt.continual.streams import (
    Task,
    n_outputs,
    split_stream,
    stream_from_tensors,
    subsample,
    with_validation,
)
from tests.cli_args import TINY_BENCH
from tests.continual.http_server import Respond, send, serve, serve_folder

# --------------------------------------------------------------------------- baselines


def _quadratic_steps(opt: torch.optim.Optimizer, w: torch.Tensor, target: torch.Tensor, n: int):
    """``n`` steps on ``sum (w - target)^2`` through the optimizer's closure."""
    for _ in range(n):

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = ((w - target) ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("cls", [EWC, SI])
def test_state_dict_roundtrip_keeps_the_penalty_active(cls: type) -> None:
    """A regulariser restored from ``state_dict`` (resuming a run) must take the same steps
    as the original: the penalty of the consolidated tasks is still applied."""
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = cls([w], base=torch.optim.SGD, lr=0.1, strength=5.0)
    _quadratic_steps(opt, w, torch.tensor([3.0, 0.0, -1.0]), 5)
    opt.new_task()  # fallback importance (EWC) / path integral (SI), anchor here
    assert opt.penalty().item() == 0.0
    state = copy.deepcopy(opt.state_dict())

    # also a state dict written before the task counters were saved with it
    legacy = {k: v for k, v in copy.deepcopy(state).items() if k != "counters"}
    copies = [nn.Parameter(w.detach().clone()) for _ in range(2)]
    restored = []
    for w_copy, saved in zip(copies, (state, legacy), strict=True):
        restored.append(cls([w_copy], base=torch.optim.SGD, lr=0.1, strength=5.0))
        restored[-1].load_state_dict(saved)
    second = torch.tensor([-4.0, 4.0, 2.0])
    _quadratic_steps(opt, w, second, 3)
    for w_copy, other in zip(copies, restored, strict=True):
        _quadratic_steps(other, w_copy, second, 3)
        assert torch.allclose(w_copy, w), "the restored optimizer no longer applies the penalty"


@pytest.mark.parametrize("cls", [EWC, SI])
def test_parameter_groups_are_accepted_with_their_own_options(cls: type) -> None:
    """The docstrings promise "parameters or groups": a frozen group (lr 0) stays put."""
    a = nn.Parameter(torch.ones(2))
    b = nn.Parameter(torch.ones(2))
    opt = cls([{"params": [a]}, {"params": [b], "lr": 0.0}], base=torch.optim.SGD, lr=0.5)
    _quadratic_steps(opt, a, torch.zeros(2), 1)
    assert torch.allclose(a.detach(), torch.zeros(2))  # 1 - 0.5 * 2 * 1
    ((b - 3.0) ** 2).sum().backward()
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2))
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.0]


def _ewc_task(x: torch.Tensor) -> Task:
    return Task("t", x, torch.zeros(len(x), dtype=torch.long), x, x[:, 0, 0, 0].long(), 2, 0)


def test_ewc_fisher_and_online_accumulation_by_hand() -> None:
    """At zero weights a 2-class linear model predicts (1/2, 1/2), so whatever label is
    sampled, d log p / d bias = +-1/2 and d log p / d w = +-x/2: the Fisher is 1/4 for
    the biases and mean(x^2)/4 for the weights, and online EWC keeps gamma * F_1 + F_2."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    weight, bias = model[1].weight, model[1].bias
    opt = EWC(model.parameters(), base=torch.optim.SGD, lr=0.0, strength=4.0, gamma=0.5)
    x1 = torch.tensor([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1)
    x2 = torch.tensor([2.0, 4.0]).reshape(2, 1, 1, 1)
    loss = nn.functional.cross_entropy
    opt.end_task(TaskContext(model, _ewc_task(x1), loss))
    opt.new_task()
    f1_w = torch.full((2, 1), (1 + 4 + 9) / 3 / 4)
    assert torch.allclose(opt.state[weight]["importance"], f1_w)
    assert torch.allclose(opt.state[bias]["importance"], torch.full((2,), 0.25))
    opt.end_task(TaskContext(model, _ewc_task(x2), loss))
    opt.new_task()
    f2_w = torch.full((2, 1), (4 + 16) / 2 / 4)
    assert torch.allclose(opt.state[weight]["importance"], 0.5 * f1_w + f2_w)
    assert torch.allclose(opt.state[bias]["importance"], torch.full((2,), 0.5 * 0.25 + 0.25))
    with torch.no_grad():
        weight.add_(torch.tensor([[1.0], [-2.0]]))
    expected = 0.5 * 4.0 * ((0.5 * f1_w + f2_w) * torch.tensor([[1.0], [4.0]])).sum()
    assert opt.penalty().item() == pytest.approx(expected.item())


# --------------------------------------------------------------------------- IDX files


def _idx(shape: tuple[int, ...], payload: bytes) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape) + payload


def _corrupt_deflate(raw: bytes) -> bytes:
    """A gzip file with a valid header whose compressed stream is garbage."""
    data = bytearray(gzip.compress(raw))
    data[12:40] = b"\xff" * 28
    return bytes(data)


def test_idx_with_zero_items_is_an_empty_tensor(tmp_path: Path) -> None:
    (tmp_path / "none").write_bytes(_idx((0, 28, 28), b""))
    assert read_idx(tmp_path / "none").shape == (0, 28, 28)


def test_corrupt_deflate_stream_is_a_data_file_error(tmp_path: Path) -> None:
    """A gzip file damaged inside its compressed data (not only truncated) names the file,
    for the loader and for the checksum check alike."""
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(_corrupt_deflate(_idx((5000,), bytes(5000))))
    with pytest.raises(DataFileError, match="train-labels"):
        read_idx(path)
    with pytest.raises(DataFileError, match="train-labels"):
        verify_file(path, SHA256["mnist"]["train-labels-idx1-ubyte"])


# --------------------------------------------------------------------------- downloads

MNIST_FILES = sorted(f"{stem}.gz" for stem in SHA256["mnist"])

def _hang_up(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.close_connection = True
    handler.wfile.flush()
    handler.connection.shutdown(2)


def _short_body(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Announces 1 MB, sends half of it and hangs up."""
    body = gzip.compress(os.urandom(1 << 20))
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body[: len(body) // 2])
    _hang_up(handler)


def _short_chunked(handler: http.server.BaseHTTPRequestHandler) -> None:
    """A chunked response that stops in the middle of its second chunk."""
    body = gzip.compress(os.urandom(1 << 16))
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    handler.wfile.write(b"1000\r\n" + body[:4096] + b"\r\n1000\r\n" + body[4096:5000])
    _hang_up(handler)


def _garbled_gzip(handler: http.server.BaseHTTPRequestHandler) -> None:
    send(handler, _corrupt_deflate(bytes(1 << 16)))


def _server_error(handler: http.server.BaseHTTPRequestHandler) -> None:
    handler.send_error(503)


@pytest.mark.parametrize(
    ("respond", "message"),
    [
        (_short_body, "incomplete"),
        (_short_chunked, "incomplete"),
        (_garbled_gzip, "train-images"),
        (_server_error, "503"),
    ],
)
def test_failed_download_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, respond: Respond, message: str
) -> None:
    """Whatever goes wrong on the wire, the user gets a ``DataFileError`` (which the CLI
    reports) naming the URL, and no file (final or temporary) is left in the folder."""
    with serve(respond) as (url, _), pytest.raises(DataFileError, match=message) as exc:
        download_dataset("mnist", tmp_path, base_url=url, timeout=10)
    assert url in str(exc.value)
    assert list((tmp_path / "mnist").iterdir()) == []


def test_local_file_with_a_corrupt_stream_is_downloaded_again(
    data_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in MNIST_FILES:
        shutil.copy(data_dir / "mnist" / name, folder / name)
    damaged = folder / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(_corrupt_deflate(gzip.decompress(damaged.read_bytes())))
    with serve(serve_folder(data_dir / "mnist")) as (url, requests):
        download_dataset("mnist", tmp_path, base_url=url, timeout=10)
    assert requests == ["t10k-labels-idx1-ubyte.gz"]
    verify_file(damaged, SHA256["mnist"]["t10k-labels-idx1-ubyte"])


def test_downloaded_files_follow_the_umask(data_dir: Path, tmp_path: Path) -> None:
    """A shared data directory must be readable by the other users: the files get the
    permissions of any new file (0o666 minus the umask), not the private 0o600 of a
    temporary file."""
    old = os.umask(0o022)
    try:
        with serve(serve_folder(data_dir / "mnist")) as (url, _):
            paths = download_dataset("mnist", tmp_path, base_url=url, timeout=10)
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == MNIST_FILES
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(0o644)}
    x, y = load_mnist("mnist", tmp_path, "test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)


def test_results_file_write_is_atomic_and_shared(tmp_path: Path) -> None:
    """A results file that cannot be written keeps its previous content and leaves no
    temporary file behind; a written one is readable by the other users (umask)."""
    from metaopt.continual.report import load_results, save_results

    path = tmp_path / "results.json"
    old = os.umask(0o022)
    try:
        save_results(path, {"suite": "quick"}, [_fake_row(2)])
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_results(path, {"suite": "quick"}, [{**_fake_row(2), "seed": torch.zeros(1)}])
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert load_results(path)["rows"] == [_fake_row(2)]


# --------------------------------------------------------------------------- streams, runner


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging the test session) if the block runs longer than ``seconds``."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _toy(n: int, n_classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 3, 3, generator=gen), torch.arange(n) % n_classes


def _run(stream: list[Task], **budget: int) -> object:
    return run_stream(
        functools.partial(build_model, "mlp", (1, 3, 3), n_outputs(stream), hidden=(4,)),
        functools.partial(torch.optim.SGD, lr=0.1),
        stream,
        **budget,
    )


def test_split_classes_without_training_examples(caplog: pytest.LogCaptureFixture) -> None:
    """Requested classes absent from the training labels (a typo, or a subset of the data)
    made an empty task (which ``steps=`` training never finished) without a word; a task
    that keeps one of its classes is built, with a warning naming the missing one."""
    x, y = _toy(40)
    xt, yt = _toy(20, seed=1)
    with pytest.raises(ValueError, match=r"task 1 \(classes \[7, 8\]\) has no training"):
        split_stream(x, y, xt, yt, n_tasks=2, classes=[0, 1, 7, 8])
    stream = split_stream(x, y, xt, yt, n_tasks=2, classes=[0, 1, 2, 7])
    assert len(stream[1].y_train) == 10
    assert "[7]" in caplog.text


@pytest.mark.parametrize("budget", [{"steps": 2}, {"epochs": 1}])
@pytest.mark.parametrize("empty", ["train", "test"])
def test_run_stream_rejects_empty_tasks_before_training(budget: dict, empty: str) -> None:
    """A task without training examples made ``steps=`` loop forever, and one without test
    examples was silently scored 0% accuracy (``R`` looked like total forgetting)."""
    x, y = _toy(40)
    stream = split_stream(x, y, x, y, n_tasks=2, scenario="domain")
    nothing = (x[:0], y[:0])
    fields = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}[empty]
    broken = Task(**{**stream[1].__dict__, **dict(zip(fields, nothing, strict=True))})
    with _deadline(10), pytest.raises(ValueError, match=f"{broken.name}.*no {empty}"):
        _run([stream[0], broken], **budget)


def test_validation_hold_out_keeps_training_examples() -> None:
    """Holding out validation examples must leave something to train on."""
    x, y = _toy(8)
    (task,) = split_stream(x[:1], y[:1], x, y, n_tasks=1, classes=[0])
    with pytest.raises(ValueError, match="training"):
        with_validation([task], 0.5)
    (task,) = split_stream(x[:2], y[:2], x, y, n_tasks=1, classes=[0, 1])
    with pytest.raises(ValueError, match="training"):
        with_validation([task], 0.9)
    (held,) = with_validation([task], 0.5)
    assert len(held.y_train) == 1 and len(held.y_val) == 1


def test_subsample_to_nothing_is_rejected() -> None:
    x, y = _toy(40)
    stream = split_stream(x, y, x, y, n_tasks=2)
    for what, n in (("n_train", 0), ("n_test", 0), ("n_train", -5)):
        with pytest.raises(ValueError, match=f"{what} must be >= 1"):
            subsample(stream, **{what: n})


def test_stream_from_tensors_needs_both_test_tensors() -> None:
    """Passing ``x_test`` without ``y_test`` (or the reverse) silently held out a random
    test set from the training data and ignored the one given."""
    x, y = _toy(40)
    xt, yt = _toy(20, seed=1)
    with pytest.raises(ValueError, match="x_test and y_test"):
        stream_from_tensors(x, y, x_test=xt, n_tasks=2)
    with pytest.raises(ValueError, match="x_test and y_test"):
        stream_from_tensors(x, y, y_test=yt, n_tasks=2)
    stream = stream_from_tensors(x, y, x_test=xt, y_test=yt, n_tasks=2)
    assert sum(len(t.y_train) for t in stream) == 40
    assert sum(len(t.y_test) for t in stream) == 20


# --------------------------------------------------------------------------- metaopt bench

TINY = [*TINY_BENCH, "--optimizers", "sgd", "--lrs", "0.1"]
TINY_BUDGET = suite_module.Budget(n_train=40, n_val=10, n_test=30, epochs=1)


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to build a stream (load data, train) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("bench started working before rejecting its arguments")

    monkeypatch.setattr(suite_module, "build_stream", refuse)


def _with(argv: list[str], option: str, *values: str) -> list[str]:
    """``argv`` with ``option``'s values replaced (or the option added)."""
    if option not in argv:
        return [*argv, option, *values]
    i = argv.index(option) + 1
    j = i
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    return [*argv[:i], *values, *argv[j:]]


@pytest.mark.parametrize(
    ("option", "values", "message"),
    [
        ("--n-tasks", ["0"], "--n-tasks"),
        ("--n-tasks", ["3"], "10 classes"),
        ("--epochs", ["0"], "--epochs"),
        ("--steps", ["0"], "--steps"),
        ("--batch-size", ["0"], "--batch-size"),
        ("--train-per-task", ["0"], "--train-per-task"),
        ("--val-per-task", ["0"], "--val-per-task"),
        ("--test-per-task", ["0"], "--test-per-task"),
        ("--threads", ["0"], "--threads"),
        ("--seeds", ["0", "0"], "duplicate"),
        ("--lrs", ["0.1", "0.1"], "duplicate"),
        ("--device", ["nodev"], "nodev"),
        ("--lrs", ["-0.1"], "sgd lr=-0.1"),
        ("--optimizers", ["sgd", "ewc"], "ewc lr=0.001 strength=-1"),
    ],
)
def test_bench_rejects_bad_arguments_before_any_work(
    no_work: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    values: list[str],
    message: str,
) -> None:
    """``--n-tasks 0`` silently ran 5 tasks, ``--test-per-task 0`` scored empty test sets
    0%, ``--seeds 0 0`` ran everything twice, ``--device nodev`` was a traceback, the
    others failed only once the first stream was built or the optimizer made (after the
    runs that came before)."""
    out = tmp_path / "out"
    argv = _with(TINY, option, *values)
    if option == "--optimizers":  # sgd would run first, then ewc fail
        argv = [*argv, "--ewc-strengths", "-1"]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(out)])
    assert exc.value.code in (1, 2)
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_bench_rejects_cuda_without_a_gpu(
    no_work: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*_with(TINY, "--device", "cuda"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 1 and "CUDA" in capsys.readouterr().err


def test_bench_rejects_an_unusable_learned_checkpoint(
    no_work: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An explicit ``--learned-checkpoint`` that does not load ran 0 runs and exited 0."""
    missing = tmp_path / "typo.pt"
    argv = _with(TINY, "--optimizers", "learned")
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--learned-checkpoint", str(missing), "--out", str(tmp_path / "out")])
    assert exc.value.code == 1 and "typo.pt" in capsys.readouterr().err


def _fake_row(n_tasks: int, seed: int = 0) -> dict:
    return {
        "stream": "split-digits-task",
        "model": "mlp",
        "optimizer": "sgd",
        "setting": "sgd lr=0.1",
        "hyper": {"lr": 0.1},
        "seed": seed,
        "test": dict.fromkeys(("acc", "bwt", "fwt", "forgetting", "learning_acc"), 0.5),
        "val": dict.fromkeys(("acc", "bwt", "fwt", "forgetting", "learning_acc"), 0.5),
        "R": [[0.5] * n_tasks] * n_tasks,
        "b": [0.5] * n_tasks,
        "n_tasks": n_tasks,
        "budget": dataclasses.asdict(TINY_BUDGET),
    }


@pytest.mark.parametrize("mode", ["--resume", "--merge-into"])
def test_resume_and_merge_refuse_rows_with_another_number_of_tasks(
    no_work: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """Rows are keyed by stream *name*, which does not hold the number of tasks: resuming
    with ``--n-tasks 2`` over 5-task rows skipped every run and reported the 5-task
    results, and merging mixed 2- and 5-task rows in one table."""
    results = tmp_path / "out" / "results.json"
    results.parent.mkdir()
    meta = {"command": "metaopt bench ...", "budget": dataclasses.asdict(TINY_BUDGET)}
    results.write_text(json.dumps({"meta": meta, "rows": [_fake_row(5), _fake_row(5, 1)]}))
    before = results.read_bytes()
    extra = ["--resume"] if mode == "--resume" else ["--merge-into", str(results)]
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--out", str(results.parent), *extra])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "split-digits-task" in err and "5 tasks" in err
    assert results.read_bytes() == before


# --------------------------------------------------------------------------- metrics


def test_metrics_accept_lists_and_integer_matrices() -> None:
    """``results.json`` stores ``R`` and ``b`` as nested lists, and a 0/1 matrix may be
    integer: both give the same numbers as float tensors."""
    from metaopt.continual.metrics import summarize

    R = [[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 0.95]]
    b = [0.1, 0.05, 0.2]
    assert summarize(R, b) == pytest.approx(summarize(torch.tensor(R), torch.tensor(b)))
    eye = torch.eye(2, dtype=torch.long)
    assert summarize(eye, torch.zeros(2, dtype=torch.long)) == pytest.approx(
        {"acc": 0.5, "bwt": -1.0, "fwt": 0.0, "forgetting": 1.0, "learning_acc": 1.0}
    )


@pytest.mark.parametrize(
    ("R", "b", "message"),
    [
        ([[0.5, float("nan")], [0.4, 0.6]], [0.1, 0.1], "finite"),
        ([[0.5, 0.2], [0.4, 0.6]], [0.1, float("inf")], "finite"),
        ([[50.0, 20.0], [40.0, 60.0]], [10.0, 10.0], r"\[0, 1\]"),
        ([[0.5, 0.2], [0.4, 0.6]], [-0.1, 0.1], r"\[0, 1\]"),
        (torch.zeros(0, 0), torch.zeros(0), "at least one task"),
        (torch.zeros(2, 2, 2), torch.zeros(2), "square"),
    ],
)
def test_metrics_reject_missing_or_out_of_range_accuracies(
    R: object, b: object, message: str
) -> None:
    """A NaN (an evaluation that did not happen) made FWT NaN while ACC looked fine, and
    percentages gave metrics 100x too large for the reports (which print 100 * value)."""
    from metaopt.continual.metrics import summarize

    with pytest.raises(ValueError, match=message):
        summarize(R, b)


@pytest.mark.slow
def test_bench_outputs_agree_with_results_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``runs.csv``, ``summary.csv`` and the printed choice hold what ``results.json`` does:
    the metrics of each row are those of its stored ``R``/``b``, and each selected setting
    is the best by mean *validation* ACC over seeds (recomputed here from the rows)."""
    import csv
    import statistics

    from metaopt.continual.metrics import summarize

    out = tmp_path / "out"
    argv = _with(TINY, "--optimizers", "sgd", "adam")
    argv = _with(_with(argv, "--lrs", "0.5", "0.001"), "--seeds", "0", "1")
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 8
    for row in rows:
        assert summarize(row["R"], row["b"]) == pytest.approx(row["test"], abs=1e-4)
        assert summarize(row["R_val"], row["b_val"]) == pytest.approx(row["val"], abs=1e-4)

    with open(out / "runs.csv", newline="") as handle:
        runs = list(csv.DictReader(handle))
    by_key = {(r["setting"], int(r["seed"])): r for r in rows}
    assert sorted((r["setting"], int(r["seed"])) for r in runs) == sorted(by_key)
    for line in runs:
        row = by_key[(line["setting"], int(line["seed"]))]
        for split in ("test", "val"):
            for metric, value in row[split].items():
                assert float(line[f"{split}_{metric}"]) == pytest.approx(value, abs=1e-12)

    with open(out / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    tuned = {line["optimizer"]: line for line in summary if line["mode"] == "tuned"}
    assert set(tuned) == {"sgd", "adam"}
    for optimizer, line in tuned.items():
        scores = {
            setting: statistics.fmean(r["val"]["acc"] for r in rows if r["setting"] == setting)
            for setting in {r["setting"] for r in rows if r["optimizer"] == optimizer}
        }
        best = max(sorted(scores), key=scores.__getitem__)
        assert line["setting"] == best
        chosen = [r for r in rows if r["setting"] == best]
        assert int(line["n_seeds"]) == 2
        for metric in ("acc", "bwt", "fwt", "forgetting", "learning_acc"):
            values = [r["test"][metric] for r in chosen]
            assert float(line[f"{metric}_mean"]) == pytest.approx(statistics.fmean(values))
            assert float(line[f"{metric}_std"]) == pytest.approx(statistics.stdev(values))


# --------------------------------------------------------------------------- suite streams


def _tagged_dataset(name: str, data_dir: object = None, split: str = "train"):
    """A fake 10-class dataset whose images are told apart by their sorted pixel values
    (kept by permutations): train images carry tags 1, 2, ..., test images -1, -2, ...
    (``load_dataset``'s signature)."""
    n = 300 if split == "train" else 100
    sign = 1.0 if split == "train" else -1.0
    tags = sign * torch.arange(1, n + 1, dtype=torch.float32)
    x = tags[:, None] * torch.linspace(1.0, 2.0, 16)[None, :]
    return x.reshape(n, 1, 4, 4), torch.arange(n) % 10


def _tags(x: torch.Tensor) -> set[float]:
    return {round(float(v), 3) for v in x.reshape(len(x), -1).sort(dim=1).values[:, 0]}


@pytest.mark.parametrize("name", ["split-mnist-domain", "split-mnist-class", "permuted-mnist"])
def test_suite_validation_comes_from_training_images_only(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Validation images are training images never trained on in that task, never test
    images; a seed gives the same stream again, another seed another hold-out."""
    monkeypatch.setattr(suite_module, "load_dataset", _tagged_dataset)
    budget = suite_module.Budget(n_train=15, n_val=5, n_test=8)
    spec = suite_module.parse_stream(name, n_tasks=5)
    stream = suite_module.build_stream(spec, budget, seed=0)
    for task in stream:
        train, val, test = _tags(task.x_train), _tags(task.x_val), _tags(task.x_test)
        assert (len(train), len(val), len(test)) == (15, 5, 8)
        assert min(train | val) > 0 and max(test) < 0
        assert not train & val
    again = suite_module.build_stream(spec, budget, seed=0)
    other = suite_module.build_stream(spec, budget, seed=1)
    for a, b, c in zip(stream, again, other, strict=True):
        assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_train, b.x_train)
        assert not torch.equal(a.x_val, c.x_val)


@pytest.mark.parametrize(("n_train", "n_val"), [(20, 30), (None, 40)])
def test_suite_stream_sizes_are_the_budget(n_train: int | None, n_val: int) -> None:
    """Every task holds out exactly ``n_val`` validation examples and keeps ``n_train``
    (the budget recorded in results.json): a validation size above the training size was
    cut to half of the examples, and with ``n_train=None`` tasks smaller than the largest
    held out fewer."""
    budget = suite_module.Budget(n_train=n_train, n_val=n_val, n_test=10)
    stream = suite_module.build_stream(suite_module.parse_stream("split-digits-domain"), budget, 0)
    assert [len(t.y_val) for t in stream] == [n_val] * 5
    if n_train is not None:
        assert [len(t.y_train) for t in stream] == [n_train] * 5
    too_many = suite_module.Budget(n_train=None, n_val=1000, n_test=10)
    with pytest.raises(ValueError, match="1000"):
        suite_module.build_stream(suite_module.parse_stream("split-digits-task"), too_many, 0)


def test_cnn_on_flat_inputs_is_a_clear_error() -> None:
    """``stream_from_tensors`` turns flat ``[N, D]`` data into ``[N, 1, 1, D]``; the CNN
    cannot pool that, which failed only at the first forward with a pooling-size error."""
    with pytest.raises(ValueError, match="mlp"):
        build_model("cnn", (1, 1, 20), 2)
    assert build_model("cnn", (1, 5, 7), 2)(torch.zeros(1, 1, 5, 7)).shape == (1, 2)


@pytest.mark.parametrize("builder", ["permuted_stream", "rotated_stream"])
def test_shared_label_streams_need_a_task(builder: str) -> None:
    """``rotated_stream(n_tasks=0)`` returned one task (at 0 degrees)."""
    from metaopt.continual import streams

    x, y = _toy(12)
    with pytest.raises(ValueError, match="n_tasks"):
        getattr(streams, builder)(x, y, x, y, n_tasks=0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"meta": {}, "rows": [{"stream": "s"}]}', "row 0"),
        ('{"meta": ["x"], "rows": []}', "meta"),
    ],
)
def test_bench_names_an_unreadable_results_file(
    no_work: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str,
    message: str,
) -> None:
    """A damaged results file given to ``--merge-into``/``--resume`` is named in the error
    (a bare JSON decoder message or a ``KeyError`` traceback before) and left as it is."""
    results = tmp_path / "results.json"
    results.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main([*TINY, "--out", str(tmp_path / "out"), "--merge-into", str(results)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert str(results) in err and message in err
    assert results.read_text() == content


@pytest.mark.parametrize("where", ["--out", "--merge-into"])
def test_bench_rejects_output_paths_it_cannot_write(
    no_work: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    """``--out`` naming a file, or ``--merge-into`` naming a folder, failed only when the
    first run's row was saved (its work lost)."""
    target = tmp_path / "target"
    if where == "--out":
        target.write_text("a file")
        extra = ["--out", str(target)]
    else:
        target.mkdir()
        extra = ["--out", str(tmp_path / "out"), "--merge-into", str(target)]
    with pytest.raises(SystemExit) as exc:
        main([*TINY, *extra])
    assert exc.value.code == 1 and str(target) in capsys.readouterr().err


@pytest.mark.skipif(not suite_module.learned_available(), reason="no learned optimizer")
@pytest.mark.parametrize("mode", ["--resume", "--merge-into"])
def test_rows_of_another_checkpoint_with_the_same_label_are_not_kept(
    no_work: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    """``learned[<stem>]`` only holds the file stem: resuming with ``runs/b/best.pt`` over
    rows of ``runs/a/best.pt`` skipped them all and reported a's results under b's
    provenance; merging a partial re-run kept a's other rows next to b's."""
    from metaopt.learned.checkpoint import CHECKPOINT_DIR

    mine = tmp_path / "b" / "best.pt"
    mine.parent.mkdir()
    shutil.copy(CHECKPOINT_DIR / "default.pt", mine)
    label = "learned[best]"
    rows = [
        {**_fake_row(2, seed), "optimizer": label, "setting": label, "hyper": {}} for seed in (0, 1)
    ]
    other = {"path": "runs/a/best.pt", "sha256": "0" * 64, "metadata": {}}
    meta = {
        "command": "metaopt bench ...",
        "budget": dataclasses.asdict(TINY_BUDGET),
        "learned_checkpoints": {label: other},
    }
    results = tmp_path / "out" / "results.json"
    results.parent.mkdir()
    results.write_text(json.dumps({"meta": meta, "rows": rows}))
    before = results.read_bytes()
    argv = [*_with(TINY, "--optimizers", "learned"), "--learned-checkpoint", str(mine)]
    extra = ["--resume"] if mode == "--resume" else ["--merge-into", str(results)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(results.parent), *extra])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert label in err and "runs/a/best.pt" in err
    assert results.read_bytes() == before


def test_a_model_with_too_few_outputs_is_a_clear_error() -> None:
    """Slicing a task's logits out of a too narrow output gave fewer (or no) columns: the
    initial accuracies ``b`` were computed on them without complaint and training failed
    later with an index error (or a class-incremental head never saw its classes)."""
    x, y = _toy(40)
    stream = split_stream(x, y, x, y, n_tasks=2, scenario="task")
    narrow = functools.partial(build_model, "mlp", (1, 3, 3), 2, hidden=(4,))
    with pytest.raises(ValueError, match="at least 4 outputs"):
        run_stream(narrow, functools.partial(torch.optim.SGD, lr=0.1), stream, steps=1)
    assert stream[1].logits(torch.zeros(3, 5)).shape == (3, 2)  # wider is fine


@pytest.mark.parametrize(
    ("cls", "options", "message"),
    [
        (SI, {"xi": 0.0}, "xi"),
        (SI, {"xi": -0.1}, "xi"),
        (EWC, {"n_fisher": 0}, "n_fisher"),
        (EWC, {"gamma": -0.5}, "gamma"),
    ],
)
def test_regularizer_options_out_of_range_are_rejected(
    cls: type, options: dict, message: str
) -> None:
    """``SI(xi=0)`` divided 0 by 0 for any parameter that did not move during a task (a
    NaN importance, then NaN weights); ``EWC(n_fisher=0)`` silently estimated a zero
    Fisher (no penalty at all) and a negative one dropped examples from the end."""
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=message):
        cls([w], **options)


def test_si_parameter_that_does_not_move_gets_no_importance() -> None:
    w = nn.Parameter(torch.ones(2))
    still = nn.Parameter(torch.ones(2))
    opt = SI([w, still], base=torch.optim.SGD, lr=0.1, strength=1.0, xi=1e-3)
    _quadratic_steps(opt, w, torch.zeros(2), 3)
    opt.new_task()
    assert torch.equal(opt.state[still]["importance"], torch.zeros(2))
    assert (opt.state[w]["importance"] > 0).all()


def test_rotation_of_non_square_images_is_a_rotation() -> None:
    """Rotating a 6x10 image by 90 degrees inside its own canvas must give the centre crop
    of rotating it padded to 10x10 (exactly ``rot90``): the rotation was applied in
    normalised coordinates, which stretches the content by the aspect ratio."""
    from metaopt.continual.streams import rotated_stream

    x = torch.rand(3, 1, 6, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(3)
    (task,) = rotated_stream(x, y, x, y, angles=[90.0])
    padded = torch.nn.functional.pad(x, (0, 0, 2, 2))
    expected = torch.rot90(padded, 1, dims=(2, 3))[:, :, 2:8, :]
    assert torch.allclose(task.x_train, expected, atol=1e-5)
    (square,) = rotated_stream(padded, y, padded, y, angles=[90.0])
    assert torch.allclose(square.x_train, torch.rot90(padded, 1, dims=(2, 3)), atol=1e-5)


def test_streams_reject_raw_images_and_float_labels() -> None:
    """Raw ``uint8`` images (as numpy loaders give them) and float labels made a stream
    that failed only in training (dtype mismatch) or with an indexing error."""
    x, y = _toy(40)
    raw = (x * 255).to(torch.uint8)
    with pytest.raises(ValueError, match="float"):
        split_stream(raw, y, x, y, n_tasks=2)
    with pytest.raises(ValueError, match="integer"):
        split_stream(x, y.float(), x, y, n_tasks=2)


def test_run_stream_rejects_a_zero_evaluation_batch() -> None:
    x, y = _toy(40)
    with pytest.raises(ValueError, match="eval_batch_size"):
        _run(split_stream(x, y, x, y, n_tasks=2), steps=1, eval_batch_size=0)


@pytest.mark.parametrize("data_dir", [None, "missing"])
def test_bench_checks_the_data_directory_before_any_run(
    no_work: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    data_dir: str | None,
) -> None:
    """Without MNIST files, a suite whose first stream needs none ran it and failed only
    when it reached the MNIST stream; the error must come first and say what to set."""
    monkeypatch.delenv("METAOPT_DATA_DIR", raising=False)
    argv = _with(TINY, "--streams", "split-digits-task", "split-mnist-task")
    extra = [] if data_dir is None else ["--data-dir", str(tmp_path / data_dir)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "out"), *extra])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "METAOPT_DATA_DIR" in err and "--data-dir" in err
    if data_dir is not None:
        assert str(tmp_path / data_dir / "mnist") in err


@pytest.mark.parametrize("cls", [EWC, SI])
def test_parameter_group_added_later_trains_and_is_consolidated(cls: type) -> None:
    """Adding a head per task (``add_param_group``, as progressive models do) went to the
    wrapper's defaults: the base Adam's step failed (no ``betas``) and the new parameters
    had no penalty state."""
    w = nn.Parameter(torch.ones(2))
    opt = cls([w], lr=0.1, strength=1.0)
    _quadratic_steps(opt, w, torch.zeros(2), 2)
    head = nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [head], "lr": 0.05})
    assert opt.param_groups[-1]["betas"] == opt.base.defaults["betas"]
    before = head.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (((w - 1.0) ** 2).sum() + ((head + 2.0) ** 2).sum()).backward()
        opt.step()
    assert (head.detach() < before).all()
    opt.new_task()  # EWC without end_task: mean squared task gradient; SI: path integral
    assert (opt.state[head]["importance"] > 0).all()
    assert torch.equal(opt.state[head]["anchor"], head.detach())
