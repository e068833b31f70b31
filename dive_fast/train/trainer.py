"""The run behind ``python -m dive_fast.train`` (its command line: ``cli.py``): data, model,
zero-shot evaluation, the method, the training loop, checkpoints, the final report.

Writes to --out: config.json, metrics.jsonl, curves.png, checkpoints/ (atomic, with a
digest, the newest --keep kept), report.json and table.md (zero-shot row, fine-tuned row,
WiSE-FT rows). A run owns its --out (a lock while it runs; another run's folder only with
--resume), and checks every argument and input before any expensive work
(``cli.check_args``).
"""
from __future__ import annotations

import functools
import json
import logging
import random
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from . import distributed, frozen_cache, metrics_log, optim, parallel, validate
from .checkpoint import atomic_save, load_checkpoint, prune
from .data import (CsvCaptions, ImageFolderTask, Readable, ResumableSampler, ShardedCaptions,
                   WorldCaptions, WorldTask, csv_options, heldout_pairs, train_collate)
from .evaluate import evaluate, format_table, task_sets, world_eval_sets, world_rsa_set
from .fileio import DiskFull, atomic_write_json, atomic_write_text, remove_stale_temporaries
from .frozen import FrozenReference
from .methods import METHODS, Batch, MethodConfig, make_method
from .protocol import chosen_templates
from .models import TINY_MODELS, compile_towers, frozen_copy, load_clip
from .step import NonFiniteGuard, train_step

log = logging.getLogger("dive_fast.train")


# --- data ------------------------------------------------------------------------------

def data_sources(args) -> dict[str, str]:
    """Where each data set comes from, for the report: a path, 'world' or 'none'."""
    own = {"target": args.train_folder, "reference": args.reference_csv or args.reference_shards,
           "eval": ", ".join(args.task), "rsa": args.rsa_csv or args.rsa_shards}
    return {part: own[part] or ("world" if part in args.world_parts else "none") for part in own}


def target_data(args, bundle, train_tf):
    if args.train_folder:
        return ImageFolderTask(args.train_folder, train_tf,
                               templates=chosen_templates(args.templates))
    return WorldTask("shapes", "train", args.train_size, train_tf, args.world_seed, bundle.image_size)


def reference_data(args, bundle, rank, world):
    """(dataset, id for the cache key; None when streamed)."""
    tf = bundle.preprocess_val  # deterministic, so the frozen embeddings can be cached
    if args.reference_shards:
        return ShardedCaptions(args.reference_shards, tf, seed=args.seed, rank=rank,
                               world_size=world), None
    if args.reference_csv:
        ds = CsvCaptions(args.reference_csv, tf, **csv_options(args))
        # its contents (cli.check_inputs digested them): a CSV rewritten in place is new data
        return ds, args.data_ids.get("reference") or ds.fingerprint()
    if "reference" not in args.world_parts:  # cli.resolve_world_parts refuses this earlier
        raise ValueError("no reference pairs: give --reference-csv or --reference-shards")
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
               "precision", "augment", "data_ids", "world_parts", "train_size", "ref_size",
               "world_seed", "seed", "fsdp")
# What checkpoints written before data_ids (2026-12-05) recorded of their data, by path.
OLD_DATA_KEYS = ("train_folder", "reference_csv", "reference_shards")


class ResumeMismatch(ValueError):
    """A checkpoint written with other settings or data than this run's."""


def checkpoint_state(step, args, method, opt, sched, scaler=None) -> dict:
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
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
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
    keys = RESUME_KEYS if "data_ids" in ckpt else RESUME_KEYS + OLD_DATA_KEYS
    for key in keys:
        if key == "data_ids" and key in ckpt:
            changed = [part for part, digest in ckpt[key].items() if args.data_ids.get(part) != digest]
            if changed:
                raise ResumeMismatch(f"cannot resume from {path}: the {' and '.join(changed)} data "
                                 "differ from what it was trained on (other class names, files, "
                                 "sizes or modification times)")
        elif key in ckpt and ckpt[key] != getattr(args, key):
            raise ResumeMismatch(f"cannot resume from {path}: it was written with {key}="
                             f"{ckpt[key]!r}, this run has {key}={getattr(args, key)!r}")
    ckpt["path"] = str(path)
    return ckpt


