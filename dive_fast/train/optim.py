"""The optimiser as open_clip trains: AdamW with open_clip_train's weight-decay exemptions,
a cosine schedule with linear warm-up, and the clamp of the logit scale after each update."""
from __future__ import annotations

import math

import torch

MAX_LOGIT_SCALE = math.log(100)  # CLIP's clamp: temperature at most 100


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def no_decay(name: str, p) -> bool:
    """open_clip_train's ``exclude`` rule, word for word: no weight decay on tensors below
    2-D (gains, biases, the class embedding, the logit scale, whose decay towards 0 would
    flatten the contrastive softmax) nor on what its name says is a norm, a bias or the
    logit scale."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or \
        "logit_scale" in name


def no_decay_before_2026_12(name: str, p) -> bool:
    """The exemptions the tiny models' cached pre-trained weights were made with (tensors
    below 2-D and position embeddings): pre-training keeps them, so that those weights and
    the tables made with them stay reproducible."""
    return p.ndim < 2 or "positional_embedding" in name


def decay_groups(named_parameters, weight_decay: float, exempt=no_decay) -> list[dict]:
    """AdamW parameter groups, no decay where ``exempt`` says (open_clip_train's rule by
    default). Parameters sharded by FSDP (DTensors) get groups of their own after the plain
    ones: fused AdamW cannot mix the two kinds."""
    from torch.distributed.tensor import DTensor

    groups: dict[tuple[bool, bool], list] = {}
    for name, p in named_parameters:
        if not p.requires_grad:
            continue
        groups.setdefault((isinstance(p, DTensor), exempt(name, p)), []).append(p)
    kinds = [(False, False), (False, True)] + [k for k in ((True, False), (True, True))
                                               if k in groups]
    return [{"params": groups.get(k, []), "weight_decay": 0.0 if k[1] else weight_decay}
            for k in kinds]


def build(named_parameters, lr: float, weight_decay: float, steps: int, warmup: int,
          betas=(0.9, 0.999), eps: float = 1e-8, fused: bool = True, exempt=no_decay):
    """(AdamW, LambdaLR). Fused AdamW (CPU and GPU) is what lets ``train_step`` skip a
    non-finite update on the device: it honours the optimiser's ``found_inf`` tensor."""
    opt = torch.optim.AdamW(decay_groups(named_parameters, weight_decay, exempt), lr=lr,
                            betas=betas, eps=eps, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
    return opt, sched


@torch.no_grad()
def clamp_logit_scale(model) -> None:
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        scale.clamp_(0, MAX_LOGIT_SCALE)
