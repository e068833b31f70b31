"""The training loop: steps ``run.start_step`` .. ``--steps`` of a built ``Run``, the
metrics log (the host reads device values only at log steps), the evaluation every
``--eval-every`` steps, checkpoints (the newest ``--keep`` kept) and the non-finite
policy (``--on-nonfinite``)."""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from .._cli.progress import progress_bar
from . import distributed, metrics_log, parallel
from .build import Run, load_model
from .checkpoint import atomic_save, checkpoint_state, prune
from .fileio import DiskFull
from .precision import autocast_dtype
from .report_tables import summary_value
from .scoring import evaluate


def whole_model(run: Run):
    """The model being trained, whole on every rank: itself, or for a sharded one a whole
    copy loaded with its gathered weights (a collective)."""
    model = run.method.model
    if not parallel.is_sharded(model):
        return model
    state = parallel.whole_model_state(model)
    whole = load_model(run.args, run.pretrained, run.args.device).model
    whole.load_state_dict(state)
    return whole


def evaluate_during_training(run: Run, sets, keep_best=None, step: int = 0) -> dict | None:
    """The evaluation of the model being trained (its trained heads too), flattened for the
    metrics log (rank 0's; None elsewhere): every rank calls it and scores its share of each
    set. ``keep_best`` (``weights.KeepBest``, rank 0's) keeps the weights when --keep-best's
    metric is the best so far."""
    args, method = run.args, run.method
    model = whole_model(run)
    report = evaluate(model, run.bundle.tokenizer, sets, heads=method.eval_heads(),
                      device=args.device, workers=args.workers, progress=False,
                      amp_dtype=autocast_dtype(args.precision, args.device), rank=run.rank,
                      world=run.world)
    result = None
    if distributed.is_main():
        if keep_best is not None:
            keep_best.offer(step, summary_value(report, args.keep_best), model.state_dict())
        result = {f"eval/{name}": value for kind in ("id", "ood", "zeroshot")
                  for name, value in report[kind].items()}
        result.update({f"eval/{kind}_mean": report[f"{kind}_mean"]
                       for kind in ("id", "ood", "zeroshot")})
    method.train()  # evaluate() left the towers in eval mode
    return result


def train_loop(run: Run, evaluator=None) -> int:
    """Runs steps ``run.start_step`` .. ``--steps``; returns the unreadable samples skipped
    (all ranks). ``evaluator(step=)`` (every rank calls it; rank 0's result is logged) runs
    every ``--eval-every`` steps."""
    args, method, opt, sched, guard = run.args, run.method, run.opt, run.sched, run.guard
    start_step, device, out = run.start_step, method.device, Path(args.out)
    stream = run.batches()
    main_proc = distributed.is_main()
    reporters = args.report_to.split(",")
    metrics = metrics_log.MetricsSink(
        out, start_step, tensorboard="tensorboard" in reporters,
        wandb=metrics_log.start_wandb(args, out) if "wandb" in reporters else None) \
        if main_proc else None
    ckpt_dir = out / "checkpoints"
    # The checkpoints pruning may delete: this run's, from the step it resumed at down (the
    # run owns --out, under its lock), then each new one once it is durable.
    written = sorted(p for p in ckpt_dir.glob("step-*.pt")
                     if int(p.stem.split("-")[1]) <= start_step) if main_proc else []
    last_ckpt = written[-1] if written else None
    bar = progress_bar(range(start_step, args.steps), initial=start_step, total=args.steps,
                       desc=args.method, disable=args.no_progress or not main_proc)
    t_last, n_samples, n_steps, data_time, skipped = time.perf_counter(), 0, 0, 0.0, 0
    method.train()
    if run.rng is not None:  # a resumed run continues the random streams where they stopped
        torch.set_rng_state(run.rng["torch"])
        random.setstate(run.rng["python"])
    for step in bar:
        t_wait = time.perf_counter()
        batch = next(stream).to(device)
        data_time += time.perf_counter() - t_wait  # waiting for the loader (open_clip's)
        values = run.step(batch, step, opt, sched, guard)
        n_samples += batch.samples
        n_steps += 1
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
                    f"non-finite loss or gradients at step {first_bad} (its update was "
                    f"skipped); last good checkpoint: {last_ckpt or 'none'} (resume with "
                    f"--resume {last_ckpt or 'auto'}, or pass --on-nonfinite skip)")
            if main_proc:
                now = time.perf_counter()
                row.pop("skipped", None)
                row = {"step": done, **row, "lr": sched.get_last_lr()[0],
                       "samples_per_s": n_samples * run.world / (now - t_last),
                       "samples_per_s_per_gpu": n_samples / (now - t_last),
                       "data_time": data_time / n_steps,
                       "skipped_samples": skipped, "skipped_steps": skipped_steps}
                metrics.write(row)
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "samples_per_s")},
                                refresh=False)
                t_last, n_samples, n_steps, data_time = now, 0, 0, 0.0
        if evaluator is not None and done % args.eval_every == 0 and done < args.steps:
            result = evaluator(step=done)  # the last step's evaluation is the final report's
            if main_proc:
                metrics.write({"step": done, **result})
        if (done % args.checkpoint_every == 0 or done == args.steps) and \
                (main_proc or parallel.is_sharded(method.model)):  # FSDP's gather: every rank
            state = checkpoint_state(done, args, method, opt, sched, run.scaler)
            if main_proc:
                try:
                    last_ckpt = atomic_save(state, ckpt_dir / f"step-{done:08d}.pt")
                except DiskFull as exc:
                    raise DiskFull(exc.errno, f"{exc.strerror}. The run stopped at step "
                                   f"{done}; the last good checkpoint is {last_ckpt or 'none'}: "
                                   "free space, then run the same command with --resume "
                                   "auto") from None
                written.append(last_ckpt)
                prune(written, args.keep)
    if metrics:
        metrics.close()
    return distributed.sum_over_ranks(skipped, device)
