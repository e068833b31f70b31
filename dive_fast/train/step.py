"""One training step, the same for ``dive_fast.train`` and ``benchmarks/bench_step.py``:
forward (the method's named losses), backward, gradient norm (and optional clipping), a
non-finite guard that stays on the device, the optimiser and schedule steps, CLIP's clamp
of the logit scale. Nothing here waits for the GPU: the host reads values at log steps.
Its phases carry profiler labels (``dive_fast.forward`` ...), which the step benchmark
reads for its breakdown; outside a profiler they cost next to nothing."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from ..accumulate import micro_batched_backward
from . import parallel
from .optim import clamp_logit_scale
from .parallel import GradientSync


class NonFiniteGuard:
    """Device-side record of skipped steps: how many, and the first one. A step whose loss
    or gradients are not finite changes no weight and no optimiser state (fused AdamW
    honours ``found_inf``, as under a grad scaler); the host learns of it when it next
    reads the counters (``read``)."""

    def __init__(self, device):
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def record(self, bad: Tensor, step: int) -> None:
        self.skipped += bad.long()
        self.first.copy_(torch.where(bad & (self.first < 0), step, self.first))

    def read(self) -> tuple[int, int | None]:
        """(steps skipped so far, the first of them or None); a host sync."""
        skipped, first = torch.stack((self.skipped, self.first)).tolist()
        return skipped, (first if first >= 0 else None)


def train_step(forward, method, batch, step: int, opt, sched, guard: NonFiniteGuard,
               grad_clip: float = 0.0, accum_freq: int = 1,
               gradient_sync: GradientSync | None = None,
               scaler: torch.amp.GradScaler | None = None) -> dict[str, Tensor]:
    """One update. ``forward`` is the method itself or its DDP wrapper; ``accum_freq`` K > 1
    computes the same update in K micro-batches (``forward_backward``); ``gradient_sync`` averages
    over ranks what DDP does not (micro-batched steps, parameters FSDP leaves replicated).
    Returns detached device tensors: the total loss, each named loss, the method's metrics,
    the gradient norm and whether the update was skipped. ``scaler``: fp16's loss scaling
    (the backward runs on the scaled loss; gradients are unscaled before the norm)."""
    opt.zero_grad(set_to_none=True)
    # The loss scale as a device tensor (no sync); None: no scaling.
    loss_scale = None if scaler is None else scaler.scale(torch.ones((), device=method.device))
    if accum_freq > 1:
        losses = forward_backward(method, batch, step, accum_freq, gradient_sync, loss_scale)
        total = sum(v.detach() for v in losses.values())
    else:
        with record_function("dive_fast.forward"):
            losses = forward(batch, step)
            total = sum(losses.values())
        with record_function("dive_fast.backward"):
            (total if loss_scale is None else total * loss_scale).backward()
    if gradient_sync is not None:
        gradient_sync.finish()
    if scaler is not None:
        scaler.unscale_(opt)  # in place, on the device; records inf/NaN for the scale's update
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norm = parallel.total_norm(grads) if grads else total.new_zeros(())
    loss_ok = torch.isfinite(total.detach())
    skip = ~(loss_ok & torch.isfinite(norm))
    # Under fp16 loss scaling an overflowing gradient is routine (the scale halves and the
    # step is skipped); only a non-finite loss is a fault there.
    bad = skip if scaler is None else ~loss_ok
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Gradients are all-reduced, so ranks agree on them; a loss that is not finite on
        # one rank alone must still skip the update everywhere.
        flags = torch.stack((skip, bad)).float()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skip, bad = flags[0] > 0, flags[1] > 0
    with record_function("dive_fast.optimizer"):
        if grad_clip > 0:
            parallel.clip_gradients(grads, grad_clip, norm)
        opt.found_inf = skip.float()  # read by fused AdamW: the whole update is skipped on device
        opt.step()
        if scaler is not None:
            scaler.update()  # halve the scale after an overflow, grow it after a quiet run
        sched.step()
        clamp_logit_scale(method.model)
        guard.record(bad, step)
    extra = {} if scaler is None else {"loss_scale": loss_scale}
    return {"loss": total.detach(), **{k: v.detach() for k, v in losses.items()},
            **method.metrics, "grad_norm": norm.detach(), **extra, "skipped": skip}


def forward_backward(method, batch, step: int, k: int, gradient_sync=None,
                     loss_scale: Tensor | None = None) -> dict[str, Tensor]:
    """Forward and backward of ``method``'s objective on ``batch`` in ``k`` micro-batches;
    the parameters' ``.grad`` end up as the full-batch step's (not yet averaged over ranks
    unless ``gradient_sync`` is a sharded model's, which reduces on the last micro-batch).
    Returns the named losses, as ``method(batch, step)`` would."""
    images, tokens = method.inputs(batch, step)  # prompts drawn for the whole batch
    n = len(images)

    def encode(parts):
        imgs, txts = method.encode(parts[:n], parts[n:])
        return imgs + txts

    def objective(features):
        pending = method.reference(batch, chunks=k)  # the frozen side in the same pieces
        return method.objective(batch, step, features[:n], features[n:],
                                pending() if pending else None)

    sync = None if gradient_sync is None else lambda j, last: gradient_sync.micro_batch(last)
    return micro_batched_backward(encode, [*images, *tokens], objective, k,
                                  learns=method.tower_grad(step), before_micro_batch=sync,
                                  loss_scale=loss_scale, modules=method.model)
