"""`python -m dive_fast.train`: the command line, and the checks that run before any model loads.

A flag with the name of one of open_clip's trainer (``python -m open_clip_train.main``)
means what it means there (``--epochs``, ``--precision``, ``--accum-freq``, ``--opt``,
``--lock-image``, ``--resume latest``, ``--report-to`` ...); its other options are refused
with what to write instead (``open_clip_flags``); docs/training.md maps all of them.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import torch

from .._cli.arguments import DefaultsFormatter, run_checked
from . import data, distributed, listing, parallel, protocol, runlock, shard_plan, validate
from .checkpoint import CorruptCheckpoint, ResumeMismatch, claim_out
from .data import csv_options, shards_fingerprint
from .fileio import DiskFull
from .methods import METHODS
from .models import (
    CACHE_ENV,
    HF_HUB,
    TINY_MODELS,
    DownloadFailed,
    cache_dir,
    is_weights_path,
    model_and_tag,
    tiny_checkpoint,
)
from .open_clip_flags import REFUSED_VALUES, RefuseValues, adamw_settings, add_refusals
from .precision import PRECISIONS
from .report_tables import SUMMARY_METRICS
from .runlock import FolderInUse
from .start_weights import StartMismatch
from .suite import with_suite
from .trainer import run_owned
from .wise_ft import parse_alphas

EXAMPLES = """\
examples:
  # the miniature: pre-train a tiny CLIP on a generated world (once, cached), fine-tune it
  # with DiVE, print ID / OOD / zero-shot / RSA before and after
  python -m dive_fast.train

  # ViT-B-16 on your own data, one GPU (folder layout and CSV format: docs/training.md);
  # a step of --accum-freq x --batch-size, as in open_clip: 2 x 256 = the paper's 512
  python -m dive_fast.train --model ViT-B-16 --pretrained openai \\
      --train-folder /data/imagenet/train --reference-csv /data/cc3m/train.csv \\
      --task id:imagenet:/data/imagenet/val --task ood:sketch:/data/imagenet-sketch \\
      --rsa-csv /data/cc3m/heldout.csv --epochs 10 --batch-size 256 --accum-freq 2 \\
      --lr 1e-5 --warmup 500 --out runs/vitb16-dive

  # the same on 8 GPUs (--batch-size is per GPU: 8 x 64 = the paper's 512)
  torchrun --nproc_per_node 8 -m dive_fast.train --model ViT-B-16 --pretrained openai \\
      --train-folder /data/imagenet/train --reference-shards '/data/cc3m/{00000..00331}.tar' \\
      --task id:imagenet:/data/imagenet/val --epochs 10 --batch-size 64 --lr 1e-5 \\
      --warmup 500 --out runs/vitb16-dive-8gpu
