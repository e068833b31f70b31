"""Robust fine-tuning of CLIP with DiVE (or a baseline), lean enough to cost about FLYP.

    python -m dive_fast.train                    # the embedded miniature, end to end
    python -m dive_fast.train --method flyp --steps 200
    torchrun --nproc_per_node 8 -m dive_fast.train --model ViT-B-16 --pretrained openai \\
        --train-folder /data/imagenet/train --reference-shards '/data/cc3m/{00000..00331}.tar' \\
        --task id:imagenet:/data/imagenet/val --task ood:sketch:/data/imagenet-sketch/val \\
        --rsa-shards /data/cc3m/00332.tar
    torchrun --nproc_per_node 8 -m dive_fast.train --model ViT-L-14 --pretrained openai \\
        --batch-size 512 --accum-freq 8 --grad-checkpointing --fsdp ...   # exact, in less memory

Writes to --out: metrics.jsonl, curves.png, checkpoints/ (atomic, with a digest, last --keep
kept), report.json and table.md (zero-shot row, fine-tuned row, WiSE-FT rows). A run owns its
--out (a lock while it runs; another run's folder only with --resume), and checks every
argument and input before any expensive work (``check_args``).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from . import distributed, frozen_cache, metrics_log, optim, parallel, runlock, validate
from .checkpoint import atomic_save, load_checkpoint, prune
from .data import (CsvCaptions, ImageFolderTask, Readable, ResumableSampler, ShardedCaptions,
                   WorldCaptions, WorldTask, heldout_pairs, shard_list, train_collate)
from .evaluate import evaluate, format_table, task_sets, world_eval_sets, world_rsa_set
from .fileio import atomic_write_json, atomic_write_text
from .frozen import FrozenReference
from .methods import METHODS, Batch, MethodConfig, make_method
from .models import (CACHE_ENV, TINY_MODELS, cache_dir, frozen_copy, is_weights_path, load_clip,
                     tiny_checkpoint)
from .step import NonFiniteGuard, train_step

log = logging.getLogger("dive_fast.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--method", default="dive", choices=list(METHODS))
    a("--model", default="dive-tiny", help="open_clip model name or a dive_fast tiny config")
    a("--pretrained", default=None, help="open_clip tag or checkpoint path, '' for random "
      "weights (tiny configs: the cached pre-trained weights, built on first use)")
    a("--out", default="runs/miniature")
    a("--steps", type=int, default=300)
    a("--batch-size", type=int, default=128, help="target batch B per rank")
    a("--ref-batch-size", type=int, default=None, help="reference batch B' per rank (default B)")
    a("--lr", type=float, default=1e-4)
    a("--wd", type=float, default=0.1)
    a("--warmup", type=int, default=None, help="warm-up steps (default min(500, steps/10))")
    a("--grad-clip", type=float, default=0.0, help="clip the gradient norm to this (0: off)")
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
    a("--reference-shards", default=None,
      help="webdataset shards of reference pairs: brace pattern, glob or '::'-separated list")
    a("--task", action="append", default=[], help="KIND:NAME:PATH eval image folder")
    a("--rsa-csv", default=None, help="held-out pairs (open_clip CSV) for RSA on real data")
    a("--rsa-shards", default=None, help="held-out pairs (webdataset shards) for RSA")
    a("--rsa-size", type=int, default=256, help="held-out pairs used for RSA")
    a("--augment", action=argparse.BooleanOptionalAction, default=True,
      help="FLYP's RandomResizedCrop(scale 0.9-1) on target images (world data)")
    a("--frozen-cache", action=argparse.BooleanOptionalAction, default=True,
      help="cache frozen reference embeddings (exact: the reference transform is fixed)")
    a("--co-schedule", action=argparse.BooleanOptionalAction, default=True,
      help="GPU: run the uncached frozen forward on a side stream, overlapping the trainable one")
    a("--amp", choices=["auto", "bf16", "fp32"], default="auto",
      help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    a("--compile", action="store_true", help="torch.compile the towers")
    a("--accum-freq", type=int, default=1,
      help="compute each step in K micro-batches (B/K target, B'/K reference rows): the "
           "same update as the full batch in about 1/K of its activation memory")
    a("--grad-checkpointing", action="store_true",
      help="recompute the towers' residual blocks in the backward (open_clip's)")
    a("--fsdp", action="store_true",
      help="shard the trainable towers and their optimiser state over the ranks (FSDP2); "
           "checkpoints hold the full state")
    a("--workers", type=int, default=1)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--checkpoint-every", type=int, default=100)
    a("--keep", type=int, default=2, help="checkpoints kept")
    a("--resume", default=None, help="checkpoint path, or 'auto' for the newest in --out")
    a("--on-nonfinite", choices=["stop", "skip"], default="stop",
      help="a step with non-finite loss or gradients is always skipped on the device; "
           "'stop' also ends the run at the next log step, naming it")
    a("--log-every", type=int, default=10)
    a("--no-progress", action="store_true")
    return p


# Lower (and upper) bounds of the numeric arguments; "above": the bound itself is refused.
RANGES = {"steps": (0,), "batch_size": (1,), "ref_batch_size": (1,), "checkpoint_every": (1,),
          "log_every": (1,), "accum_freq": (1,), "rsa_size": (3,), "train_size": (1,), "ref_size": (1,),
          "eval_per_task": (0,), "keep": (1,), "workers": (0,), "warmup": (0,),
          "grad_clip": (0,), "lam": (0,), "momentum": (0, 1), "wd": (0,), "lr": (0, None, "above")}


def check_args(args) -> None:
    """Every argument and input checked before any expensive work (model loading,
    pre-training, caches, evaluation); each failure names the argument."""
    for name, (low, *rest) in RANGES.items():
        high = rest[0] if rest else None
        validate.number(f"--{name.replace('_', '-')}", getattr(args, name), low, high,
                        above="above" in rest)
    if args.lp_steps is None:
        args.lp_steps = args.steps // 3
    validate.number("--lp-steps", args.lp_steps, 0, args.steps)
    smallest = min(args.batch_size, args.ref_batch_size or args.batch_size)
    if args.accum_freq > smallest:
        raise ValueError(f"--accum-freq {args.accum_freq}: each micro-batch needs a row of the "
                         f"target and reference batches (at most {smallest})")
    if args.warmup is None:
        args.warmup = min(500, max(1, args.steps // 10))
    if args.reference_csv and args.reference_shards:
        raise ValueError("give one of --reference-csv and --reference-shards, not both")
    if args.rsa_csv and args.rsa_shards:
        raise ValueError("give one of --rsa-csv and --rsa-shards, not both")
    try:
        args.wise_ft_alphas = [float(a) for a in args.wise_ft.split(",") if a.strip()]
    except ValueError:
        raise ValueError(f"--wise-ft wants comma-separated numbers, got {args.wise_ft!r}") from None
    for alpha in args.wise_ft_alphas:
        validate.number("--wise-ft", alpha)
    validate.device(args.device)
    check_inputs(args)


def check_inputs(args) -> None:
    """The files and folders a run reads and writes, before any expensive work."""
    validate.task_specs(args.task)
    if args.train_folder:
        validate.image_folder(args.train_folder, "--train-folder")
    for arg, csv_path in (("--reference-csv", args.reference_csv), ("--rsa-csv", args.rsa_csv)):
        if csv_path:
            validate.caption_csv(csv_path, arg)
    for arg, urls in (("--reference-shards", args.reference_shards),
                      ("--rsa-shards", args.rsa_shards)):
        if urls:
            shard_list(urls)  # missing shards fail now, not at step 1
    if is_weights_path(args.pretrained) and not Path(args.pretrained).is_file():
        raise FileNotFoundError(f"--pretrained: checkpoint not found: {args.pretrained}")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {args.resume}")
    validate.writable_folder(args.out, "--out")
    if args.pretrained is None and args.model in TINY_MODELS and \
            not tiny_checkpoint(args.model, args.world_seed).is_file():  # pre-training will write
        validate.writable_folder(cache_dir(), f"the model cache (${CACHE_ENV} or ~/.cache/dive_fast)")


# --- data ------------------------------------------------------------------------------

def target_data(args, bundle, train_tf):
    if args.train_folder:
        return ImageFolderTask(args.train_folder, train_tf)
    return WorldTask("shapes", "train", args.train_size, train_tf, args.world_seed, bundle.image_size)


def reference_data(args, bundle, rank, world):
    """(dataset, id for the cache key; None when streamed)."""
    tf = bundle.preprocess_val  # deterministic, so the frozen embeddings can be cached
    if args.reference_shards:
        return ShardedCaptions(args.reference_shards, tf, seed=args.seed, rank=rank,
                               world_size=world), None
    if args.reference_csv:
        ds = CsvCaptions(args.reference_csv, tf)
        return ds, ds.fingerprint()  # its contents: a CSV rewritten in place is new data
    ds = WorldCaptions("reference", args.ref_size, tf, args.world_seed, bundle.image_size)
    return ds, f"world:{args.world_seed}:{args.ref_size}"


def loader(ds, batch, seed, start_step, rank, world, workers, pin, tokenizer=None):
    collate = functools.partial(train_collate, tokenizer=tokenizer)
    if isinstance(ds, IterableDataset):  # streamed shards: split by rank inside, no sampler
        return DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate,
                          pin_memory=pin, persistent_workers=workers > 0)
    sampler = ResumableSampler(len(ds), seed, batch, start_step, rank, world)
    # An own generator: creating the iterator must not draw from the global RNG, whose
    # state a resumed run restores (and which drives the augmentation with workers=0).
    return DataLoader(Readable(ds), batch_size=batch, sampler=sampler, num_workers=workers,
                      collate_fn=collate, pin_memory=pin, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def batch_stream(targets, references):
    """Endless ``Batch``es: a target batch and, where the method uses them, reference pairs."""
    targets = iter(targets)
    references = iter(references) if references is not None else None
    while True:
        images, labels, _, skipped, _ = next(targets)
        batch = Batch(images, labels, skipped=skipped)
        if references is not None:
            ref_images, _, index, ref_skipped, tokens = next(references)
            batch.ref_images, batch.ref_tokens, batch.skipped = ref_images, tokens, skipped + ref_skipped
            batch.ref_index = index if bool((index >= 0).all()) else None
        yield batch


# --- checkpoints -----------------------------------------------------------------------

# Settings a resumed run must share with the checkpoint it resumes: everything that
# changes the result (model and weights, method, optimiser and schedule, data, batches).
RESUME_KEYS = ("method", "model", "pretrained", "batch_size", "ref_batch_size", "world_size",
               "lr", "wd", "steps", "warmup", "grad_clip", "lp_steps", "lam", "momentum",
               "amp", "augment", "train_folder", "reference_csv", "reference_shards",
               "train_size", "ref_size", "world_seed", "seed", "fsdp")


def checkpoint_state(step, args, method, opt, sched) -> dict:
    """What a resume needs; under FSDP a collective (every rank calls it) whose full,
    unsharded state is rank 0's, so that the checkpoint loads anywhere."""
    method_state = {k: v for k, v in method.state_dict().items() if not k.startswith("model.")}
    if parallel.is_sharded(method.model):
        model_state = parallel.full_model_state(method.model)
        opt_state = parallel.full_optimizer_state(method, opt)
    else:
        model_state, opt_state = method.model.state_dict(), opt.state_dict()
    return {"state_dict": model_state, "method_state": method_state,
            "step": step, **{k: getattr(args, k) for k in RESUME_KEYS},
            "optimizer": opt_state, "scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}


def claim_out(args, out: Path) -> None:
    """A folder holding another run's checkpoints or metrics is refused unless resuming."""
    if args.resume is not None:
        return
    held = sorted((out / "checkpoints").glob("step-*.pt"))
    metrics = out / "metrics.jsonl"
    if held or (metrics.is_file() and metrics.stat().st_size):
        raise FileExistsError(
            f"--out {out} already holds a run ({held[-1] if held else metrics}): pass "
            "--resume auto to continue it, or give another --out")


def find_resume(args) -> Path | None:
    if args.resume is None:
        return None
    if args.resume != "auto":
        return Path(args.resume)
    found = sorted((Path(args.out) / "checkpoints").glob("step-*.pt"))
    return found[-1] if found else None


def load_resume(args) -> dict | None:
    """The checkpoint to resume (checked against its digest and this run's settings)."""
    path = find_resume(args)
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    for key in RESUME_KEYS:
        if key in ckpt and ckpt[key] != getattr(args, key):
            raise ValueError(f"cannot resume from {path}: it was written with {key}="
                             f"{ckpt[key]!r}, this run has {key}={getattr(args, key)!r}")
    ckpt["path"] = str(path)
    return ckpt


def restore(ckpt, method, opt, sched) -> tuple[int, dict]:
    """Loads a checkpoint into the run; returns its step and the RNG states to resume."""
    if parallel.is_sharded(method.model):
        parallel.load_full_state(method.model, ckpt["state_dict"], method, opt, ckpt["optimizer"])
        method.load_state_dict(ckpt.get("method_state", {}), strict=False)
    else:
        state = {f"model.{k}": v for k, v in ckpt["state_dict"].items()}
        method.load_state_dict({**state, **ckpt.get("method_state", {})})
        opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return int(ckpt["step"]), ckpt["rng"]


# --- the run ---------------------------------------------------------------------------

def resolve_pretrained(args) -> str | None:
    if args.pretrained is None and args.model in TINY_MODELS:
        from .pretrain import ensure_pretrained_tiny  # the caller asks for pre-training
        return str(ensure_pretrained_tiny(args.model, args.world_seed))
    return args.pretrained


def eval_sets(args, bundle):
    """({name: (kind, dataset)}, RSA pairs or None)."""
    tf = bundle.preprocess_val
    if args.rsa_csv or args.rsa_shards:
        rsa = heldout_pairs(tf, args.rsa_csv, args.rsa_shards, args.rsa_size)
    elif not args.task:
        rsa = world_rsa_set(tf, n=args.rsa_size, seed=args.world_seed, size=bundle.image_size)
    else:
        rsa = None
    if args.task:
        return task_sets(validate.task_specs(args.task, check_folders=False), tf), rsa
    return world_eval_sets(tf, args.eval_per_task, args.world_seed, bundle.image_size), rsa


def wise_ft(model, pre_state, ft_state, alpha):
    model.load_state_dict({k: (1 - alpha) * pre_state[k] + alpha * v if v.is_floating_point() else v
                           for k, v in ft_state.items()})


def build_method(args, bundle, classnames, templates, pretrained, device, rank, world, out,
                 reference=None):
    """The method's task module and its step: ``step(batch, i, opt, sched, guard)`` runs
    ``train_step`` as the arguments ask (DDP or FSDP, micro-batches, clipping).
    ``reference``: (reference pairs, their id for the embedding cache's key, None when
    streamed), for methods that use them."""
    model = bundle.model
    on_gpu = device.startswith("cuda")
    amp_dtype = torch.bfloat16 if (args.amp == "bf16" or (args.amp == "auto" and on_gpu)) else None
    frozen = None
    if METHODS[args.method].uses_frozen:
        frozen = FrozenReference(frozen_copy(model), device, amp_dtype,
                                 co_schedule=args.co_schedule)
        ref_ds, ref_id = reference
        if args.frozen_cache and ref_id is not None:
            key = frozen_cache.cache_key(model=args.model, weights=frozen_cache.weights_id(pretrained),
                                         data=ref_id,
                                         transform=repr(bundle.preprocess_val), n=len(ref_ds),
                                         amp=str(amp_dtype))
            path = out / "cache" / f"frozen-ref-{key}.npy"
            if distributed.is_main():
                frozen_cache.build(frozen, bundle.tokenizer, ref_ds, path,
                                   progress=not args.no_progress)
            distributed.barrier()
            frozen.cache = frozen_cache.build(frozen, bundle.tokenizer, ref_ds, path)
    method = make_method(args.method, model, bundle.tokenizer, classnames, templates,
                         device=device, config=MethodConfig.from_args(args), frozen=frozen,
                         amp_dtype=amp_dtype, seed=args.seed, rank=rank, world_size=world)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    sharded = args.fsdp and world > 1 and method.trains
    if args.fsdp and world == 1:
        log.warning("--fsdp with one process: nothing to shard, the model stays whole")
    if sharded:  # after the frozen copy and FT's zero-shot head, which need the whole model
        parallel.shard(model, device)
    if args.compile:  # the encoders, so that state_dict keys stay as they are
        model.encode_image = torch.compile(model.encode_image)
        model.encode_text = torch.compile(model.encode_text)
    forward, sync = method, None
    if sharded or (world > 1 and method.trains and args.accum_freq > 1):
        # Steps DDP cannot wrap: FSDP reduces its shards itself, the rest is averaged once
        # after the last micro-batch. m is kept equal on every rank by DiVE's all-reduced
        # batch mean (no buffer sync).
        sync = parallel.GradientSync(method.parameters(), model if sharded else None)
    elif world > 1 and method.trains:
        kw = {"device_ids": [torch.device(device).index]} if on_gpu else {}
        forward = nn.parallel.DistributedDataParallel(
            method, find_unused_parameters=method.find_unused_parameters,
            forward_sync_buffers=False, **kw)
    step = functools.partial(train_step, forward, method, grad_clip=args.grad_clip,
                             accum_freq=args.accum_freq, gradient_sync=sync)
    return method, step


def run(args) -> dict:
    check_args(args)
    rank, world, device = distributed.init_from_env(args.device)
    args.device, args.world_size = device, world
    try:
        with runlock.hold(args.out, enabled=distributed.is_main()):  # this run owns --out
            report = run_owned(args, rank, world, device)
    finally:
        parallel.release_groups()
    distributed.shutdown()
    return report


def run_owned(args, rank, world, device) -> dict:
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    out = Path(args.out)
    main_proc = distributed.is_main()
    claim_out(args, out)
    resume = load_resume(args)  # a corrupt or mismatched checkpoint fails now
    if main_proc:
        atomic_write_text(out / "config.json", json.dumps(vars(args), indent=2))
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
    target_ds = target_data(args, bundle, train_tf)
    sets, rsa_set = eval_sets(args, bundle)
    reference = reference_data(args, bundle, rank, world) if METHODS[args.method].uses_reference \
        else (None, None)
    report = {}
    if main_proc:  # before any sharding: rank 0 alone evaluates
        report["zero-shot"] = evaluate(model, bundle.tokenizer, sets, device=device,
                                       progress=not args.no_progress)
    method, step = build_method(args, bundle, target_ds.classnames, target_ds.templates,
                                pretrained, device, rank, world, out, reference)
    skipped = 0
    if method.trains and args.steps > 0:
        opt, sched = optim.build(method.named_parameters(), args.lr, args.wd, args.steps,
                                 args.warmup)
        start_step, rng = 0, None
        if resume is not None:
            start_step, rng = restore(resume, method, opt, sched)
            log.info("resumed from %s at step %d", resume["path"], start_step)
        skipped = train_loop(args, method, step, opt, sched, target_ds, reference[0],
                             bundle.tokenizer, start_step, rank, world, out, rng)
    if parallel.is_sharded(model):  # gathered (a collective); rank 0 evaluates it whole
        state = parallel.full_model_state(model)
        if main_proc:
            model = load_clip(args.model, pretrained, device).model
            model.load_state_dict(state)
    if main_proc:
        pre_model = load_clip(args.model, pretrained, device).model.eval()
        ft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if method.trains:
            common = dict(pre_model=pre_model, rsa_set=rsa_set, device=device,
                          progress=not args.no_progress)
            report[args.method] = evaluate(model, bundle.tokenizer, sets,
                                           heads=method.eval_heads(), **common)
            report[args.method]["skipped_train_samples"] = skipped
            for alpha in args.wise_ft_alphas:
                wise_ft(model, pre_state, ft_state, alpha)
                report[f"{args.method} wise-ft {alpha:g}"] = evaluate(
                    model, bundle.tokenizer, sets, heads=method.eval_heads(alpha), **common)
            model.load_state_dict(ft_state)
        table = format_table(report)
        if rsa_set is None:
            table += "\n\nRSA: no held-out pairs given (--rsa-csv or --rsa-shards)."
        atomic_write_text(out / "table.md", table + "\n")
        atomic_write_json(out / "report.json", report)
        if (out / "metrics.jsonl").is_file():
            metrics_log.plot_curves(out / "metrics.jsonl", out / "curves.png")
        print(table)
    return report


def batches(args, method, target_ds, ref_ds, tokenizer, start_step=0, rank=0, world=1):
    """The run's ``Batch`` stream from ``start_step`` on (loaders for targets and, where the
    method uses them, reference pairs)."""
    pin = method.device.type == "cuda"
    targets = loader(target_ds, args.batch_size, args.seed, start_step, rank, world,
                     args.workers, pin)
    references = None
    if method.uses_reference:
        if isinstance(ref_ds, ShardedCaptions):  # a resumed stream starts a fresh epoch
            ref_ds.start_epoch = start_step
        references = loader(ref_ds, args.ref_batch_size or args.batch_size, args.seed + 1,
                            start_step, rank, world, args.workers, pin, tokenizer)
    return batch_stream(targets, references)


def train_loop(args, method, step_fn, opt, sched, target_ds, ref_ds, tokenizer, start_step,
               rank, world, out, rng=None) -> int:
    """Runs steps start_step .. args.steps; returns the unreadable samples skipped (all ranks)."""
    from tqdm.auto import tqdm

    device = method.device
    stream = batches(args, method, target_ds, ref_ds, tokenizer, start_step, rank, world)
    main_proc = distributed.is_main()
    metrics = None
    if main_proc:  # rows past the resumed checkpoint (or of a run started over) go
        metrics_log.cut_back(out / "metrics.jsonl", start_step)
        metrics = open(out / "metrics.jsonl", "a")
    ckpt_dir = out / "checkpoints"
    last_ckpt = None
    guard = NonFiniteGuard(device)
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps,
               desc=args.method, disable=args.no_progress or not main_proc)
    t_last, n_samples, skipped = time.perf_counter(), 0, 0
    method.train()
    if rng is not None:  # a resumed run continues the random streams where they stopped
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    for step in bar:
        batch = next(stream).to(device)
        values = step_fn(batch, step, opt, sched, guard)
        n_samples += batch.samples
        skipped += batch.skipped
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            # The host's only reads of device values (a sync): the step's losses and the guard.
            names = list(values)
            read = torch.stack([v.float() for v in values.values()] +
                               [guard.skipped.float(), guard.first.float()]).tolist()
            row = dict(zip(names, read[:-2]))
            skipped_steps, first_bad = int(read[-2]), int(read[-1])
            if first_bad >= 0 and args.on_nonfinite == "stop":
                raise FloatingPointError(
                    f"non-finite loss or gradients at step {first_bad} (its update was skipped); "
                    f"last good checkpoint: {last_ckpt or 'none'} (resume with --resume "
                    f"{last_ckpt or 'auto'}, or pass --on-nonfinite skip)")
            if main_proc:
                now = time.perf_counter()
                row.pop("skipped", None)
                row = {"step": done, **row, "lr": sched.get_last_lr()[0],
                       "samples_per_s": n_samples * world / (now - t_last),
                       "skipped_samples": skipped, "skipped_steps": skipped_steps}
                t_last, n_samples = now, 0
                metrics.write(metrics_log.row_line(row))
                metrics.flush()
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "samples_per_s")})
        if (done % args.checkpoint_every == 0 or done == args.steps) and \
                (main_proc or parallel.is_sharded(method.model)):  # FSDP's gather: every rank
            state = checkpoint_state(done, args, method, opt, sched)
            if main_proc:
                last_ckpt = atomic_save(state, ckpt_dir / f"step-{done:08d}.pt")
                prune(ckpt_dir, "step-*.pt", args.keep)
    if metrics:
        metrics.close()
    return distributed.sum_over_ranks(skipped, device)


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    main()
