"""Evaluation as the paper does it: zero-shot heads from templates; ID, OOD and zero-shot
accuracy; RSA between the pre-trained and the fine-tuned embedding geometry.

    python -m dive_fast.train.evaluate                                  # pre-trained tiny model
    python -m dive_fast.train.evaluate --checkpoint runs/x/checkpoints/step-00000300.pt
    python -m dive_fast.train.evaluate --model ViT-B-16 --pretrained openai \\
        --task id:imagenet:/data/imagenet/val --task ood:sketch:/data/imagenet-sketch
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .._cli.progress import progress_bar
from ..world.tasks import TASKS
from . import start_weights, validate
from .checkpoint import CorruptCheckpoint, WrongModel, load_checkpoint, load_model_weights
from .data import (
    ImageFolderTask,
    WorldCaptions,
    WorldTask,
    add_csv_flags,
    collate,
    csv_options,
    heldout_pairs,
)
from .fileio import atomic_write_json
from .models import (
    DownloadFailed,
    find_pretrained,
    is_weights_path,
    load_clip,
    model_and_tag,
)
from .protocol import chosen_templates, projection_rows, with_imagenet_root
from .validate import KINDS, TASK_METRICS, EvalFolder


@torch.no_grad()
def zeroshot_head(model, tokenizer, classnames, templates, device="cpu",
                  prompts_per_batch: int = 1024) -> torch.Tensor:
    """[classes, dim]: per class the normalised mean of its normalised prompt embeddings,
    batched over classes (ImageNet's 1000 x 80 prompts in ~80 forwards, not 1000)."""
    rows, per = [], max(1, prompts_per_batch // len(templates))
    for start in range(0, len(classnames), per):
        names = classnames[start:start + per]
        tokens = tokenizer([t.format(c) for c in names for t in templates]).to(device)
        emb = model.encode_text(tokens, normalize=True).float()
        emb = emb.view(len(names), len(templates), -1).mean(1)
        rows.append(emb / emb.norm(dim=-1, keepdim=True))
    return torch.cat(rows)


METRICS = TASK_METRICS  # what a --task may report (PATH@METRIC)


@torch.no_grad()
def scores(model, head: torch.Tensor, loader, device="cpu", desc: str | None = None,
           owner: list[int] | None = None):
    """({top1, top5, macro_f1}, samples seen, samples skipped); streams, memory flat in set
    size. top5 is None for a set of 5 classes or fewer (it would be 1 by construction);
    macro_f1 is the mean F1 over the classes that occur in the labels (WILDS's, as
    iWildCam is scored). ``owner``: the class each head row scores, a class's logit the
    largest of its rows' (ObjectNet's projection); None: row k is class k."""
    classes = head.shape[0] if owner is None else max(owner) + 1
    if owner is not None:
        owner = torch.tensor(owner, device=head.device)
    k = min(5, classes)
    top1 = top5 = seen = skipped = 0
    true_pos, predicted, actual = (torch.zeros(classes, dtype=torch.long) for _ in range(3))
    for images, labels, n_skipped in progress_bar(loader, desc=desc, leave=False,
                                                  disable=desc is None):
        skipped += n_skipped
        if images is None:
            continue
        feats = model.encode_image(images.to(device), normalize=True).float()
        logits = feats @ head.T
        if owner is not None:
            logits = logits.new_full((len(logits), classes), float("-inf")).scatter_reduce(
                1, owner.expand(len(logits), -1), logits, "amax")
        best = logits.topk(k, dim=1).indices.cpu()
        hit = best.eq(labels[:, None])
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(1).sum())
        seen += labels.numel()
        true_pos += torch.bincount(labels[hit[:, 0]], minlength=classes)
        predicted += torch.bincount(best[:, 0], minlength=classes)
        actual += torch.bincount(labels, minlength=classes)
    if not seen:
        return {m: float("nan") for m in METRICS}, 0, skipped
    present = actual > 0
    f1 = 2 * true_pos[present] / (actual[present] + predicted[present])
    return {"top1": top1 / seen, "top5": top5 / seen if classes > 5 else None,
            "macro_f1": float(f1.double().mean())}, seen, skipped


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
def embed_pairs(model, tokenizer, loader, device="cpu"):
    imgs, txts = [], []
    for images, texts, _ in loader:
        if images is None:
            continue
        imgs.append(model.encode_image(images.to(device), normalize=True).float().cpu())
        txts.append(model.encode_text(tokenizer(texts).to(device), normalize=True).float().cpu())
    return torch.cat(imgs), torch.cat(txts)


def rsa_report(pre_model, model, tokenizer, loader, device="cpu") -> dict:
    pi, pt = embed_pairs(pre_model, tokenizer, loader, device)
    fi, ft = embed_pairs(model, tokenizer, loader, device)
    return {"image": rsa(pi, fi), "text": rsa(pt, ft),
            "joint": rsa(torch.cat((pi, pt)), torch.cat((fi, ft)))}


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


def set_head(model, tokenizer, dataset, heads: dict, cache: dict, device="cpu"):
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
        built.update(zip(todo, zeroshot_head(model, tokenizer, todo, dataset.templates, device)))
    return torch.stack([built[c] for c in names]), note


def evaluate(model, tokenizer, eval_sets: dict, *, pre_model=None, rsa_set=None, device="cpu",
             batch_size=256, workers=0, progress=True, heads=None) -> dict:
    """The report: per set grouped by kind its metric (top-1 unless the set's ``metric``
    says otherwise), their means, every set's top-1, top-5 and macro-F1 in "metrics", and
    RSA (if pre_model).

    ``heads`` maps class-name tuples to trained classifier weights [classes, dim] (FT's
    linear head), used instead of the zero-shot head for sets with those classes."""
    model.eval()
    report = {k: {} for k in KINDS}
    skipped = 0
    zeroshot_rows = {}  # {templates: {class name: row}}, shared by the sets
    for name, (kind, dataset) in eval_sets.items():
        head, note = set_head(model, tokenizer, dataset, heads or {}, zeroshot_rows, device)
        if note:
            report.setdefault("notes", {})[name] = note
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        owner = projection_rows(dataset.projection)[1] \
            if getattr(dataset, "head_classes", None) is not None else None
        found, seen, n_skipped = scores(model, head, loader, device,
                                        desc=name if progress else None, owner=owner)
        metric = getattr(dataset, "metric", "top1")  # the task's own (--task ...@macro_f1)
        report[kind][name] = found[metric] if seen else None
        report.setdefault("metrics", {})[name] = {**found, "reported": metric} if seen else None
        if not seen:
            report.setdefault("notes", {})[name] = f"no readable image ({n_skipped} unreadable)"
        skipped += n_skipped
    for kind in KINDS:
        vals = [v for v in report[kind].values() if v is not None]
        report[f"{kind}_mean"] = sum(vals) / len(vals) if vals else None
    if pre_model is not None and rsa_set is not None:
        loader = DataLoader(rsa_set, batch_size=batch_size, num_workers=workers, collate_fn=collate)
        report["rsa"] = rsa_report(pre_model, model, tokenizer, loader, device)
    report["skipped_images"] = skipped
    return report


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
        folder = ImageFolderTask(t.path, transform, preset=t.preset,
                                 templates=None if t.kind == "zeroshot" else templates)
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
    a("--checkpoint", default=None,
      help="a dive_fast.train checkpoint to evaluate (unset: the pre-trained model itself)")
    a("--task", action="append", default=[], metavar="KIND:NAME:PATH",
      help="an evaluation image folder, KIND id, ood or zeroshot; repeat for more (unset: "
           "the generated world's tasks); PATH@macro_f1 reports macro-F1 (WILDS's) for it")
    a("--imagenet-root", default=None, metavar="DIR",
      help="add the paper's ImageNet sets found under DIR by their usual folder names "
           "(docs/training.md)")
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
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    validate.device(args.device)
    chosen_templates(args.templates)
    if args.imagenet_root:
        args.task = with_imagenet_root(args.task, args.imagenet_root)
        args.imagenet_root = None  # now in --task
    folders = validate.eval_folders(args.task)
    for name in ("n_per_task", "batch_size", "rsa_size"):
        validate.number(f"--{name.replace('_', '-')}", getattr(args, name),
                        3 if name == "rsa_size" else 1)
    if (args.rsa_csv or args.rsa_shards) and not args.checkpoint:
        raise ValueError("--rsa-csv/--rsa-shards: RSA compares a fine-tuned model with its "
                         "start; give the fine-tuned --checkpoint too")
    validate.rsa_pairs(args)
    model_and_tag(args.model, args.pretrained)
    if is_weights_path(args.pretrained) and not Path(args.pretrained).is_file():
        raise FileNotFoundError(f"--pretrained: checkpoint not found: {args.pretrained}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint: checkpoint not found: {args.checkpoint}")
    if args.out:
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder; give the JSON file to write")
        validate.writable_folder(Path(args.out).absolute().parent, "--out")
    return folders


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


def load_models(args):
    """(the model to evaluate, its start for RSA or None): a checkpoint's recorded model and
    start are used or a mismatch is refused, naming the flag."""
    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
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
    report = evaluate(bundle.model, bundle.tokenizer, sets, pre_model=pre_model, rsa_set=rsa_set,
                      device=args.device, batch_size=args.batch_size, workers=args.workers)
    label = "fine-tuned" if args.checkpoint else "zero-shot"
    print(format_table({label: report}))
    if args.out:
        atomic_write_json(args.out, report)
    return report


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
