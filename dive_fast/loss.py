"""Public DiVE API: the ``DiVELoss`` module (keeps the EMA vector m) and ``dive_loss``.

A call's checks and backend choice depend only on the inputs' shapes, dtypes and devices
and on the options: they run once per such key (``ops.checks.checked_config``), and later
calls find the packed ``DiVEConfig`` in a dictionary (the host cost of a call is then close
to that of a bare ``autograd.Function`` calling the kernels:
``benchmarks/bench_dive_op.py --host``). Under torch.compile the checks are traced instead.
What depends on the call's tensors themselves is checked every call, without a host sync:
no functorch transform active, and ``m_out`` (when given) sharing no memory with an input.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .ops import backends
from .ops.checks import (
    TRANSFORMS_REFUSED,
    check_dim,
    check_m_out_overlap,
    check_not_meta,
    check_options,
    check_tensors,
    checked_config,
    raise_on_bad_values,
)
from .ops.dive import ALL, LOSS, LOSS_INFO, DiVEConfig, DiVEFunction, DiVEOutput

# Validated configurations by call key (see the module docstring); a bounded memo.
_CONFIGS: dict = {}
_MAX_CONFIGS = 1024


def _call_key(img_ft, img_pre, txt_ft, txt_pre, m, m_out, options: tuple):
    """What a call's checks and backend choice depend on: the tensors' metadata (with
    requires_grad: the swapped-order check reads it), the
    caller's options (lam and momentum with their types: "1000" or True is not 1000.0 or 1)
    and $DIVE_FAST_BACKEND. Raises AttributeError/TypeError for what is not a tensor."""
    return (img_ft.shape, img_ft.dtype, img_ft.device, img_ft.requires_grad, img_pre.shape,
            img_pre.dtype, img_pre.device, img_pre.requires_grad, txt_ft.shape, txt_ft.dtype,
            txt_ft.device, txt_ft.requires_grad, txt_pre.shape, txt_pre.dtype, txt_pre.device,
            txt_pre.requires_grad, m.shape, m.dtype, m.device,
            None if m_out is None else (m_out.shape, m_out.dtype, m_out.device),
            options, os.environ.get(backends.ENV_VAR))


def _memoised(inputs, m, m_out, options: tuple, check) -> DiVEConfig:
    """The config of a call: found by its key, else ``check()``'s, remembered. Under
    torch.compile the checks run every time (dynamo traces them, then they cost nothing)."""
    if torch.compiler.is_compiling():
        return check()
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(TRANSFORMS_REFUSED)
    try:
        key = _call_key(*inputs, m, m_out, options)
        config = _CONFIGS.get(key)
    except (AttributeError, TypeError, ValueError):  # the checks name the problem
        key = config = None
    if config is None:
        config = check()
        if key is not None:
            if len(_CONFIGS) >= _MAX_CONFIGS:
                _CONFIGS.clear()
            _CONFIGS[key] = config
    return config


def _frozen(x: Tensor) -> Tensor:
    """The frozen embeddings never receive a gradient: detached, autograd keeps no graph."""
    return x.detach() if x.requires_grad else x


def dive_loss(img_ft: Tensor, img_pre: Tensor, txt_ft: Tensor, txt_pre: Tensor, m: Tensor, *,
              lam: float = 1000.0, momentum: float = 0.99, update: bool = True,
              normalize: bool = True, avl: bool = True, pvl: bool = True,
              distributed: bool = True, check_values: bool = True,
              backend: str | None = None, m_out: Tensor | None = None) -> DiVEOutput:
    """The DiVE regulariser as a function, for callers that keep the EMA vector m themselves.

    Args:
        img_ft, txt_ft: [B', D] image and text embeddings of the reference pairs by the
            model being fine-tuned (gradients flow to these two).
        img_pre, txt_pre: [B', D] the same pairs' embeddings by the frozen pre-trained model
            (never given a gradient). float32, bfloat16, float16 or float64; the ``*_ft``
            pair shares one dtype, the ``*_pre`` pair one (float64 only with float64).
        m: [D] the EMA average difference vector (float; kept by the caller).
        lam: weight of both losses (>= 0, finite). momentum: the EMA's weight on the old m,
            in [0, 1]. update: False leaves m as given (evaluation).
        normalize: L2-normalise the embeddings before differencing (False: they already are).
        avl, pvl: include the average-vector / pairwise-vector loss in ``loss``.
        distributed: under an initialised torch.distributed group, average the batch mean
            over ranks before the EMA update (one all-reduce of D values).
        check_values: one host sync a call to raise on NaN/Inf or zero-norm rows (skipped
            under torch.compile); without it such rows give a NaN loss. m is left unchanged
            either way.
        backend: "torch", "cpu", "triton", "cuda", "auto" or None (the fastest usable, or
            $DIVE_FAST_BACKEND).
        m_out: a [D] tensor like m (may be m itself) that receives the updated m, written by
            the op (no extra copy).

    Returns:
        ``DiVEOutput(loss, avl, pvl, m, b, info)``: loss = lam * (avl + pvl) with the
        disabled terms left out, both losses, the updated m, this batch's mean difference
        vector b, and [mean |u|, mean |v|, non-finite rows x4, zero-norm rows x4].

    Raises:
        TypeError, ValueError: an input or option of the wrong type, shape, dtype or device
            (the message names it), NaN/Inf or zero-norm rows (``check_values``), m_out
            sharing memory with an input.
        RuntimeError: a named backend that cannot run here (and why), functorch transforms.
    """
    inputs = (img_ft, img_pre, txt_ft, txt_pre)
    options = (lam, type(lam), momentum, type(momentum), bool(update), bool(normalize),
               bool(avl), bool(pvl), bool(distributed), backend)
    config = _memoised(inputs, m, m_out, options, lambda: checked_config(
        *inputs, m, m_out, lam=lam, momentum=momentum, update=update, normalize=normalize,
        avl=avl, pvl=pvl, distributed=distributed, backend=backend, outputs=ALL))
    compiling = torch.compiler.is_compiling()
    if m_out is not None and not compiling:
        check_m_out_overlap(m_out, m, inputs)
    # m_out may be m itself (DiVELoss's buffer): then the op reads m from m_out.
    out = DiVEOutput(*DiVEFunction.apply(img_ft, _frozen(img_pre), txt_ft, _frozen(txt_pre),
                                         None if m_out is m else _frozen(m), m_out, config))
    if check_values and not compiling:
        raise_on_bad_values(out.info, normalize, inputs, m, out.avl)
    return out


def _refuse_non_finite_m(module, state_dict, prefix, *args) -> None:
    """DiVELoss's load_state_dict pre-hook: a NaN/Inf m would make every later loss NaN
    (the EMA keeps a non-finite m), so it is refused before anything is copied."""
    m = state_dict.get(prefix + "m")
    if isinstance(m, Tensor) and m.device.type != "meta" and m.is_floating_point():
        bad = int((~torch.isfinite(m)).sum())
        if bad:
            raise ValueError(f"state_dict[{prefix + 'm'!r}] has {bad} NaN or Inf value(s) of "
                             f"{m.numel()}: DiVELoss's m must be finite (every loss computed "
                             "with it would be NaN)")


class DiVELoss(nn.Module):
    """DiVE's regulariser ``lam * (L_AVL + L_PVL)`` with the EMA average vector as buffer ``m``.

    In training mode each call first updates m with the batch mean of both modalities'
    difference vectors, then computes the losses with the new m; in eval mode m is left
    alone. Under an initialised torch.distributed group the batch mean is averaged over
    ranks first, so every rank holds the same m. m is float32 whatever the module's dtype
    casts (an EMA's small steps round away in bf16/fp16); it is saved in the state dict.

    Args:
        dim: the embeddings' width D (the length of m).
        lam: weight of both losses (the paper's 1000); a finite real >= 0.
        momentum: the EMA's weight on the old m (the paper's 0.99), in [0, 1].
        avl, pvl: include the average-vector / pairwise-vector loss (ablations).
        normalize: L2-normalise the embeddings before differencing (False: they already are).
        backend: "torch", "cpu", "triton", "cuda", "auto" or None (the fastest usable for
            each call's inputs, or $DIVE_FAST_BACKEND).
        distributed: average the batch mean over ranks under torch.distributed.
        check_values: one host sync a call to raise on NaN/Inf or zero-norm rows.

    Call: ``loss = DiVELoss(dim)(img_ft, img_pre, txt_ft, txt_pre)`` with four [B', D]
    embeddings (see ``dive_loss``); ``return_parts=True`` returns ``(loss, parts)`` with the
    detached avl, pvl, b and mean norms of u and v.

    Raises:
        TypeError, ValueError: a bad argument at construction; at a call, inputs of the wrong
            type, shape, dtype or device (named), NaN/Inf or zero-norm rows (check_values).
        RuntimeError: a named backend that cannot run on the call's inputs (and why).
    """

    def __init__(self, dim: int, lam: float = 1000.0, momentum: float = 0.99, *,
                 avl: bool = True, pvl: bool = True, normalize: bool = True,
                 backend: str | None = None, distributed: bool = True,
                 check_values: bool = True):
        super().__init__()
        dim = check_dim(dim)
        check_options(lam, momentum)
        backends.check_name(backend)  # an unknown name now; whether it can run, per call
        self.dim, self.lam, self.momentum = dim, lam, momentum
        self.avl, self.pvl, self.normalize = avl, pvl, normalize
        self.backend, self.distributed, self.check_values = backend, distributed, check_values
        self.register_buffer("m", torch.zeros(dim, dtype=torch.float32))
        self.register_load_state_dict_pre_hook(_refuse_non_finite_m)

    def _apply(self, fn, recurse=True):
        # m is an fp32 accumulator: in bf16/fp16 the EMA's small steps round away and it
        # stalls, so module dtype casts (.half(), .to(bf16)) skip it; device moves apply.
        m = self.m

        def apply(t):
            out = fn(t)
            return out if t is not m or out.dtype == t.dtype else t.to(out.device)
        return super()._apply(apply, recurse)

    def forward(self, img_ft: Tensor, img_pre: Tensor, txt_ft: Tensor, txt_pre: Tensor,
                return_parts: bool = False):
        m = self._buffers["m"]
        training = self.training
        inputs = (img_ft, img_pre, txt_ft, txt_pre)
        options = (training, return_parts, self.dim, self.lam, type(self.lam), self.momentum,
                   type(self.momentum), self.avl, self.pvl, self.normalize, self.distributed,
                   self.check_values, self.backend)
        # In training the op updates the buffer in place (read from m_out, written there).
        m_out = m if training else None
        config = _memoised(inputs, m, m_out, options,
                           lambda: self._config(*inputs, m, return_parts))
        result = DiVEFunction.apply(img_ft, _frozen(img_pre), txt_ft, _frozen(txt_pre),
                                    None if training else m, m_out, config)
        if config.outputs == LOSS:
            return result
        check = self.check_values and not torch.compiler.is_compiling()
        if config.outputs == LOSS_INFO:
            if check:
                raise_on_bad_values(result[1], self.normalize, inputs)
            return result[0]
        out = DiVEOutput(*result)
        if check:
            raise_on_bad_values(out.info, self.normalize, inputs)
        parts = {"avl": out.avl.detach(), "pvl": out.pvl.detach(), "b": out.b.detach(),
                 "mean_norm_u": out.info[0].detach(), "mean_norm_v": out.info[1].detach()}
        return out.loss, parts

    def _config(self, img_ft, img_pre, txt_ft, txt_pre, m, return_parts) -> DiVEConfig:
        check_tensors(img_ft, img_pre, txt_ft, txt_pre)  # before .device is read below
        check_not_meta(img_ft)
        if m.device != img_ft.device:
            raise ValueError(f"DiVELoss buffer m is on {m.device} but img_ft is on "
                             f"{img_ft.device}: move the loss with .to(device)")
        if img_ft.dim() == 2 and img_ft.shape[-1] != self.dim:
            raise ValueError(f"img_ft has dim {img_ft.shape[-1]} but DiVELoss(dim={self.dim})")
        outputs = ALL if return_parts else LOSS_INFO if self.check_values else LOSS
        return checked_config(img_ft, img_pre, txt_ft, txt_pre, m, m if self.training else None,
                              lam=self.lam, momentum=self.momentum, update=self.training,
                              normalize=self.normalize, avl=self.avl, pvl=self.pvl,
                              distributed=self.distributed, backend=self.backend,
                              outputs=outputs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, lam={self.lam}, momentum={self.momentum}, avl={self.avl}, "
                f"pvl={self.pvl}, normalize={self.normalize}, backend={self.backend or 'auto'}")
