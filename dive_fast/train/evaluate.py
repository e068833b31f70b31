"""The evaluation command: a model, a checkpoint or a finished run (and its WiSE-FT mixes)
scored on the world or on ``--task`` folders, with RSA against its recorded start; the
scoring itself is ``scoring.py`` (heads: ``heads.py``, RSA: ``rsa.py``, tables:
``report_tables.py``).

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

from . import listing, start_weights, validate
from .checkpoint import (
    CorruptCheckpoint,
    WrongModel,
    load_checkpoint,
    load_model_weights,
    load_weights_file,
)
from .data import (
    add_csv_flags,
    csv_options,
    heldout_pairs,
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
from .protocol import chosen_templates, with_imagenet_root
from .report_tables import format_table
from .scoring import evaluate, evaluate_variants, folder_eval_sets, world_eval_sets, world_rsa_set
from .suite import with_suite
from .validate import EvalFolder
from .weights import FINAL, model_state, save_weights
from .wise_ft import WeightMix, parse_alphas, plot_id_ood

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
