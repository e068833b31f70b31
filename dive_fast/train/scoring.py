"""Scoring as the paper does it: every evaluation set's top-1, top-5 and macro-F1 under
each variant's head (one read of the set for all), each rank scoring its share; the world's
and ``--task`` folders' sets; the report with its means and RSA (``rsa.py``)."""
from __future__ import annotations

import torch
from torch.utils.data import Subset

from .._cli.progress import progress_bar
from ..world.tasks import TASKS
from . import distributed
from .data import WorldCaptions, WorldTask, collate, in_order_loader
from .heads import set_head
from .precision import autocast
from .protocol import projection_rows
from .rsa import embed_pairs, rsa_of
from .suite import eval_dataset
from .validate import KINDS, TASK_METRICS, EvalFolder

METRICS = TASK_METRICS  # what a --task may report (PATH@METRIC)


class Tally:
    """One set's top-1, top-5 and macro-F1 counts, batch by batch. ``owner``: the class each
    head row scores, a class's logit the largest of its rows' (ObjectNet's projection);
    None: row k is class k."""

    def __init__(self, rows: int, owner: list[int] | None = None, device="cpu"):
        self.classes = rows if owner is None else max(owner) + 1
        self.owner = None if owner is None else torch.tensor(owner, device=device)
        self.top1 = self.top5 = self.seen = 0
        self.true_pos, self.predicted, self.actual = (
            torch.zeros(self.classes, dtype=torch.long) for _ in range(3))

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.owner is not None:
            logits = logits.new_full((len(logits), self.classes), float("-inf")).scatter_reduce(
                1, self.owner.expand(len(logits), -1), logits, "amax")
        best = logits.topk(min(5, self.classes), dim=1).indices.cpu()
        hit = best.eq(labels[:, None])
        self.top1 += int(hit[:, 0].sum())
        self.top5 += int(hit.any(1).sum())
        self.seen += labels.numel()
        self.true_pos += torch.bincount(labels[hit[:, 0]], minlength=self.classes)
        self.predicted += torch.bincount(best[:, 0], minlength=self.classes)
        self.actual += torch.bincount(labels, minlength=self.classes)

    def counts(self) -> torch.Tensor:
        """Every count as one integer vector (``from_counts`` reads it back): what ranks add."""
        return torch.cat([torch.tensor([self.top1, self.top5, self.seen]), self.true_pos,
                          self.predicted, self.actual])

    def from_counts(self, counts: torch.Tensor) -> None:
        self.top1, self.top5, self.seen = (int(c) for c in counts[:3])
        self.true_pos, self.predicted, self.actual = counts[3:].cpu().view(3, self.classes)

    def result(self) -> dict:
        """top5 is None for 5 classes or fewer (it would be 1 by construction); macro_f1 is
        the mean F1 over the classes that occur in the labels (WILDS's, as iWildCam is
        scored)."""
        if not self.seen:
            return {m: float("nan") for m in METRICS}
        present = self.actual > 0
        f1 = 2 * self.true_pos[present] / (self.actual[present] + self.predicted[present])
        return {"top1": self.top1 / self.seen,
                "top5": self.top5 / self.seen if self.classes > 5 else None,
                "macro_f1": float(f1.double().mean())}


def logits(model, head: torch.Tensor, images, device="cpu", amp_dtype=None) -> torch.Tensor:
    """Image features against a head's rows, under the run's autocast (open_clip's way)."""
    with autocast(device, amp_dtype):
        return model.encode_image(images.to(device), normalize=True) @ head.T


@torch.no_grad()
def score_variants(model, variants: list, loader, device="cpu", desc: str | None = None,
                   owner: list[int] | None = None, amp_dtype=None, over_ranks: bool = False):
    """([{top1, top5, macro_f1} per variant], samples seen, samples skipped) in one pass over
    ``loader`` (each image read once for all of them); streams, memory flat in set size.
    ``variants``: (set_weights or None, head) pairs; ``set_weights()`` puts that variant's
    weights into ``model`` (a WiSE-FT mix) before its forward. ``over_ranks``: ``loader`` is
    this rank's share, and the counts of every rank's are added (exact, integers)."""
    tallies = [Tally(head.shape[0], owner, head.device) for _, head in variants]
    skipped, applied = 0, None
    for images, labels, n_skipped in progress_bar(loader, desc=desc, leave=False,
                                                  disable=desc is None):
        skipped += n_skipped
        if images is None:
            continue
        for (set_weights, head), tally in zip(variants, tallies):
            if set_weights is not None and set_weights is not applied:  # one variant: once
                set_weights()
                applied = set_weights
            tally.add(logits(model, head, images, device, amp_dtype).float(), labels)
    if over_ranks:
        skipped = add_over_ranks(tallies, skipped, device)
    return [t.result() for t in tallies], tallies[0].seen, skipped


def add_over_ranks(tallies: list[Tally], skipped: int, device) -> int:
    """Every rank's counts added into ``tallies`` in one collective; returns the skipped
    total."""
    packed = torch.cat([torch.tensor([skipped])] + [t.counts() for t in tallies])
    packed = distributed.sum_tensor_over_ranks(packed.to(device)).cpu()
    at = 1
    for t in tallies:
        size = 3 + 3 * t.classes
        t.from_counts(packed[at:at + size])
        at += size
    return int(packed[0])


def share(dataset, batch_size: int, rank: int, world: int):
    """This rank's share of an evaluation set: whole batches (``distributed.batch_slice``),
    so that the batches, and so every logit, are those of one process."""
    if world == 1:
        return dataset
    return Subset(dataset, distributed.batch_slice(len(dataset), batch_size, rank, world))


