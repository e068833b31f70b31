"""After training: final.safetensors as open_clip loads it, --keep-best, and the WiSE-FT
sweep of ``evaluate --wise-ft`` (its ends equal the zero-shot and fine-tuned rows).
dive-micro on the world, a few seconds a run."""
import json

import open_clip
import pytest
import torch
from helpers.runs import train_args

from dive_fast import train
from dive_fast.train import evaluate
from dive_fast.train.checkpoint import load_checkpoint
from dive_fast.train.models import tiny_checkpoint
from dive_fast.train.weights import KeepBest, load_weights
from dive_fast.train.wise_ft import parse_alphas

EVAL = ["--model", "dive-micro", "--n-per-task", "10", "--workers", "0"]
SCORES = ("id", "ood", "zeroshot", "id_mean", "ood_mean", "zeroshot_mean", "metrics")


@pytest.fixture(scope="module")
def flyp_run(micro_cache, tmp_path_factory):
    """A 4-step FLYP run evaluated at every step, keeping the best zeroshot_mean (its 5 sets'
    mean varies from step to step here, where id_mean ties), every checkpoint."""
    out = tmp_path_factory.mktemp("runs") / "flyp"
    train.main(train_args(out, "--method", "flyp", "--eval-every", "1", "--keep-best",
                          "zeroshot_mean", "--checkpoint-every", "1", "--keep", "10"))
    return out


def _embeddings(model, tokenizer):
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (model.encode_image(images, normalize=True),
                model.encode_text(tokenizer(["a red circle", "two blue squares"]),
                                  normalize=True))


def test_final_weights_reload_in_open_clip_with_equal_embeddings(flyp_run):
    final = flyp_run / "final.safetensors"
    loaded, _, _ = open_clip.create_model_and_transforms("dive-micro", pretrained=str(final))
    trained, _, _ = open_clip.create_model_and_transforms("dive-micro")
    trained.load_state_dict(load_checkpoint(flyp_run / "checkpoints" / "step-00000004.pt")
                            ["state_dict"])
    pre, _, _ = open_clip.create_model_and_transforms(
        "dive-micro", pretrained=str(tiny_checkpoint("dive-micro")))
    tokenizer = open_clip.get_tokenizer("dive-micro")
    got, want = _embeddings(loaded.eval(), tokenizer), _embeddings(trained.eval(), tokenizer)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert not torch.equal(got[0], _embeddings(pre.eval(), tokenizer)[0])  # it did train
    assert set(load_weights(final)) == set(trained.state_dict())  # weights only


def test_keep_best_keeps_the_step_with_the_highest_metric(flyp_run):
    rows = [json.loads(line) for line in (flyp_run / "metrics.jsonl").read_text().splitlines()]
    seen = [(r["step"], r["eval/zeroshot_mean"]) for r in rows if "eval/zeroshot_mean" in r]
    seen.append((4, json.loads((flyp_run / "report.json").read_text())["flyp"]["zeroshot_mean"]))
    assert [s for s, _ in seen] == [1, 2, 3, 4]
    assert len({v for _, v in seen}) > 1, "the metric must vary for the test to tell steps apart"
    best_step, best_value = max(seen, key=lambda s: (s[1], -s[0]))  # the earliest among equals
    record = json.loads((flyp_run / "best.json").read_text())
    assert (record["step"], record["value"], record["metric"]) == (best_step, best_value,
                                                                   "zeroshot_mean")
    kept = load_weights(flyp_run / "best.safetensors")
    at_step = load_checkpoint(flyp_run / "checkpoints" / f"step-{best_step:08d}.pt")["state_dict"]
    assert kept.keys() == at_step.keys()
    assert all(torch.equal(kept[k], at_step[k]) for k in kept)


