"""Evaluation as the paper does it: zero-shot heads from templates; ID, OOD and zero-shot
accuracy; RSA between the pre-trained and the fine-tuned embedding geometry.

    python -m dive_fast.train.evaluate                                  # pre-trained tiny model
    python -m dive_fast.train.evaluate --checkpoint runs/x/checkpoints/step-00000300.pt
    python -m dive_fast.train.evaluate --checkpoint runs/x --wise-ft 0:1:0.1   # WiSE-FT sweep
    python -m dive_fast.train.evaluate --model ViT-B-16 --pretrained openai \\
        --task id:imagenet:/data/imagenet/val --task ood:sketch:/data/imagenet-sketch
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.data import Subset

from .._cli.progress import progress_bar
from ..world.tasks import TASKS
from . import distributed, listing, start_weights, validate
from .checkpoint import (
    CorruptCheckpoint,
    WrongModel,
    load_checkpoint,
    load_model_weights,
    load_weights_file,
)
from .data import (
    WorldCaptions,
    WorldTask,
    add_csv_flags,
    collate,
    csv_options,
    heldout_pairs,
    in_order_loader,
)
from .fileio import append_rows, atomic_write_json
from .models import (
    DownloadFailed,
    find_pretrained,
    is_weights_path,
    load_clip,
    model_and_tag,
)
from .precision import PRECISIONS, autocast_dtype
from .protocol import chosen_templates, projection_rows, with_imagenet_root
from .suite import eval_dataset, with_suite
from .validate import KINDS, TASK_METRICS, EvalFolder
from .weights import FINAL, model_state, save_weights
from .wise_ft import WeightMix, parse_alphas, plot_id_ood

PROMPTS_PER_BATCH = 1024  # text forwards of ~1024 prompts: ImageNet's 1000 x 80 in ~80


def autocast(device, dtype):
    """The run's autocast (``dtype`` None: float32), around every forward of an evaluation,
    as open_clip's zero-shot evaluation runs under its --precision."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def zeroshot_head(model, tokenizer, classnames, templates, device="cpu",
                  amp_dtype=None) -> torch.Tensor:
    """[classes, dim] float32: per class the normalised mean of its normalised prompt
    embeddings, built by open_clip's ``build_zero_shot_classifier`` under the run's
    autocast, batched over classes."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    with autocast(device, amp_dtype):
        weights = build_zero_shot_classifier(
            model, tokenizer, list(classnames), list(templates),
            num_classes_per_batch=max(1, PROMPTS_PER_BATCH // len(templates)), device=device)
    return weights.T.float()


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


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(x.numel(), dtype=x.dtype, device=x.device)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def rsa(pre: torch.Tensor, ft: torch.Tensor) -> float:
    """Spearman correlation of the upper triangles of the two cosine-similarity matrices."""
    if pre.shape != ft.shape or pre.shape[0] < 3:
        raise ValueError(f"RSA needs two [N>=3, dim] embeddings of one set, got "
                         f"{tuple(pre.shape)} and {tuple(ft.shape)}")
    pre = torch.nn.functional.normalize(pre.double(), dim=1)
    ft = torch.nn.functional.normalize(ft.double(), dim=1)
    iu = torch.triu_indices(len(pre), len(pre), offset=1)
    return spearman((pre @ pre.T)[iu[0], iu[1]], (ft @ ft.T)[iu[0], iu[1]])


@torch.no_grad()
def embed_pairs(model, tokenizer, loader, device="cpu", amp_dtype=None, weight_setters=(None,),
                over_ranks: bool = False):
    """[(image embeddings, text embeddings)] of the pairs, one per weight setter (None: the
    model as it is), in one pass over ``loader``. ``over_ranks``: ``loader`` is this rank's
    share (``share``), and every rank gets all the rows, in rank order."""
    found, applied = [([], []) for _ in weight_setters], None
    for images, texts, _ in loader:
        if images is None:
            continue
        tokens = tokenizer(texts).to(device)
        for set_weights, (imgs, txts) in zip(weight_setters, found):
            if set_weights is not None and set_weights is not applied:  # one variant: once
                set_weights()
                applied = set_weights
            with autocast(device, amp_dtype):
                imgs.append(model.encode_image(images.to(device), normalize=True).float().cpu())
                txts.append(model.encode_text(tokens, normalize=True).float().cpu())
    found = [(torch.cat(imgs) if imgs else None, torch.cat(txts) if txts else None)
             for imgs, txts in found]
    if over_ranks:  # every_rank[rank][setter] = (images, texts); None: a share with none
        every_rank = distributed.gather_in_rank_order(found)
        found = [tuple(torch.cat([t for t in column if t is not None]) for column in zip(*ranks))
                 for ranks in zip(*every_rank)]
    return found


def rsa_of(pre: tuple, ft: tuple) -> dict:
    (pi, pt), (fi, ft_) = pre, ft
    return {"image": rsa(pi, fi), "text": rsa(pt, ft_),
            "joint": rsa(torch.cat((pi, pt)), torch.cat((fi, ft_)))}


def rsa_report(pre_model, model, tokenizer, loader, device="cpu", amp_dtype=None) -> dict:
    (pre,) = embed_pairs(pre_model, tokenizer, loader, device, amp_dtype)
    (ft,) = embed_pairs(model, tokenizer, loader, device, amp_dtype)
    return rsa_of(pre, ft)


def world_eval_sets(transform, n_per_task=500, seed=0, size=32):
    """{name: (kind, dataset)} over the embedded world's test splits."""
    return {name: (task.kind, WorldTask(task, "test", n_per_task, transform, seed, size))
            for name, task in TASKS.items()}


