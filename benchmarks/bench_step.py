"""Training-step benchmark: what DiVE costs over FLYP, and what the lean loop saves.

    python benchmarks/bench_step.py                         # dive-tiny on this CPU
    python benchmarks/bench_step.py --device cuda --model ViT-B-16 --batch 256 --amp bf16

Variants, each in its own process (so peak memory is its own), run back to back:
  flyp-B        FLYP at batch B
  flyp-B+B'     FLYP at batch B + B' (the trainable work DiVE cannot avoid)
  dive-naive    eager reference loss, frozen forward every step, separate trainable forwards
  dive-fast     dive_fast: one concatenated forward, cached frozen embeddings, fused loss
Reports samples/s (target + reference samples), peak memory, and a per-step breakdown
(data, trainable forward+backward, frozen forward, losses, optimiser), as long-format CSV.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, synchronize, write_csv  # noqa: E402

VARIANTS = ("flyp-B", "flyp-B+B'", "dive-naive", "dive-fast")
PHASES = ("data", "trainable_fwd_bwd", "frozen_fwd", "losses", "optimizer")
# open_clip's profile: GFLOP per image-text pair forward (x3 for forward + backward).
GFLOP_PER_PAIR = {"ViT-B-16": 41.0, "ViT-B-32": 14.8}


class Timer:
    def __init__(self, device):
        self.device, self.t = device, {p: 0.0 for p in PHASES}

    def __call__(self, phase):
        timer = self

        class Span:
            def __enter__(self):
                synchronize(timer.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                synchronize(timer.device)
                timer.t[phase] += time.perf_counter() - self.t0
        return Span()


class SyntheticTask(torch.utils.data.Dataset):
    """Seeded random images with shape labels, at any resolution."""
    classnames = tuple(f"shape {i}" for i in range(10))
    templates = ("a photo of a {}.", "a {}.")

    def __init__(self, n, size):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), i % 10


class SyntheticCaptions(SyntheticTask):
    def __getitem__(self, i):
        from dive_fast.world import caption_pair
        img, _ = super().__getitem__(i)
        return img, caption_pair("reference", i, size=8)[1]


def run_variant(args) -> dict:
    from open_clip.loss import ClipLoss
    from torch.utils.data import DataLoader

    from dive_fast import DiVELoss, frozen_cache
    from dive_fast.context import StepContext
    from dive_fast.data import Indexed, ResumableSampler, WorldCaptions, WorldTask, collate
    from dive_fast.models import frozen_copy, load_clip
    from dive_fast.ops.dive_reference import dive_loss_eager

    torch.manual_seed(0)
    device, variant, B, Bp = args.device, args.variant, args.batch, args.ref_batch or args.batch
    on_gpu = device.startswith("cuda")
    amp = torch.bfloat16 if args.amp == "bf16" else None
    bundle = load_clip(args.model, None, device)
    model, tf = bundle.model.train(), bundle.preprocess_val
    size = bundle.image_size
    if args.data == "synthetic":  # model-bound timing on big models: no image rendering
        tasks, refs = SyntheticTask(4096, size), Indexed(SyntheticCaptions(args.ref_size, size))
    else:
        tasks = WorldTask("shapes", "train", 4096, tf, size=size)
        refs = Indexed(WorldCaptions("reference", args.ref_size, tf, size=size))
    batch_t = B + Bp if variant == "flyp-B+B'" else B
    load = lambda ds, b, seed: iter(DataLoader(  # noqa: E731
        ds, batch_size=b, sampler=ResumableSampler(len(ds), seed, b), collate_fn=collate,
        num_workers=args.workers, pin_memory=on_gpu, persistent_workers=args.workers > 0))
    targets = load(tasks, batch_t, 0)
    references = load(refs, Bp, 1) if variant.startswith("dive") else None
    frozen = frozen_copy(model, torch.bfloat16 if on_gpu else None) if variant.startswith("dive") else None
    cache = None
    if variant == "dive-fast":
        cache = frozen_cache.build(frozen, bundle.tokenizer, refs.dataset,
                                   Path(args.cache_dir) / f"{args.model}-{args.ref_size}.npy",
                                   device, progress=False)
    ctx = StepContext(model, frozen, bundle.tokenizer, tasks.classnames, tasks.templates, device,
                      clip_loss=ClipLoss(), cache=cache, amp_dtype=amp)
    reg = DiVELoss(model.text_projection.shape[1], check_values=False).to(device)
    m = torch.zeros(model.text_projection.shape[1], device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu or None)
    clip = lambda i, t: ctx.clip_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1),  # noqa: E731
                                      model.logit_scale.exp())
    step_times, timers = [], []
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        timer = Timer(device)
        t0 = time.perf_counter()
        with timer("data"):
            images, labels, _ = next(targets)
            if references is not None:
                ref_images, ref_targets, _ = next(references)
                texts, idx = zip(*ref_targets)
        with timer("trainable_fwd_bwd"):
            if variant == "dive-fast":
                ref_tokens = ctx.tokenize(texts)
                (it, ir), (tt, tr) = ctx.encode([images, ref_images],
                                                [ctx.prompts(labels, step), ref_tokens])
            elif variant == "dive-naive":
                (it,), (tt,) = ctx.encode([images], [ctx.prompts(labels, step)])
                (ir,), (tr,) = ctx.encode([ref_images], [ctx.tokenize(texts)])
            else:
                (it,), (tt,) = ctx.encode([images], [ctx.prompts(labels, step)])
        if variant.startswith("dive"):
            with timer("frozen_fwd"), torch.no_grad():
                if variant == "dive-fast":
                    i0, t0_ = ctx.frozen_reference(ref_images, ref_tokens, idx)
                else:  # every step, full precision, no overlap
                    i0 = frozen.encode_image(ref_images.to(device), normalize=True).float()
                    t0_ = frozen.encode_text(ctx.tokenize(texts), normalize=True).float()
        with timer("losses"):
            loss = clip(it, tt)
            if variant == "dive-fast":
                loss = loss + reg(ir, i0, tr, t0_)
            elif variant == "dive-naive":
                dl, _, _, m_new = dive_loss_eager(F.normalize(ir.float(), dim=-1), i0,
                                                  F.normalize(tr.float(), dim=-1), t0_, m)
                m = m_new.detach()
                loss = loss + dl
        with timer("trainable_fwd_bwd"):
            loss.backward()
        with timer("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t0)
            timers.append(timer.t)
    samples = batch_t + (Bp if variant.startswith("dive") else 0)
    med = statistics.median(step_times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if on_gpu else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    out = {"variant": variant, "model": args.model, "B": B, "B_ref": Bp, "samples_per_step": samples,
           "step_ms": med * 1e3, "step_ms_p20": statistics.quantiles(step_times, n=5)[0] * 1e3,
           "step_ms_p80": statistics.quantiles(step_times, n=5)[3] * 1e3,
           "samples_per_s": samples / med, "peak_mem_MiB": peak,
           "peak_mem_kind": "cuda max allocated" if on_gpu else "process max RSS",
           "baseline_rss_MiB": baseline_rss / 1024}
    for p in PHASES:
        out[f"{p}_ms"] = statistics.median(t[p] for t in timers) * 1e3
    flop = GFLOP_PER_PAIR.get(args.model)
    if flop and on_gpu:
        peak_tflops = args.peak_tflops
        out["MFU"] = 3 * flop * 1e9 * samples / med / (peak_tflops * 1e12)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=VARIANTS, default=None, help="(internal) run one")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="dive-tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--ref-batch", type=int, default=None)
    p.add_argument("--ref-size", type=int, default=4096)
    p.add_argument("--amp", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--data", choices=["world", "synthetic"], default="world")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="variants run this many times, interleaved")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100/H200 bf16 dense)")
    p.add_argument("--cache-dir", default="benchmarks/results/.cache")
    p.add_argument("--out", default="benchmarks/results/step_cpu.csv")
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    env = environment(args.device)
    rows = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for rnd in range(args.rounds):
        for variant in VARIANTS:
            proc = subprocess.run([sys.executable, __file__, "--variant", variant, *passthrough],
                                  capture_output=True, text=True, check=True)
            row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "round": rnd, **env}
            rows.append(row)
            print(f"round {rnd} {variant:11s} step {row['step_ms']:8.1f} ms  "
                  f"{row['samples_per_s']:7.1f} samples/s  peak {row['peak_mem_MiB']:7.0f} MiB  "
                  + " ".join(f"{ph}={row[ph + '_ms']:.1f}" for ph in PHASES), flush=True)
    write_csv(rows, args.out)
    summarize(rows)
    print(f"wrote {args.out}")


def summarize(rows):
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    med = {v: statistics.median(r["step_ms"] for r in rs) for v, rs in by.items()}
    mem = {v: statistics.median(r["peak_mem_MiB"] for r in rs) for v, rs in by.items()}
    print("\nvariant      step ms (median of rounds)  peak MiB   vs flyp-B+B' (time, memory)")
    for v in VARIANTS:
        if v in med:
            print(f"{v:11s}  {med[v]:10.1f}  {mem[v]:14.0f}   {med[v] / med[VARIANTS[1]]:.3f}x, "
                  f"{mem[v] / mem[VARIANTS[1]]:.3f}x")
    if "dive-naive" in med and "dive-fast" in med:
        print(f"dive-fast is {med['dive-naive'] / med['dive-fast']:.2f}x faster than dive-naive")


if __name__ == "__main__":
    main()
