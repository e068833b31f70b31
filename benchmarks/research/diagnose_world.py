"""Diagnosis of the embedded world: what the tiny image tower can learn of each task.

    python benchmarks/research/diagnose_world.py zeroshot --checkpoint PATH   # pre-trained
    python benchmarks/research/diagnose_world.py probe --checkpoint PATH      # linear probes
    python benchmarks/research/diagnose_world.py scratch --task shapes --steps 600  # ceiling
    python benchmarks/research/diagnose_world.py perclass --checkpoint RUN/checkpoints/STEP.pt

zeroshot: the checkpoint's zero-shot accuracy on every task (templates, as evaluate does).
probe:    a linear probe (multinomial logistic regression) on the frozen, normalised image
          features of each task's train split, tested on its test split; the probe trained
          on the ID task is also tested on every OOD shift (are the shape features the same
          across styles?).
perclass: the checkpoint's zero-shot-head accuracy on each class of --task's test split
          (a fine-tuned checkpoint from dive_fast.train loads too): which classes a method
          learned.
scratch:  the same image tower (the model config's vision tower, random weights) + a linear
          head trained with labels on a task's train split (AdamW, batch 128), tested on the
          test split every --eval-every steps, and on the OOD shifts for a shape task.
Results are merged into benchmarks/results/diagnosis.json under --label.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dive_fast._cli.arguments import DefaultsFormatter  # noqa: E402
from dive_fast.train.heads import zeroshot_head
from dive_fast.train.models import load_clip
from dive_fast.train.scoring import evaluate, world_eval_sets
from dive_fast.world.tasks import TASKS, task_image

RESULTS = Path(__file__).resolve().parents[1] / "results" / "diagnosis.json"


def task_tensor(task: str, split: str, n: int, size: int, seed: int = 0):
    """(images [n, 3, size, size] normalised as CLIP's preprocess does, labels [n])."""
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    imgs, labels = zip(*(task_image(TASKS[task], split, i, seed, size) for i in range(n)))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    return (x - mean) / std, torch.tensor(labels)


@torch.no_grad()
def features(model, x, batch=512):
    return torch.cat([model.encode_image(x[i:i + batch], normalize=True).float()
                      for i in range(0, len(x), batch)])


def fit_probe(f, y, classes, epochs=300, wd=1e-4):
    head = nn.Linear(f.shape[1], classes)
    opt = torch.optim.AdamW(head.parameters(), 1e-2, weight_decay=wd)
    for _ in range(epochs):
        loss = nn.functional.cross_entropy(head(f * 10), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def acc(head, f, y):
    with torch.no_grad():
        return float((head(f * 10).argmax(1) == y).float().mean())


def ood_of(task: str) -> list[str]:
    if TASKS[task].attribute != "shape":
        return []
    return [n for n, t in TASKS.items() if t.attribute == "shape" and n != task]


def run_probe(args, bundle):
    model = bundle.model.eval()
    size = bundle.image_size
    out = {}
    for name, task in TASKS.items():
        xtr, ytr = task_tensor(name, "train", args.n_train, size)
        xte, yte = task_tensor(name, "test", args.n_test, size)
        head = fit_probe(features(model, xtr), ytr, len(task.classnames))
        out[name] = {"test": acc(head, features(model, xte), yte)}
        for other in (ood_of(name) if task.kind == "id" else []):
            xo, yo = task_tensor(other, "test", args.n_test, size)
            out[name][f"on {other}"] = acc(head, features(model, xo), yo)
        print(name, {k: round(100 * v, 1) for k, v in out[name].items()}, flush=True)
    return out


def run_scratch(args, bundle):
    torch.manual_seed(args.seed)
    visual = bundle.model.visual
    for m in visual.modules():  # random weights, whatever the checkpoint
        if hasattr(m, "reset_parameters") and m is not visual:
            m.reset_parameters()
    size = bundle.image_size
    task = TASKS[args.task]
    xtr, ytr = task_tensor(args.task, "train", args.n_train, size)
    tests = {n: task_tensor(n, "test", args.n_test, size) for n in [args.task, *ood_of(args.task)]}
    dim = bundle.model.text_projection.shape[1] if hasattr(bundle.model, "text_projection") else 64
    net = nn.Sequential(visual, nn.Linear(dim, len(task.classnames)))
    opt = torch.optim.AdamW(net.parameters(), args.lr, weight_decay=0.1)
    curve, start = [], time.time()
    g = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(xtr), (args.batch_size,), generator=g)
        net.train()
        loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            net.eval()
            with torch.no_grad():
                row = {"step": step, "seconds": round(time.time() - start, 1)}
                for n, (x, y) in tests.items():
                    row[n] = float(torch.cat([net(x[i:i + 512]).argmax(1) for i in
                                              range(0, len(x), 512)]).eq(y).float().mean())
            curve.append(row)
            print({k: (round(100 * v, 1) if isinstance(v, float) and k != "seconds" else v)
                   for k, v in row.items()}, flush=True)
    return {"task": args.task, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
            "n_train": args.n_train, "curve": curve}


@torch.no_grad()
def run_perclass(args, bundle):
    task = TASKS[args.task]
    x, y = task_tensor(args.task, "test", args.n_test, bundle.image_size)
    head = zeroshot_head(bundle.model, bundle.tokenizer, task.classnames, task.templates)
    pred = (features(bundle.model.eval(), x) @ head.T).argmax(1)
    result = {name: float((pred[y == c] == c).float().mean())
              for c, name in enumerate(task.classnames)}
    print(" ".join(f"{k} {100 * v:.1f}" for k, v in result.items()))
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("mode", choices=["zeroshot", "probe", "scratch", "perclass"],
                   help="what to measure")
    p.add_argument("--model", default="dive-tiny", help="model (its cached pre-trained weights)")
    p.add_argument("--checkpoint", default=None,
                   help="weights to load instead (zeroshot, probe, perclass; unset: none)")
    p.add_argument("--task", default="shapes", help="world task")
    p.add_argument("--steps", type=int, default=600, help="probe / scratch training steps")
    p.add_argument("--eval-every", type=int, default=150, help="steps between evaluations")
    p.add_argument("--lr", type=float, default=1e-3, help="probe / scratch learning rate")
    p.add_argument("--batch-size", type=int, default=128, help="training batch")
    p.add_argument("--n-train", type=int, default=8000, help="training samples")
    p.add_argument("--n-test", type=int, default=500, help="test samples")
    p.add_argument("--seed", type=int, default=0, help="world seed")
    p.add_argument("--label", default=None, help="key in diagnosis.json (unset: the mode)")
    p.add_argument("--no-save", action="store_true", help="do not write diagnosis.json")
    return p

def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bundle = load_clip(args.model, args.checkpoint if args.mode != "scratch" else None)
    if args.mode == "zeroshot":
        sets = world_eval_sets(bundle.preprocess_val, args.n_test, 0, bundle.image_size)
        rep = evaluate(bundle.model, bundle.tokenizer, sets, progress=False)
        result = {k: rep[k] for k in ("id", "ood", "zeroshot", "id_mean", "ood_mean",
                                      "zeroshot_mean")}
        print(json.dumps(result, indent=1))
    elif args.mode == "probe":
        result = run_probe(args, bundle)
    elif args.mode == "perclass":
        result = run_perclass(args, bundle)
    else:
        result = run_scratch(args, bundle)
    if not args.no_save:
        data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
        data[args.label or args.mode] = {"args": vars(args), "result": result}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
