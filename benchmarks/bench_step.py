"""Training-step benchmark: what DiVE costs over FLYP, what the lean loop saves, and how it
compares with open_clip's own trainer.

    python benchmarks/bench_step.py                         # dive-tiny on this CPU
    python benchmarks/bench_step.py --model ViT-S-32 --batch 16 --data synthetic --steps 4
    python benchmarks/bench_step.py --device cuda --model ViT-B-16 --batch 256 --amp bf16 \
        --data synthetic
    python benchmarks/bench_step.py --flops-only --model ViT-B-16 --batch 32 --steps 2 \
        --data synthetic --workers 0 --ref-size 64 \
        --variants "flyp-B+B'" dive-fast "flyp-B+B'-notrunc" dive-fast-notrunc

Every variant is the run the training app builds (``common.user_run``: its argument checks,
then ``dive_fast.train.build.build_run``: the method module, frozen copy and embedding cache,
optimiser, schedule, the data stream, DDP-free here), stepped by its own step function
(``step.train_step``: non-finite guard, schedule, logit-scale clamp included), each
variant in its own process (so peak memory is its own), interleaved over rounds:
  flyp-B        FLYP at batch B
  flyp-B+B'     FLYP at batch B + B' (as many trainable samples as DiVE's step)
  replay-B+B'   FLYP on B target samples plus the contrastive loss on B' reference pairs
                (``--method flyp+replay``): the trainable work DiVE cannot avoid, captions
                included (with text truncation, captions longer than class prompts cost more)
  dive-naive    DiVE as written plainly: separate trainable forwards for target and
                reference, the frozen forward every step after them, the eager loss
                (the ``torch`` backend), no cache
  dive-fast     ``--method dive`` as users run it: one concatenated forward, cached frozen
                embeddings, the fused loss
  dive-seq      no cache: the frozen forward every step, after the trainable one
  dive-cosched  no cache: the frozen forward on a side CUDA stream (= dive-seq on a CPU)
  open_clip_train   open_clip's trainer (``python -m open_clip_train.main``, its synthetic
                data) at batch B + B', same model, image size, precision and AdamW: what
                users run today, beside flyp-B+B'
  ...-notrunc   the variant with --no-text-truncation (text at the full context length)
  ...-compiled  the variant with --compile (open_clip_train: its --torchcompile), warmed
                up until two steps in a row compile nothing; compile_s is what the
                warm-up steps took beyond a steady step (open_clip_train: its first step's)
``--flops-only`` counts each variant's FLOPs instead, the mean over ``--steps`` steps (any
device, no timing: the work a GPU run will do, counted on a CPU). Otherwise reports
samples/s, FLOPs, peak memory and a per-step breakdown (data; and from a short profiled
run after the timed steps: trainable forward, frozen forward, losses, backward,
optimiser), as long-format CSV.
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    check_common,
    environment,
    result_path,
    synchronize,
    train_cli,
    user_run,
    write_csv,
)
from tables import step_table  # noqa: E402

from dive_fast._cli.arguments import DefaultsFormatter  # noqa: E402

VARIANTS = ("open_clip_train", "flyp-B", "flyp-B+B'", "flyp-B+B'-notrunc", "replay-B+B'",
            "dive-naive", "dive-fast", "dive-fast-notrunc", "open_clip_train-compiled",
            "flyp-B+B'-compiled", "dive-fast-compiled", "dive-seq", "dive-cosched")
DEFAULT_VARIANTS = VARIANTS[:11]
PHASES = ("data", "trainable_fwd", "frozen_fwd", "losses", "backward", "optimizer")
# open_clip's profile: GFLOP per image-text pair forward (x3 for forward + backward).
GFLOP_PER_PAIR = {"ViT-B-16": 41.0, "ViT-B-32": 14.8}


def naive_dive():
    """DiVE written plainly (the baseline): its own subclass of the user's method."""
    from dive_fast.train.methods import DiVE

    class NaiveDiVE(DiVE):
        def forward(self, batch, step):
            (img_t,), (txt_t,) = self.encode([batch.images], [self.prompts(batch.labels, step)])
            (img_r,), (txt_r,) = self.encode([batch.ref_images], [batch.ref_tokens])
            img0, txt0 = self.frozen.embed(batch.ref_images, batch.ref_tokens)
            return {"clip": self.clip(img_t, txt_t),
                    "dive": self.dive(img_r, img0, txt_r, txt0)}
    return NaiveDiVE


