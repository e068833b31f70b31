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
from torch import Tensor, nn
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


def check_arguments(inputs, k) -> None:
    """``k`` a positive int; ``inputs`` a non-empty list of non-empty tensors (each is cut
    into ``k`` pieces of its own rows: a target and a reference batch may differ in size)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not isinstance(inputs, (list, tuple)) or not inputs or \
            not all(isinstance(x, Tensor) for x in inputs):
        raise ValueError("inputs must be a non-empty list of tensors (the whole batch, one "
                         f"tensor per encoder input), got {type(inputs).__name__}")
    if min(len(x) for x in inputs) == 0:
        raise ValueError(f"inputs: an empty batch (0 rows; rows per tensor: "
                         f"{[len(x) for x in inputs]})")


def row_mixing_modules(modules) -> list[str]:
    """The modules under ``modules`` (an nn.Module or a list of them) whose output for one
    row depends on the other rows of the batch: batch normalisation in training mode (its
    batch statistics, and its running statistics updated once per forward). Found by type:
    a row-mixing computation written by hand in a forward (a batch mean) cannot be seen."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    found = []
    for root in roots:
        if not isinstance(root, nn.Module):
            raise TypeError(f"modules must be an nn.Module or a list of them, got "
                            f"{type(root).__name__}")
        found += [f"{name or type(root).__name__} ({type(m).__name__})"
                  for name, m in root.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    return found


def _features(encode, inputs) -> list[Tensor]:
    out = encode(inputs)
    if not isinstance(out, (list, tuple)) or not all(isinstance(f, Tensor) for f in out):
        raise TypeError("encode must return a list or tuple of tensors, got "
                        f"{type(out).__name__}")
    return list(out)


def micro_batched_backward(encode, inputs: list[Tensor], objective, k: int, *,
                           learns: bool = True, before_micro_batch=None,
                           loss_scale: Tensor | float | None = None, modules=None):
    """The gradient of ``objective(encode(inputs))`` in ``k`` micro-batches, for any
    encoder and any batch-coupled loss (DiVELoss users outside the training loop too).

    ``encode(list of input tensors) -> list of feature tensors`` must treat rows
    independently (a tower: row i's features depend on row i's input only): a batch-norm
    layer in training mode breaks that (gradients off by tens of percent, running
    statistics updated 2k times a step). Given ``modules`` (the encoder's nn.Module(s)),
    such layers are found by type and refused; a row-mixing computation inside a forward
    (a batch mean written by hand) is not checked;
    ``objective(list of whole-batch features) -> loss or dict of losses``, called once.
    Gradients accumulate into the parameters' ``.grad``; returns what ``objective``
    returned. ``learns`` False: the encoder's parameters get no gradient (only the
    objective's own, e.g. a head's), so no second forward runs. ``before_micro_batch(j,
    last)`` runs before each recomputed micro-batch (a sharded model's gradient sync).
    ``loss_scale`` multiplies the objective before its backward (fp16 loss scaling, as
    ``torch.amp.GradScaler.scale``); the returned losses stay unscaled.

        loss = micro_batched_backward(
            lambda xs: [model.encode_image(xs[0]), model.encode_text(xs[1])],
            [images, tokens], lambda fs: dive(fs[0], img0, fs[1], txt0), k=4)
        opt.step()
    """
    check_arguments(inputs, k)
    if k > 1 and modules is not None and (mixing := row_mixing_modules(modules)):
        raise ValueError(f"modules: {', '.join(mixing[:3])}{' ...' if len(mixing) > 3 else ''}"
                         " mix(es) the rows of a batch in training mode, so micro-batches "
                         "cannot reproduce the whole batch's gradient: put them in eval "
                         "mode (frozen statistics) or use k=1")
    device = inputs[0].device
    if k > min(len(x) for x in inputs):
        raise ValueError(f"accumulation: {k} micro-batches is more than a batch of "
                         f"{min(len(x) for x in inputs)} rows")
    states, parts = [], []
    with record_function("dive_fast.cache_features"), torch.no_grad():
        for j in range(k):
            states.append(rng_state(device))
            parts.append(_features(encode, micro(inputs, k, j)))
    # Whole-batch features as leaves: the objective's gradient stops at them.
    leaves = [torch.cat([p[i] for p in parts]).requires_grad_(learns)
              for i in range(len(parts[0]))]
    del parts
    with record_function("dive_fast.objective"):
        out = objective(leaves)
        total = sum(out.values()) if isinstance(out, dict) else out
        (total if loss_scale is None else total * loss_scale).backward()
    if not learns:
        return out
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]
    with record_function("dive_fast.recompute"):
        for j in range(k):
            if before_micro_batch is not None:
                before_micro_batch(j, j == k - 1)
            with replayed(states[j], device):
                features = _features(encode, micro(inputs, k, j))
            torch.autograd.backward(features, micro(grads, k, j))
    return out
