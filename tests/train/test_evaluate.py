"""Evaluation: 100% for a perfect model, chance for a random one; RSA's invariances; trained
heads for part of a set's classes; strict JSON reports; the command's argument checks."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers.images import image_folder

from dive_fast.train import validate
from dive_fast.train.evaluate import main as evaluate_main
from dive_fast.train.fileio import atomic_write_json
from dive_fast.train.heads import trained_head, zeroshot_head
from dive_fast.train.report_tables import format_table
from dive_fast.train.rsa import rsa, spearman
from dive_fast.train.scoring import evaluate, folder_eval_sets


class LabelSet(torch.utils.data.Dataset):
    """Images whose first pixel holds their label (a model can be built to read it)."""

    def __init__(self, n, classes, kind_seed=0, prefix="c"):
        g = torch.Generator().manual_seed(kind_seed)
        self.labels = torch.randint(classes, (n,), generator=g)
        self.classnames = tuple(f"{prefix}{i}" for i in range(classes))
        self.templates = ("a {}.", "the {}.")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = torch.zeros(3, 4, 4)
        img[0, 0, 0] = self.labels[i]
        return img, int(self.labels[i])


class Tokenizer:
    def __call__(self, texts):
        return torch.tensor([[int(re.search(r"\d+", t).group()), 0] for t in texts])


class PerfectModel(torch.nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def encode_image(self, x, normalize=True):
        return F.one_hot(x[:, 0, 0, 0].long(), self.classes).float()

    def encode_text(self, tokens, normalize=True):
        return F.one_hot(tokens[:, 0], self.classes).float()


class RandomModel(PerfectModel):
    def encode_image(self, x, normalize=True):
        return F.normalize(torch.randn(len(x), 8), dim=-1)

    def encode_text(self, tokens, normalize=True):
        return F.normalize(torch.randn(len(tokens), 8), dim=-1)


def test_zeroshot_head_is_normalised_mean_of_prompts():
    head = zeroshot_head(PerfectModel(3), Tokenizer(), ("c0", "c1", "c2"), ("a {}.", "b {}."))
    torch.testing.assert_close(head, torch.eye(3))


def test_perfect_model_scores_100_random_scores_chance():
    sets = {"id": ("id", LabelSet(600, 10)), "z": ("zeroshot", LabelSet(600, 4, 1))}
    perfect = evaluate(PerfectModel(10), Tokenizer(), sets, progress=False, batch_size=128)
    assert perfect["id"]["id"] == 1.0 and perfect["zeroshot"]["z"] == 1.0
    torch.manual_seed(0)
    rand = evaluate(RandomModel(10), Tokenizer(), sets, progress=False, batch_size=128)
    assert abs(rand["id"]["id"] - 0.1) < 0.05 and abs(rand["zeroshot"]["z"] - 0.25) < 0.07
    assert rand["ood_mean"] is None
    assert "| method |" in format_table({"perfect": perfect, "random": rand})


def test_rsa_invariances():
    torch.manual_seed(0)
    x = torch.randn(50, 16)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    assert rsa(x, x) == pytest.approx(1.0)
    assert rsa(x, x @ q) == pytest.approx(1.0)  # a rotation keeps every cosine
    assert rsa(x, 3 * x) == pytest.approx(1.0)  # so does scaling
    distorted = rsa(x, x + 0.8 * torch.randn(50, 16))
    assert 0.0 < distorted < 0.95
    with pytest.raises(ValueError, match="RSA needs"):
        rsa(x, x[:10])


def test_spearman_matches_definition():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert math.isfinite(spearman(torch.randn(30), torch.randn(30)))


def test_trained_heads_replace_the_zeroshot_head_for_their_classes():
    """... and for a test set holding some of the training classes (matched by name), never
    silently the zero-shot head; other classes get the zero-shot head."""
    sets = {"id": ("id", LabelSet(200, 10)), "nine": ("id", LabelSet(200, 9, 2)),
            "z": ("zeroshot", LabelSet(200, 4, 1, prefix="z"))}
    shifted = torch.eye(10).roll(1, dims=0)  # a head that always answers the next class
    report = evaluate(PerfectModel(10), Tokenizer(), sets, progress=False,
                      heads={sets["id"][1].classnames: shifted})
    assert report["id"]["id"] == 0.0 and report["zeroshot"]["z"] == 1.0
    assert report["id"]["nine"] == 0.0  # the trained rows, not the (perfect) zero-shot head
    assert report["notes"]["nine"] == "trained head (9 of its 10 classes, matched by name)"


class Logits(torch.nn.Module):
    """encode_image: the 'image' is its logits row (with an identity head)."""

    def encode_image(self, x, normalize=True):
        return x


def test_top1_top5_and_macro_f1_by_hand():
    from dive_fast.train.scoring import scores
    rows = torch.tensor([[6., 5, 4, 3, 2, 1],   # label 0: predicted 0
                         [0., 5, 6, 4, 3, 2],   # label 1: predicted 2, 2nd best: top-5 hit
                         [0., 0, 9, 0, 0, 0],   # label 2: predicted 2
                         [9., 8, 1, 7, 6, 5]])  # label 2: predicted 0, 6th: top-5 miss
    labels = torch.tensor([0, 1, 2, 2])
    found, seen, skipped = scores(Logits(), torch.eye(6), [(rows, labels, 1)])
    assert (seen, skipped) == (4, 1)
    assert found["top1"] == 0.5 and found["top5"] == 0.75
    # F1 over the classes in the labels: 0: 2*1/(1+2); 1: 0; 2: 2*1/(2+2)
    assert found["macro_f1"] == pytest.approx((2 / 3 + 0 + 1 / 2) / 3)
    few, _, _ = scores(Logits(), torch.eye(3), [(rows[:, :3], labels, 0)])
    assert few["top5"] is None  # 3 classes: top-5 says nothing


def test_a_task_reports_its_own_metric_and_every_set_its_top5(tmp_path):
    from PIL import Image

    from dive_fast.train import validate
    for c in ("c0", "c1"):
        (tmp_path / "w" / c).mkdir(parents=True)
        Image.new("RGB", (2, 2)).save(tmp_path / "w" / c / "0.png")
    spec, = validate.eval_folders([f"ood:iwildcam:{tmp_path / 'w'}@macro_f1"])
    assert (spec.path, spec.metric) == (str(tmp_path / "w"), "macro_f1")
    with pytest.raises(ValueError, match="unknown metric @f2"):
        validate.eval_folders([f"ood:iwildcam:{tmp_path / 'w'}@f2"])
    sets = {"id": ("id", LabelSet(60, 10)),
            **folder_eval_sets([spec], lambda img: torch.zeros(3, 4, 4))}
    report = evaluate(PerfectModel(10), Tokenizer(), sets, progress=False)
    assert report["metrics"]["id"]["top5"] == 1.0 and report["metrics"]["id"]["top1"] == 1.0
    # both images read as class 0 (c0): top-1 0.5; F1 of c0 2/3, of c1 0
    assert report["metrics"]["iwildcam"]["top1"] == 0.5
    assert report["ood"]["iwildcam"] == pytest.approx(1 / 3)
    table = format_table({"m": report})
    assert "| 100.0 / 100.0 |" in table and "iwildcam (macro-f1: main table)" in table


def test_a_trained_head_over_a_list_with_repeated_names_is_taken_by_position():
    weight = torch.arange(3.)[:, None]  # ImageNet's list repeats 'missile' and 'sunglasses'
    head, note = trained_head({("missile", "tench", "missile"): weight},
                              ("missile", "tench", "missile"))
    assert head.flatten().tolist() == [0., 1., 2.] and note is None


def test_format_table_takes_any_task_name():
    row = {"id": {"": 0.5}, "ood": {}, "ood_mean": None, "zeroshot": {}, "zeroshot_mean": None}
    assert "| 50.0 |" in format_table({"m": row})


def test_nan_in_a_report_is_written_as_null_with_the_reason(micro_cache, tmp_path):
    """A task whose images all fail to read is refused before the run (test_cli.py); one
    whose images break during the run is null in the report, with the reason."""
    from dive_fast.train.models import load_clip
    broken = image_folder(tmp_path / "broken", broken=True)
    bundle = load_clip("dive-micro")
    sets = folder_eval_sets(validate.eval_folders([f"id:broken:{broken}"], check_folders=False),
                            bundle.preprocess_val)
    report = evaluate(bundle.model, bundle.tokenizer, sets, progress=False)
    atomic_write_json(tmp_path / "report.json", {"zero-shot": report})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert report["zero-shot"]["id"]["broken"] is None
    assert report["zero-shot"]["notes"]["broken"] == "no readable image (6 unreadable)"
    atomic_write_json(tmp_path / "r.json", {"a": {"rsa": float("nan")}, "b": [1.0, float("inf")]})
    strict = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert strict == {"a": {"rsa": None}, "b": [1.0, None],
                      "non_finite": ["a.rsa: nan", "b[1]: inf"]}


def test_evaluate_checks_its_arguments_first(tmp_path, not_loaded):
    with pytest.raises(FileNotFoundError, match="--checkpoint: checkpoint not found"):
        evaluate_main(["--checkpoint", str(tmp_path / "none.pt")])
    with pytest.raises(ValueError, match="--n-per-task must be .* >= 1, got 0"):
        evaluate_main(["--n-per-task", "0"])


def test_a_test_set_with_some_training_classes_uses_the_trained_head_rows():
    head = torch.arange(12.0).view(4, 3)
    rows, note = trained_head({("a", "b", "c", "d"): head}, ["c", "a"])
    assert torch.equal(rows, head[[2, 0]]) and "2 of its 4 classes" in note
    rows, note = trained_head({("a", "b", "c", "d"): head}, ["c", "z"])
    assert rows is None and "['z'] are not among" in note
    assert trained_head({("a", "b"): head}, ["a", "b"])[1] is None
    assert trained_head({("a", "b"): head}, ["n01", "n02"]) == \
        (None, "zero-shot head: no class of this set is among the trained head's")
    assert trained_head({}, ["a"]) == (None, None)  # no trained head: nothing to say


def test_evaluate_refuses_a_folder_as_its_report_file(tmp_path, not_loaded):
    with pytest.raises(ValueError, match=r"--out .* is a folder; give the JSON file to write"):
        evaluate_main(["--out", str(tmp_path)])


def test_bf16_autocast_scores_as_fp32_within_bf16s_own_error(micro_cache):
    """Under the run's autocast (bf16 here, on the CPU) the logits stay within twice the
    error of the same model computed wholly in bf16 (PyTorch's own error in that dtype);
    every image whose fp32 margin exceeds twice that error gets the same class, and the
    reported top-1 moves by at most the share of the others."""
    import copy

    from torch.utils.data import DataLoader

    from dive_fast.train.data import collate
    from dive_fast.train.models import find_pretrained, load_clip
    from dive_fast.train.scoring import logits, world_eval_sets
    bundle = load_clip("dive-micro", find_pretrained("dive-micro", None))
    model, tok = bundle.model.eval(), bundle.tokenizer
    sets = world_eval_sets(bundle.preprocess_val, 100, 0, bundle.image_size)
    bf16 = torch.bfloat16
    for name in ("shapes", "colour"):
        ds = sets[name][1]
        images, labels, _ = next(iter(DataLoader(ds, batch_size=len(ds), collate_fn=collate)))
        with torch.no_grad():
            fp32 = logits(model, zeroshot_head(model, tok, ds.classnames, ds.templates), images)
            amp = logits(model, zeroshot_head(model, tok, ds.classnames, ds.templates,
                                              amp_dtype=bf16), images, amp_dtype=bf16)
            whole = copy.deepcopy(model).to(bf16)
            own = logits(whole, zeroshot_head(whole, tok, ds.classnames, ds.templates).to(bf16),
                         images.to(bf16))
        assert amp.dtype == bf16  # the autocast ran
        err = (amp.float() - fp32).abs().max()
        assert 0 < err <= 2 * (own.float() - fp32).abs().max()
        top2 = fp32.topk(2).values
        sure = top2[:, 0] - top2[:, 1] > 2 * err
        assert torch.equal(amp.argmax(1)[sure], fp32.argmax(1)[sure])
        reports = [evaluate(model, tok, {name: sets[name]}, progress=False, amp_dtype=dtype)
                   for dtype in (None, bf16)]
        kind = sets[name][0]
        moved = abs(reports[0][kind][name] - reports[1][kind][name])
        assert moved <= (~sure).float().mean() + 1e-9


def test_rsa_and_wise_ft_compare_with_the_runs_own_random_start(micro_cache, tmp_path):
    """--pretrained '' (random weights) and a learning rate too small to move them: the
    fine-tuned model is its start, so RSA is 1, in the app and in evaluate (which reads the
    start the checkpoint records); other weights offered as the start are refused."""
    from helpers.runs import train_args

    from dive_fast import train
    out = tmp_path / "out"
    report = train.main(train_args(out, "--method", "flyp", "--pretrained", "", "--lr", "1e-12",
                                   "--wise-ft", "0.5"))
    for row in ("flyp", "flyp wise-ft 0.5"):
        assert all(abs(v - 1) < 1e-6 for v in report[row]["rsa"].values()), report[row]["rsa"]
    config = json.loads((out / "config.json").read_text())
    assert config["start"]["path"].endswith("start-weights.safetensors")
    assert config["start"]["sha256"][:16] in (out / "table.md").read_text()
    ckpt = str(out / "checkpoints" / "step-00000004.pt")
    again = evaluate_main(["--model", "dive-micro", "--checkpoint", ckpt, "--n-per-task", "2"])
    assert all(abs(v - 1) < 1e-6 for v in again["rsa"].values()), again["rsa"]
    from dive_fast.train.models import tiny_checkpoint
    with pytest.raises(ValueError, match=r"--pretrained .*dive-micro.*not the weights the run "
                                         r"started from .*random weights"):
        evaluate_main(["--model", "dive-micro", "--checkpoint", ckpt, "--n-per-task", "2",
                       "--pretrained", str(tiny_checkpoint("dive-micro"))])
