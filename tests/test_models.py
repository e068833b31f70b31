"""Models and checkpoints: loading by name and path, round trips, clear errors."""
import json

import pytest
import torch

from dive_fast.checkpoint import atomic_save, load_checkpoint, load_model_weights
from dive_fast.models import TINY_MODELS, frozen_copy, load_clip, tiny_checkpoint


def test_tiny_configs_registered():
    assert {"dive-tiny", "dive-micro"} <= set(TINY_MODELS)
    bundle = load_clip("dive-micro")
    assert bundle.image_size == 16 and bundle.context_length == 32


def test_cached_pretrained_micro_loads_with_metadata(micro_cache):
    path = tiny_checkpoint("dive-micro")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["steps"] == 5 and "zeroshot" in meta
    a = load_clip("dive-micro", str(path)).model.state_dict()
    b = load_clip("dive-micro", str(path)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_round_trip_and_open_clip_compatibility(tmp_path):
    model = load_clip("dive-micro").model
    path = atomic_save({"state_dict": model.state_dict(), "step": 3}, tmp_path / "c.pt")
    assert not list(tmp_path.glob(".*.tmp"))
    other = load_clip("dive-micro").model
    assert load_model_weights(other, path)["step"] == 3
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    # open_clip itself reads the trainer's checkpoints (the 'state_dict' key)
    again = load_clip("dive-micro", str(path)).model
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_frozen_copy_has_no_grads():
    model = load_clip("dive-micro").model
    frozen = frozen_copy(model)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert any(p.requires_grad for p in model.parameters())


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'ViT-Nope'"):
        load_clip("ViT-Nope")
    with pytest.raises(FileNotFoundError, match="pretrained checkpoint not found"):
        load_clip("dive-micro", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(RuntimeError, match="corrupt"):
        load_checkpoint(tmp_path / "corrupt.pt")
    atomic_save({"state_dict": {"nope": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(RuntimeError, match="does not fit this model"):
        load_model_weights(load_clip("dive-micro").model, tmp_path / "other.pt")
