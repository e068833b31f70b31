"""The exact step of a large batch in the memory of a small one (``--accum-freq K``).

Contrastive losses and DiVE couple every row of the batch, so summing the gradients of K
smaller losses is another method. Instead (the feature-caching scheme open_clip uses for
``--accum-freq``, with three of its gaps closed):

1. every micro-batch's features, under no_grad, recording the random state before each;
2. the method's whole-batch objective on those features as leaf tensors (the contrastive
   loss over the whole batch, gathered across ranks as always; DiVE with one update of m);
   its backward gives each feature row's gradient and, once, the logit scale's (and any
   other parameter the objective uses directly, such as FT's head);
3. each micro-batch again with gradient, its random state replayed (dropout masks, patch
   dropout: the features are the ones the objective saw), back-propagating the feature
   gradients of step 2. Gradients are synchronised across ranks after the last one.

The sum over micro-batches of step 3 is the full-batch gradient: the objective is
differentiated once, and each tower row's features only depend on its own input. The
activation memory is one micro-batch's, plus the features; the price is one extra
forward of the towers without gradient.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor
from torch.profiler import record_function


def rng_state(device: torch.device):
    return (torch.get_rng_state(),
            torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@contextmanager
def replayed(state, device):
    """Runs the block from ``state`` and leaves the generators where they were."""
    after = rng_state(device)
    set_rng_state(state, device)
    try:
        yield
    finally:
        set_rng_state(after, device)


def micro(parts: list[Tensor], k: int, j: int) -> list[Tensor]:
    """Micro-batch ``j`` of ``k`` of each tensor (sizes may differ by one row)."""
    return [p.tensor_split(k)[j] for p in parts]


def forward_backward(method, batch, step: int, k: int,
                     gradient_sync=None) -> dict[str, Tensor]:
    """Forward and backward of ``method``'s objective on ``batch`` in ``k`` micro-batches;
    the parameters' ``.grad`` end up as the full-batch step's (not yet averaged over ranks
    unless ``gradient_sync`` is a sharded model's, which reduces on the last micro-batch).
    Returns the named losses, as ``method(batch, step)`` would."""
    device = method.device
    images, tokens = method.inputs(batch, step)  # prompts drawn for the whole batch
    if k > min(len(x) for x in (*images, *tokens)):
        raise ValueError(f"--accum-freq {k} is larger than a batch of "
                         f"{min(len(x) for x in (*images, *tokens))} rows")
    learns = method.tower_grad(step)
    states, feats = [], []
    with record_function("dive_fast.cache_features"), torch.no_grad():
        pending = method.reference(batch, chunks=k)  # the frozen side in the same pieces
        for j in range(k):
            states.append(rng_state(device))
            feats.append(method.encode(micro(images, k, j), micro(tokens, k, j)))
    # Whole-batch features as leaves: the objective's gradient stops at them.
    imgs = [torch.cat([f[0][i] for f in feats]).requires_grad_(learns) for i in range(len(images))]
    txts = [torch.cat([f[1][i] for f in feats]).requires_grad_(learns) for i in range(len(tokens))]
    del feats
    with record_function("dive_fast.objective"):
        losses = method.objective(batch, step, imgs, txts, pending() if pending else None)
        sum(losses.values()).backward()
    if not learns:
        return losses
    leaves = imgs + txts
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]
    with record_function("dive_fast.recompute"):
        for j in range(k):
            if gradient_sync is not None:
                gradient_sync.micro_batch(last=j == k - 1)
            with replayed(states[j], device):
                out_img, out_txt = method.encode(micro(images, k, j), micro(tokens, k, j))
            torch.autograd.backward([*out_img, *out_txt], micro(grads, k, j))
    return losses
