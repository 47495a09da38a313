"""Checkpoints: round trip, shipped default, clear errors for bad files."""

from __future__ import annotations

import pytest
import torch

from metaopt.learned import (
    CheckpointError,
    LearnedRuleNet,
    load_checkpoint,
    load_pretrained,
    pretrained_names,
    save_checkpoint,
)
from tests.learned.helpers import perturbed_net


def test_round_trip_keeps_weights_config_and_metadata(tmp_path):
    net = perturbed_net()
    path = save_checkpoint(net, tmp_path / "sub" / "net.pt", {"description": "x", "steps": 3})
    loaded, meta = load_checkpoint(path)
    assert meta == {"description": "x", "steps": 3}
    assert loaded.config == net.config
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert load_pretrained(str(path)).metadata == meta


def test_shipped_default_is_the_adam_identity_and_says_so():
    assert "default" in pretrained_names()
    net = load_pretrained("default")
    assert net.metadata["meta_trained"] in (True, False)
    if not net.metadata["meta_trained"]:
        assert "Adam" in net.metadata["description"]
        fresh = LearnedRuleNet(**net.config)
        assert torch.equal(net.head.weight, fresh.head.weight)
        assert torch.equal(net.head.bias, torch.zeros_like(net.head.bias))


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no pretrained checkpoint 'nope'"):
        load_pretrained("nope")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read") as caught:
        load_checkpoint(corrupt)
    # torch's advice to load with weights_only=False is wrong for a corrupt file
    assert "not a weights-only torch file" in str(caught.value)
    assert "weights_only" not in str(caught.value) and "file an issue" not in str(caught.value)
    other = tmp_path / "other.pt"
    torch.save({"format": "something/else"}, other)
    with pytest.raises(CheckpointError, match=r"not a metaopt\.learned/1 checkpoint"):
        load_checkpoint(other)
    path = save_checkpoint(LearnedRuleNet(), tmp_path / "ok.pt", {})
    payload = torch.load(path, weights_only=True)
    payload["n_token_features"] += 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"token / .* task features"):
        load_checkpoint(path)
    payload["n_token_features"] -= 1
    del payload["state_dict"]["head.bias"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path)


def test_metadata_must_be_plain_data(tmp_path):
    with pytest.raises(TypeError, match="not plain data"):
        save_checkpoint(LearnedRuleNet(), tmp_path / "x.pt", {"tensor": torch.zeros(1)})
    assert not (tmp_path / "x.pt").exists()
