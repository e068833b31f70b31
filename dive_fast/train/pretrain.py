"""Contrastive pre-training of the project's tiny CLIP on the embedded world.

    python -m dive_fast.train.pretrain                 # dive-tiny into the cache folder
    python -m dive_fast.train.pretrain --model dive-micro --steps 20 --out /tmp/micro.safetensors

The result is cached (``$DIVE_FAST_CACHE`` or ~/.cache/dive_fast) as safetensors, with a
JSON beside it holding the settings and the zero-shot table measured at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from safetensors.torch import save
from torch.utils.data import DataLoader

from .._cli.progress import progress_bar
from . import optim
from .data import WorldCaptions, collate
from .fileio import atomic_write, atomic_write_text
from .models import (
    CACHE_ENV,
    PRETRAIN_STEPS,
    cache_dir,
    load_clip,
    model_and_tag,
    tiny_checkpoint,
    tiny_intact,
)
from .report_tables import format_table
from .scoring import evaluate, world_eval_sets

log = logging.getLogger(__name__)
# The default pre-training's time on 2 CPU cores (an idle machine), said before it starts.
PRETRAIN_MINUTES = {"dive-tiny": "13 minutes", "dive-micro": "10 seconds",
                    "dive-wide": "25 minutes"}


def pretrain(name: str = "dive-tiny", seed: int = 0, out=None, steps: int | None = None,
             batch_size: int = 128, lr: float = 5e-4, warmup: int = 100, workers: int = 1,
             device: str = "cpu", progress: bool = True, eval_per_task: int = 300) -> Path:
    torch.manual_seed(seed)
    steps = steps or PRETRAIN_STEPS.get(name, 600)
    out = Path(out) if out else tiny_checkpoint(name, seed, steps=steps,
                                                batch_size=batch_size, lr=lr, warmup=warmup)
    # Full-length text: the cached weights (and the tables made with them) come from the
    # arithmetic before text truncation; fine-tuning trims exactly either way.
    bundle = load_clip(name, None, device, text_truncation=False)
    model = bundle.model.train()
    data = WorldCaptions("pretrain", steps * batch_size, bundle.preprocess_val, seed,
                         bundle.image_size)
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)
    # Plain (foreach) AdamW, not train_step's fused one: the cached weights and the
    # README's tables come from this exact arithmetic.
    opt, sched = optim.build(model.named_parameters(), lr, 0.1, steps, warmup, fused=False,
                             exempt=optim.no_decay_before_2026_12)
    loss_fn = ClipLoss()
    start = time.time()
    bar = progress_bar(loader, total=steps, desc=f"pretrain {name}", disable=not progress)
    for done, (images, texts, _) in enumerate(bar, 1):
        img, txt, scale = model(images.to(device), bundle.tokenizer(texts).to(device))
        loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        optim.clamp_logit_scale(model)
        rate = done * batch_size / (time.time() - start + 1e-9)  # bar.n lags between redraws
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale.item():.1f}",
                        samples_s=f"{rate:.0f}", refresh=False)
    payload = save({k: v.contiguous() for k, v in model.state_dict().items()})
    atomic_write(out, lambda f: f.write(payload))
    meta = {"model": name, "world_seed": seed, "steps": steps, "batch_size": batch_size,
            "lr": lr, "warmup": warmup, "seconds": round(time.time() - start, 1),
            "sha256": hashlib.sha256(payload).hexdigest()}  # checked before reuse
    if eval_per_task:
        sets = world_eval_sets(bundle.preprocess_val, eval_per_task, seed, bundle.image_size)
        meta["zeroshot"] = evaluate(model, bundle.tokenizer, sets, device=device, progress=False)
    atomic_write_text(out.with_suffix(".json"), json.dumps(meta, indent=2))
    log.info("pre-trained %s in %.0f s -> %s", name, meta["seconds"], out)
    return out


def ensure_pretrained_tiny(name: str = "dive-tiny", seed: int = 0, **pretrain_kwargs) -> Path:
    """The cached pre-trained tiny model, pre-training it first when absent, or when its
    bytes do not match the digest recorded at pre-training (changed or damaged)."""
    path = tiny_checkpoint(name, seed)
    if path.is_file():
        if tiny_intact(path):
            return path
        log.warning("the cached %s does not match its recorded digest: pre-training it again",
                    path)
    else:
        log.info("first use of %s (world seed %d): pre-training it once on the generated "
                 "world, %d steps, about %s on 2 idle CPU cores; cached in %s, which "
                 "later runs load", name, seed, PRETRAIN_STEPS.get(name, 600),
                 PRETRAIN_MINUTES.get(name, "a while"), path)
    return pretrain(name=name, seed=seed, out=path, **pretrain_kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .._cli.arguments import DefaultsFormatter
    p = argparse.ArgumentParser(
        prog="python -m dive_fast.train.pretrain", formatter_class=DefaultsFormatter,
        description="Pre-train a tiny CLIP contrastively on the generated world and cache it "
                    "(python -m dive_fast.train does this on first use).",
        epilog="example:\n  python -m dive_fast.train.pretrain --model dive-tiny --steps 1500")
    a = p.add_argument
    a("--model", default="dive-tiny", help="a dive_fast tiny config")
    a("--seed", type=int, default=0, help="world seed")
    a("--steps", type=int, default=None, help="pre-training steps (unset: the config's, 1500)")
    a("--batch-size", type=int, default=128, help="image-caption pairs per step")
    a("--lr", type=float, default=5e-4, help="AdamW peak learning rate")
    a("--workers", type=int, default=1, help="data loader processes drawing the world")
    a("--out", default=None, help="weights file to write (unset: the model cache, "
      "$DIVE_FAST_CACHE or ~/.cache/dive_fast)")
    a("--device", default=None, help="torch device (unset: cuda when visible, else cpu)")
    a("--any-model", action="store_true",
      help="pre-train a model other than dive_fast's tiny configs on the world (an open_clip "
           "ViT takes hours to days on a CPU)")
    return p


def check_args(args) -> None:
    from .models import TINY_MODELS
    from .validate import device, number, seed, writable_folder
    if args.model not in TINY_MODELS and not args.any_model:
        raise ValueError(f"--model {args.model}: pre-training on the world is meant for the tiny "
                         f"configs ({', '.join(TINY_MODELS)}); pass --any-model to pre-train "
                         "another (slow), or fine-tune it from --pretrained weights instead")
    if args.any_model:
        model_and_tag(args.model, None)
    number("--steps", args.steps, 1)
    number("--batch-size", args.batch_size, 1)
    number("--lr", args.lr, 0, above=True)
    number("--workers", args.workers, 0)
    seed("--seed", args.seed)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device(args.device)
    if args.out is not None:
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a folder; give the weights file to write "
                             "(e.g. weights.safetensors)")
        writable_folder(Path(args.out).absolute().parent, "--out")
    else:
        writable_folder(cache_dir(), f"the model cache (${CACHE_ENV} or ~/.cache/dive_fast)")


def run(args):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = pretrain(args.model, args.seed, args.out, args.steps, args.batch_size, args.lr,
                    workers=args.workers, device=args.device)
    meta = json.loads(path.with_suffix(".json").read_text())
    if "zeroshot" in meta:
        print(format_table({f"{args.model} pre-trained": meta["zeroshot"]}))
    print(f"saved {path}")
    default = tiny_checkpoint(args.model, args.seed)
    if path.resolve() != default.resolve():
        print(f"the default {args.model} that runs load ({default}) is left as it was "
              f"({'present' if default.is_file() else 'not pre-trained yet'}); these weights "
              f"load with --pretrained {path}")
    return path


def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    return run(args)


if __name__ == "__main__":
    from .._cli.arguments import run_checked
    run_checked(build_parser(), check_args, run)
