"""Robust fine-tuning of CLIP with DiVE (or a baseline), lean enough to cost about FLYP.

    python -m dive_fast.train                    # the embedded miniature, end to end
    python -m dive_fast.train --method flyp --steps 200
    torchrun --nproc_per_node 8 -m dive_fast.train --model ViT-B-16 --pretrained openai \\
        --train-folder /data/imagenet/train --reference-shards '/data/cc3m/{00000..00331}.tar' \\
        --task id:imagenet:/data/imagenet/val --task ood:sketch:/data/imagenet-sketch/val

Writes to --out: metrics.jsonl, curves.png, checkpoints/ (atomic, last --keep kept),
report.json and table.md (zero-shot row, fine-tuned row, WiSE-FT rows).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed, frozen_cache
from .checkpoint import atomic_save, load_checkpoint, prune
from .context import StepContext
from .data import (CsvCaptions, ImageFolderTask, Indexed, ResumableSampler, WorldCaptions,
                   WorldTask, collate, webdataset_captions)
from .evaluate import evaluate, format_table, parse_task, world_eval_sets, world_rsa_set
from .methods import METHODS, make_method
from .models import TINY_MODELS, ensure_pretrained_tiny, frozen_copy, load_clip
from .pretrain import apply_update, cosine_lr, decay_groups

log = logging.getLogger("dive_fast.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--method", default="dive", choices=list(METHODS))
    a("--model", default="dive-tiny", help="open_clip model name or a dive_fast tiny config")
    a("--pretrained", default=None, help="open_clip tag or checkpoint path "
      "(tiny configs: the cached pre-trained weights, built on first use)")
    a("--out", default="runs/miniature")
    a("--steps", type=int, default=300)
    a("--batch-size", type=int, default=128, help="target batch B per rank")
    a("--ref-batch-size", type=int, default=None, help="reference batch B' (default B)")
    a("--lr", type=float, default=1e-4)
    a("--wd", type=float, default=0.1)
    a("--warmup", type=int, default=None, help="warm-up steps (default min(500, steps/10))")
    a("--lam", type=float, default=1000.0, help="DiVE / SnD weight lambda")
    a("--momentum", type=float, default=0.99, help="DiVE EMA momentum alpha")
    a("--dive-backend", default=None, help="force a DiVELoss backend")
    a("--lp-steps", type=int, default=None, help="lp-ft: linear-probe steps (default steps/3)")
    a("--wise-ft", default="0.5", help="comma-separated WiSE-FT alphas to evaluate ('' for none)")
    a("--seed", type=int, default=0)
    a("--world-seed", type=int, default=0)
    a("--train-size", type=int, default=8000, help="world ID training samples")
    a("--ref-size", type=int, default=4096, help="world reference pairs (CC3M stand-in)")
    a("--eval-per-task", type=int, default=500)
    a("--train-folder", default=None, help="target image folder (ImageNet layout)")
    a("--reference-csv", default=None, help="open_clip CSV of reference pairs")
    a("--reference-shards", default=None, help="webdataset shards of reference pairs")
    a("--task", action="append", default=[], help="KIND:NAME:PATH eval image folder")
    a("--augment", action=argparse.BooleanOptionalAction, default=True,
      help="FLYP's RandomResizedCrop(scale 0.9-1) on target images (world data)")
    a("--frozen-cache", action=argparse.BooleanOptionalAction, default=True,
      help="cache frozen reference embeddings (exact: the reference transform is fixed)")
    a("--amp", choices=["auto", "bf16", "fp32"], default="auto",
      help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    a("--compile", action="store_true", help="torch.compile the towers")
    a("--workers", type=int, default=1)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--checkpoint-every", type=int, default=100)
    a("--keep", type=int, default=2, help="checkpoints kept")
    a("--resume", default=None, help="checkpoint path, or 'auto' for the newest in --out")
    a("--on-nonfinite", choices=["stop", "skip"], default="stop")
    a("--log-every", type=int, default=10)
    a("--no-progress", action="store_true")
    return p


# --- data ------------------------------------------------------------------------------

def target_data(args, bundle, train_tf):
    if args.train_folder:
        ds = ImageFolderTask(args.train_folder, train_tf)
    else:
        ds = WorldTask("shapes", "train", args.train_size, train_tf, args.world_seed, bundle.image_size)
    return ds, ds.classnames, ds.templates


def reference_data(args, bundle):
    tf = bundle.preprocess_val  # deterministic, so the frozen embeddings can be cached
    if args.reference_shards:
        return webdataset_captions(args.reference_shards, tf, seed=args.seed), "shards"
    if args.reference_csv:
        return Indexed(CsvCaptions(args.reference_csv, tf)), f"csv:{Path(args.reference_csv).resolve()}"
    ds = WorldCaptions("reference", args.ref_size, tf, args.world_seed, bundle.image_size)
    return Indexed(ds), f"world:{args.world_seed}:{args.ref_size}"


def loader(ds, batch, seed, start_step, rank, world, workers, pin):
    if isinstance(ds, torch.utils.data.IterableDataset):  # webdataset: streamed, no sampler
        return DataLoader(ds.batched(batch, collation_fn=collate, partial=False), batch_size=None,
                          num_workers=workers, pin_memory=pin)
    sampler = ResumableSampler(len(ds), seed, batch, start_step, rank, world)
    # An own generator: creating the iterator must not draw from the global RNG, whose
    # state a resumed run restores (and which drives the augmentation with workers=0).
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def batches(dl):
    """Batches with at least one readable sample; counts the skipped ones."""
    skipped = 0
    for images, targets, n_skipped in dl:
        skipped += n_skipped
        if images is not None:
            yield images, targets, skipped


# --- checkpoints -----------------------------------------------------------------------

def checkpoint_state(step, args, model, method, opt, sched):
    return {"state_dict": model.state_dict(), "step": step, "method": args.method,
            "model": args.model, "batch_size": args.batch_size,
            "extra": {k: m.state_dict() for k, m in method_modules(method).items()},
            "optimizer": opt.state_dict() if opt else None,
            "scheduler": sched.state_dict() if sched else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}


def method_modules(method):
    mods = dict(method.extra_modules())
    if hasattr(method, "reg"):
        mods["dive"] = method.reg
    return mods


def find_resume(args) -> Path | None:
    if args.resume is None:
        return None
    if args.resume != "auto":
        return Path(args.resume)
    found = sorted((Path(args.out) / "checkpoints").glob("step-*.pt"))
    return found[-1] if found else None


def restore(path, args, model, method, opt, sched) -> tuple[int, dict]:
    """Loads a checkpoint into the run; returns its step and the RNG states to resume."""
    ckpt = load_checkpoint(path)
    for key in ("method", "model", "batch_size"):
        if ckpt.get(key) != getattr(args, key):
            raise ValueError(f"cannot resume from {path}: it was written with {key}="
                             f"{ckpt.get(key)!r}, this run has {key}={getattr(args, key)!r}")
    model.load_state_dict(ckpt["state_dict"])
    for name, mod in method_modules(method).items():
        mod.load_state_dict(ckpt["extra"][name])
    if opt and ckpt["optimizer"]:
        opt.load_state_dict(ckpt["optimizer"])
    if sched and ckpt["scheduler"]:
        sched.load_state_dict(ckpt["scheduler"])
    return int(ckpt["step"]), ckpt["rng"]


# --- the run ---------------------------------------------------------------------------

def resolve_pretrained(args) -> str | None:
    if args.pretrained is None and args.model in TINY_MODELS:
        return str(ensure_pretrained_tiny(args.model, args.world_seed))
    return args.pretrained


def eval_sets(args, bundle):
    tf = bundle.preprocess_val
    if args.task:
        return dict(parse_task(s, tf) for s in args.task), None
    return (world_eval_sets(tf, args.eval_per_task, args.world_seed, bundle.image_size),
            world_rsa_set(tf, seed=args.world_seed, size=bundle.image_size))


def wise_ft(model, pre_state, ft_state, alpha):
    model.load_state_dict({k: (1 - alpha) * pre_state[k] + alpha * v if v.is_floating_point() else v
                           for k, v in ft_state.items()})


def plot_curves(metrics_path: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    if not rows:
        return
    keys = [k for k in rows[0] if k not in ("step", "lr", "samples_per_s", "skipped")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        axes[0].plot([r["step"] for r in rows], [r[k] for r in rows], label=k)
    axes[0].set_yscale("log"); axes[0].set_xlabel("step"); axes[0].legend(); axes[0].set_title("losses")
    axes[1].plot([r["step"] for r in rows], [r["samples_per_s"] for r in rows])
    axes[1].set_xlabel("step"); axes[1].set_title("samples/s")
    fig.tight_layout(); fig.savefig(out, dpi=110); plt.close(fig)


def run(args) -> dict:
    rank, world, device = distributed.init_from_env(args.device)
    args.device = device
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    out = Path(args.out)
    main_proc = distributed.is_main()
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(vars(args), indent=2))
    method = make_method(args.method)
    pretrained = resolve_pretrained(args)
    bundle = load_clip(args.model, pretrained, device)
    model = bundle.model
    pre_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_tf = bundle.preprocess_train
    if not args.augment:
        train_tf = bundle.preprocess_val
    elif args.train_folder is None:  # FLYP's crop, at the world's resolution
        from torchvision import transforms as T
        train_tf = T.Compose([T.RandomResizedCrop(bundle.image_size, scale=(0.9, 1.0),
                                                  interpolation=T.InterpolationMode.BICUBIC),
                              *bundle.preprocess_val.transforms[-2:]])
    target_ds, classnames, templates = target_data(args, bundle, train_tf)
    on_gpu = device.startswith("cuda")
    amp_dtype = torch.bfloat16 if (args.amp == "bf16" or (args.amp == "auto" and on_gpu)) else None

    frozen = cache = None
    ref_ds = None
    if method.uses_reference:
        ref_ds, ref_id = reference_data(args, bundle)
    if method.uses_frozen:
        frozen = frozen_copy(model, torch.bfloat16 if on_gpu else None)
        if args.frozen_cache and not isinstance(ref_ds, torch.utils.data.IterableDataset):
            key = frozen_cache.cache_key(model=args.model, pretrained=pretrained, data=ref_id,
                                         transform=repr(bundle.preprocess_val), n=len(ref_ds))
            path = out / "cache" / f"frozen-ref-{key}.npy"
            if main_proc:
                frozen_cache.build(frozen, bundle.tokenizer, ref_ds.dataset, path, device,
                                   progress=not args.no_progress)
            distributed.barrier()
            cache = frozen_cache.build(frozen, bundle.tokenizer, ref_ds.dataset, path, device)
    clip_loss = ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True,
                         rank=rank, world_size=world)
    ddp = None
    if world > 1:
        ddp = {"find_unused_parameters": args.method in ("ft", "lp-ft")}
        if on_gpu:
            ddp["device_ids"] = [torch.device(device).index]
    ctx = StepContext(model, frozen, bundle.tokenizer, classnames, templates, device,
                      seed=args.seed, rank=rank, world_size=world, clip_loss=clip_loss,
                      cache=cache, amp_dtype=amp_dtype, ddp_kwargs=ddp)
    method.build(ctx, args)
    if args.compile:  # the wrapper, so that the model's state_dict keys stay as they are
        ctx.encoders = torch.compile(ctx.encoders)

    sets, rsa_set = eval_sets(args, bundle)
    report = {}
    if main_proc:
        report["zero-shot"] = evaluate(model, bundle.tokenizer, sets, pre_model=None,
                                       device=device, progress=not args.no_progress)
    start_step, opt, sched = 0, None, None
    if method.trains and args.steps > 0:
        params = [*model.named_parameters(),
                  *(p for m in method.extra_modules().values() for p in m.named_parameters())]
        opt = torch.optim.AdamW(decay_groups(params, args.wd), lr=args.lr, fused=on_gpu or None)
        warmup = args.warmup if args.warmup is not None else min(500, max(1, args.steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps, warmup))
        resume, rng = find_resume(args), None
        if resume is not None:
            start_step, rng = restore(resume, args, model, method, opt, sched)
            log.info("resumed from %s at step %d", resume, start_step)
        train_loop(args, ctx, method, model, opt, sched, target_ds, ref_ds, start_step,
                   rank, world, out, rng)
    if main_proc:
        pre_model = load_clip(args.model, pretrained, device).model.eval()
        ft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if method.trains:
            report[args.method] = evaluate(model, bundle.tokenizer, sets, pre_model=pre_model,
                                           rsa_set=rsa_set, device=device,
                                           progress=not args.no_progress,
                                           heads=method.eval_heads(ctx))
            for alpha in [float(a) for a in args.wise_ft.split(",") if a.strip()]:
                wise_ft(model, pre_state, ft_state, alpha)
                report[f"{args.method} wise-ft {alpha:g}"] = evaluate(
                    model, bundle.tokenizer, sets, pre_model=pre_model, rsa_set=rsa_set,
                    device=device, progress=not args.no_progress,
                    heads=method.eval_heads(ctx, alpha))
            model.load_state_dict(ft_state)
        table = format_table(report)
        (out / "table.md").write_text(table + "\n")
        (out / "report.json").write_text(json.dumps(report, indent=2))
        if (out / "metrics.jsonl").is_file():
            plot_curves(out / "metrics.jsonl", out / "curves.png")
        print(table)
    distributed.shutdown()
    return report


def train_loop(args, ctx, method, model, opt, sched, target_ds, ref_ds, start_step,
               rank, world, out, rng=None):
    pin = str(ctx.device).startswith("cuda")
    targets = batches(loader(target_ds, args.batch_size, args.seed, start_step, rank, world,
                             args.workers, pin))
    refs = batches(loader(ref_ds, args.ref_batch_size or args.batch_size, args.seed + 1,
                          start_step, rank, world, args.workers, pin)) if method.uses_reference else None
    main_proc = distributed.is_main()
    metrics = open(out / "metrics.jsonl", "a") if main_proc else None
    ckpt_dir = out / "checkpoints"
    last_ckpt = None
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps,
               desc=args.method, disable=args.no_progress or not main_proc)
    t_last, n_samples = time.perf_counter(), 0
    model.train()
    if rng is not None:  # a resumed run continues the random streams where they stopped
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    for step in bar:
        images, labels, skipped = next(targets)
        reference = None
        if refs is not None:
            ref_images, ref_targets, _ = next(refs)
            texts, idx = zip(*ref_targets)
            reference = (ref_images, (texts, idx))
        method.before_step(ctx, step)
        loss, parts = method.loss(ctx, (images, labels), reference, step)
        values = torch.stack([loss.detach().float()] + [v.float() for v in parts.values()]).tolist()
        if not math.isfinite(values[0]):
            if args.on_nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite loss ({values[0]}) at step {step}; parts "
                    f"{dict(zip(parts, values[1:]))}; last good checkpoint: {last_ckpt or 'none'}"
                    f" (resume with --resume {last_ckpt or 'auto'}, or pass --on-nonfinite skip)")
            log.warning("skipping step %d: non-finite loss %s", step, values[0])
            opt.zero_grad(set_to_none=True)
            continue
        apply_update(loss, opt, sched, model)
        n_samples += len(images) + (len(reference[0]) if reference else 0)
        done = step + 1
        if main_proc and (done % args.log_every == 0 or done == args.steps):
            now = time.perf_counter()
            rate = n_samples * world / (now - t_last)
            t_last, n_samples = now, 0
            row = {"step": done, "loss": values[0], **dict(zip(parts, values[1:])),
                   "lr": sched.get_last_lr()[0], "samples_per_s": rate, "skipped": skipped}
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in ("step", "lr", "skipped")})
        if main_proc and (done % args.checkpoint_every == 0 or done == args.steps):
            last_ckpt = atomic_save(checkpoint_state(done, args, model, method, opt, sched),
                                    ckpt_dir / f"step-{done:08d}.pt")
            prune(ckpt_dir, "step-*.pt", args.keep)
    if metrics:
        metrics.close()


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    main()