"""

CAST_PRECISIONS = tuple(REFUSED_VALUES["--precision"])  # open_clip's that cast the weights
AMP_ALIASES = {"auto": "auto", "bf16": "amp_bf16", "fp32": "fp32"}  # the old --amp values


class _AmpAlias(argparse.Action):
    """``--amp bf16`` (dive_fast's older flag) sets --precision amp_bf16."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.precision = AMP_ALIASES[value]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dive_fast.train",
        description="Robust fine-tuning of an open_clip model with DiVE (or a baseline), "
                    "then an ID / OOD / zero-shot / RSA report. With no arguments: the "
                    "embedded miniature.",
        epilog=EXAMPLES, formatter_class=DefaultsFormatter)

    g = p.add_argument_group("model").add_argument
    g("--model", default="dive-tiny",
      help="open_clip model name (ViT-B-16, ...) or a dive_fast tiny config (dive-tiny, "
           "dive-micro, dive-wide)")
    g("--pretrained", default=None,
      help="open_clip pretrained tag (openai, laion2b_s34b_b88k, ...) or a checkpoint path; "
           "'' for random weights; unset with a tiny config: its cached weights, pre-trained "
           "on the world on first use")
    g("--device", default=None,
      help="torch device (unset: cuda when a GPU is visible, else cpu); under torchrun each "
           "rank takes cuda:LOCAL_RANK")
    g("--precision", choices=list(PRECISIONS) + list(CAST_PRECISIONS), default="auto",
      action=RefuseValues,
      help="autocast: amp_bf16 (bf16), amp (fp16 with loss scaling) or fp32; auto: amp_bf16 "
           "on GPUs, fp32 on CPUs; open_clip's bf16, fp16, pure_bf16 and pure_fp16 (weights "
           "cast) are refused")
    g("--tf32", action=argparse.BooleanOptionalAction, default=True,
      help="CUDA: allow TF32 matmuls and convolutions (open_clip_train turns them on for "
           "every CUDA run)")
    g("--amp", choices=list(AMP_ALIASES), action=_AmpAlias, dest="precision",
      default=argparse.SUPPRESS, help="older spelling of --precision (bf16 = amp_bf16)")
    g("--compile", "--torchcompile", dest="compile", action="store_true",
      help="torch.compile the towers")
    g("--force-image-size", type=int, nargs="+", default=None, metavar="SIZE",
      help="another input resolution than the model config's: H (square) or H W, the "
           "position embedding resized (open_clip's)")
    g("--lock-image", action="store_true",
      help="freeze the image tower (open_clip's model.lock_image_tower)")
    g("--lock-image-unlocked-groups", type=int, default=0,
      help="--lock-image: leave the last N layer groups of the image tower trainable")
    g("--lock-image-freeze-bn-stats", action="store_true",
      help="--lock-image: freeze the batch-norm statistics of the locked layers")
    g("--lock-text", action="store_true",
      help="freeze the text tower (open_clip's model.lock_text_tower)")
    g("--lock-text-unlocked-layers", type=int, default=0,
      help="--lock-text: leave the last N layers of the text tower trainable")
    g("--lock-text-freeze-layer-norm", action="store_true",
      help="--lock-text: freeze the layer norms of the locked layers too (CLIP's own text "
           "tower requires it)")
    g("--siglip", action="store_true",
      help="train with open_clip's SigLipLoss (sigmoid, with the model's logit bias); "
           "models with a logit bias (the SigLIP ones) always do")
    g("--text-truncation", action=argparse.BooleanOptionalAction, default=True,
      help="run the text tower on each batch's longest caption instead of the full context "
           "(exact for causal towers that pool at the end token, e.g. every CLIP ViT)")

    g = p.add_argument_group("data (the world when none is given)").add_argument
    g("--train-folder", default=None,
      help="target task: an image folder, one sub-folder per class (ImageNet layout), "
           "optional classnames.txt and templates.txt")
    g("--reference-csv", default=None,
      help="reference image-caption pairs (e.g. CC3M) as an open_clip CSV")
    g("--reference-shards", default=None,
      help="reference pairs as webdataset tar shards: brace pattern, glob or '::'-separated "
           "sources, read one after another (open_clip's --train-data)")
    g("--dataset-resampled", action="store_true",
      help="--reference-shards: draw shards with replacement, seeded per rank, worker and "
           "epoch (open_clip's); unset: each pair once per epoch")
    g("--reference-upsampling-factors", "--train-data-upsampling-factors", default=None,
      metavar="F1::F2", help="--dataset-resampled: one weight per '::' source of "
      "--reference-shards; each shard weighs its source's factor (open_clip's)")
    g("--templates", default=None, metavar="openai|simple|PATH",
      help="prompt templates of the target and the id and ood sets: openai (open_clip's 80, "
           "the paper's), simple (open_clip's 7) or a file, one per line with {} (unset: a "
           "folder's templates.txt, else openai for ImageNet's classes, else three generic "
           "ones)")
    data.add_csv_flags(g)
    g("--workers", type=int, default=None,
      help="data loader processes per rank (unset: the CPUs this process may use, divided "
           "among the ranks of its node, at most 8)")
    g("--augment", action=argparse.BooleanOptionalAction, default=True,
      help="on the world's target images: FLYP's RandomResizedCrop (scale 0.9-1); real "
           "folders use the model's own training transform")
    g("--use-world", default=None, metavar="PARTS",
      help="comma-separated parts to take from the generated world: target, reference, eval, "
           "rsa (unset: all of them when no data of your own is named, none otherwise: a "
           "run on your data never falls back to the world silently)")
    g("--world-seed", type=int, default=0, help="seed of the generated world")
    g("--train-size", type=int, default=8000, help="world: target training samples")
    g("--ref-size", type=int, default=4096, help="world: reference pairs")

    g = p.add_argument_group("method").add_argument
    g("--method", default="dive", choices=list(METHODS),
      help="dive, or a baseline of the paper: flyp (contrastive fine-tuning), ft (image "
           "tower + linear head), lp-ft (linear probe, then ft), flyp+replay (flyp + the "
           "CLIP loss on the reference pairs), snd-like, zeroshot (evaluate only); ablations: "
           "dive-avl, dive-pvl (one loss each), dive with --ema-momentum 0")
    g("--lam", type=float, default=1000.0, help="DiVE / SnD weight lambda")
    g("--ema-momentum", type=float, default=0.99,
      help="momentum alpha of DiVE's moving average vector m (open_clip's --momentum, an "
           "optimiser's, is refused)")
    g("--dive-backend", default=None,
      help="force a DiVELoss backend: torch, cpu, triton or cuda (python -m dive_fast.info "
           "lists them)")
    g("--lp-steps", type=int, default=None, help="lp-ft: linear-probe steps (unset: steps/3)")
    g("--frozen-cache", action=argparse.BooleanOptionalAction, default=True,
      help="cache the frozen model's reference embeddings on disk (exact: the reference "
           "transform is deterministic)")
    g("--co-schedule", action=argparse.BooleanOptionalAction, default=True,
      help="GPU: run an uncached frozen forward on a side stream beside the trainable one")

    g = p.add_argument_group("optimisation").add_argument
    g("--steps", type=int, default=None,
      help="optimiser steps (unset: from --epochs, else 300, the miniature's)")
    g("--epochs", type=float, default=None,
      help="passes over the target training set; sets --steps (as open_clip's --epochs)")
    g("--batch-size", type=int, default=128,
      help="target batch per rank and micro-batch (a step: --accum-freq of them)")
    g("--ref-batch-size", type=int, default=None,
      help="reference batch per rank and micro-batch (unset: --batch-size)")
    g("--opt", choices=["adamw"], default="adamw",
      help="the optimiser: AdamW (open_clip's timm optimisers are not offered)")
    g("--lr", type=float, default=1e-4,
      help="AdamW peak learning rate (the miniature's; the paper's ViT-B-16: 1e-5)")
    g("--beta1", type=float, default=None, help="AdamW beta1 (unset: 0.9, open_clip's)")
    g("--beta2", type=float, default=None,
      help="AdamW beta2 (unset: open_clip's, 0.98 for a ViT, else 0.999)")
    g("--eps", type=float, default=None,
      help="AdamW epsilon (unset: open_clip's, 1e-6 for a ViT, else 1e-8)")
    g("--wd", type=float, default=0.1,
      help="AdamW weight decay, except on gains, biases, the logit scale and bias and "
           "tensors below 2-D (open_clip's exemptions)")
    g("--warmup", type=int, default=None,
      help="linear warm-up steps before the cosine decay (unset: min(500, steps/10))")
    g("--lr-scheduler", choices=["cosine", "const", "const-cooldown"], default="cosine",
      action=RefuseValues, help="cosine (open_clip's const schedules are refused)")
    g("--grad-clip-norm", "--grad-clip", dest="grad_clip", type=float, default=0.0,
      help="clip the global gradient norm to this (0: off)")
    g("--seed", type=int, default=0, help="seed of sampling, augmentation and dropout")

    g = p.add_argument_group("memory and scale").add_argument
    g("--accum-freq", type=int, default=1,
      help="a step of K x --batch-size, computed in K micro-batches of --batch-size (as "
           "open_clip's: every micro-batch's features cached, each recomputed with "
           "gradient), the update of the whole K x batch in about 1/K of the activation "
           "memory")
    g("--grad-checkpointing", action="store_true",
      help="recompute the towers' residual blocks in the backward")
    g("--fsdp", action="store_true",
      help="torchrun: shard the trainable towers and their optimiser state over the ranks "
           "(FSDP2); checkpoints hold the full state")

    g = p.add_argument_group("evaluation").add_argument
    g("--task", action="append", default=[], metavar="KIND:NAME:PATH",
      help="an evaluation image folder; KIND is id, ood or zeroshot; repeat for more. NAME "
           "imagenet, imagenet-v2, imagenet-r, imagenet-a, imagenet-sketch or objectnet reads "
           "the set by its standard protocol (docs/training.md); PATH@macro_f1 reports "
           "macro-F1 (WILDS's, for iWildCam) instead of top-1")
    g("--imagenet-root", default=None, metavar="DIR",
      help="add the paper's sets found under DIR by their usual folder names (imagenet/val, "
           "imagenetv2-matched-frequency-format-val, imagenet-r, imagenet-a, sketch, "
           "objectnet-1.0/images; "
           "docs/training.md), each read by its standard protocol")
    g("--zeroshot-suite", nargs=2, default=None, metavar=("SUITE", "DIR"),
      help="add the paper's ten zero-shot sets found under DIR by their usual folder names "
           "(SUITE: paper; docs/training.md: each set's layout), naming those absent")
    g("--rsa-csv", default=None, help="held-out pairs (open_clip CSV) for RSA")
    g("--rsa-shards", default=None, help="held-out pairs (webdataset shards) for RSA")
    g("--rsa-size", type=int, default=256, help="held-out pairs used for RSA")
    g("--eval-per-task", type=int, default=500, help="world: samples per evaluation task")
    g("--eval-every", type=int, default=0,
      help="also evaluate every N steps during training, into metrics.jsonl (0: only at "
           "the end)")
    g("--zeroshot-frequency", type=float, default=None,
      help="open_clip's spelling, in epochs: --eval-every that many epochs' steps")
    g("--wise-ft", default="0.5",
      help="WiSE-FT mixing weights to evaluate: comma-separated (0.5,0.75) or a grid "
           "START:STOP:STEP (0:1:0.1); '' for none")
    g("--keep-best", default=None, choices=list(SUMMARY_METRICS), metavar="METRIC",
      help="keep best.safetensors in --out: the weights whose METRIC was the highest at the "
           "--eval-every evaluations and the final one (best.json says which step); METRIC: "
           "id_mean, ood_mean, zeroshot_mean (each kind's mean of its sets' reported "
           "metrics) or id_top1, ood_top1, zeroshot_top1 (their mean top-1)")

    g = p.add_argument_group("output").add_argument
    g("--out", default="runs/miniature",
      help="run folder: config, metrics.jsonl, curves.png, checkpoints/, report.json, "
           "table.md")
    g("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    g("--keep", type=int, default=2, help="checkpoints kept (the newest)")
    g("--resume", default=None,
      help="a checkpoint path, or 'latest' (also 'auto'): the newest in --out/checkpoints")
    g("--log-every-n-steps", "--log-every", dest="log_every", type=int, default=10,
      help="steps between metric rows (the host's only reads of device values)")
    g("--report-to", default="", metavar="wandb,tensorboard",
      help="also send the metrics to: tensorboard (event files in --out/tensorboard), wandb "
           "(files in --out/wandb; the run id is kept for --resume; $WANDB_MODE=offline "
           "works), both comma-separated, or all")
    g("--wandb-project-name", default="dive-fast", help="wandb: the project")
    g("--wandb-notes", default="", help="wandb: the run's notes")
    g("--debug", action="store_true", help="log at DEBUG level")
    g("--gather-with-grad", action="store_true",
      help="always on here: the contrastive loss gathers features over the ranks with "
           "gradient (open_clip's --gather-with-grad without --local-loss)")
    g("--on-nonfinite", choices=["stop", "skip"], default="stop",
      help="a step with non-finite loss or gradients is skipped on the device; stop also "
           "ends the run at the next log step, naming it")
    g("--no-progress", action="store_true", help="no progress bars")
    add_refusals(p)
    return p


def flag_tables(parser: argparse.ArgumentParser | None = None) -> str:
    """Every option as markdown tables by group (docs/training.md holds this text; a test
    keeps the two equal)."""
    parser = parser or build_parser()
    out = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"
                   and a.help is not argparse.SUPPRESS]
        if not actions:
            continue
        out += [f"**{group.title}**", "", "| flag | default | what it does |", "|---|---|---|"]
        for a in actions:
            default = a.default
            shown = ("" if default is argparse.SUPPRESS else "unset" if default is None else
                     f"`{default!r}`" if isinstance(default, str) else f"`{default}`")
            names = " / ".join(f"`{o}`" for o in a.option_strings)
            out.append(f"| {names} | {shown} | {a.help.replace('|', '/')} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


# Lower (and upper) bounds of the numeric arguments; "above": the bound itself is refused.
RANGES = {"steps": (0,), "batch_size": (1,), "ref_batch_size": (1,), "checkpoint_every": (1,),
          "log_every": (1,), "accum_freq": (1,), "rsa_size": (3,), "train_size": (1,),
          "ref_size": (1,), "eval_per_task": (1,), "keep": (1,), "workers": (0,),
          "warmup": (0,), "grad_clip": (0,), "lam": (0,), "ema_momentum": (0, 1), "wd": (0,),
          "beta1": (0, 1, "below"), "beta2": (0, 1, "below"), "eps": (0, None, "above"),
          "lock_image_unlocked_groups": (0,), "lock_text_unlocked_layers": (0,),
          "lr": (0, None, "above"), "epochs": (0, None, "above"), "eval_every": (0,),
          "zeroshot_frequency": (0,)}
DEFAULT_STEPS = 300


def target_size(args) -> int:
    """Samples in the target training set (an image folder's listing, or the world's)."""
    if args.train_folder:
        from .data import ImageFolderTask
        return len(ImageFolderTask(args.train_folder, transform=None,
                                   templates=protocol.chosen_templates(args.templates)))
    return args.train_size


def resolve_schedule(args, world_size: int = 1) -> None:
    """--epochs to --steps (one epoch: the target set once over all ranks' steps of
    --accum-freq x --batch-size), the
    warm-up and LP-FT defaults, and --zeroshot-frequency to --eval-every."""
    steps_per_epoch = None
    if args.epochs is not None or args.zeroshot_frequency:
        step_batch = args.batch_size * args.accum_freq * world_size
        steps_per_epoch = max(1, math.ceil(target_size(args) / step_batch))
    if args.epochs is not None:
        if args.steps is not None:
            raise ValueError(f"give one of --steps ({args.steps}) and --epochs ({args.epochs:g})")
        args.steps = max(1, round(args.epochs * steps_per_epoch))
    elif args.steps is None:
        args.steps = DEFAULT_STEPS
    if args.zeroshot_frequency:
        args.eval_every = max(1, round(args.zeroshot_frequency * steps_per_epoch))
    if args.lp_steps is None:
        args.lp_steps = args.steps // 3
    validate.number("--lp-steps", args.lp_steps, 0, args.steps)
    if args.warmup is None:
        args.warmup = min(500, max(1, args.steps // 10))


WORLD_PARTS = ("target", "reference", "eval", "rsa")


def resolve_world_parts(args) -> None:
    """Which data sets come from the generated world (``args.world_parts``), and a refusal
    naming the flag when a method lacks a set it needs and the world was not asked for."""
    own = {"target": bool(args.train_folder),
           "reference": bool(args.reference_csv or args.reference_shards),
           "eval": bool(args.task), "rsa": bool(args.rsa_csv or args.rsa_shards)}
    if args.use_world is None:
        parts = set() if any(own.values()) else set(WORLD_PARTS)
    else:
        parts = {p.strip() for p in args.use_world.split(",") if p.strip()}
        unknown = parts - set(WORLD_PARTS)
        if unknown:
            raise ValueError(f"--use-world: unknown part(s) {sorted(unknown)}; expected a "
                             f"comma-separated subset of {', '.join(WORLD_PARTS)}")
        both = sorted(p for p in parts if own[p])
        if both:
            raise ValueError(f"--use-world {args.use_world}: {', '.join(both)} also given as "
                             "your own data; name each set once")
    method = METHODS[args.method]
    needs = {}
    if method.trains:
        needs["target"] = "--train-folder"
    if method.uses_reference:
        needs["reference"] = "--reference-csv or --reference-shards"
    needs["eval"] = "--task KIND:NAME:PATH (an evaluation image folder)"
    for part, flags in needs.items():
        if not own[part] and part not in parts:
            raise ValueError(f"--method {args.method} needs {part} data: give {flags}, or "
                             f"--use-world {part} to take the generated world's (your other "
                             "data sets are your own, so the world is not used silently)")
    args.world_parts = sorted(parts)


def check_args(args, world_size: int = 1) -> None:
    """Every argument and input checked before any expensive work (model loading,
    pre-training, caches, evaluation); each failure names the argument."""
    for name, (low, *rest) in RANGES.items():
        high = rest[0] if rest and rest[0] not in ("above", "below") else None
        validate.number(f"--{name.replace('_', '-')}", getattr(args, name), low, high,
                        above="above" in rest, below="below" in rest)
    for name in ("seed", "world_seed"):
        validate.seed(f"--{name.replace('_', '-')}", getattr(args, name))
    validate.float32_number("--lam", args.lam)
    if args.resume == "latest":
        args.resume = "auto"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    validate.device(args.device)
    if args.workers is None:
        args.workers = default_workers()
    check_backend(args)
    check_model(args)
    check_model_options(args)
    resolve_optimiser(args)
    check_inputs(args, world_size)
    resolve_world_parts(args)
    resolve_schedule(args, world_size)
    if args.steps and args.warmup > args.steps:
        raise ValueError(f"--warmup {args.warmup} is longer than the run's {args.steps} steps")
    if args.reference_csv and args.reference_shards:
        raise ValueError("give one of --reference-csv and --reference-shards, not both")
    args.wise_ft_alphas = parse_alphas(args.wise_ft)
    if args.keep_best and not (args.eval_every and METHODS[args.method].trains):
        raise ValueError(f"--keep-best {args.keep_best}: needs evaluations during training to "
                         "choose among: --eval-every N (or --zeroshot-frequency) and a method "
                         "that trains")
    args.report_to = ",".join(reporters(args.report_to))


REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to: its package


def reporters(report_to: str) -> list[str]:
    """--report-to as open_clip reads it (comma-separated, or all), each one's package
    installed."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if "all" in names:
        names = list(REPORTERS)
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"--report-to {report_to}: unknown {', '.join(unknown)}; expected "
                         "tensorboard, wandb, both comma-separated, or all")
    for name in names:
        try:
            __import__(REPORTERS[name])
        except ImportError:
            raise ValueError(f"--report-to {name}: the {name} package is not installed "
                             f"(pip install {name})") from None
    return sorted(set(names), key=names.index)


def default_workers() -> int:
    """Loader processes per rank: the CPUs this process may use, shared by the ranks of its
    node, at most 8 (open_clip's default is a fixed 4)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(8, (cpus or 1) // max(1, local_ranks)))


def resolve_optimiser(args) -> None:
    """AdamW's betas and epsilon that were not given: open_clip_train's for the model (set
    here so that config.json and checkpoints record them)."""
    (args.beta1, args.beta2), args.eps = adamw_settings(args)


def check_model_options(args) -> None:
    """--force-image-size's shape, --siglip on a model that has a logit bias, and the tower
    locks' companions (checked from the model config, before it loads)."""
    import open_clip
    size = args.force_image_size
    if size is not None:
        if len(size) > 2 or min(size) < 1:
            raise ValueError(f"--force-image-size wants H or H W (positive), got "
                             f"{' '.join(map(str, size))}")
        args.force_image_size = size[0] if len(size) == 1 else list(size)
    config = open_clip.get_model_config(args.model) \
        if not args.model.startswith(HF_HUB) else None
    if args.siglip and config is not None and config.get("init_logit_bias") is None:
        raise ValueError(f"--siglip: {args.model} has no logit bias (open_clip gives SigLIP "
                         "models one, e.g. ViT-B-16-SigLIP; those train with SigLipLoss "
                         "without the flag)")
    for flag, lock in (("--lock-image-unlocked-groups", "lock_image"),
                       ("--lock-image-freeze-bn-stats", "lock_image"),
                       ("--lock-text-unlocked-layers", "lock_text"),
                       ("--lock-text-freeze-layer-norm", "lock_text")):
        if getattr(args, flag[2:].replace("-", "_")) and not getattr(args, lock):
            raise ValueError(f"{flag} applies to a locked tower: add "
                             f"--{lock.replace('_', '-')}")
    text_cfg = (config or {}).get("text_cfg", {})
    if args.lock_text and not args.lock_text_freeze_layer_norm and config is not None \
            and not text_cfg.get("hf_model_name"):
        raise ValueError(f"--lock-text: {args.model}'s own text tower locks its layer norms "
                         "with it (open_clip asserts so): add --lock-text-freeze-layer-norm")


def check_backend(args) -> None:
    """A forced DiVE backend (--dive-backend, else $DIVE_FAST_BACKEND) that can run on this
    device, named as the user set it."""
    from ..ops import backends
    requested, source = args.dive_backend, "--dive-backend"
    if not requested and os.environ.get(backends.ENV_VAR):
        requested, source = os.environ[backends.ENV_VAR], f"${backends.ENV_VAR}"
    if requested and requested != "auto":
        why = backends.unavailable_reason(requested, torch.device(args.device).type)
        if why:
            raise ValueError(f"{source} {requested}: this DiVE backend cannot run here: {why}")


def check_model(args) -> None:
    model_and_tag(args.model, args.pretrained)


def check_inputs(args, world_size: int = 1) -> None:
    """The files and folders a run reads and writes, before any expensive work. Under
    torchrun the process group starts here: rank 0 lists the data folders and digests the
    CSVs, and sends the listings and digests to the other ranks (``listing``)."""
    listing.forget()  # a new run: its folders are read anew
    if world_size > 1:
        distributed.init_from_env(args.device)
    protocol.chosen_templates(args.templates)
    if args.imagenet_root:
        args.task = protocol.with_imagenet_root(args.task, args.imagenet_root)
        args.imagenet_root = None  # now in --task (a checked run is not expanded twice)
    if args.zeroshot_suite:
        args.task = with_suite(args.task, *args.zeroshot_suite)
        args.zeroshot_suite = None  # now in --task
    folders = validate.eval_folders(args.task)
    # What the data is, by content (a resume must see the same data, however it is spelled).
    args.data_ids = {"target": None, "reference": None}
    if args.train_folder:
        folder = validate.image_folder(args.train_folder, "--train-folder",
                                       templates=protocol.chosen_templates(args.templates))
        if len(folder.classnames) < 2 and METHODS[args.method].trains:
            raise ValueError(f"--train-folder {args.train_folder}: one class "
                             f"({folder.classnames[0]!r}); a classification task needs two or more")
        args.data_ids["target"] = folder.fingerprint()
    if args.reference_csv:
        pairs = validate.caption_csv(args.reference_csv, "--reference-csv", **csv_options(args))
        args.data_ids["reference"] = distributed.from_rank0(pairs.fingerprint)
    if args.reference_shards:
        shards = validate.shard_urls("--reference-shards", args.reference_shards)
        args.data_ids["reference"] = shards_fingerprint(shards)
        check_resampling(args)
    elif args.dataset_resampled or args.reference_upsampling_factors:
        flag = "--dataset-resampled" if args.dataset_resampled else \
            "--reference-upsampling-factors"
        raise ValueError(f"{flag}: draws webdataset shards with replacement; give "
                         "--reference-shards")
    validate.rsa_pairs(args)
    if is_weights_path(args.pretrained) and not Path(args.pretrained).is_file():
        raise FileNotFoundError(f"--pretrained: checkpoint not found: {args.pretrained}")
    if args.resume not in (None, "auto") and not Path(args.resume).is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {args.resume}")
    validate.outside_inputs(args.out, "--out", {"--train-folder": args.train_folder, **{
        f"--task {f.kind}:{f.name}": f.path for f in folders}})
    validate.output_paths(args.out, "--out")
    claim_out(args, Path(args.out))
    if args.pretrained is None and args.model in TINY_MODELS and \
            not tiny_checkpoint(args.model, args.world_seed).is_file():  # pre-training will write
        validate.writable_folder(cache_dir(),
                                 f"the model cache (${CACHE_ENV} or ~/.cache/dive_fast)")


def check_resampling(args) -> None:
    """--reference-upsampling-factors: only with --dataset-resampled (as open_clip_train
    asserts), one number per '::' source."""
    factors = args.reference_upsampling_factors
    if factors is None:
        return
    if not args.dataset_resampled:
        raise ValueError(f"--reference-upsampling-factors {factors}: weights apply to shards "
                         "drawn with replacement, so it needs --dataset-resampled (as in "
                         "open_clip_train); without it the '::' sources are read one after "
                         "another, each pair once per epoch")
    try:
        shard_plan.parse_factors(factors, len(data.shard_sources(args.reference_shards)))
    except ValueError as exc:
        raise ValueError(f"--reference-upsampling-factors {exc}") from None


def set_tf32(enabled: bool, device: str) -> None:
    """On CUDA, TF32 matmuls and convolutions as --tf32 says (open_clip_train turns on
    ``torch.backends.cuda.matmul.allow_tf32`` for every CUDA run; cuDNN's is on by default)."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def parse(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args, checked: bool = False) -> dict:
    """Runs what ``args`` (``parse``) asks; ``checked``: ``check_args`` already ran."""
    if not checked:
        check_args(args, distributed.world_size_from_env())
    rank, world, device = distributed.init_from_env(args.device)
    args.device, args.world_size = device, world
    set_tf32(args.tf32, device)
    if args.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    try:
        with runlock.hold(args.out, enabled=distributed.is_main()):  # this run owns --out
            report = run_owned(args, rank, world, device)
    finally:
        parallel.release_groups()
        listing.forget()
    distributed.shutdown()
    return report


def main(argv=None):
    """The Python entry: errors raise (``ValueError`` naming the argument, ...)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parse(argv))


def cli(argv=None) -> None:
    """The command's entry: an argument error is one line (argparse's), not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()

    def run_or_say(args):
        try:
            return run(args, checked=True)
        except RUN_ERRORS as exc:  # what a user can act on: one line, not a traceback
            parser.exit(1, f"{parser.prog}: error: {exc}\n")
        except KeyboardInterrupt:
            parser.exit(130, f"{parser.prog}: interrupted; {last_checkpoint(args.out)}\n")
    run_checked(parser, lambda args: check_args(args, distributed.world_size_from_env()),
                run_or_say, argv)


def last_checkpoint(out) -> str:
    """Where an interrupted run can continue from, in words."""
    found = sorted((Path(out) / "checkpoints").glob("step-*.pt"))
    if not found:
        return f"no checkpoint was written yet in {Path(out) / 'checkpoints'}"
    return f"the last checkpoint is {found[-1]} (the same command with --resume auto continues)"


# Errors of a run that name their cause and remedy (a full disk, another run holding
# --out, a checkpoint that cannot be resumed or read); anything else keeps its traceback.
RUN_ERRORS = (DiskFull, FolderInUse, ResumeMismatch, CorruptCheckpoint, FileExistsError,
              StartMismatch, DownloadFailed)


if __name__ == "__main__":
    cli(sys.argv[1:])
