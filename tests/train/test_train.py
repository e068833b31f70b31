"""The training loop end to end on tiny sizes: every method, resume, cache, DDP, errors."""
import json

import numpy as np
import pytest
import torch
from helpers.kill import run_killed_at_step
from helpers.runs import train_args

from dive_fast import train
from dive_fast.train import methods
from dive_fast.train.checkpoint import load_checkpoint
from dive_fast.train.methods import METHODS


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
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in rows)
    assert (out / "curves.png").is_file()
    ckpts = sorted((out / "checkpoints").glob("step-*.pt"))
    assert [c.name for c in ckpts] == ["step-00000002.pt", "step-00000004.pt"]
    if method.startswith("dive"):
        m = load_checkpoint(ckpts[-1])["method_state"]["dive.m"]
        assert m.abs().sum() > 0  # the EMA vector is checkpointed


def _final(out):
    return load_checkpoint(sorted((out / "checkpoints").glob("step-*.pt"))[-1])


def test_resume_ends_where_an_unbroken_run_ends(micro_cache, tmp_path, monkeypatch):
    args = ["--method", "dive", "--steps", "6", "--checkpoint-every", "3", "--keep", "5"]
    train.main(train_args(tmp_path / "whole", *args))
    run_killed_at_step(monkeypatch, methods.DiVE, 5, train_args(tmp_path / "broken", *args))
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").glob("*.pt")) == \
        ["step-00000003.pt"]
    train.main(train_args(tmp_path / "broken", *args, "--resume", "auto"))
    whole, resumed = _final(tmp_path / "whole"), _final(tmp_path / "broken")
    assert resumed["step"] == whole["step"] == 6
    for k, v in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed["method_state"]["dive.m"], whole["method_state"]["dive.m"])


def test_frozen_cache_gives_the_loss_of_the_frozen_model(micro_cache, tmp_path):
    cached = train.main(train_args(tmp_path / "a", "--method", "dive", "--steps", "3"))
    fresh = train.main(train_args(tmp_path / "b", "--method", "dive", "--steps", "3",
                                  "--no-frozen-cache"))
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("a", "b")]
    for ra, rb in zip(*rows):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["avl"] == pytest.approx(rb["avl"], rel=1e-4)
    assert cached["dive"]["id"] == fresh["dive"]["id"]
    assert list((tmp_path / "a" / "cache").glob("frozen-ref-*.npy"))


def test_nonfinite_step_is_skipped_on_device_and_stops_at_the_log_step(micro_cache, tmp_path,
                                                                        monkeypatch):
    original = methods.FLYP.forward

    def nan_at_step_2(self, batch, step):
        losses = original(self, batch, step)
        return {k: v * float("nan") for k, v in losses.items()} if step == 2 else losses

    monkeypatch.setattr(methods.FLYP, "forward", nan_at_step_2)
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* at step 2.*step-00000002.pt"):
        train.main(train_args(tmp_path, "--method", "flyp", "--checkpoint-every", "2"))
    # Logging every 4 steps, the run stops at step 4, naming step 2.
    with pytest.raises(FloatingPointError, match=r"at step 2 "):
        train.main(train_args(tmp_path / "late", "--method", "flyp", "--log-every", "4",
                              "--checkpoint-every", "8"))
    train.main(train_args(tmp_path / "skip", "--method", "flyp", "--on-nonfinite", "skip"))
    metrics = (tmp_path / "skip" / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
    assert np.isfinite(rows[-1]["loss"])


def test_bad_inputs_give_clear_errors(micro_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        train.main(train_args(tmp_path / "a", "--train-folder", str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        train.main(train_args(tmp_path / "b", "--train-folder", str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="--model nope: unknown to open_clip"):
        train.main(train_args(tmp_path / "c", "--model", "nope"))
    train.main(train_args(tmp_path / "d", "--method", "flyp", "--steps", "2"))
    with pytest.raises(ValueError, match="cannot resume .* method='flyp'"):
        train.main(train_args(tmp_path / "d", "--method", "dive", "--resume", "auto"))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        train.main(train_args(tmp_path / "e", "--resume", str(tmp_path / "none.pt")))


def test_train_step_skips_a_nonfinite_update_on_the_device():
    from dive_fast.train import optim
    from dive_fast.train.step import NonFiniteGuard, train_step

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Linear(3, 2)
            self.model.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
            self.metrics = {}

        def forward(self, x, step):
            return {"a": self.model(x).pow(2).mean() * self.model.logit_scale}

    toy = Toy()
    opt, sched = optim.build(toy.named_parameters(), 1e-2, 0.1, steps=10, warmup=1)
    guard = NonFiniteGuard("cpu")
    train_step(toy, toy, torch.ones(4, 3), 0, opt, sched, guard)
    before = {k: v.clone() for k, v in toy.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[toy.model.weight].items()}
    out = train_step(toy, toy, torch.full((4, 3), float("nan")), 1, opt, sched, guard)
    assert bool(out["skipped"]) and not torch.isfinite(out["loss"])
    assert all(torch.equal(v, before[k]) for k, v in toy.state_dict().items())
    assert all(torch.equal(v, state[k]) for k, v in opt.state[toy.model.weight].items())
    train_step(toy, toy, torch.ones(4, 3), 2, opt, sched, guard)
    assert guard.read() == (1, 1)
    assert not torch.equal(toy.model.weight, before["model.weight"])
    assert int(opt.state[toy.model.weight]["step"]) == 2  # the skipped step is not counted


def test_a_plot_failure_never_fails_a_finished_run(micro_cache, tmp_path, monkeypatch, caplog):
    from dive_fast.train import metrics_log
    monkeypatch.setattr(metrics_log, "_plot", lambda *a: 1 / 0)
    report = train.main(train_args(tmp_path, "--method", "flyp", "--steps", "2"))
    assert "flyp" in report and (tmp_path / "report.json").is_file()
    assert any("could not plot" in r.getMessage() for r in caplog.records)