def variant_cli(args, variant, out) -> list[str]:
    """The command line a user would give ``dive_fast.train`` for this variant."""
    B, Bp = args.batch, args.ref_batch or args.batch
    method = {"flyp": "flyp", "replay": "flyp+replay"}.get(variant.split("-")[0], "dive")
    cli = train_cli(method, args.model,
                    B + Bp if variant.startswith("flyp-B+B'") else B, Bp, args.ref_size,
                    args.amp, args.device, args.workers, args.warmup + args.steps + 40, out)
    if variant.endswith("-notrunc"):
        cli += ["--no-text-truncation"]
    if variant.endswith("-compiled"):
        cli += ["--compile"]
    if variant in ("dive-naive", "dive-seq", "dive-cosched"):
        cli += ["--no-frozen-cache"]
    if variant in ("dive-naive", "dive-seq"):
        cli += ["--no-co-schedule"]
    if variant == "dive-naive":
        cli += ["--dive-backend", "torch"]
    return cli


def peak_memory(on_gpu: bool) -> float:
    return (torch.cuda.max_memory_allocated() / 2**20 if on_gpu else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def timing_row(args, variant, step_times, samples, on_gpu, first_step_s) -> dict:
    """The CSV row of one variant: median step, spread, samples/s, peak memory (read here,
    before any step outside the timed ones)."""
    med = statistics.median(step_times)
    q = statistics.quantiles(step_times, n=5)
    row = {"variant": variant, "model": args.model, "image_size": args.image_size or "",
           "B": args.batch, "B_ref": args.ref_batch or args.batch, "samples_per_step": samples,
           "step_ms": med * 1e3, "step_ms_p20": q[0] * 1e3, "step_ms_p80": q[3] * 1e3,
           "samples_per_s": samples / med, "peak_mem_MiB": peak_memory(on_gpu),
           "peak_mem_kind": "cuda max allocated" if on_gpu else "process max RSS",
           "first_step_ms": first_step_s * 1e3,
           "compile_s": max(0.0, first_step_s - med) if variant.endswith("-compiled") else 0.0}
    return row


def flop_fields(args, step_s: float, samples: int, on_gpu: bool, flops: float | None) -> dict:
    """The step's work and FLOP rate (MFU on a GPU): from ``flops`` counted as the step ran,
    else open_clip's per-pair profile of the model (77-token text), else nothing."""
    source = "counted"
    if flops is None and args.model in GFLOP_PER_PAIR and not args.image_size:
        flops, source = 3 * GFLOP_PER_PAIR[args.model] * 1e9 * samples, "open_clip profile"
    if not flops:
        return {}
    row = {"GFLOP_per_step": flops / 1e9, "TFLOP_per_s": flops / step_s / 1e12,
           "flop_count": source}
    if on_gpu:
        row["MFU"] = flops / step_s / (args.peak_tflops * 1e12)
    return row


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out, query, key, value)


def step_flops(one_step, first: int, steps: int = 1) -> tuple[float, int]:
    """(FLOPs, samples) of a step as it runs, the mean over ``steps`` steps from ``first``:
    matmuls, convolutions and attention of the trainable forward, of the frozen forward when
    not cached, and of the backward, counted eagerly by torch's FlopCounterMode (truncated
    text at the length it runs at; element-wise work and the DiVE op are not counted). The
    CPU's attention kernel gets torch's attention formula, which it lacks, so that a CPU
    counts what a GPU does."""
    from torch.utils.flop_counter import FlopCounterMode
    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward:
                         _cpu_attention_backward}
    with torch.compiler.set_stance("force_eager"), \
            FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
        samples = [one_step(first + i)[2] for i in range(steps)]
    return counter.get_total_flops() / steps, samples[0]


def run_open_clip_train(args) -> dict:
    """open_clip's own trainer, as users start it, on its synthetic data (one image and
    caption, transformed per sample) at batch B + B': its per-step times from its log."""
    import os
    import re

    from open_clip_train.main import main as open_clip_main

    import dive_fast.train.models  # noqa: F401  (registers the tiny configs with open_clip)
    on_gpu = args.device.startswith("cuda")
    batch = args.batch + (args.ref_batch or args.batch)
    steps = args.warmup + args.steps
    argv = ["--dataset-type", "synthetic", "--train-num-samples", str(steps * batch),
            "--batch-size", str(batch), "--epochs", "1", "--model", args.model,
            "--precision", "amp_bf16" if args.amp == "bf16" else "fp32",
            "--workers", str(args.workers), "--lr", "1e-4", "--wd", "0.1", "--warmup", "1",
            "--log-every-n-steps", "1", "--logs", "none", "--name", "bench", "--seed", "0",
            "--device", args.device]
    argv += ["--force-image-size", str(args.image_size)] if args.image_size else []
    argv += ["--torchcompile"] if args.variant.endswith("-compiled") else []
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # --logs none: its log lands in ./none/bench/, nothing is saved
        try:
            open_clip_main(argv)
            log = Path(tmp, "none", "bench", "out.log").read_text()
        finally:
            os.chdir(cwd)
    rates = [float(r) for r in re.findall(r"Batch \(t\): [0-9.]+, ([0-9.e+]+)/s,", log)]
    if len(rates) != steps:
        raise RuntimeError(f"open_clip_train logged {len(rates)} steps, expected {steps}")
    times = [batch / r for r in rates]
    row = timing_row(args, args.variant, times[args.warmup:], batch, on_gpu, times[0])
    return {**row, **flop_fields(args, row["step_ms"] / 1e3, batch, on_gpu, None)}