def test_keep_best_by_hand(tmp_path):
    keep = KeepBest(tmp_path, "ood_top1", resumed=False)
    offers = [(1, 0.5), (2, 0.7), (3, 0.7), (4, None), (5, float("nan")), (6, 0.6)]
    kept = [keep.offer(step, value, {"w": torch.full((2,), float(step))})
            for step, value in offers]
    assert kept == [True, True, False, False, False, False]
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 2
    assert torch.equal(load_weights(tmp_path / "best.safetensors")["w"], torch.full((2,), 2.0))
    again = KeepBest(tmp_path, "ood_top1", resumed=True)  # a resumed run keeps the record
    assert not again.offer(7, 0.65, {"w": torch.zeros(2)})
    assert KeepBest(tmp_path, "ood_top1", resumed=False).offer(7, 0.1, {"w": torch.zeros(2)})


def test_wise_ft_sweep_ends_equal_the_zero_shot_and_fine_tuned_rows(flyp_run, tmp_path):
    results, mixes = tmp_path / "sweep.jsonl", tmp_path / "mixes"
    sweep = evaluate.main([*EVAL, "--checkpoint", str(flyp_run), "--wise-ft", "0:1:0.5",
                           "--results", str(results), "--save-weights", str(mixes)])
    zero_shot = evaluate.main(EVAL)
    fine_tuned = evaluate.main([*EVAL, "--checkpoint", str(flyp_run / "final.safetensors")])
    assert list(sweep) == ["wise-ft 0", "wise-ft 0.5", "wise-ft 1"]
    for key in SCORES:
        assert sweep["wise-ft 0"][key] == zero_shot[key], key
        assert sweep["wise-ft 1"][key] == fine_tuned[key], key
    assert sweep["wise-ft 1"]["rsa"] == fine_tuned["rsa"]
    assert sweep["wise-ft 0"]["rsa"] == pytest.approx({"image": 1, "text": 1, "joint": 1})
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["alpha"], r["checkpoint"]) for r in rows] == \
        [(a, str(flyp_run / "final.safetensors")) for a in (0.0, 0.5, 1.0)]
    assert rows[1]["id_mean"] == sweep["wise-ft 0.5"]["id_mean"]
    assert results.with_suffix(".png").stat().st_size > 0
    pre = load_weights(tiny_checkpoint("dive-micro"))
    ft = load_weights(flyp_run / "final.safetensors")
    half = load_weights(mixes / "wise-ft-0.5.safetensors")
    zero = load_weights(mixes / "wise-ft-0.safetensors")
    for k in pre:
        assert torch.equal(zero[k], pre[k])
        torch.testing.assert_close(half[k], (pre[k] + ft[k]) / 2)
    evaluate.main([*EVAL, "--checkpoint", str(flyp_run), "--wise-ft", "1",
                   "--results", str(results)])
    assert len(results.read_text().splitlines()) == 4  # appended, not rewritten


def test_wise_ft_grid_and_its_refusals(micro_cache, tmp_path, not_loaded):
    assert parse_alphas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_alphas("0.5, 0.75") == [0.5, 0.75]
    for bad in ("1:0:0.1", "0:1:0", "a,b", "0:1"):
        with pytest.raises(ValueError, match=r"--wise-ft wants comma-separated numbers"):
            parse_alphas(bad)
    with pytest.raises(ValueError, match=r"--wise-ft must be a finite number >= 0 and <= 1, "
                                         r"got nan"):
        parse_alphas("0.5,nan")
    with pytest.raises(ValueError, match=r"--wise-ft must be .* <= 1, got 1.5"):
        parse_alphas("1.5,-0.5")
    with pytest.raises(ValueError, match=r"--wise-ft mixes .* give --checkpoint"):
        evaluate.main([*EVAL, "--wise-ft", "0:1:0.1"])
    with pytest.raises(ValueError, match=r"--save-weights belongs to --wise-ft"):
        evaluate.main([*EVAL, "--save-weights", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"--checkpoint .*: a run folder without "
                                                r"final.safetensors"):
        evaluate.main([*EVAL, "--checkpoint", str(tmp_path), "--wise-ft", "0.5"])
    with pytest.raises(ValueError, match=r"--keep-best id_mean: needs evaluations during "
                                         r"training"):
        train.main(train_args(tmp_path / "k", "--keep-best", "id_mean"))
