"""open_clip_train's options that ``python -m dive_fast.train`` does not take, each refused
with what to write instead (users bring open_clip habits: a flag with open_clip_train's
name means what it means there, or it is refused, never taken with another meaning), and
the values of shared options that are refused the same way. docs/training.md lists all of
open_clip_train's options; tests/train/test_open_clip_flags.py parses its every row with both
parsers."""
from __future__ import annotations

import argparse

OWN_DATA = "--train-folder (the target task, an image folder) and --reference-csv / " \
    "--reference-shards (the reference pairs)"
TORCHRUN = "start the ranks with torchrun (it sets the rendezvous, backend and devices)"
TRANSFORMS = "the model's own transforms are used (open_clip's preprocess for that model)"

# open_clip_train option -> what to write here instead.
REFUSED = {
    "--train-data": f"give {OWN_DATA}",
    "--val-data": "evaluate on image folders with --task KIND:NAME:PATH",
    "--train-num-samples": "the target folder's size sets an epoch (--epochs) or give --steps",
    "--val-num-samples": "evaluation reads each --task folder whole",
    "--dataset-type": "name the format by the flag: --reference-csv or --reference-shards",
    "--imagenet-val": "use --task id:imagenet:PATH (or --imagenet-root DIR)",
    "--imagenet-v2": "use --task ood:imagenet-v2:PATH (or --imagenet-root DIR)",
    "--cache-dir": "set $HF_HUB_CACHE (open_clip downloads through huggingface_hub)",
    "--logs": "use --out (the run folder: logs, metrics, checkpoints)",
    "--log-local": "rank 0 writes --out/out.log",
    "--name": "use --out (the run folder names the run)",
    "--epochs-cooldown": "the schedule is linear warm-up then cosine to 0 (--warmup)",
    "--momentum": "AdamW has none (its --beta1); DiVE's moving-average momentum is "
                  "--ema-momentum",
    "--use-bn-sync": "batch norm is not synchronised across ranks (the ViTs have none)",
    "--skip-scheduler": "the schedule is linear warm-up then cosine to 0 (--warmup)",
    "--lr-cooldown-end": "the cosine schedule ends at 0",
    "--lr-cooldown-power": "the schedule is linear warm-up then cosine to 0 (--warmup)",
    "--save-frequency": "use --checkpoint-every (in steps)",
    "--save-most-recent": "every checkpoint is step-N.pt and --resume latest finds the newest",
    "--val-frequency": "use --eval-every (steps) or --zeroshot-frequency (epochs)",
    "--pretrained-image": "give the whole model's weights with --pretrained",
    "--image-mean": TRANSFORMS,
    "--image-std": TRANSFORMS,
    "--image-interpolation": TRANSFORMS,
    "--image-resize-mode": TRANSFORMS,
    "--aug-cfg": TRANSFORMS + "; --no-augment for the world's images",
    "--local-loss": "the contrastive loss is the global batch's (open_clip's "
                    "--gather-with-grad without --local-loss)",
    "--force-context-length": "the context is the model's (--text-truncation runs each "
                              "batch at its longest caption)",
    "--force-quick-gelu": "give a model name ending -quickgelu, such as ViT-B-16-quickgelu",
    "--force-patch-dropout": "patch dropout is the model config's",
    "--force-custom-text": "the model config decides the text tower",
    "--torchscript": "use --torchcompile",
    "--trace": "use --torchcompile",
    "--dist-url": TORCHRUN,
    "--dist-backend": TORCHRUN,
    "--copy-codebase": "the run's config.json records its arguments",
    "--horovod": TORCHRUN,
    "--ddp-static-graph": "DDP is set up by the app (--fsdp shards instead)",
    "--no-set-device-rank": TORCHRUN + "; each rank takes cuda:LOCAL_RANK",
    "--coca-caption-loss-weight": "CoCa's captioning loss is not trained here",
    "--coca-contrastive-loss-weight": "CoCa's captioning loss is not trained here",
    "--remote-sync": "copy --out yourself (checkpoints are written atomically)",
    "--remote-sync-frequency": "copy --out yourself (checkpoints are written atomically)",
    "--remote-sync-protocol": "copy --out yourself (checkpoints are written atomically)",
    "--delete-previous-checkpoint": "use --keep 1",
    "--distill-model": "distillation is not offered; DiVE's regulariser uses the frozen "
                       "pre-trained model",
    "--distill-pretrained": "distillation is not offered; DiVE's regulariser uses the frozen "
                            "pre-trained model",
    "--use-bnb-linear": "the towers train in --precision's autocast",
    "--loss-dist-impl": "the losses gather features over the ranks with gradient",
}

# Values of shared options that are refused, with what to write instead.
REFUSED_VALUES = {
    "--precision": {
        "bf16": "it casts the weights to bfloat16; use amp_bf16 (bfloat16 autocast, float32 "
                "weights)",
        "pure_bf16": "it casts the weights to bfloat16; use amp_bf16 (bfloat16 autocast, "
                     "float32 weights)",
        "fp16": "it casts the weights to float16; use amp (float16 autocast with loss scaling)",
        "pure_fp16": "it casts the weights to float16; use amp (float16 autocast with loss "
                     "scaling)"},
    "--lr-scheduler": {
        "const": "the schedule is linear warm-up then cosine to 0 (cosine)",
        "const-cooldown": "the schedule is linear warm-up then cosine to 0 (cosine)"},
}


def refusal(flag: str) -> str:
    return f"open_clip_train's {flag} is not offered here: {REFUSED[flag]}"


class Refuse(argparse.Action):
    """An open_clip_train option this app does not take: exit 2 with what to write."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.update(nargs="*", help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        raise argparse.ArgumentError(self, refusal(option_string))


class RefuseValues(argparse.Action):
    """A shared option whose value in ``REFUSED_VALUES`` means something this app does not
    do: exit 2 naming the value and what to write."""

    def __call__(self, parser, namespace, value, option_string=None):
        why = REFUSED_VALUES[self.option_strings[0]].get(value)
        if why:
            raise argparse.ArgumentError(self, f"{value} is open_clip_train's, not offered "
                                               f"here: {why}")
        setattr(namespace, self.dest, value)


def add_refusals(parser: argparse.ArgumentParser) -> None:
    for flag in REFUSED:
        parser.add_argument(flag, action=Refuse)


def adam_defaults(model: str) -> dict:
    """open_clip_train's AdamW betas and epsilon for ``model`` (params.get_default_params:
    CLIP's paper, beta2 0.98 and eps 1e-6 for ViTs)."""
    if "vit" in model.lower():
        return {"beta1": 0.9, "beta2": 0.98, "eps": 1.0e-6}
    return {"beta1": 0.9, "beta2": 0.999, "eps": 1.0e-8}


def adamw_settings(args) -> tuple[tuple[float, float], float]:
    """(betas, eps) of ``args``, open_clip_train's defaults for the model where unset (also
    for arguments built without ``cli.check_args``, as the GPU check's)."""
    given = {name: getattr(args, name, None) for name in ("beta1", "beta2", "eps")}
    chosen = {**adam_defaults(args.model), **{k: v for k, v in given.items() if v is not None}}
    return (chosen["beta1"], chosen["beta2"]), chosen["eps"]
