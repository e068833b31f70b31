"""The one door from the API to the kernels: the DiVE regulariser as torch.library custom
ops with a custom autograd, and each backend's kernels in one table.

Every backend provides the same four kernels (``Kernels``): the statistics of the
difference vectors (one read of the four inputs), their finalisation into the batch mean
b, the EMA update of m and both losses (``dive_reference.finalize`` is the mathematics),
the two fused (on the GPU backends two launches, on the CPU one C++ call), and the
backward (one pass that reads the inputs again and writes both input gradients, with m
fixed at its updated value). A call indexes the table once, by its backend's name; under
torch.distributed (``all_reduce`` and more than one rank) b is averaged across ranks
between the statistics and the finalisation.

The forward op writes the new m into the caller's buffer itself (``m_out``), which
spares a copy launch per step; torch.library does not let a mutating op carry its own
autograd formula, so ``DiVEFunction`` (a ``torch.autograd.Function``, which torch.compile
traces) joins the two ops, its options packed in one ``DiVEConfig``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import extension
from .dive_reference import (
    INFO_SIZE,
    accumulation_dtype,
    batch_mean,
    reference_backward,
    reference_finalize,
    reference_forward,
    reference_stats_op,
)

__all__ = ["ALL", "INFO_SIZE", "LOSS", "LOSS_INFO", "DiVEConfig", "DiVEFunction", "DiVEOutput",
           "Kernels", "dive_backward", "dive_forward", "kernels"]


class Kernels(NamedTuple):
    """One backend's kernels, with the signatures every backend shares."""
    # (img_ft, img_pre, txt_ft, txt_pre, normalize) -> (means [K, 2, D], scalars [K, S],
    # workspace): the per-part statistics and what the finalisation needs with them (the
    # GPU backends' arrival ticket; None on the others).
    stats: Callable
    # (means, scalars, workspace, m, m_out, b, momentum, lam_avl, lam_pvl)
    #   -> (loss, avl, pvl, m_new, b, info); b None: the parts' own batch mean; m_out, when
    # given, receives m_new (written by the finalisation itself).
    finalize: Callable
    # (img_ft, img_pre, txt_ft, txt_pre, m, m_out, normalize, momentum, lam_avl, lam_pvl)
    #   -> the finalisation's outputs: statistics and finalisation in one call.
    forward: Callable
    # (img_ft, img_pre, txt_ft, txt_pre, m, g_loss, g_avl, g_pvl, lam_avl, lam_pvl, scale,
    # normalize) -> (grad_img, grad_txt).
    backward: Callable


def _torch_kernels() -> Kernels:
    return Kernels(reference_stats_op, reference_finalize, reference_forward, reference_backward)


def _triton_kernels() -> Kernels:
    from . import dive_triton as t  # imported on first use: triton is optional
    return Kernels(t.triton_stats, t.triton_finalize, t.triton_forward, t.triton_backward)


def _compiled_kernels() -> Kernels:
    """dive_fast._C's ops: one name each, dispatched to the CPU or CUDA kernel by device."""
    ops = extension.ops()
    return Kernels(ops.dive_stats.default, ops.dive_finalize.default, ops.dive_forward.default,
                   ops.dive_backward.default)


_MAKERS = {"torch": _torch_kernels, "triton": _triton_kernels, "cpu": _compiled_kernels,
           "cuda": _compiled_kernels}
_TABLES: dict[str, Kernels] = {}


def kernels(backend: str) -> Kernels:
    """The kernels of a backend (a name ``backends.select`` returned), built on first use."""
    table = _TABLES.get(backend)
    if table is None:
        table = _TABLES[backend] = _MAKERS[backend]()
    return table


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
    k = kernels(backend)
    world_size = _world_size() if all_reduce else 1
    if world_size == 1:
        return tuple(k.forward(img_ft, img_pre, txt_ft, txt_pre, m, m_out, normalize, momentum,
                               lam_avl, lam_pvl))
    # b crosses ranks before the EMA update: one all-reduce of D values, no host sync.
    means, scalars, workspace = k.stats(img_ft, img_pre, txt_ft, txt_pre, normalize)
    b = batch_mean(means, scalars)
    dist.all_reduce(b)
    b /= world_size
    return tuple(k.finalize(means, scalars, workspace, m, m_out, b, momentum, lam_avl, lam_pvl))


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
    return tuple(kernels(backend).backward(img_ft, img_pre, txt_ft, txt_pre, m, g_loss, g_avl,
                                           g_pvl, lam_avl, lam_pvl, scale, normalize))


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
    txt_ft only."""

    @staticmethod
    def forward(ctx, img_ft, img_pre, txt_ft, txt_pre, m, m_out, config: DiVEConfig):
        # In eager mode the op's Python implementation, called directly (the custom op's
        # dispatcher layers cost tens of microseconds a call, as much as the CPU kernels at
        # B' = 512); while torch.compile traces, the custom op (an opaque node, its fake).
        op = dive_forward if torch.compiler.is_compiling() else _forward
        out = op(img_ft, img_pre, txt_ft, txt_pre, m, m_out, config.momentum, config.normalize,
                 config.lam_avl, config.lam_pvl, config.all_reduce, config.backend)
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
