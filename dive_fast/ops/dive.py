"""The DiVE regulariser as torch.library custom ops with a custom autograd.

``dive_fast::dive_forward``: one read of the four inputs by the chosen backend yields
difference-vector statistics, and the backend's finalisation turns them into the batch
mean b, the EMA update of m and both losses: on the GPU backends two kernel launches and
no other op, on the CPU one C++ call. Under torch.distributed (``all_reduce`` and more
than one rank) b is averaged across ranks between the two. ``finalize`` below is the
reference's finalisation, the mathematics every backend's follows.
``dive_fast::dive_backward``: one pass that reads the inputs again and writes the two
input gradients, with m fixed at its updated value (no gradient flows through m).

The forward op writes the new m into the caller's buffer itself (``m_out``), which
spares a copy launch per step; torch.library does not let a mutating op carry its own
autograd formula, so ``DiVEFunction`` (a ``torch.autograd.Function``, which torch.compile
traces) joins the two ops, its options packed in one ``DiVEConfig``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _extension
from .dive_reference import (COUNT, INFO_SIZE, M2_U, M2_V, NONFINITE, NORM_U_SUM, NORM_V_SUM,
                             PVL_SUM, ZERO_NORM, accumulation_dtype, reference_backward,
                             reference_stats)

__all__ = ["ALL", "INFO_SIZE", "LOSS", "LOSS_INFO", "DiVEConfig", "DiVEFunction", "DiVEOutput",
           "dive_backward", "dive_forward", "finalize"]


def _stats(backend: str, *inputs, normalize: bool):
    """(means, scalars, workspace): the per-part statistics and what the backend's
    finalisation needs with them (the GPU backends' arrival ticket; None elsewhere)."""
    if backend == "torch":
        return (*reference_stats(*inputs, normalize), None)
    if backend == "triton":
        from .dive_triton import triton_stats
        return triton_stats(*inputs, normalize)
    return tuple(_extension.ops().dive_stats(*inputs, normalize))


def batch_mean(means: Tensor, scalars: Tensor) -> Tensor:
    """b: the mean of u and v over all rows, from per-part statistics."""
    n = scalars[:, COUNT]
    return (n[:, None, None] * means).sum((0, 1)) / (2 * n.sum())


def finalize(means: Tensor, scalars: Tensor, m: Tensor, momentum: float, b: Tensor | None = None):
    """(avl, pvl, m_new, b, info) from per-part statistics; see dive_reference.

    ``b``: the batch mean to update m with (averaged over ranks), else the parts' own.
    ``momentum`` 1 leaves m as it is (no update).
    """
    n = scalars[:, COUNT]
    total = n.sum()
    if b is None:
        b = batch_mean(means, scalars)
    m_old = m.to(means.dtype)
    m_new = momentum * m_old + (1 - momentum) * b
    # A non-finite batch must not poison the EMA: keep the old m (no host sync).
    m_new = torch.where(torch.isfinite(b).all(), m_new, m_old)
    offset = ((means - m_new) ** 2).sum(2)  # [K, 2]
    avl = (scalars[:, M2_U].sum() + scalars[:, M2_V].sum() + (n[:, None] * offset).sum()) / total
    pvl = scalars[:, PVL_SUM].sum() / total
    sums = scalars.sum(0)
    info = torch.cat((sums[NORM_U_SUM:NORM_V_SUM + 1] / total,
                      sums[NONFINITE:NONFINITE + 4], sums[ZERO_NORM:ZERO_NORM + 4]))
    return avl, pvl, m_new, b, info


def _finalize(backend: str, means, scalars, workspace, m, m_out, b, momentum, lam_avl, lam_pvl):
    """(loss, avl, pvl, m_new, b, info) by the backend's finalisation; m_out gets m_new.
    ``workspace``: the statistics' (None: partials from elsewhere)."""
    if backend == "torch":
        avl, pvl, m_new, b, info = finalize(means, scalars, m, momentum, b)
        m_new = m_new.to(m.dtype)
        if m_out is not None:
            m_out.copy_(m_new)
        return lam_avl * avl + lam_pvl * pvl, avl, pvl, m_new, b, info
    if backend == "triton":
        from .dive_triton import triton_finalize
        return triton_finalize(means, scalars, workspace, m, m_out, b, momentum, lam_avl,
                               lam_pvl)
    return tuple(_extension.ops().dive_finalize(means, scalars, workspace, m, m_out, b, momentum,
                                                lam_avl, lam_pvl))


def _fused_forward(backend: str, inputs, m, m_out, normalize, momentum, lam_avl, lam_pvl):
    """Statistics and finalisation: on the GPU backends two launches, on the CPU one call."""
    if backend == "torch":
        means, scalars = reference_stats(*inputs, normalize)
        return _finalize(backend, means, scalars, None, m, m_out, None, momentum, lam_avl,
                         lam_pvl)
    if backend == "triton":
        from .dive_triton import triton_forward
        return triton_forward(*inputs, m, m_out, normalize, momentum, lam_avl, lam_pvl)
    return _extension.ops().dive_forward(*inputs, m, m_out, normalize, momentum, lam_avl,
                                         lam_pvl)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _forward(img_ft: Tensor, img_pre: Tensor, txt_ft: Tensor, txt_pre: Tensor,
             m: Optional[Tensor], m_out: Optional[Tensor], momentum: float, normalize: bool,
             lam_avl: float, lam_pvl: float, all_reduce: bool,
             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (loss, avl, pvl, m_new, b, info); loss = lam_avl * avl + lam_pvl * pvl.

    ``momentum`` 1 leaves m as it is. ``m_out`` (optional) receives m_new as well, written
    by the finalisation itself; ``m`` None: m is read from m_out (an in-place update of
    the module's buffer).
    """
    if m is None:
        m = m_out
    world_size = _world_size() if all_reduce else 1
    if world_size == 1:
        if backend == "cpu" or backend == "cuda":  # the common case, without more layers
            return _extension.ops().dive_forward(img_ft, img_pre, txt_ft, txt_pre, m, m_out,
                                                 normalize, momentum, lam_avl, lam_pvl)
        return _fused_forward(backend, (img_ft, img_pre, txt_ft, txt_pre), m, m_out, normalize,
                              momentum, lam_avl, lam_pvl)
    inputs = (img_ft, img_pre, txt_ft, txt_pre)
    # b crosses ranks before the EMA update: one all-reduce of D values, no host sync.
    means, scalars, workspace = _stats(backend, *inputs, normalize=normalize)
    b = batch_mean(means, scalars)
    dist.all_reduce(b)
    b /= world_size
    return _finalize(backend, means, scalars, workspace, m, m_out, b, momentum, lam_avl, lam_pvl)


dive_forward = torch.library.custom_op("dive_fast::dive_forward", _forward,
                                       mutates_args=("m_out",))


@dive_forward.register_fake
def _(img_ft, img_pre, txt_ft, txt_pre, m, m_out, momentum, normalize, lam_avl, lam_pvl,
      all_reduce, backend):
    acc = accumulation_dtype(img_ft)
    scalar = img_ft.new_empty((), dtype=acc)
    return (scalar, scalar.clone(), scalar.clone(), torch.empty_like(m_out if m is None else m),
            img_ft.new_empty(img_ft.shape[1], dtype=acc), img_ft.new_empty(INFO_SIZE, dtype=acc))


def _backward(img_ft: Tensor, img_pre: Tensor, txt_ft: Tensor, txt_pre: Tensor, m: Tensor,
              g_loss: Optional[Tensor], g_avl: Optional[Tensor], g_pvl: Optional[Tensor],
              lam_avl: float, lam_pvl: float, scale: float, normalize: bool, backend: str
              ) -> tuple[Tensor, Tensor]:
    """Gradients for img_ft and txt_ft given dL/du = c_avl (u-m) + c_pvl (u-v), etc., with
    c_avl = scale (lam_avl g_loss + g_avl), c_pvl = scale (lam_pvl g_loss + g_pvl) from the
    upstream gradients of (loss, avl, pvl) (None: zero), formed inside the kernel."""
    if backend == "cpu" or backend == "cuda":
        return _extension.ops().dive_backward(img_ft, img_pre, txt_ft, txt_pre, m, g_loss, g_avl,
                                              g_pvl, lam_avl, lam_pvl, scale, normalize)
    args = (img_ft, img_pre, txt_ft, txt_pre, m, g_loss, g_avl, g_pvl, lam_avl, lam_pvl, scale)
    if backend == "torch":
        return reference_backward(*args, normalize)
    if backend == "triton":
        from .dive_triton import triton_backward
        return triton_backward(*args, normalize)
    return _extension.ops().dive_backward(*args, normalize)


dive_backward = torch.library.custom_op("dive_fast::dive_backward", _backward, mutates_args=())


@dive_backward.register_fake
def _(img_ft, img_pre, txt_ft, txt_pre, m, g_loss, g_avl, g_pvl, lam_avl, lam_pvl, scale,
      normalize, backend):
    return torch.empty_like(img_ft, memory_format=torch.contiguous_format), \
        torch.empty_like(txt_ft, memory_format=torch.contiguous_format)


# What DiVEFunction returns: the loss; the loss and info (the value check reads info); or
# every output (loss, avl, pvl, m_new, b, info), avl and pvl differentiable too.
LOSS, LOSS_INFO, ALL = 0, 1, 2


class DiVEConfig(NamedTuple):
    """One call's options, packed once per (shapes, dtypes, device, options) by the callers
    (``dive_fast.loss``), validated there."""
    momentum: float  # 1.0 when m is not updated
    normalize: bool
    lam_avl: float  # loss = lam_avl * avl + lam_pvl * pvl
    lam_pvl: float
    all_reduce: bool
    backend: str
    outputs: int  # LOSS, LOSS_INFO or ALL


class DiVEFunction(torch.autograd.Function):
    """Autograd of the forward op: ``apply(img_ft, img_pre, txt_ft, txt_pre, m, m_out,
    config)``; the backward op with m at its updated value; gradients for img_ft and
    txt_ft only. In eager mode the ops' Python implementations are called directly (the
    custom op's dispatcher layers cost tens of microseconds a call, as much as the CPU
    kernels at B' = 512); while torch.compile traces, the custom ops (opaque nodes with
    their fakes)."""

    @staticmethod
    def forward(ctx, img_ft, img_pre, txt_ft, txt_pre, m, m_out, config: DiVEConfig):
        backend = config.backend
        if ((backend == "cpu" or backend == "cuda") and not torch.compiler.is_compiling()
                and not (config.all_reduce and _world_size() > 1)):
            # The compiled kernels' one call, straight (the path of _forward, less a layer).
            out = _extension.ops().dive_forward(img_ft, img_pre, txt_ft, txt_pre,
                                                m_out if m is None else m, m_out,
                                                config.normalize, config.momentum,
                                                config.lam_avl, config.lam_pvl)
        else:
            op = dive_forward if torch.compiler.is_compiling() else _forward
            out = op(img_ft, img_pre, txt_ft, txt_pre, m, m_out, config.momentum,
                     config.normalize, config.lam_avl, config.lam_pvl, config.all_reduce, backend)
        ctx.save_for_backward(img_ft, img_pre, txt_ft, txt_pre, out[3])
        ctx.config = config
        if config.outputs == LOSS:
            return out[0]
        ctx.set_materialize_grads(False)  # unused outputs: None, not zero tensors (launches)
        if config.outputs == LOSS_INFO:
            ctx.mark_non_differentiable(out[5])
            return out[0], out[5]
        ctx.mark_non_differentiable(*out[3:])
        return tuple(out)

    @staticmethod
    def backward(ctx, g_loss, *grads):
        if torch.is_grad_enabled():  # create_graph=True: the kernels have no derivatives
            if torch.compiler.is_compiling():
                return _backward_once(ctx, g_loss, *grads)
            return _backward_first_order(ctx, g_loss, *grads)
        return _gradients(ctx, g_loss, *grads)


def _gradients(ctx, g_loss, *grads):
    config = ctx.config
    g_avl, g_pvl = grads[:2] if config.outputs == ALL else (None, None)
    if g_loss is None and g_avl is None and g_pvl is None:
        return (None,) * 7
    img_ft, img_pre, txt_ft, txt_pre, m_new = ctx.saved_tensors
    op = dive_backward if torch.compiler.is_compiling() else _backward
    grad_img, grad_txt = op(img_ft, img_pre, txt_ft, txt_pre, m_new, g_loss, g_avl, g_pvl,
                            config.lam_avl, config.lam_pvl, 2.0 / img_ft.shape[0],
                            config.normalize, config.backend)
    return grad_img, None, grad_txt, None, None, None, None


# once_differentiable costs ~5 us a call (a third of the Python layer's budget at B' = 8),
# so only the create_graph=True path takes it (traced by torch.compile).
_backward_once = torch.autograd.function.once_differentiable(_gradients)

SECOND_ORDER_REFUSED = ("second derivatives of DiVE are not supported: its kernels give "
                        "first-order gradients only (create_graph=True gave those; "
                        "differentiating them again is what failed)")


def _backward_first_order(ctx, g_loss, *grads):
    """create_graph=True in eager mode: the first-order gradients, with a graph node that
    raises when they are differentiated again. (once_differentiable adds that node only when
    an upstream gradient requires grad; without it a second derivative either fails with
    'does not require grad' or, mixed with other terms, silently treats DiVE's gradient as a
    constant.)"""
    with torch.no_grad():
        out = _gradients(ctx, g_loss, *grads)
    if out[0] is None:
        return out
    # The node's inputs: the gradients and what they depend on (img_ft, txt_ft), so that a
    # second torch.autograd.grad(..., img_ft) reaches the node and raises.
    img_ft, _, txt_ft, _, _ = ctx.saved_tensors
    refuse = torch._C._functions.DelayedError(SECOND_ORDER_REFUSED, 4)
    grad_img, grad_txt, _, _ = refuse(out[0], out[2], img_ft, txt_ft)
    return grad_img, None, grad_txt, None, None, None, None


class DiVEOutput(NamedTuple):
    loss: Tensor  # lam * (L_AVL + L_PVL), with the disabled terms left out
    avl: Tensor
    pvl: Tensor
    m: Tensor  # the EMA vector after this call (unchanged when update=False)
    b: Tensor  # this batch's mean difference vector (averaged over ranks if distributed)
    info: Tensor  # [mean |u|, mean |v|, non-finite rows x4, zero-norm rows x4]