def world_rsa_set(transform, n=256, seed=0, size=32):
    return WorldCaptions("rsa-heldout", n, transform, seed, size)


def trained_head(heads: dict, classnames) -> tuple[torch.Tensor | None, str | None]:
    """The trained head's rows for a set's classes, matched by name in the set's order
    (a test set with 9 of the 10 training classes uses those 9 rows); None with a note
    saying why when some class has no trained row (then the zero-shot head serves)."""
    names = tuple(classnames)
    for trained, weight in heads.items():
        if names == tuple(trained):  # by position: ImageNet's own list repeats two names
            return weight, None
        rows = {c: i for i, c in enumerate(trained)}
        missing = [c for c in names if c not in rows]
        if not missing:
            index = torch.tensor([rows[c] for c in names], device=weight.device)
            subset = "" if names == tuple(trained) else \
                f" ({len(names)} of its {len(trained)} classes, matched by name)"
            return weight[index], f"trained head{subset}" if subset else None
        if len(missing) < len(names):
            return None, (f"zero-shot head: class(es) {missing[:5]} are not among the trained "
                          f"head's {len(trained)} classes")
    if heads:  # a method with a trained head, on a set that shares no class name with it
        return None, "zero-shot head: no class of this set is among the trained head's"
    return None, None


def set_head(model, tokenizer, dataset, heads: dict, cache: dict, device="cpu",
             amp_dtype=None):
    """(head [rows, dim], note): the trained head when it covers the set's classes, else the
    zero-shot head. A subset of a larger class list (ImageNet-R's 200 of ImageNet's 1000,
    ObjectNet's 113: ``head_classes``, ``projection``) is scored with the larger head's
    rows ``projection`` (``protocol.projection_rows``): projected logits, as WiSE-FT and
    FLYP score it. A zero-shot row depends on its class name and the templates alone, so
    each is built once per templates in ``cache`` (ImageNet's shifts share them)."""
    full = getattr(dataset, "head_classes", None)
    rows, owner = projection_rows(dataset.projection) if full is not None else (None, None)
    if full is not None and tuple(full) in heads:  # by position: two ImageNet names repeat
        weight = heads[tuple(full)]
        return weight[torch.tensor(rows, device=weight.device)], None
    note = None
    if owner is None:  # one row per class: a trained head's rows by name
        head, note = trained_head(heads, dataset.classnames)
        if head is not None:
            return head, note
    names = dataset.classnames if full is None else [full[r] for r in rows]
    built = cache.setdefault(tuple(dataset.templates), {})
    todo = list(dict.fromkeys(c for c in names if c not in built))
    if todo:
        built.update(zip(todo, zeroshot_head(model, tokenizer, todo, dataset.templates, device,
                                             amp_dtype)))
    return torch.stack([built[c] for c in names]), note


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


