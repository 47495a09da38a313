"""Stream construction: disjoint and complete class splits, permutations, rotations, seeds."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from metaopt.continual.streams import (
    n_outputs,
    permuted_stream,
    rotated_stream,
    split_stream,
    stream_from_tensors,
    subsample,
    with_validation,
)


def _toy(n: int = 200, n_classes: int = 10, side: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % n_classes
    x = torch.rand(n, 1, side, side, generator=gen)
    return x, y, x[: n // 2].clone(), y[: n // 2].clone()


@given(
    n_tasks=st.sampled_from([1, 2, 5, 10]),
    scenario=st.sampled_from(["task", "domain", "class"]),
    shuffle=st.booleans(),
    seed=st.integers(0, 100),
)
def test_split_classes_disjoint_complete_and_labels_mapped(
    n_tasks: int, scenario: str, shuffle: bool, seed: int
) -> None:
    x, y, xt, yt = _toy()
    stream = split_stream(
        x, y, xt, yt, n_tasks=n_tasks, scenario=scenario, shuffle_classes=shuffle, seed=seed
    )
    assert len(stream) == n_tasks
    seen = [c for task in stream for c in task.classes]
    assert sorted(seen) == list(range(10))  # complete and disjoint
    k = 10 // n_tasks
    for t, task in enumerate(stream):
        assert task.task_id == t and len(task.classes) == k
        assert torch.isin(
            y[torch.isin(y, torch.tensor(task.classes))], torch.tensor(task.classes)
        ).all()
        assert len(task.y_train) == int(torch.isin(y, torch.tensor(task.classes)).sum())
        # every image keeps its label: the label maps back to the original class
        for x_split, y_split, x_all, y_all in ((task.x_train, task.y_train, x, y),):
            index = [int((x_all == img).flatten(1).all(1).nonzero()[0]) for img in x_split[:5]]
            original = y_all[index]
            if scenario == "class":
                assert [seen[int(v)] for v in y_split[:5]] == original.tolist()
            else:
                assert [task.classes[int(v)] for v in y_split[:5]] == original.tolist()
        assert task.y_train.max() < task.n_classes
        assert task.logit_offset == (t * k if scenario == "task" else 0)
    assert n_outputs(stream) == (10 if scenario in ("task", "class") else k)


def test_split_seeded_order_reproducible_and_subset() -> None:
    x, y, xt, yt = _toy()
    a = split_stream(x, y, xt, yt, n_tasks=5, shuffle_classes=True, seed=3)
    b = split_stream(x, y, xt, yt, n_tasks=5, shuffle_classes=True, seed=3)
    c = split_stream(x, y, xt, yt, n_tasks=5, shuffle_classes=True, seed=4)
    assert [t.classes for t in a] == [t.classes for t in b]
    assert [t.classes for t in a] != [t.classes for t in c]
    assert [t.classes for t in split_stream(x, y, xt, yt, n_tasks=5)] == [
        (0, 1),
        (2, 3),
        (4, 5),
        (6, 7),
        (8, 9),
    ]
    sub = split_stream(x, y, xt, yt, n_tasks=2, classes=[7, 3, 1, 9])
    assert [t.classes for t in sub] == [(7, 3), (1, 9)]
    with pytest.raises(ValueError, match="cannot be split"):
        split_stream(x, y, xt, yt, n_tasks=3)
    with pytest.raises(ValueError, match="scenario"):
        split_stream(x, y, xt, yt, scenario="online")


@given(seed=st.integers(0, 1000))
def test_permutations_are_permutations_and_seeded(seed: int) -> None:
    side = 3
    x = torch.arange(side * side, dtype=torch.float32).reshape(1, 1, side, side).repeat(4, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 3])
    stream = permuted_stream(x, y, x, y, n_tasks=3, seed=seed)
    assert torch.equal(stream[0].x_train, x)  # identity first
    for task in stream:
        pixels = task.x_train[0].flatten()
        assert sorted(pixels.tolist()) == list(range(side * side))
        assert torch.equal(task.x_train, task.x_test)  # same permutation on both splits
        assert torch.equal(task.y_train, y) and task.n_classes == 4
    again = permuted_stream(x, y, x, y, n_tasks=3, seed=seed)
    assert all(torch.equal(a.x_train, b.x_train) for a, b in zip(stream, again, strict=True))


def test_rotations() -> None:
    x, y, xt, yt = _toy(side=8)
    stream = rotated_stream(x, y, xt, yt, n_tasks=3, seed=0)
    assert torch.allclose(stream[0].x_train, x, atol=1e-5)
    assert [t.name for t in stream] == [t.name for t in rotated_stream(x, y, xt, yt, n_tasks=3)]
    fixed = rotated_stream(x, y, xt, yt, angles=[0.0, 90.0])
    # a 90 degree rotation of a square image is a transpose-and-flip of its pixels
    assert torch.allclose(
        fixed[1].x_train, torch.rot90(x, 1, dims=(2, 3)), atol=1e-4
    ) or torch.allclose(fixed[1].x_train, torch.rot90(x, -1, dims=(2, 3)), atol=1e-4)


def test_stream_from_tensors_holds_out_test_and_accepts_flat_inputs() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(100, 6, generator=gen)
    y = torch.arange(100) % 4
    stream = stream_from_tensors(x, y, n_tasks=2, scenario="domain", test_fraction=0.2)
    assert stream[0].x_train.shape[1:] == (1, 1, 6)
    assert sum(len(t.y_test) for t in stream) == 20
    assert sum(len(t.y_train) for t in stream) == 80
    permuted = stream_from_tensors(x, y, kind="permuted", n_tasks=3)
    assert len(permuted) == 3
    with pytest.raises(ValueError, match="unknown stream kind"):
        stream_from_tensors(x, y, kind="shuffled")
    # float labels (regression targets, a wrong column) were truncated to classes
    with pytest.raises(ValueError, match="y must hold integer labels"):
        stream_from_tensors(x, y.float() + 0.7, n_tasks=2)
    with pytest.raises(ValueError, match="y_test must hold integer labels"):
        stream_from_tensors(x, y, x_test=x, y_test=y.float(), n_tasks=2)
    assert len(stream_from_tensors(x, y.to(torch.int32), n_tasks=2)) == 2
    # negative labels were silently merged with another class (-1 indexed the last entry
    # of the label table); mismatched lengths dropped examples; NaN images trained to NaN
    with pytest.raises(ValueError, match="labels must be >= 0"):
        stream_from_tensors(x, y - 1, n_tasks=2, scenario="class")
    with pytest.raises(ValueError, match="must match"):
        stream_from_tensors(torch.cat([x, x]), y, n_tasks=2)
    nan_x = x.clone()
    nan_x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        stream_from_tensors(nan_x, y, n_tasks=2)


def test_validation_is_held_out_from_training_data_only() -> None:
    x, y, xt, yt = _toy()
    stream = split_stream(x, y, xt, yt, n_tasks=2)
    val = with_validation(stream, 0.25, seed=1)
    for before, after in zip(stream, val, strict=True):
        assert len(after.y_val) + len(after.y_train) == len(before.y_train)
        assert torch.equal(after.x_test, before.x_test)
        train_rows = {tuple(r.tolist()) for r in after.x_train.flatten(1)}
        assert not any(tuple(r.tolist()) in train_rows for r in after.x_val.flatten(1))
    capped = with_validation(stream, 0.5, n_max=3)
    assert all(len(t.y_val) == 3 for t in capped)
    small = subsample(stream, n_train=7, n_test=5, seed=0)
    assert [(len(t.y_train), len(t.y_test)) for t in small] == [(7, 5), (7, 5)]
