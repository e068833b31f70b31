"""Co-scheduled against sequential frozen forward: equal losses and gradients, and the time
of each (the step the training app runs, ``--no-frozen-cache``, with and without
``--co-schedule``).

    python benchmarks/gpu_check/check_streams.py --device cuda --model ViT-B-16 --batch 256 \
        --amp bf16

On a CPU there is no side stream: both runs are sequential, and the check proves only
that the script and the code path work (``gpu_check.sh --dry-run`` runs it so).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common
from common import SyntheticCaptions, SyntheticTask, environment, synchronize, write_csv  # noqa: E402

from dive_fast._cli.arguments import DefaultsFormatter  # noqa: E402


def one_run(args, co_schedule: bool, steps: int):
    """(losses of the first step, gradients of the first step, median step ms)."""
    from dive_fast.train import cli
    from dive_fast.train.build import build_run
    from dive_fast.train.models import load_clip

    torch.manual_seed(0)
    argv = ["--method", "dive", "--model", args.model, "--pretrained", "", "--batch-size",
           str(args.batch), "--amp", args.amp, "--device", args.device, "--workers", "0",
           "--steps", str(steps), "--no-frozen-cache", "--no-progress", "--out", "/tmp",
           "--lr", "0", "--wd", "0", "--warmup", "1"]  # lr 0: no drift
    argv += ["--co-schedule"] if co_schedule else ["--no-co-schedule"]
    targs = cli.parse(argv)
    bundle = load_clip(args.model, None, args.device)
    size = bundle.image_size
    target, refs = SyntheticTask(1024, size), SyntheticCaptions(1024, size)
    run = build_run(targs, bundle=bundle, target=target, reference=(refs, None))
    method, step_fn, opt, sched, guard = run.method, run.step, run.opt, run.sched, run.guard
    stream = run.batches()
    batches = [next(stream).to(args.device) for _ in range(steps)]
    method.train()
    values = step_fn(batches[0], 0, opt, sched, guard)
    first = {k: v.float().item() for k, v in values.items()}
    grads = {n: p.grad.detach().float().clone() for n, p in method.named_parameters()
             if p.grad is not None}
    times = []
    for step in range(1, steps):
        synchronize(args.device)
        t0 = time.perf_counter()
        step_fn(batches[step], step, opt, sched, guard)
        synchronize(args.device)
        times.append((time.perf_counter() - t0) * 1e3)
    return first, grads, statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (a side stream needs cuda)")
    p.add_argument("--model", default="dive-micro", help="model (random weights)")
    p.add_argument("--batch", type=int, default=16, help="B = B' per step")
    p.add_argument("--amp", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    p.add_argument("--steps", type=int, default=6, help="steps timed per mode")
    p.add_argument("--out", default=None, help="CSV of the comparison (unset: none written)")
    return p

def main(argv=None) -> bool:
    p = build_parser()
    args = p.parse_args(argv)
    seq_losses, seq_grads, seq_ms = one_run(args, False, args.steps)
    co_losses, co_grads, co_ms = one_run(args, True, args.steps)
    loss_gap = max(abs(co_losses[k] - seq_losses[k]) / max(abs(seq_losses[k]), 1e-12)
                   for k in seq_losses if k != "skipped")
    grad_gap = max(((co_grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item()
                   for n, g in seq_grads.items())
    # The same kernels on either stream: a race (a read before the write it needs) gives
    # gross errors; atomics in some backward kernels may differ in the last bits.
    ok = loss_gap <= 1e-5 and grad_gap <= 1e-3
    row = {"model": args.model, "B": args.batch, "amp": args.amp, "sequential_ms": seq_ms,
           "co_scheduled_ms": co_ms, "speed-up": seq_ms / co_ms, "max_loss_gap": loss_gap,
           "max_grad_gap": grad_gap, "equal": ok,
           "side_stream": args.device.startswith("cuda"), **environment(args.device)}
    print(json.dumps(row))
    if args.out:
        write_csv([row], args.out)
    print("STREAMS", "EQUAL" if ok else "DIFFER")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