def scores(model, head: torch.Tensor, loader, device="cpu", desc: str | None = None,
           owner: list[int] | None = None, amp_dtype=None):
    """({top1, top5, macro_f1}, samples seen, samples skipped) of one model and head."""
    (found,), seen, skipped = score_variants(model, [(None, head)], loader, device, desc,
                                             owner, amp_dtype)
    return found, seen, skipped


def accuracy(model, head: torch.Tensor, loader, device="cpu", desc: str | None = None):
    """(top-1 accuracy, samples seen, samples skipped) (``scores``)."""
    found, seen, skipped = scores(model, head, loader, device, desc)
    return found["top1"], seen, skipped


def evaluate(model, tokenizer, eval_sets: dict, *, pre_model=None, rsa_set=None, device="cpu",
             batch_size=256, workers=0, progress=True, heads=None, amp_dtype=None,
             rank=0, world=1) -> dict:
    """The report: per set grouped by kind its metric (top-1 unless the set's ``metric``
    says otherwise), their means, every set's top-1, top-5 and macro-F1 in "metrics", and
    RSA (if pre_model). Forwards run under ``amp_dtype``'s autocast (None: float32).

    ``heads`` maps class-name tuples to trained classifier weights [classes, dim] (FT's
    linear head), used instead of the zero-shot head for sets with those classes.

    On ``world`` ranks every rank calls it with the same arguments: each scores its share of
    every set (``share``), and every rank returns the report one process gives."""
    (report,) = evaluate_variants(model, tokenizer, eval_sets, [(None, heads)],
                                  pre_model=pre_model, rsa_set=rsa_set, device=device,
                                  batch_size=batch_size, workers=workers, progress=progress,
                                  amp_dtype=amp_dtype, rank=rank, world=world)
    return report


def evaluate_variants(model, tokenizer, eval_sets: dict, variants: list, *, pre_model=None,
                      rsa_set=None, device="cpu", batch_size=256, workers=0, progress=True,
                      amp_dtype=None, rank=0, world=1) -> list[dict]:
    """``evaluate``'s report for each of ``variants``, (set_weights or None, heads or None)
    pairs, reading each set once for all: ``set_weights()`` puts a variant's weights
    (a WiSE-FT mix) into ``model`` before each of its forwards. ``rank``, ``world``: as
    ``evaluate``'s."""
    progress = progress and rank == 0
    model.eval()
    reports = [{k: {} for k in KINDS} for _ in variants]
    caches = [{} for _ in variants]  # per variant {templates: {class name: zero-shot row}}
    skipped = 0
    for name, (kind, dataset) in eval_sets.items():
        scored = []
        for (set_weights, heads), cache, report in zip(variants, caches, reports):
            if set_weights is not None:
                set_weights()
            head, note = set_head(model, tokenizer, dataset, heads or {}, cache, device,
                                  amp_dtype)
            scored.append((set_weights, head))
            if note:
                report.setdefault("notes", {})[name] = note
        loader = in_order_loader(share(dataset, batch_size, rank, world), batch_size, workers,
                                 collate)
        owner = projection_rows(dataset.projection)[1] \
            if getattr(dataset, "head_classes", None) is not None else None
        found_all, seen, n_skipped = score_variants(
            model, scored, loader, device, desc=name if progress else None, owner=owner,
            amp_dtype=amp_dtype, over_ranks=world > 1)
        metric = getattr(dataset, "metric", "top1")  # the task's own (--task ...@macro_f1)
        for found, report in zip(found_all, reports):
            report[kind][name] = found[metric] if seen else None
            report.setdefault("metrics", {})[name] = \
                {**found, "reported": metric} if seen else None
            if not seen:
                report.setdefault("notes", {})[name] = \
                    f"no readable image ({n_skipped} unreadable)"
        skipped += n_skipped
    for report in reports:
        for kind in KINDS:
            vals = [v for v in report[kind].values() if v is not None]
            report[f"{kind}_mean"] = sum(vals) / len(vals) if vals else None
        report["skipped_images"] = skipped
    if pre_model is not None and rsa_set is not None:
        loader = in_order_loader(share(rsa_set, batch_size, rank, world), batch_size, workers,
                                 collate)
        (pre,) = embed_pairs(pre_model, tokenizer, loader, device, amp_dtype,
                             over_ranks=world > 1)
        embedded = embed_pairs(model, tokenizer, loader, device, amp_dtype,
                               [set_weights for set_weights, _ in variants], world > 1)
        for report, ft in zip(reports, embedded):
            report["rsa"] = rsa_of(pre, ft)
    return reports


def world_eval_sets(transform, n_per_task=500, seed=0, size=32):
    """{name: (kind, dataset)} over the embedded world's test splits."""
    return {name: (task.kind, WorldTask(task, "test", n_per_task, transform, seed, size))
            for name, task in TASKS.items()}


def world_rsa_set(transform, n=256, seed=0, size=32):
    return WorldCaptions("rsa-heldout", n, transform, seed, size)


def folder_eval_sets(specs: list[EvalFolder], transform, templates=None) -> dict:
    """{name: (kind, dataset)} of checked ``--task`` entries (``validate.eval_folders``);
    ``templates`` (--templates) serve the id and ood sets, which share the target's
    classes; a zero-shot set keeps its own."""
    sets = {}
    for t in specs:
        folder = eval_dataset(t.path, transform, t.preset,
                              None if t.kind == "zeroshot" else templates)
        folder.metric = t.metric  # what the report gives for it (``evaluate``)
        sets[t.name] = (t.kind, folder)
    return sets
