"""Memory of DiVE's step against FLYP's: activations saved for backward, peak memory, time.

    python benchmarks/bench_memory.py                      # dive-tiny (world, 32 px), B = B' = 128
    python benchmarks/bench_memory.py --model ViT-B-32 --image-size 64 --batch 16 --data synthetic
    python benchmarks/bench_memory.py --fit-budget    # the largest B in FLYP(128)'s activations
    python benchmarks/bench_memory.py --user-runs     # python -m dive_fast.train, ViT-B-32, 224 px

Every variant is the training app's own run (``common.user_run``: the run
``dive_fast.train.build.build_run`` builds, stepped by its ``train_step``), each in a fresh
process:

  flyp-B       FLYP on the target batch B
  flyp-B+B'    FLYP on B + B' target rows (the compute DiVE's batch costs)
  dive         DiVE, full batch (B target rows, B' reference pairs, frozen cache)
  dive-kK      the same step in K micro-batches (``--batch-size B/K --accum-freq K``)
  ...+ckpt     with ``--grad-checkpointing``

Measured per variant: the bytes autograd saves for backward at their peak during a step
(``dive_fast.train.memory.SavedTensorMeter``: exact, the same on any device; parameters left
out), the peak memory (GPU: max allocated; CPU: the process's max RSS, which includes
weights, optimiser state, data and the Python heap), the frozen tower's weights on the device
per rank (0 once the embedding cache answers every reference pair) and the median step time.
Writes long-format CSV rows (with the device and versions), a markdown table and a PNG.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    check_common,
    environment,
    pyplot,
    result_path,
    synchronize,
    train_cli,
    user_run,
    write_csv,
)

from dive_fast._cli.arguments import DefaultsFormatter  # noqa: E402

ACCUM4 = ["--accum-freq", "4"]  # with --batch-size B/4: a step of B, as open_clip counts it
USER_RUNS = {  # --user-runs: label -> the method's flags
    "flyp (B)": ["--method", "flyp"],
    "dive (full batch, live)": ["--method", "dive", "--no-frozen-cache"],
    "dive --accum-freq 4 (live)": ["--method", "dive", *ACCUM4, "--no-frozen-cache"],
    "dive --accum-freq 4 (cache)": ["--method", "dive", *ACCUM4]}
VARIANTS = ("flyp-B", "flyp-B+B'", "dive", "dive-k2", "dive-k4", "dive-k8")
ALL_VARIANTS = VARIANTS + tuple(v + "+ckpt" for v in VARIANTS)


def variant_cli(variant: str, model: str, batch: int, amp: str, device: str,
                ref_size: int, steps: int, out) -> list[str]:
    """The command line a user would give ``dive_fast.train`` for this variant (``out``:
    where its frozen cache goes)."""
    name, ckpt = variant.removesuffix("+ckpt"), variant.endswith("+ckpt")
    k = int(name.split("-k")[1]) if "-k" in name else 1  # a step of B in k micro-batches of B/k
    extra = (["--accum-freq", str(k)] if k > 1 else []) + \
        (["--grad-checkpointing"] if ckpt else [])
    return train_cli("flyp" if name.startswith("flyp") else "dive", model,
                     2 * batch if name == "flyp-B+B'" else batch // k, batch // k, ref_size, amp,
                     device, 0, steps, out, *extra)


def saved_bytes(run, stream, step_index: int) -> tuple[int, float]:
    """(peak bytes saved for backward during one step of ``stream``, the step's loss)."""
    from dive_fast.train.memory import SavedTensorMeter
    frozen = run.method.frozen
    exclude = [run.method] + ([frozen.model] if frozen and frozen.model is not None else [])
    batch = next(stream).to(run.args.device)
    with SavedTensorMeter(exclude=exclude) as meter:
        values = run.step(batch, step_index, run.opt, run.sched, run.guard)
    return meter.peak, float(values["loss"])


class FrozenTowerLog(logging.Handler):
    """The frozen tower's bytes on this rank as the app logs them (0: no tower, or released
    once the embedding cache answers every reference pair)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def emit(self, record):
        self.bytes = getattr(record, "frozen_tower_bytes", self.bytes)


def run_variant(args) -> dict:
    """One variant in this (fresh) process."""
    import torch

    from dive_fast.train.memory import peak_memory_mib

    torch.manual_seed(0)
    cli = variant_cli(args.variant, args.model, args.batch, args.amp, args.device,
                      args.ref_size, args.warmup + args.steps + 1, args.cache_dir)
    run = user_run(cli, args.data, args.image_size, data_size=args.ref_size)
    stream = run.batches()
    on_gpu = args.device.startswith("cuda")
    for i in range(args.warmup):
        run.step(next(stream).to(args.device), i, run.opt, run.sched, run.guard)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup, args.warmup + args.steps):
        batch = next(stream).to(args.device)
        synchronize(args.device)
        t0 = time.perf_counter()
        run.step(batch, i, run.opt, run.sched, run.guard)
        synchronize(args.device)
        times.append(time.perf_counter() - t0)
    peak = peak_memory_mib(args.device)
    saved, loss = saved_bytes(run, stream, args.warmup + args.steps)
    name = args.variant.removesuffix("+ckpt")
    return {"variant": args.variant, "model": args.model, "image_size": run.bundle.image_size,
            "B": args.batch, "B_ref": args.batch,
            "accum_freq": int(name.split("-k")[1]) if "-k" in name else 1,
            "grad_checkpointing": args.variant.endswith("+ckpt"),
            "saved_for_backward_MiB": saved / 2**20, "peak_mem_MiB": peak,
            "frozen_tower_MiB": (run.frozen.tower_bytes if run.frozen else 0) / 2**20,
            "peak_mem_kind": "cuda max allocated" if on_gpu else "process max RSS",
            "step_ms": statistics.median(times) * 1e3, "steps_timed": len(times), "loss": loss}


def fit_budget(args) -> list[dict]:
    """Largest power-of-two B = B' whose saved activations fit FLYP(budget B)'s, measured."""
    import torch
    rows = []

    def measure(variant, batch):
        torch.manual_seed(0)
        cli = variant_cli(variant, args.model, batch, args.amp, args.device, 2 * batch, 2,
                          args.cache_dir)
        run = user_run(cli + ["--no-frozen-cache"], args.data, args.image_size,
                       data_size=2 * batch)
        return saved_bytes(run, run.batches(), 0)[0]

    budget = measure("flyp-B", args.budget_batch)
    for variant in ("flyp-B", "dive", "dive-k8+ckpt"):
        batch, fits = 8, None
        while batch <= args.max_batch:
            used = measure(variant, batch)
            print(f"  {variant:14s} B={batch:5d}: {used / 2**20:9.1f} MiB saved "
                  f"({used / budget:.2f}x the budget)", flush=True)
            rows.append({"kind": "measured", "variant": variant, "model": args.model, "B": batch,
                         "saved_for_backward_MiB": used / 2**20, "budget_MiB": budget / 2**20})
            if used > budget:
                break
            fits, batch = batch, 2 * batch
        rows.append({"kind": "largest", "variant": variant, "model": args.model,
                     "budget_MiB": budget / 2**20, "budget": f"FLYP at B={args.budget_batch}",
                     "largest_B": fits, "searched_up_to": args.max_batch,
                     "capped": fits is not None and fits * 2 > args.max_batch})
    return rows


def user_runs(args) -> list[dict]:
    """``python -m dive_fast.train`` as a user runs it, each in its own process: the whole
    process's peak memory, the frozen tower's weights on the device (0 once the embedding
    cache answers every reference pair) and the step-1 loss (from metrics.jsonl)."""
    rows = []
    base = ["--model", "ViT-B-32", "--pretrained", "", "--batch-size", str(args.user_batch),
            "--steps", "2", "--log-every", "1", "--workers", "0",
            "--train-size", "64", "--ref-size", "64", "--eval-per-task", "8", "--rsa-size", "16",
            "--wise-ft", "", "--no-progress", "--device", args.device]
    quarter = ["--batch-size", str(args.user_batch // 4)]
    runs = {label: USER_RUNS[label] + (quarter if "--accum-freq" in USER_RUNS[label] else [])
            for label in args.user_variants}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in runs.items():
            out = Path(tmp) / label.replace(" ", "_")
            cli = base + extra + ["--out", str(out)]
            t0 = time.time()
            proc = subprocess.run([sys.executable, __file__, "--train", *cli], capture_output=True,
                                  text=True)
            if proc.returncode:
                sys.exit(f"{label} failed:\n{proc.stderr[-4000:]}")
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            peak, frozen = measured["peak_rss_MiB"], measured["frozen_tower_MiB"]
            first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
            rows.append({"run": label, "command": "python -m dive_fast.train " + " ".join(cli[:-2]),
                         "peak_rss_MiB": peak, "frozen_tower_MiB": frozen,
                         "step1_loss": first["loss"], "wall_s": time.time() - t0})
            print(f"  {label:30s} peak {peak:8.0f} MiB  frozen tower {frozen:6.0f} MiB  step-1 "
                  f"loss {first['loss']:.6f}", flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    """The README's table: each variant against FLYP(B) (activations) and full DiVE (time)."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["image_size"], r["B"]), {})[r["variant"]] = r
    lines = []
    for (model, size, batch), v in by.items():
        flyp, dive = v.get("flyp-B"), v.get("dive")
        lines += [f"\n{model} at {size} px, B = B' = {batch} ({rows[0]['device']}):\n",
                  "| variant | saved for backward (MiB) | vs FLYP(B) | peak memory (MiB) | "
                  "frozen tower (MiB/rank) | step (ms) | vs DiVE full batch |",
                  "|---|---|---|---|---|---|---|"]
        for name in ALL_VARIANTS:
            if name not in v:
                continue
            r = v[name]
            act = (f"{r['saved_for_backward_MiB'] / flyp['saved_for_backward_MiB']:.2f}x"
                   if flyp else "")
            t = f"{r['step_ms'] / dive['step_ms']:.2f}x" if dive else ""
            lines.append(f"| {name} | {r['saved_for_backward_MiB']:.1f} | {act} | "
                         f"{r['peak_mem_MiB']:.0f} | {r.get('frozen_tower_MiB', 0):.0f} | "
                         f"{r['step_ms']:.0f} | {t} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:  # said why; the CSV and the table are written all the same
        return
    models = list(dict.fromkeys((r["model"], r["image_size"]) for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, (model, size) in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == model and r["image_size"] == size]
        names = [r["variant"] for r in rs]
        ax.barh(names, [r["saved_for_backward_MiB"] for r in rs], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel("activations saved for backward (MiB)")
        ax.set_title(f"{model} at {size} px, B = B' = {rs[0]['B']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--variant", choices=ALL_VARIANTS, default=None,
                   help="(internal) run one variant in this process (unset: all, each in its own)")
    p.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, default=list(ALL_VARIANTS),
                   help="variants to measure")
    p.add_argument("--model", default="dive-tiny", help="model (random weights)")
    p.add_argument("--image-size", type=int, default=None, help="image side (unset: the model's)")
    p.add_argument("--batch", type=int, default=128, help="B = B'")
    p.add_argument("--ref-size", type=int, default=1024, help="reference pairs in the data set")
    p.add_argument("--data", choices=["world", "synthetic"], default="world",
                   help="world images, or random ones (model-bound timing)")
    p.add_argument("--amp", choices=["fp32", "bf16"], default="fp32", help="autocast dtype")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--steps", type=int, default=3, help="steps timed per variant")
    p.add_argument("--warmup", type=int, default=1, help="steps before timing")
    p.add_argument("--fit-budget", action="store_true",
                   help="find each variant's largest batch within FLYP's activation budget")
    p.add_argument("--budget-batch", type=int, default=128,
                   help="--fit-budget: the FLYP batch whose activations set the budget")
    p.add_argument("--max-batch", type=int, default=2048, help="--fit-budget: largest B tried")
    p.add_argument("--user-runs", action="store_true",
                   help="time whole `python -m dive_fast.train` runs as a user starts them")
    p.add_argument("--user-batch", type=int, default=32, help="--user-runs: the batch size")
    p.add_argument("--user-variants", nargs="+", choices=list(USER_RUNS), default=list(USER_RUNS),
                   help="--user-runs: the runs to measure")
    p.add_argument("--cache-dir", default=None,
                   help="embedding cache folder (unset: a temporary one)")
    p.add_argument("--out", default=None,
                   help="CSV (unset: benchmarks/results/local/memory_<kind>_<device>.csv)")
    return p


def main(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train"]:  # (internal) the rest is dive_fast.train's command line
        from dive_fast import train
        from dive_fast.train.memory import peak_memory_mib
        frozen = FrozenTowerLog()
        logging.getLogger("dive_fast.train").addHandler(frozen)
        train.main(argv[1:])
        print(json.dumps({"peak_rss_MiB": peak_memory_mib("cpu"),
                          "frozen_tower_MiB": frozen.bytes / 2**20}))
        return
    from dive_fast._cli.arguments import run_checked
    return run_checked(p, check_args, lambda args: run(args, argv), argv)


def check_args(args) -> None:
    check_common(args, {"image_size": 8, "batch": 1, "ref_size": 1, "steps": 1, "warmup": 0,
                        "budget_batch": 1, "max_batch": 1, "user_batch": 1})
    if args.user_runs and args.user_batch % 4 and \
            any("--accum-freq" in USER_RUNS[label] for label in args.user_variants):
        raise ValueError(f"--user-batch {args.user_batch}: the --accum-freq 4 runs need a "
                         "multiple of 4 (a step of B in micro-batches of B/4)")


def run(args, argv):
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    env = environment(args.device)
    kind = "user" if args.user_runs else "budget" if args.fit_budget else "step"
    out = Path(args.out or result_path(f"memory_{kind}", args.device))
    with tempfile.TemporaryDirectory() as tmp:
        args.cache_dir = args.cache_dir or tmp
        if args.user_runs:
            rows = user_runs(args)
        elif args.fit_budget:
            rows = fit_budget(args)
        else:
            rows = []
            for variant in args.variants:
                proc = subprocess.run([sys.executable, __file__, *argv, "--cache-dir",
                                       args.cache_dir, "--variant", variant],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
                row = {**json.loads(proc.stdout.strip().splitlines()[-1]), **env}
                rows.append(row)
                print(f"{variant:14s} saved {row['saved_for_backward_MiB']:8.1f} MiB  peak "
                      f"{row['peak_mem_MiB']:7.0f} MiB  step {row['step_ms']:8.1f} ms  "
                      f"loss {row['loss']:.5f}", flush=True)
    rows = [{**r, **env} for r in rows]
    write_csv(rows, out)
    if kind == "step":
        table = summarize(rows)
        out.with_suffix(".md").write_text(table + "\n")
        plot(rows, out.with_suffix(".png"))
        print(table)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
