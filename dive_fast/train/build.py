"""The run, built in one place: ``build_run(args)`` turns the checked arguments of
``python -m dive_fast.train`` into a ``Run``: the model as loaded, the target and reference
data, the frozen side (live or cached), the method, its wrapping for several ranks (DDP or
FSDP) and ``--compile``, the optimiser and schedule, fp16's loss scaler, the step function
and, when resuming, the checkpoint's state. The app (``trainer.run_owned``) and the
benchmarks (``benchmarks/bench_step.py``, ``bench_memory.py``) both call it, so what is
timed is what users run."""
from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import optim, parallel
from .checkpoint import restore
from .frozen import FrozenReference, make_frozen_side
from .loaders import batches, reference_data, target_data
from .methods import METHODS, Method, MethodConfig, make_method
from .models import TINY_MODELS, ClipBundle, compile_towers, load_clip
from .open_clip_flags import adamw_settings
from .precision import autocast_dtype
from .step import NonFiniteGuard, train_step

log = logging.getLogger("dive_fast.train")

def ensure_pretrained(args) -> str | None:
    """The weights the run loads: ``--pretrained`` as given, or for a tiny config without it
    the cached pre-trained file, pre-trained first when absent or damaged (the app asks
    for pre-training; the model loader never trains)."""
    if args.pretrained is None and args.model in TINY_MODELS:
        from .pretrain import ensure_pretrained_tiny
        return str(ensure_pretrained_tiny(args.model, args.world_seed))
    return args.pretrained


def load_model(args, pretrained, device):
    """The run's model as ``load_clip`` builds it (the same text truncation and image size
    everywhere)."""
    return load_clip(args.model, pretrained, device, text_truncation=args.text_truncation,
                     image_size=getattr(args, "force_image_size", None))


def lock_towers(args, model) -> None:
    """--lock-image and --lock-text through open_clip's own ``lock_image_tower`` and
    ``lock_text_tower``, after the method chose what trains and before DDP or FSDP wraps
    it (as open_clip_train locks them before DDP)."""
    if args.lock_image:
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.lock_text:
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers,
                              freeze_layer_norm=args.lock_text_freeze_layer_norm)


@dataclass
class Run:
    """What a training step needs, built by ``build_run``. ``step(batch, i, opt, sched,
    guard)`` runs ``step.train_step`` as the arguments ask; ``opt`` and ``sched`` are None
    when nothing trains (a method that does not, or ``--steps 0``)."""
    args: argparse.Namespace
    bundle: ClipBundle  # the model (trained in place), its transforms and tokenizer
    pretrained: str | None  # the weights loaded: for reloading them, and the cache's key
    target: torch.utils.data.Dataset
    reference: torch.utils.data.Dataset | None  # None: the method uses no reference pairs
    frozen: FrozenReference | None  # None: the method needs no frozen embeddings
    method: Method
    step: Callable
    scaler: torch.amp.GradScaler | None  # fp16's loss scale (state a resume restores)
    guard: NonFiniteGuard
    opt: torch.optim.Optimizer | None = None
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    start_step: int = 0  # a resumed run's first step
    rng: dict | None = None  # the random states a resumed run continues from
    rank: int = 0
    world: int = 1

    @property
    def model(self) -> nn.Module:
        return self.bundle.model

    def batches(self):
        """The ``Batch`` stream from ``start_step`` on."""
        return batches(self.args, self.method, self.target, self.reference,
                       self.bundle.tokenizer, self.start_step, self.rank, self.world)


def build_run(args, rank: int = 0, world: int = 1, *, resume: dict | None = None,
              before_method: Callable[[ClipBundle], None] | None = None,
              bundle: ClipBundle | None = None, target=None, reference=None) -> Run:
    """The run of checked ``args`` (``cli.check_args``) on ``args.device``, as rank ``rank``
    of ``world``; ``resume``: a checkpoint (``checkpoint.load_resume``) to continue from.

    ``before_method(bundle)`` is called once the model is loaded and before the method
    takes it (frozen copy, sharding, compile): where the app reads the weights as loaded
    and measures its zero-shot row. ``bundle``, ``target`` and ``reference`` ((pairs, id
    for the cache key or None)) replace the model and data the arguments name: what the
    benchmarks bring that no flag says (another image size, synthetic data)."""
    device = args.device
    if bundle is None:
        pretrained = ensure_pretrained(args)
        bundle = load_model(args, pretrained, device)
    else:
        pretrained = bundle.pretrained
    if target is None:
        target = target_data(args, bundle)
    if reference is None and METHODS[args.method].uses_reference:
        reference = reference_data(args, bundle, rank, world)
    pairs, _ = reference or (None, None)
    if before_method is not None:
        before_method(bundle)
    amp_dtype = autocast_dtype(args.precision, device)
    frozen = make_frozen_side(args, bundle, pretrained, reference, amp_dtype, Path(args.out),
                              world) if METHODS[args.method].uses_frozen else None
    method = make_method(args.method, bundle.model, bundle.tokenizer, target.classnames,
                         target.templates, device=device, config=MethodConfig.from_args(args),
                         frozen=frozen, amp_dtype=amp_dtype, seed=args.seed, rank=rank,
                         world_size=world, siglip=args.siglip)
    lock_towers(args, method.model)
    forward, sync = for_ranks(args, method, world)
    # fp16 needs loss scaling (bf16 and fp32 do not): open_clip's --precision amp.
    scaler = torch.amp.GradScaler(torch.device(device).type) \
        if amp_dtype == torch.float16 and method.trains else None
    step = functools.partial(train_step, forward, method, grad_clip=args.grad_clip,
                             accum_freq=args.accum_freq, gradient_sync=sync, scaler=scaler)
    run = Run(args, bundle, pretrained, target, pairs, frozen, method, step, scaler,
              NonFiniteGuard(device), rank=rank, world=world)
    if method.trains and args.steps > 0:
        run.opt, run.sched = optim.build(method.named_parameters(), args.lr, args.wd,
                                         args.steps, args.warmup,
                                         *adamw_settings(args))
        if resume is not None:
            run.start_step, run.rng = restore(resume, method, run.opt, run.sched, scaler)
            log.info("resumed from %s at step %d", resume["path"], run.start_step)
    return run


def for_ranks(args, method, world: int):
    """(what the step calls forward, the gradient sync it finishes or None): the method
    itself, sharded (``--fsdp``) or wrapped in DDP across ``world`` ranks, and compiled
    after sharding (``--compile``), with ``--grad-checkpointing`` set on its towers."""
    model, device = method.model, args.device
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    sharded = args.fsdp and world > 1 and method.trains
    if args.fsdp and world == 1:
        log.warning("--fsdp with one process: nothing to shard, the model stays whole")
    if sharded:  # after the frozen copy and FT's zero-shot head, which need the whole model
        parallel.shard(model, device)
    if args.compile:  # after sharding: FSDP2's units are the blocks it compiles
        log.info("--compile: %s", compile_towers(model))
    if sharded or (world > 1 and method.trains and args.accum_freq > 1):
        # Steps DDP cannot wrap: FSDP reduces its shards itself, the rest is averaged once
        # after the last micro-batch. m is kept equal on every rank by DiVE's all-reduced
        # batch mean (no buffer sync).
        return method, parallel.GradientSync(method.parameters(), model if sharded else None)
    if world > 1 and method.trains:
        kw = {"device_ids": [torch.device(device).index]} if device.startswith("cuda") else {}
        return nn.parallel.DistributedDataParallel(
            method, find_unused_parameters=method.find_unused_parameters,
            forward_sync_buffers=False, **kw), None
    return method, None