def run_variant(args) -> dict:
    from dive_fast.train.step import train_step

    torch.manual_seed(0)
    device, variant = args.device, args.variant
    if variant.startswith("open_clip_train"):
        return run_open_clip_train(args)
    on_gpu = device.startswith("cuda")
    run = user_run(variant_cli(args, variant, Path(args.cache_dir)), args.data,
                   args.image_size)
    method, step_fn, stream, opt, sched, guard = (run.method, run.step, run.batches(), run.opt,
                                                  run.sched, run.guard)
    if variant == "dive-naive":
        method = naive_dive()(
            run.model, run.bundle.tokenizer, run.target.classnames, run.target.templates,
            device=device, config=method.config, frozen=method.frozen,
            amp_dtype=method.amp_dtype)
        step_fn = functools.partial(train_step, method, method)  # the same weights: run.opt
        method.train()
    step_times, data_times = [], []
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    def one_step(step):
        t0 = time.perf_counter()
        batch = next(stream).to(device)
        synchronize(device)
        t1 = time.perf_counter()
        step_fn(batch, step, opt, sched, guard)
        synchronize(device)
        return t1 - t0, time.perf_counter() - t0, batch.samples

    if args.flops_only:  # the work of a step, without timing it
        flops, samples = step_flops(one_step, 0, args.steps)
        return {"variant": variant, "model": args.model, "B": args.batch,
                "B_ref": args.ref_batch or args.batch, "samples_per_step": samples,
                "GFLOP_per_step": flops / 1e9, "steps_counted": args.steps,
                "flop_count": "counted"}
    warmup = compiled_warmup(one_step, args.warmup) if variant.endswith("-compiled") else \
        [one_step(step)[1] for step in range(args.warmup)]
    for step in range(len(warmup), len(warmup) + args.steps):
        data_s, step_s, samples = one_step(step)
        step_times.append(step_s)
        data_times.append(data_s)
    row = timing_row(args, variant, step_times, samples, on_gpu,
                     warmup[0] if warmup else step_times[0])
    med = row["step_ms"] / 1e3
    if variant.endswith("-compiled"):  # every step that compiled, less a steady step each
        row.update(compile_s=sum(max(0.0, t - med) for t in warmup), warmup_steps=len(warmup))
    row.update(flop_fields(args, med, samples, on_gpu,
                           step_flops(one_step, len(warmup) + args.steps)[0]))
    return {**row, "baseline_rss_MiB": baseline_rss / 1024,
            "data_ms": statistics.median(data_times) * 1e3,
            **profile_phases(one_step, len(warmup) + args.steps + 1, 3, on_gpu)}


def compiled_warmup(one_step, least: int, most: int = 30) -> list[float]:
    """Warm-up steps of a compiled variant: at least ``least``, then until two steps in a row
    compile nothing (new text lengths and batch shapes recompile the first few steps; timing
    them would time the compiler). Returns their times."""
    from torch._dynamo.utils import counters
    times, quiet = [], 0
    while len(times) < most and (len(times) < least or quiet < 2):
        graphs = counters["stats"]["unique_graphs"]
        times.append(one_step(len(times))[1])
        quiet = quiet + 1 if counters["stats"]["unique_graphs"] == graphs else 0
    return times


def _is_engine_node(event) -> bool:
    return event.name.startswith("autograd::engine::evaluate_function")


