"""Saving and loading :class:`LearnedRuleNet` checkpoints (with metadata).

A checkpoint is a ``torch.save``'d dict of plain types (loadable with
``torch.load(weights_only=True)``)::

    {"format": "metaopt.learned/1", "config": net.config, "n_token_features": ...,
     "n_task_features": ..., "state_dict": net.state_dict(), "metadata": {...}}

Checkpoints shipped with the package live in ``metaopt/learned/checkpoints/<name>.pt``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from metaopt._files import load_failure, replace_atomically
from metaopt.learned.features import N_TASK_FEATURES, N_TOKEN_FEATURES
from metaopt.learned.network import LearnedRuleNet

__all__ = [
    "CHECKPOINT_DIR",
    "FORMAT",
    "CheckpointError",
    "load_checkpoint",
    "load_pretrained",
    "pretrained_names",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT = "metaopt.learned/1"
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
"""Where the shipped checkpoints are (package data)."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not fit this version of the net."""


def save_checkpoint(net: LearnedRuleNet, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write ``net`` and ``metadata`` to ``path`` (parent folders are created).

    Args:
        net: the learned rule's network.
        path: destination file (``.pt``).
        metadata: plain data only (str, numbers, bools, None, lists/dicts of those), e.g.
            ``{"description": ..., "trained_on": ..., "meta_steps": ...}``.

    Returns:
        The path written. The write is atomic: if it fails, a file already at ``path``
        is left as it was.
    """
    if not isinstance(net, LearnedRuleNet):
        raise TypeError(f"save_checkpoint expects a LearnedRuleNet, got {type(net).__name__}")
    _check_plain(metadata, "metadata")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": dict(net.config),
        "n_token_features": N_TOKEN_FEATURES,
        "n_task_features": N_TASK_FEATURES,
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "metadata": metadata,
    }
    # a failed or interrupted write leaves an existing checkpoint as it was
    with replace_atomically(path) as handle:
        torch.save(payload, handle)
    return path


def _check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, got {k!r}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, (str, int, float, bool, type(None))):
        raise TypeError(f"{where}: {type(value).__name__} is not plain data")


def load_checkpoint(path: str | Path) -> tuple[LearnedRuleNet, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Returns:
        ``(net, metadata)``; ``net`` is in eval mode, float32, on the CPU.

    Raises:
        CheckpointError: the file is missing, corrupt (unreadable, non-finite weights,
            metadata that is not a dict), of another format, or its feature sizes /
            config / weights do not fit :class:`LearnedRuleNet`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {load_failure(err)}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format: {got!r})")
    sizes = (payload.get("n_token_features"), payload.get("n_task_features"))
    if sizes != (N_TOKEN_FEATURES, N_TASK_FEATURES):
        raise CheckpointError(
            f"{path} was made for {sizes[0]} token / {sizes[1]} task features; this version "
            f"of metaopt uses {N_TOKEN_FEATURES} / {N_TASK_FEATURES}"
        )
    metadata = payload.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a dict, got {type(metadata).__name__}")
    try:
        # its random initialisation is overwritten at once: drawn from a forked generator,
        # so that building an optimizer does not change the caller's later random numbers
        # (data order, dropout, heads created afterwards) as torch.optim's do not
        with torch.random.fork_rng(devices=[]):
            net = LearnedRuleNet(**payload["config"])
        net.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path} does not fit LearnedRuleNet: {err}") from err
    for name, tensor in net.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path} is corrupt: {name} holds NaN or infinite values")
    net.eval()
    metadata = dict(metadata or {})
    logger.debug("loaded learned-rule checkpoint %s (%s)", path, metadata.get("description"))
    return net, metadata


def pretrained_names() -> list[str]:
    """Names of the checkpoints shipped with the package."""
    return sorted(p.stem for p in CHECKPOINT_DIR.glob("*.pt"))


def load_pretrained(name: str = "default") -> LearnedRuleNet:
    """A shipped checkpoint's network; its metadata is in ``net.metadata``.

    Args:
        name: a name from :func:`pretrained_names`, or a path to a ``.pt`` file.
    """
    path = Path(name)
    if path.suffix != ".pt":
        path = CHECKPOINT_DIR / f"{name}.pt"
        if not path.is_file():
            raise CheckpointError(
                f"no pretrained checkpoint {name!r}; shipped: {pretrained_names()}"
            )
    net, metadata = load_checkpoint(path)
    net.metadata = metadata
    return net
