"""The DiVE regulariser as torch.library custom ops with a custom autograd.

``dive_fast::dive_forward``: one read of the four inputs by the chosen backend yields
difference-vector statistics; ``finalize`` turns them into the batch mean b (averaged
across ranks when asked), the EMA update of m and both losses.
``dive_fast::dive_backward``: one pass that reads the inputs again and writes the two
input gradients, with m fixed at its updated value (no gradient flows through m).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _extension
from .dive_reference import (COUNT, M2_U, M2_V, NONFINITE, NORM_U_SUM, NORM_V_SUM, PVL_SUM,
                             ZERO_NORM, accumulation_dtype, reference_backward, reference_stats)

INFO_SIZE = 10  # mean |u|, mean |v|, 4 non-finite row counts, 4 zero-norm row counts


def _stats(backend: str, *inputs, normalize: bool):
    if backend == "reference":
        return reference_stats(*inputs, normalize)
    if backend == "triton":
        from .dive_triton import triton_stats
        return triton_stats(*inputs, normalize)
    return _extension.ops().dive_stats(*inputs, normalize)


def _backward(backend: str, *args, normalize: bool):
    if backend == "reference":
        return reference_backward(*args, normalize)
    if backend == "triton":
        from .dive_triton import triton_backward
        return triton_backward(*args, normalize)
    return tuple(_extension.ops().dive_backward(*args, normalize))


def _mean_across_ranks(b: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        b = b.clone()
        dist.all_reduce(b)  # one all-reduce of D values; no host synchronisation
        b /= dist.get_world_size()
    return b


def finalize(means: Tensor, scalars: Tensor, m: Tensor, momentum: float, update: bool,
             all_reduce: bool):
    """(avl, pvl, m_new, b, info) from per-part statistics; see dive_reference."""
    n = scalars[:, COUNT]
    total = n.sum()
    b = (n[:, None, None] * means).sum((0, 1)) / (2 * total)
    if all_reduce:
        b = _mean_across_ranks(b)
    m_old = m.to(means.dtype)
    m_new = momentum * m_old + (1 - momentum) * b if update else m_old
    # A non-finite batch must not poison the EMA: keep the old m (no host sync).
    m_new = torch.where(torch.isfinite(b).all(), m_new, m_old)
    offset = ((means - m_new) ** 2).sum(2)  # [K, 2]
    avl = (scalars[:, M2_U].sum() + scalars[:, M2_V].sum() + (n[:, None] * offset).sum()) / total
    pvl = scalars[:, PVL_SUM].sum() / total
    sums = scalars.sum(0)
    info = torch.cat((sums[NORM_U_SUM:NORM_V_SUM + 1] / total,
                      sums[NONFINITE:NONFINITE + 4], sums[ZERO_NORM:ZERO_NORM + 4]))
    return avl, pvl, m_new, b, info


@torch.library.custom_op("dive_fast::dive_forward", mutates_args=())
def dive_forward(img_ft: Tensor, img_pre: Tensor, txt_ft: Tensor, txt_pre: Tensor, m: Tensor,
                 momentum: float, update: bool, normalize: bool, lam: float, w_avl: float,
                 w_pvl: float, all_reduce: bool, backend: str
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, avl, pvl, m_new, b, info); loss = lam * (w_avl * avl + w_pvl * pvl)."""
    means, scalars = _stats(backend, img_ft, img_pre, txt_ft, txt_pre, normalize=normalize)
    avl, pvl, m_new, b, info = finalize(means, scalars, m, momentum, update, all_reduce)
    loss = lam * (w_avl * avl + w_pvl * pvl)
    return loss, avl, pvl, m_new.to(m.dtype), b, info


@dive_forward.register_fake
def _(img_ft, img_pre, txt_ft, txt_pre, m, momentum, update, normalize, lam, w_avl, w_pvl,
      all_reduce, backend):
    acc = accumulation_dtype(img_ft)
    scalar = img_ft.new_empty((), dtype=acc)
    return (scalar, scalar.clone(), scalar.clone(), torch.empty_like(m),
            img_ft.new_empty(img_ft.shape[1], dtype=acc), img_ft.new_empty(INFO_SIZE, dtype=acc))


@torch.library.custom_op("dive_fast::dive_backward", mutates_args=())
def dive_backward(img_ft: Tensor, img_pre: Tensor, txt_ft: Tensor, txt_pre: Tensor, m: Tensor,
                  c_avl: Tensor, c_pvl: Tensor, normalize: bool, backend: str
                  ) -> tuple[Tensor, Tensor]:
    """Gradients for img_ft and txt_ft given dL/du = c_avl (u-m) + c_pvl (u-v), etc."""
    return _backward(backend, img_ft, img_pre, txt_ft, txt_pre, m, c_avl, c_pvl,
                     normalize=normalize)


@dive_backward.register_fake
def _(img_ft, img_pre, txt_ft, txt_pre, m, c_avl, c_pvl, normalize, backend):
    return torch.empty_like(img_ft, memory_format=torch.contiguous_format), \
        torch.empty_like(txt_ft, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    img_ft, img_pre, txt_ft, txt_pre, _, _, _, normalize, lam, w_avl, w_pvl, _, backend = inputs
    ctx.save_for_backward(img_ft, img_pre, txt_ft, txt_pre, output[3])
    ctx.normalize, ctx.lam, ctx.w_avl, ctx.w_pvl, ctx.backend = normalize, lam, w_avl, w_pvl, backend


def _dive_forward_backward(ctx, g_loss, g_avl, g_pvl, *_):
    img_ft, img_pre, txt_ft, txt_pre, m_new = ctx.saved_tensors
    scale = 2.0 / img_ft.shape[0]
    acc = accumulation_dtype(img_ft)
    zero = torch.zeros((), dtype=g_loss.dtype, device=g_loss.device)
    g_avl = zero if g_avl is None else g_avl
    g_pvl = zero if g_pvl is None else g_pvl
    c_avl = (g_loss * (ctx.lam * ctx.w_avl) + g_avl) * scale
    c_pvl = (g_loss * (ctx.lam * ctx.w_pvl) + g_pvl) * scale
    grad_img, grad_txt = dive_backward(img_ft, img_pre, txt_ft, txt_pre, m_new,
                                       c_avl.to(acc), c_pvl.to(acc), ctx.normalize, ctx.backend)
    return grad_img, None, grad_txt, None, None, None, None, None, None, None, None, None, None


dive_forward.register_autograd(_dive_forward_backward, setup_context=_setup_context)


class DiVEOutput(NamedTuple):
    loss: Tensor  # lam * (L_AVL + L_PVL), with the disabled terms left out
    avl: Tensor
    pvl: Tensor
    m: Tensor  # the EMA vector after this call (unchanged when update=False)
    b: Tensor  # this batch's mean difference vector (averaged over ranks if distributed)
    info: Tensor  # [mean |u|, mean |v|, non-finite rows x4, zero-norm rows x4]
