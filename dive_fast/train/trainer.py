"""The run behind ``python -m dive_fast.train`` (its command line: ``cli.py``), start to end:
claim --out, find what to resume, build the run (``build.build_run``), measure the zero-shot
row, train (``loop.train_loop``), evaluate and report.

Writes to --out: config.json, metrics.jsonl, curves.png, checkpoints/ (atomic, with a
digest, the newest --keep kept), report.json and table.md (zero-shot row, fine-tuned row,
WiSE-FT rows), final.safetensors (the model's weights alone, as open_clip loads them) and,
with --keep-best, best.safetensors and best.json. A run owns its --out (a lock while it
runs; another run's folder only with --resume: ``checkpoint.claim_out``), and checks every
argument and input before any expensive work (``cli.check_args``).
"""
from __future__ import annotations

import functools
import json
import logging
import random
import uuid
from pathlib import Path

import torch

from . import distributed, metrics_log, start_weights
from .build import Run, build_run, load_model
from .checkpoint import claim_out, load_resume
from .fileio import atomic_write_json, atomic_write_text, remove_stale_temporaries
from .loaders import data_sources, eval_sets
from .loop import evaluate_during_training, train_loop, whole_model
from .precision import autocast_dtype
from .report_tables import format_table, summary_value
from .scoring import evaluate, evaluate_variants
from .weights import FINAL, KeepBest, model_state, save_weights
from .wise_ft import WeightMix

log = logging.getLogger("dive_fast.train")


LOG_FILE = "out.log"  # in --out, as open_clip_train's logs/NAME/out.log