def restore(ckpt, method, opt, sched, scaler=None) -> tuple[int, dict]:
    """Loads a checkpoint into the run; returns its step and the RNG states to resume."""
    if parallel.is_sharded(method.model):
        parallel.load_full_state(method.model, ckpt["state_dict"], method, opt, ckpt["optimizer"])
        method.load_state_dict(ckpt.get("method_state", {}), strict=False)
    else:
        state = {f"model.{k}": v for k, v in ckpt["state_dict"].items()}
        method.load_state_dict({**state, **ckpt.get("method_state", {})})
        opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
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
        rsa = heldout_pairs(tf, args.rsa_csv, args.rsa_shards, args.rsa_size,
                            csv_options=csv_options(args))
    elif "rsa" in args.world_parts:
        rsa = world_rsa_set(tf, n=args.rsa_size, seed=args.world_seed, size=bundle.image_size)
    else:
        rsa = None
    if args.task:
        return task_sets(validate.task_specs(args.task, check_folders=False), tf,
                         chosen_templates(args.templates)), rsa
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
    amp_dtype = autocast_dtype(args.precision, device)
    frozen = None
    if METHODS[args.method].uses_frozen:
        frozen = FrozenReference(frozen_copy(model), device, amp_dtype,
                                 co_schedule=args.co_schedule)
        if args.compile:  # the same compiled numerics on both sides: u = v = 0 at the start
            compile_towers(frozen.model)
        ref_ds, ref_id = reference
        if args.frozen_cache and ref_id is not None:
            key = frozen_cache.cache_key(model=args.model, weights=frozen_cache.weights_id(pretrained),
                                         data=ref_id,
                                         transform=repr(bundle.preprocess_val), n=len(ref_ds),
                                         amp=str(amp_dtype),
                                         text_truncation=str(args.text_truncation))
            path = out / "cache" / f"frozen-ref-{key}.npy"
            # Rank 0 builds the cache, or checks the one there against its digest (a read of
            # the whole file); the other ranks open what it checked, once it is there.
            cache = frozen_cache.build(frozen, bundle.tokenizer, ref_ds, path,
                                       workers=args.workers, progress=not args.no_progress) \
                if distributed.is_main() else None
            distributed.barrier()
            frozen.cache = cache if cache is not None else \
                frozen_cache.build(frozen, bundle.tokenizer, ref_ds, path, verify_digest=False)
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
    if args.compile:  # after sharding: FSDP2's units are the blocks it compiles
        log.info("--compile: %s", compile_towers(model))
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
    # fp16 needs loss scaling (bf16 and fp32 do not): open_clip's --precision amp.
    scaler = torch.amp.GradScaler(torch.device(device).type) \
        if amp_dtype == torch.float16 and method.trains else None
    step = functools.partial(train_step, forward, method, grad_clip=args.grad_clip,
                             accum_freq=args.accum_freq, gradient_sync=sync, scaler=scaler)
    return method, step


PRECISIONS = {  # --precision (open_clip's names) -> the autocast dtype (None: float32)
    "auto": "auto", "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16,
    "amp": torch.float16, "amp_fp16": torch.float16, "fp32": None}
# open_clip's "bf16" (and "pure_bf16") cast the weights themselves: not offered under that name.


def load_model(args, pretrained, device):
    """The run's model as ``load_clip`` builds it (the same text truncation everywhere)."""
    return load_clip(args.model, pretrained, device, text_truncation=args.text_truncation)


def autocast_dtype(precision: str, device: str):
    """--precision as an autocast dtype (None: float32); auto is bf16 on GPUs only."""
    dtype = PRECISIONS[precision]
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else None
    return dtype