# --keep-best METRIC: a kind's mean of its sets' reported metrics (top-1 unless a --task
# says @macro_f1), or a kind's mean top-1
SUMMARY_METRICS = tuple(f"{kind}_{stat}" for kind in KINDS for stat in ("mean", "top1"))


def summary_value(report: dict, metric: str) -> float | None:
    """``SUMMARY_METRICS`` of a report; None when no set of that kind has a value."""
    kind, _, stat = metric.rpartition("_")
    if stat == "mean":
        return report[metric]
    found = [m["top1"] for name in report[kind]
             if (m := report.get("metrics", {}).get(name)) is not None]
    return sum(found) / len(found) if found else None


def _pct(x):
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def _num(x):
    return "–" if x is None or x != x else f"{x:.3f}"


def format_table(rows: dict[str, dict]) -> str:
    """Markdown: one row per method, columns ID, each OOD, OOD mean, each zero-shot, mean, RSA."""
    first = next(iter(rows.values()))
    cols = ([("id", k) for k in first["id"]] + [("ood", k) for k in first["ood"]] +
            [("ood_mean", None)] + [("zeroshot", k) for k in first["zeroshot"]] +
            [("zeroshot_mean", None)])
    head = ["method"] + [kind.replace("_", " ") if k is None else k for kind, k in cols] + \
        ["RSA img", "RSA txt", "RSA joint"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in rows.items():
        vals = [_pct(r[kind] if k is None else r[kind][k]) for kind, k in cols]
        rs = r.get("rsa")
        vals += [_num(rs[k]) for k in ("image", "text", "joint")] if rs else ["–"] * 3
        lines.append("| " + " | ".join([method] + vals) + " |")
    return "\n".join(lines) + topk_table(rows)


def topk_table(rows: dict[str, dict]) -> str:
    """Markdown after the main table: each set's top-1 / top-5 per method ('' when the rows
    carry no per-set metrics); a set reported by another metric says so in its header."""
    first = next(iter(rows.values()))
    sets = [name for kind in KINDS for name in first[kind]]
    per = {method: r.get("metrics") or {} for method, r in rows.items()}
    if not any(per.values()):
        return ""
    reported = {name: next((m[name]["reported"] for m in per.values() if m.get(name)), "top1")
                for name in sets}
    head = ["method"] + [name if reported[name] == "top1" else
                         f"{name} ({reported[name].replace('_', '-')}: main table)"
                         for name in sets]
    lines = ["", "", "Top-1 / top-5 (%; top-5 '–' for 5 classes or fewer):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, m in per.items():
        vals = [f"{_pct(m[n]['top1'])} / {_pct(m[n]['top5'])}" if m.get(n) else "–"
                for n in sets]
        lines.append("| " + " | ".join([method] + vals) + " |")
    return "\n".join(lines)


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


EXAMPLES = """\
examples:
  python -m dive_fast.train.evaluate                       # the pre-trained tiny model on the world
  python -m dive_fast.train.evaluate --model dive-tiny \\
      --checkpoint runs/miniature/checkpoints/step-00000300.pt
  python -m dive_fast.train.evaluate --model ViT-B-16 --pretrained openai \\
      --task id:imagenet:/data/imagenet/val --task ood:sketch:/data/imagenet-sketch
  python -m dive_fast.train.evaluate --model ViT-B-16 --pretrained openai \\
      --checkpoint runs/vitb16-dive --imagenet-root /data --wise-ft 0:1:0.1 \\
      --save-weights runs/vitb16-dive/wise-ft     # every mix, one reading of the data
"""


def build_parser() -> argparse.ArgumentParser:
    from .._cli.arguments import DefaultsFormatter
    p = argparse.ArgumentParser(
        prog="python -m dive_fast.train.evaluate", epilog=EXAMPLES,
        formatter_class=DefaultsFormatter,
        description="Evaluate a CLIP model: ID, OOD and zero-shot accuracy, and RSA against "
                    "the pre-trained weights when --checkpoint is given.")
    a = p.add_argument
    a("--model", default="dive-tiny", help="open_clip model name or a dive_fast tiny config")
    a("--pretrained", default=None,
      help="open_clip tag or checkpoint path (unset with a tiny config: its cached weights)")
    a("--checkpoint", default=None, metavar="RUN_OR_FILE",
      help="what to evaluate: a dive_fast.train checkpoint (.pt), a weights file "
           "(.safetensors) or a run folder (its final.safetensors, else its newest "
           "checkpoint); unset: the pre-trained model itself")
    a("--wise-ft", default=None, metavar="ALPHAS",
      help="with --checkpoint: evaluate the WiSE-FT mixes (1 - a) pre-trained + a "
           "fine-tuned for each a, comma-separated (0.5,1) or START:STOP:STEP (0:1:0.1), "
           "every set read once for all; rows appended to --results, ID-vs-OOD plot beside it")
    a("--results", default=None, metavar="FILE",
      help="--wise-ft: the JSONL file its rows are appended to (unset: wise_ft.jsonl in the "
           "run folder); the plot is FILE with .png")
    a("--save-weights", default=None, metavar="DIR",
      help="--wise-ft: also write each mix as DIR/wise-ft-ALPHA.safetensors (open_clip "
           "loads them with pretrained=FILE)")
    a("--precision", choices=list(PRECISIONS), default="auto",
      help="autocast of the forwards, as the run's (open_clip's names; auto: amp_bf16 on "
           "GPUs, fp32 on CPUs)")
    a("--task", action="append", default=[], metavar="KIND:NAME:PATH",
      help="an evaluation image folder, KIND id, ood or zeroshot; repeat for more (unset: "
           "the generated world's tasks); PATH@macro_f1 reports macro-F1 (WILDS's) for it")
    a("--imagenet-root", default=None, metavar="DIR",
      help="add the paper's ImageNet sets found under DIR by their usual folder names "
           "(docs/training.md)")
    a("--zeroshot-suite", nargs=2, default=None, metavar=("SUITE", "DIR"),
      help="add the paper's ten zero-shot sets found under DIR by their usual folder names "
           "(SUITE: paper; docs/training.md: each set's layout), naming those absent")
    a("--templates", default=None, metavar="openai|simple|PATH",
      help="prompt templates of the id and ood sets (unset: a folder's templates.txt, else "
           "openai for ImageNet's classes, else three generic ones)")
    a("--n-per-task", type=int, default=500, help="world: test images per task")
    a("--world-seed", type=int, default=0, help="seed of the generated world")
    a("--batch-size", type=int, default=256, help="images per forward")
    a("--workers", type=int, default=0, help="data loader processes")
    a("--device", default=None, help="torch device (unset: cuda when visible, else cpu)")
    a("--rsa-csv", default=None, help="held-out pairs (open_clip CSV) for RSA")
    a("--rsa-shards", default=None, help="held-out pairs (webdataset shards) for RSA")
    a("--rsa-size", type=int, default=256, help="held-out pairs used for RSA")
    add_csv_flags(a)
    a("--out", default=None, help="write the report as JSON to this file (unset: print only)")
    return p


def check_args(args) -> list[EvalFolder]:
    """Every argument checked before a model loads; returns the parsed ``--task`` folders."""
    listing.forget()  # a new command: its folders are read anew
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    validate.device(args.device)
    chosen_templates(args.templates)
    if args.imagenet_root:
        args.task = with_imagenet_root(args.task, args.imagenet_root)
        args.imagenet_root = None  # now in --task
    if args.zeroshot_suite:
        args.task = with_suite(args.task, *args.zeroshot_suite)
        args.zeroshot_suite = None  # now in --task
    folders = validate.eval_folders(args.task)
    for name in ("n_per_task", "batch_size", "rsa_size"):
        validate.number(f"--{name.replace('_', '-')}", getattr(args, name),
                        3 if name == "rsa_size" else 1)
    if (args.rsa_csv or args.rsa_shards) and not args.checkpoint:
        raise ValueError("--rsa-csv/--rsa-shards: RSA compares a fine-tuned model with its "
                         "start; give the fine-tuned --checkpoint too")
    validate.rsa_pairs(args)
    if args.checkpoint:
        args.checkpoint = str(checkpoint_file(args.checkpoint))
    args.wise_ft_alphas = parse_alphas(args.wise_ft) if args.wise_ft is not None else None
    if args.wise_ft is not None and not args.checkpoint:
        raise ValueError("--wise-ft mixes the pre-trained weights with --checkpoint's: give "
                         "--checkpoint RUN_OR_FILE")
    if args.wise_ft is not None and not args.wise_ft_alphas:
        raise ValueError("--wise-ft: no mixing weight given (e.g. 0:1:0.1)")
    for flag in ("results", "save_weights"):
        if getattr(args, flag) and args.wise_ft is None:
            raise ValueError(f"--{flag.replace('_', '-')} belongs to --wise-ft, which is unset")
    if args.wise_ft is not None:
        args.results = args.results or str(run_folder(args.checkpoint) / "wise_ft.jsonl")
        if Path(args.results).is_dir():
            raise ValueError(f"--results {args.results} is a folder; give the JSONL file to "
                             "append to")
        validate.writable_folder(Path(args.results).parent, "--results")
        if args.save_weights:
            validate.writable_folder(args.save_weights, "--save-weights")
    model_and_tag(args.model, args.pretrained)
    if is_weights_path(args.pretrained) and not Path(args.pretrained).is_file():
        raise FileNotFoundError(f"--pretrained: checkpoint not found: {args.pretrained}")
    if args.out:
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder; give the JSON file to write")
        validate.writable_folder(Path(args.out).absolute().parent, "--out")
    return folders


def checkpoint_file(given) -> Path:
    """--checkpoint RUN_OR_FILE as the file to load: a run folder's final.safetensors, else
    its newest checkpoint."""
    path = Path(given)
    if path.is_dir():
        found = [path / FINAL] if (path / FINAL).is_file() else \
            sorted((path / "checkpoints").glob("step-*.pt"))[-1:]
        if not found:
            raise FileNotFoundError(f"--checkpoint {given}: a run folder without {FINAL} or "
                                    "checkpoints/step-*.pt; give the run's --out or a file")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: checkpoint not found: {given}")
    return path


def run_folder(checkpoint) -> Path:
    """The run a checkpoint file belongs to (the folder above checkpoints/)."""
    folder = Path(checkpoint).parent
    return folder.parent if folder.name == "checkpoints" else folder


def start_source(args, ckpt: dict | None) -> str | None:
    """What to load as the model's start: --pretrained as given, else the start a checkpoint
    records (its file, or its tag), else the tiny config's cached weights."""
    if ckpt is None or args.pretrained is not None:
        return find_pretrained(args.model, args.pretrained, args.world_seed)
    recorded = ckpt.get("start") or {}
    if recorded.get("path") and Path(recorded["path"]).is_file():
        return recorded["path"]
    if recorded and not recorded["pretrained"]:
        raise start_weights.StartMismatch(
            f"--checkpoint {args.checkpoint}: its run started from random weights, kept in "
            f"{recorded['path']}, which is gone; give them with --pretrained PATH")
    return find_pretrained(args.model, ckpt.get("pretrained"),
                           ckpt.get("world_seed", args.world_seed))


def read_checkpoint(path) -> dict:
    """A training checkpoint as loaded, or a weights-only .safetensors (final.safetensors,
    best.safetensors) with what its run's config.json records (model, start) beside it."""
    if not str(path).endswith(".safetensors"):
        return load_checkpoint(path)
    config = run_folder(path) / "config.json"
    recorded = json.loads(config.read_text()) if config.is_file() else {}
    return {"state_dict": load_weights_file(path),
            **{k: recorded[k] for k in ("model", "pretrained", "world_seed", "start")
               if k in recorded}}


def load_models(args):
    """(the model to evaluate, its start for RSA or None): a checkpoint's recorded model and
    start are used or a mismatch is refused, naming the flag."""
    ckpt = read_checkpoint(args.checkpoint) if args.checkpoint else None
    trained_as = (ckpt or {}).get("model")
    if trained_as and trained_as != args.model:
        raise WrongModel(f"--checkpoint {args.checkpoint} was trained as --model {trained_as}, "
                         f"not {args.model}; pass --model {trained_as}")
    pretrained = start_source(args, ckpt)
    bundle = load_clip(args.model, pretrained, args.device)
    if ckpt is None:
        return bundle, None
    pre_model = load_clip(args.model, pretrained, args.device).model.eval()
    start_weights.check(pre_model.state_dict(), ckpt.get("start"),
                f"--pretrained {args.pretrained}" if args.pretrained is not None else pretrained)
    load_model_weights(bundle.model, args.checkpoint, ckpt)
    return bundle, pre_model


def run(args) -> dict:
    folders = validate.eval_folders(args.task, check_folders=False)
    bundle, pre_model = load_models(args)
    tf = bundle.preprocess_val
    sets = folder_eval_sets(folders, tf, chosen_templates(args.templates)) if folders else \
        world_eval_sets(tf, args.n_per_task, args.world_seed, bundle.image_size)
    if args.rsa_csv or args.rsa_shards:
        rsa_set = heldout_pairs(tf, args.rsa_csv, args.rsa_shards, args.rsa_size,
                                csv_options(args))
    else:
        rsa_set = (world_rsa_set(tf, seed=args.world_seed, size=bundle.image_size)
                   if not args.task else None)
    common = dict(pre_model=pre_model, rsa_set=rsa_set, device=args.device,
                  batch_size=args.batch_size, workers=args.workers,
                  amp_dtype=autocast_dtype(args.precision, args.device))
    if args.wise_ft_alphas:
        rows = wise_ft_sweep(args, bundle, sets, common)
    else:
        label = "fine-tuned" if args.checkpoint else "zero-shot"
        rows = {label: evaluate(bundle.model, bundle.tokenizer, sets, **common)}
    print(format_table(rows))
    if args.out:
        atomic_write_json(args.out, rows if args.wise_ft_alphas else next(iter(rows.values())))
    return rows if args.wise_ft_alphas else next(iter(rows.values()))


def wise_ft_sweep(args, bundle, sets, common) -> dict:
    """{'wise-ft ALPHA': report} of every mix of --checkpoint's weights with the pre-trained
    ones, each set read once for all; rows appended to --results, the plot beside it,
    each mix written to --save-weights."""
    model, alphas = bundle.model, args.wise_ft_alphas
    mix = WeightMix(model, common["pre_model"].state_dict(), model_state(model))
    if args.save_weights:
        for alpha in alphas:
            mix.set(alpha)
            save_weights(model.state_dict(), Path(args.save_weights) /
                         f"wise-ft-{alpha:g}.safetensors")
    reports = evaluate_variants(model, bundle.tokenizer, sets,
                                [(mix.setter(alpha), None) for alpha in alphas], **common)
    rows = [{"checkpoint": args.checkpoint, "model": args.model, "alpha": alpha, **report}
            for alpha, report in zip(alphas, reports)]
    append_rows(args.results, rows)
    if plot_id_ood(rows, Path(args.results).with_suffix(".png")):
        print(f"ID-vs-OOD plot: {Path(args.results).with_suffix('.png')}")
    print(f"{len(rows)} rows appended to {args.results}")
    return {f"wise-ft {alpha:g}": report for alpha, report in zip(alphas, reports)}


# Errors of the run a user can act on (a checkpoint that is not this model's, or does not
# read, or whose start is gone; weights not downloaded, a tiny model not pre-trained): one
# line, exit 2, as the argument checks'.
USER_ERRORS = (CorruptCheckpoint, WrongModel, start_weights.StartMismatch, DownloadFailed,
               FileNotFoundError)


def main(argv=None) -> dict:
    """The Python entry: errors raise, naming the argument."""
    args = build_parser().parse_args(argv)
    check_args(args)
    return run(args)


if __name__ == "__main__":
    from .._cli.arguments import run_checked
    run_checked(build_parser(), check_args, run, user_errors=USER_ERRORS)
