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

from . import accumulate, parallel
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
               gradient_sync: GradientSync | None = None) -> dict[str, Tensor]:
    """One update. ``forward`` is the method itself or its DDP wrapper; ``accum_freq`` K > 1
    computes the same update in K micro-batches (accumulate.py); ``gradient_sync`` averages
    over ranks what DDP does not (micro-batched steps, parameters FSDP leaves replicated).
    Returns detached device tensors: the total loss, each named loss, the method's metrics,
    the gradient norm and whether the update was skipped."""
    opt.zero_grad(set_to_none=True)
    if accum_freq > 1:
        losses = accumulate.forward_backward(method, batch, step, accum_freq, gradient_sync)
        total = sum(v.detach() for v in losses.values())
    else:
        with record_function("dive_fast.forward"):
            losses = forward(batch, step)
            total = sum(losses.values())
        with record_function("dive_fast.backward"):
            total.backward()
    if gradient_sync is not None:
        gradient_sync.finish()
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    norm = parallel.total_norm(grads) if grads else total.new_zeros(())
    bad = ~(torch.isfinite(total.detach()) & torch.isfinite(norm))
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Gradients are all-reduced, so ranks agree on them; a loss that is not finite on
        # one rank alone must still skip the update everywhere.
        flag = bad.float()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = flag > 0
    with record_function("dive_fast.optimizer"):
        if grad_clip > 0:
            parallel.clip_gradients(grads, grad_clip, norm)
        opt.found_inf = bad.float()  # read by fused AdamW: the whole update is skipped on device
        opt.step()
        sched.step()
        clamp_logit_scale(method.model)
        guard.record(bad, step)
    return {"loss": total.detach(), **{k: v.detach() for k, v in losses.items()},
            **method.metrics, "grad_norm": norm.detach(), "skipped": bad}
