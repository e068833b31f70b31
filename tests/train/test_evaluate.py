"""Evaluation: 100% for a perfect model, chance for a random one; RSA's invariances."""
import re
import math

import pytest
import torch
import torch.nn.functional as F

from dive_fast.train.evaluate import evaluate, format_table, rsa, spearman, zeroshot_head


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