def run_owned(args, rank, world, device) -> dict:
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    out = Path(args.out)
    main_proc = distributed.is_main()
    claim_out(args, out)
    if main_proc:  # a killed write's leftovers (this run holds --out's lock)
        stale = [p for d in (out, out / "checkpoints", out / "cache")
                 for p in remove_stale_temporaries(d)]
        if stale:
            log.info("removed %d temporary file(s) a killed run left, e.g. %s", len(stale), stale[0])
    resume = load_resume(args)  # a corrupt or mismatched checkpoint fails now
    if main_proc:
        atomic_write_text(out / "config.json", json.dumps(vars(args), indent=2))
    pretrained = resolve_pretrained(args)
    bundle = load_model(args, pretrained, device)
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
                                       workers=args.workers, progress=not args.no_progress)
    method, step = build_method(args, bundle, target_ds.classnames, target_ds.templates,
                                pretrained, device, rank, world, out, reference)
    skipped = 0
    if method.trains and args.steps > 0:
        opt, sched = optim.build(method.named_parameters(), args.lr, args.wd, args.steps,
                                 args.warmup)
        scaler = step.keywords["scaler"]  # fp16's loss scale: state a resume restores
        start_step, rng = 0, None
        if resume is not None:
            start_step, rng = restore(resume, method, opt, sched, scaler)
            log.info("resumed from %s at step %d", resume["path"], start_step)
        evaluator = None
        if args.eval_every:
            evaluator = functools.partial(evaluate_during_training, args, method, bundle,
                                          pretrained, sets, device)
        skipped = train_loop(args, method, step, opt, sched, target_ds, reference[0],
                             bundle.tokenizer, start_step, rank, world, out, rng, evaluator)
    if parallel.is_sharded(model):  # gathered (a collective); rank 0 evaluates it whole
        state = parallel.full_model_state(model)
        if main_proc:
            model = load_model(args, pretrained, device).model
            model.load_state_dict(state)
    if main_proc:
        pre_model = load_model(args, pretrained, device).model.eval()
        ft_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if method.trains and args.steps == 0:
            log.info("--steps 0: evaluation only; the table has the zero-shot row alone")
        if method.trains and args.steps > 0:
            common = dict(pre_model=pre_model, rsa_set=rsa_set, device=device,
                          workers=args.workers, progress=not args.no_progress)
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
        table += "\n\nData: " + "; ".join(f"{part} {src}" for part, src in data_sources(args).items())
        atomic_write_text(out / "table.md", table + "\n")
        atomic_write_json(out / "report.json", report)
        if (out / "metrics.jsonl").is_file():
            metrics_log.plot_curves(out / "metrics.jsonl", out / "curves.png")
        print(table)
    return report


def evaluate_during_training(args, method, bundle, pretrained, sets, device) -> dict | None:
    """Rank 0's evaluation of the model being trained (its trained heads too), flattened for
    the metrics log; every rank calls it (a sharded model is gathered first)."""
    model = method.model
    if parallel.is_sharded(model):
        state = parallel.full_model_state(model)  # a collective
        if distributed.is_main():
            model = load_model(args, pretrained, device).model
            model.load_state_dict(state)
    result = None
    if distributed.is_main():
        report = evaluate(model, bundle.tokenizer, sets, heads=method.eval_heads(), device=device,
                          workers=args.workers, progress=False)
        result = {f"eval/{name}": value for kind in ("id", "ood", "zeroshot")
                  for name, value in report[kind].items()}
        result.update({f"eval/{kind}_mean": report[f"{kind}_mean"]
                       for kind in ("id", "ood", "zeroshot")})
    method.train()  # evaluate() left the towers in eval mode
    distributed.barrier()
    return result


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
               rank, world, out, rng=None, evaluator=None) -> int:
    """Runs steps start_step .. args.steps; returns the unreadable samples skipped (all ranks).
    ``evaluator()`` (every rank calls it; rank 0's result is logged) runs every
    ``--eval-every`` steps."""
    from .progress import progress_bar

    device = method.device
    stream = batches(args, method, target_ds, ref_ds, tokenizer, start_step, rank, world)
    main_proc = distributed.is_main()
    metrics = metrics_log.MetricsSink(out, start_step, tensorboard=args.report_to == "tensorboard") \
        if main_proc else None
    ckpt_dir = out / "checkpoints"
    # The checkpoints pruning may delete: this run's, from the step it resumed at down (the
    # run owns --out, under its lock), then each new one once it is durable.
    written = sorted(p for p in ckpt_dir.glob("step-*.pt")
                     if int(p.stem.split("-")[1]) <= start_step) if main_proc else []
    last_ckpt = written[-1] if written else None
    guard = NonFiniteGuard(device)
    bar = progress_bar(range(start_step, args.steps), initial=start_step, total=args.steps,
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
                metrics.write(row)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "samples_per_s")},
                                refresh=False)
        if evaluator is not None and done % args.eval_every == 0 and done < args.steps:
            result = evaluator()  # the last step's evaluation is the final report's
            if main_proc:
                metrics.write({"step": done, **result})
        if (done % args.checkpoint_every == 0 or done == args.steps) and \
                (main_proc or parallel.is_sharded(method.model)):  # FSDP's gather: every rank
            state = checkpoint_state(done, args, method, opt, sched, step_fn.keywords["scaler"])
            if main_proc:
                try:
                    last_ckpt = atomic_save(state, ckpt_dir / f"step-{done:08d}.pt")
                except DiskFull as exc:
                    raise DiskFull(exc.errno, f"{exc.strerror}. The run stopped at step {done}; "
                                   f"the last good checkpoint is {last_ckpt or 'none'}: free "
                                   "space, then run the same command with --resume auto") from None
                written.append(last_ckpt)
                prune(written, args.keep)
    if metrics:
        metrics.close()
    return distributed.sum_over_ranks(skipped, device)
