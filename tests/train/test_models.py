"""Models and checkpoints: loading by name and path, round trips, clear errors (another
model's weights named, a damaged cached tiny model pre-trained again, pre-training's checks)."""
import json

import pytest
import torch

from dive_fast.train.checkpoint import atomic_save, load_checkpoint, load_model_weights
from dive_fast.train.models import TINY_MODELS, frozen_copy, load_clip, tiny_checkpoint


def test_tiny_configs_registered():
    assert {"dive-tiny", "dive-micro"} <= set(TINY_MODELS)
    bundle = load_clip("dive-micro")
    assert bundle.image_size == 16 and bundle.context_length == 32


def test_cache_name_changes_with_the_config(tmp_path, monkeypatch):
    """A changed tiny config (or pre-training stream) never reuses stale cached weights."""
    import dive_fast.train.models as models
    monkeypatch.setattr(models, "CONFIG_DIR", tmp_path)
    (tmp_path / "m.json").write_text('{"embed_dim": 8}')
    first = tiny_checkpoint("m")
    (tmp_path / "m.json").write_text('{"embed_dim": 16}')
    assert tiny_checkpoint("m") != first and tiny_checkpoint("m").parent == first.parent


def test_weight_decay_spares_gains_biases_and_the_logit_scale():
    from dive_fast.train.optim import decay_groups
    model = load_clip("dive-micro").model
    decay, keep = decay_groups(model.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    kept = {id(p) for p in keep["params"]}
    named = dict(model.named_parameters())
    assert id(named["logit_scale"]) in kept
    assert all(id(p) in kept for n, p in named.items() if n.endswith("bias") or p.ndim < 2)
    assert all(id(p) not in kept for n, p in named.items() if n.endswith("attn.in_proj_weight"))
    assert len(decay["params"]) + len(keep["params"]) == len(named)


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


def test_cached_tiny_model_is_checked_against_its_digest(tmp_path, monkeypatch):
    from dive_fast.train import pretrain as pretrain_mod
    from dive_fast.train.models import CACHE_ENV, find_pretrained, tiny_checkpoint, tiny_intact
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = tiny_checkpoint("dive-micro")
    pretrain_mod.pretrain("dive-micro", steps=2, batch_size=8, workers=0, progress=False,
                          eval_per_task=0, out=path)
    assert tiny_intact(path)
    blob = bytearray(path.read_bytes())
    blob[-300:-50] = bytes(250)
    path.write_bytes(bytes(blob))
    assert not tiny_intact(path)
    with pytest.raises(RuntimeError, match="does not match the digest"):
        find_pretrained("dive-micro", None)
    calls = []
    monkeypatch.setattr(pretrain_mod, "pretrain", lambda **kw: calls.append(kw) or kw["out"])
    pretrain_mod.ensure_pretrained_tiny("dive-micro")
    assert len(calls) == 1  # pre-trained again, not reused


def test_another_models_weights_are_named(tmp_path):
    from safetensors.torch import save_file

    from dive_fast.train.models import load_clip
    other = load_clip("dive-tiny").model.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "tiny.safetensors")
    with pytest.raises(RuntimeError, match="into 'dive-micro': they do not fit this model"):
        load_clip("dive-micro", str(tmp_path / "tiny.safetensors"))


@pytest.mark.parametrize("bad,message", [
    (["--steps", "0"], "--steps must be a finite number >= 1, got 0"),
    (["--model", "ViT-B-32"], "--model ViT-B-32: pre-training on the world is meant for the tiny"),
])
def test_pretrain_refuses_what_cannot_make_sense(bad, message):
    from dive_fast.train import pretrain
    with pytest.raises(ValueError, match=message):
        pretrain.main(bad)


def test_a_short_pretraining_leaves_the_default_weights_and_says_so(tmp_path, monkeypatch,
                                                                    capsys):
    from dive_fast.train import pretrain as pretrain_mod
    from dive_fast.train.models import CACHE_ENV, tiny_checkpoint
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    default = tiny_checkpoint("dive-micro")
    default.write_bytes(b"the default run's weights")
    path = pretrain_mod.main(["--model", "dive-micro", "--steps", "5", "--batch-size", "8",
                              "--workers", "0"])
    assert default.read_bytes() == b"the default run's weights"
    assert path == tiny_checkpoint("dive-micro", steps=5, batch_size=8) != default
    assert path.parent == tmp_path and path.is_file()
    said = capsys.readouterr().out
    assert f"the default dive-micro that runs load ({default}) is left as it was" in said


def test_an_open_clip_train_checkpoint_loads_without_ddps_module_prefix(tmp_path):
    """open_clip_train saves a DDP-wrapped model's keys as 'module.<key>' (with epoch,
    name and optimizer beside); they load as open_clip loads them, prefix stripped."""
    model = load_clip("dive-micro").model
    torch.save({"epoch": 1, "name": "run", "state_dict": {
        f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "epoch_1.pt")
    other = load_clip("dive-micro").model
    load_model_weights(other, tmp_path / "epoch_1.pt")
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_first_run_says_it_pretrains_once_how_long_and_where(tmp_path, monkeypatch,
                                                                 caplog):
    from dive_fast.train import pretrain as pretrain_mod
    from dive_fast.train.models import CACHE_ENV, tiny_checkpoint
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(pretrain_mod, "pretrain", lambda **kw: kw["out"])
    with caplog.at_level("INFO", logger="dive_fast.train.pretrain"):
        pretrain_mod.ensure_pretrained_tiny("dive-tiny")
    said = caplog.messages[0]
    assert "pre-training it once" in said and "about 13 minutes on 2 idle CPU cores" in said
    assert str(tiny_checkpoint("dive-tiny")) in said
