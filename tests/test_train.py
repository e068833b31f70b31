"""The training loop end to end on tiny sizes: every method, resume, cache, DDP, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import train_args
from dive_fast import methods, train
from dive_fast.checkpoint import load_checkpoint
from dive_fast.methods import METHODS


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_reports(micro_cache, tmp_path, method):
    report = train.main(train_args(tmp_path, "--method", method, "--wise-ft", "0.5"))
    assert "zero-shot" in report
    out = tmp_path
    assert (out / "table.md").is_file() and json.loads((out / "report.json").read_text())
    if method == "zeroshot":
        assert list(report) == ["zero-shot"]
        return
    assert set(report) == {"zero-shot", method, f"{method} wise-ft 0.5"}
    assert 0.0 <= report[method]["id"]["shapes"] <= 1.0
    assert set(report[method]["rsa"]) == {"image", "text", "joint"}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in rows)
    assert (out / "curves.png").is_file()
    ckpts = sorted((out / "checkpoints").glob("step-*.pt"))
    assert [c.name for c in ckpts] == ["step-00000002.pt", "step-00000004.pt"]
    if method.startswith("dive"):
        m = load_checkpoint(ckpts[-1])["extra"]["dive"]["m"]
        assert m.abs().sum() > 0  # the EMA vector is checkpointed


def _final(out):
    return load_checkpoint(sorted((out / "checkpoints").glob("step-*.pt"))[-1])


def test_resume_ends_where_an_unbroken_run_ends(micro_cache, tmp_path, monkeypatch):
    args = ["--method", "dive", "--steps", "6", "--checkpoint-every", "3", "--keep", "5"]
    train.main(train_args(tmp_path / "whole", *args))
    calls = {"n": 0}
    original = methods.DiVE.loss

    def crash_at_step_5(self, ctx, target, reference, step):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self, ctx, target, reference, step)

    monkeypatch.setattr(methods.DiVE, "loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(tmp_path / "broken", *args))
    monkeypatch.setattr(methods.DiVE, "loss", original)
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").glob("*.pt")) == \
        ["step-00000003.pt"]
    train.main(train_args(tmp_path / "broken", *args, "--resume", "auto"))
    whole, resumed = _final(tmp_path / "whole"), _final(tmp_path / "broken")
    assert resumed["step"] == whole["step"] == 6
    for k, v in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed["extra"]["dive"]["m"], whole["extra"]["dive"]["m"])


def test_frozen_cache_gives_the_loss_of_the_frozen_model(micro_cache, tmp_path):
    cached = train.main(train_args(tmp_path / "a", "--method", "dive", "--steps", "3"))
    fresh = train.main(train_args(tmp_path / "b", "--method", "dive", "--steps", "3",
                                  "--no-frozen-cache"))
    rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("a", "b")]
    for ra, rb in zip(*rows):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["avl"] == pytest.approx(rb["avl"], rel=1e-4)
    assert cached["dive"]["id"] == fresh["dive"]["id"]
    assert list((tmp_path / "a" / "cache").glob("frozen-ref-*.npy"))


def test_nonfinite_loss_stops_with_a_clear_message(micro_cache, tmp_path, monkeypatch):
    original = methods.FLYP.loss

    def nan_at_step_3(self, ctx, target, reference, step):
        loss, parts = original(self, ctx, target, reference, step)
        return (loss * float("nan"), parts) if step == 2 else (loss, parts)

    monkeypatch.setattr(methods.FLYP, "loss", nan_at_step_3)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 2.*step-00000002.pt"):
        train.main(train_args(tmp_path, "--method", "flyp", "--checkpoint-every", "2"))
    train.main(train_args(tmp_path / "skip", "--method", "flyp", "--on-nonfinite", "skip"))


def test_bad_inputs_give_clear_errors(micro_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        train.main(train_args(tmp_path / "a", "--train-folder", str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        train.main(train_args(tmp_path / "b", "--train-folder", str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        train.main(train_args(tmp_path / "c", "--model", "nope"))
    train.main(train_args(tmp_path / "d", "--method", "flyp", "--steps", "2"))
    with pytest.raises(ValueError, match="cannot resume .* method='flyp'"):
        train.main(train_args(tmp_path / "d", "--method", "dive", "--resume", "auto"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        train.main(train_args(tmp_path / "e", "--resume", str(tmp_path / "none.pt")))


def test_two_rank_ddp_matches_one_process(micro_cache, tmp_path):
    common = ["--method", "dive", "--steps", "3", "--no-augment", "--eval-per-task", "4",
              "--checkpoint-every", "3"]
    single = train_args(tmp_path / "one", *common)
    single[single.index("--batch-size") + 1] = "8"
    train.main(single)
    ddp = train_args(tmp_path / "two", *common)
    ddp[ddp.index("--batch-size") + 1] = "4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
                           "-m", "dive_fast.train", *ddp], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = _final(tmp_path / "one"), _final(tmp_path / "two")
    torch.testing.assert_close(two["extra"]["dive"]["m"], one["extra"]["dive"]["m"],
                               rtol=1e-4, atol=1e-6)
    # Compare the updates (fine-tuned minus pre-trained weights) as a whole: float sums
    # in another order perturb near-zero gradients, which Adam can turn into lr-sized steps
    # (the attention key bias has an exactly-zero gradient: left out).
    from dive_fast.models import load_clip, tiny_checkpoint
    pre = load_clip("dive-micro", str(tiny_checkpoint("dive-micro"))).model.state_dict()
    keys = [k for k in pre if pre[k].is_floating_point() and not k.endswith("in_proj_bias")]
    d1 = torch.cat([(one["state_dict"][k] - pre[k]).flatten() for k in keys])
    d2 = torch.cat([(two["state_dict"][k] - pre[k]).flatten() for k in keys])
    assert d1.norm() > 0
    assert (d1 - d2).norm() / d1.norm() < 2e-3, ((d1 - d2).norm() / d1.norm()).item()
    rows = [[json.loads(l) for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("one", "two")]
    for r1, r2 in zip(*rows):  # the contrastive loss gathers features: the global loss
        assert r2["clip"] == pytest.approx(r1["clip"], rel=1e-4)