def run_owned(args, rank, world, device) -> dict:
    """The run, on rank 0 also logged to --out/out.log (appended to by a resumed run)."""
    if not distributed.is_main():
        return _run_owned(args, rank, world, device)
    handler = logging.FileHandler(Path(args.out) / LOG_FILE, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        return _run_owned(args, rank, world, device)
    finally:
        root.removeHandler(handler)
        handler.close()


def _run_owned(args, rank, world, device) -> dict:
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    out = Path(args.out)
    main_proc = distributed.is_main()
    claim_out(args, out)
    if main_proc:  # a killed write's leftovers (this run holds --out's lock)
        stale = [p for d in (out, out / "checkpoints", out / "cache")
                 for p in remove_stale_temporaries(d)]
        if stale:
            log.info("removed %d temporary file(s) a killed run left, e.g. %s", len(stale),
                     stale[0])
    distributed.barrier()  # before any rank writes its share of the cache (a .tmp part)
    resume = load_resume(args)  # a corrupt or mismatched checkpoint fails now
    # The run's identity: a resume continues the checkpoint's run (``claim_out`` compares it).
    args.run_id = (resume or {}).get("run_id") or uuid.uuid4().hex
    args.start = None  # the starting weights' record, once they are loaded
    if main_proc:
        write_config(args)
    report, pre_state, sets, rsa_set = {}, None, None, None
    log.info("python -m dive_fast.train %s", json.dumps(vars(args), default=str))
    amp_dtype = autocast_dtype(args.precision, device)
    keep_best = KeepBest(out, args.keep_best, resume is not None) \
        if args.keep_best and main_proc else None

    def as_loaded(bundle):
        """The model before the method takes it: its weights (for WiSE-FT), the evaluation
        sets, and the zero-shot row (each rank scores its share, before any sharding)."""
        nonlocal pre_state, sets, rsa_set
        pre_state = model_state(bundle.model)
        pre_state = record_start(args, bundle, pre_state, resume, main_proc)
        sets, rsa_set = eval_sets(args, bundle)
        report["zero-shot"] = evaluate(bundle.model, bundle.tokenizer, sets, device=device,
                                       workers=args.workers, progress=not args.no_progress,
                                       amp_dtype=amp_dtype, rank=rank, world=world)

    run = build_run(args, rank, world, resume=resume, before_method=as_loaded)
    skipped = 0
    if run.opt is not None:  # a method that trains, for --steps > 0
        evaluator = functools.partial(evaluate_during_training, run, sets, keep_best) \
            if args.eval_every else None
        skipped = train_loop(run, evaluator)
    final_report(run, whole_model(run), pre_state, sets, rsa_set, skipped, report, keep_best)
    return report


def write_config(args) -> None:
    atomic_write_text(Path(args.out) / "config.json", json.dumps(vars(args), indent=2))


def record_start(args, bundle, loaded: dict, resume: dict | None, main_proc: bool) -> dict:
    """The weights RSA and WiSE-FT compare with: those loaded, recorded in ``args.start``
    (config.json, checkpoints, the table); for a resume, the checkpoint's recorded start
    (its kept file when the weights loaded now differ, e.g. other random ones)."""
    args.start = start_weights.record(loaded, bundle.pretrained, args.out, keep=main_proc)
    recorded = (resume or {}).get("start")
    if recorded and recorded["sha256"] != args.start["sha256"]:
        source = f"--resume {resume['path']}: its starting weights {recorded['path']}"
        if not recorded["path"] or not Path(recorded["path"]).is_file():
            raise start_weights.StartMismatch(f"{source} are gone, and the weights loaded now are "
                                      "others; RSA and WiSE-FT need the run's own start")
        kept = start_weights.read(recorded["path"])
        start_weights.check(kept, recorded, source)
        loaded = {k: v.to(loaded[k].device) for k, v in kept.items()}
        args.start = recorded
    if main_proc:
        write_config(args)
    return loaded


def final_report(run: Run, model, pre_state, sets, rsa_set, skipped: int, report: dict,
                 keep_best: KeepBest | None = None) -> None:
    """The fine-tuned and WiSE-FT rows added to ``report`` (which holds the zero-shot row)
    in one pass over each set, every rank scoring its share; then rank 0 writes
    final.safetensors (and best.safetensors), table.md, report.json and curves.png, and
    prints the table."""
    args, method, device, out = run.args, run.method, run.args.device, Path(run.args.out)
    ft_state = model_state(model)
    if method.trains and args.steps == 0:
        log.info("--steps 0: evaluation only; the table has the zero-shot row alone")
    if method.trains and args.steps > 0:
        pre_model = load_model(args, run.pretrained, device).model.eval()
        pre_model.load_state_dict(pre_state)  # the run's own start (random weights differ)
        mix = WeightMix(model, pre_state, ft_state)
        rows = {args.method: (1.0, method.eval_heads())}
        rows.update({f"{args.method} wise-ft {alpha:g}": (alpha, method.eval_heads(alpha))
                     for alpha in args.wise_ft_alphas})
        found = evaluate_variants(
            model, run.bundle.tokenizer, sets,
            [(mix.setter(alpha) if len(rows) > 1 else None, heads)
             for alpha, heads in rows.values()],
            pre_model=pre_model, rsa_set=rsa_set, device=device, workers=args.workers,
            progress=not args.no_progress, amp_dtype=autocast_dtype(args.precision, device),
            rank=run.rank, world=run.world)
        report.update(zip(rows, found))
        report[args.method]["skipped_train_samples"] = skipped
        model.load_state_dict(ft_state)
        if keep_best is not None:
            keep_best.offer(args.steps, summary_value(report[args.method], args.keep_best),
                            ft_state)
    if not distributed.is_main():
        return
    save_weights(ft_state, out / FINAL)
    table = format_table(report)
    if rsa_set is None:
        table += "\n\nRSA: no held-out pairs given (--rsa-csv or --rsa-shards)."
    table += "\n\nData: " + "; ".join(f"{part} {src}"
                                      for part, src in data_sources(args).items())
    table += f"\n\nStarting weights: {start_weights.describe(args.start)}."
    atomic_write_text(out / "table.md", table + "\n")
    atomic_write_json(out / "report.json", report)
    if (out / "metrics.jsonl").is_file():
        metrics_log.plot_curves(out / "metrics.jsonl", out / "curves.png")
    print(table)