def _inside_engine_node(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if _is_engine_node(parent):
            return True
        parent = parent.cpu_parent
    return False


def profile_phases(one_step, first_step: int, steps: int, on_gpu: bool) -> dict:
    """Mean ms per step of each labelled phase of ``train_step`` (CPU: wall time of the
    range; GPU: kernel time under it), from a short run under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            one_step(first_step + i)
    total = {}
    for e in prof.key_averages():
        if e.key.startswith("dive_fast."):
            t = e.device_time_total if on_gpu else e.cpu_time_total
            total[e.key[len("dive_fast."):]] = t / 1e3 / steps
    if on_gpu:  # autograd runs a CUDA backward on its own thread, outside the main thread's
        # "dive_fast.backward" range: its kernels sit under the engine's per-node events
        # (the outermost ones: a nested backward's nodes are inside them already).
        total["backward"] = sum(e.device_time_total for e in prof.events()
                                if _is_engine_node(e) and not _inside_engine_node(e)) / 1e3 / steps
    fwd = total.get("forward", 0.0)
    trainable, frozen = total.get("trainable_forward", 0.0), total.get("frozen_forward", 0.0)
    return {"trainable_fwd_ms": trainable, "frozen_fwd_ms": frozen,
            "losses_ms": max(0.0, fwd - trainable - frozen),
            "backward_ms": total.get("backward", 0.0), "optimizer_ms": total.get("optimizer", 0.0)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--variant", choices=VARIANTS, default=None,
                   help="(internal) run one variant in this process (unset: all, each in its own)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                   help="variants to time")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--model", default="dive-tiny", help="model (random weights)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side (unset: the model's own)")
    p.add_argument("--batch", type=int, default=128, help="target batch B")
    p.add_argument("--ref-batch", type=int, default=None, help="reference batch B' (unset: B)")
    p.add_argument("--ref-size", type=int, default=4096, help="reference pairs in the data set")
    p.add_argument("--amp", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    p.add_argument("--data", choices=["world", "synthetic"], default="world",
                   help="world images, or random ones (model-bound timing)")
    p.add_argument("--steps", type=int, default=12, help="steps timed per variant and round")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing")
    p.add_argument("--workers", type=int, default=1, help="data loader processes")
    p.add_argument("--rounds", type=int, default=2,
                   help="variants run this many times, interleaved")
    p.add_argument("--flops-only", action="store_true",
                   help="count the FLOPs of --steps steps per variant (eager, any device; "
                        "their mean), time nothing")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the device's peak for MFU (H100/H200 bf16 dense)")
    p.add_argument("--cache-dir", default=None, help="embedding cache folder (unset: a "
                   "temporary one per run, so that no stale cache is timed)")
    p.add_argument("--out", default=None,
                   help="CSV (unset: benchmarks/results/local/step_<device>.csv)")
    return p


def check_args(args) -> None:
    check_common(args, {"batch": 1, "ref_batch": 1, "ref_size": 1, "steps": 1, "warmup": 0,
                        "workers": 0, "rounds": 1, "image_size": 8, "peak_tflops": 1e-9})


def main(argv=None):
    from dive_fast._cli.arguments import run_checked
    return run_checked(build_parser(), check_args, lambda args: run(args, argv), argv)


def run(args, argv=None):
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.flops_only and any(v.startswith("open_clip_train") for v in args.variants):
        print("--flops-only: open_clip_train's step runs inside its trainer, not counted")
        args.variants = [v for v in args.variants if not v.startswith("open_clip_train")]
    if not args.variants:
        print("no variants to run")
        return
    env = environment(args.device)
    rows, failed = [], []
    out = args.out or result_path("step_flops" if args.flops_only else "step", args.device)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or tmp
        common = [a for a in (argv if argv is not None else sys.argv[1:])]
        for rnd in range(1 if args.flops_only else args.rounds):  # counts do not vary
            for variant in args.variants:
                proc = subprocess.run([sys.executable, __file__, *common, "--cache-dir", cache,
                                       "--variant", variant], capture_output=True, text=True)
                if proc.returncode:  # said, and the other variants still run
                    print(f"round {rnd} {variant} FAILED:\n{proc.stderr[-4000:]}", flush=True)
                    failed.append(variant)
                    continue
                row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "round": rnd, **env}
                rows.append(row)
                write_csv(rows, out)  # after every variant: a run cut short keeps what it has
                if args.flops_only:
                    print(f"{variant:12s} {row['GFLOP_per_step']:10.3f} GFLOP a step of "
                          f"{row['samples_per_step']} samples", flush=True)
                    continue
                print(f"round {rnd} {variant:12s} step {row['step_ms']:8.1f} ms  "
                      f"{row['samples_per_s']:7.1f} samples/s  "
                      f"peak {row['peak_mem_MiB']:7.0f} MiB  "
                      + " ".join(f"{ph}={row[ph + '_ms']:.1f}" for ph in PHASES
                                 if ph + "_ms" in row), flush=True)
    if rows and not args.flops_only:
        print("\n" + step_table(rows))
    if failed:
        raise RuntimeError(f"variants failed: {', '.join(failed)} (their errors above)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
