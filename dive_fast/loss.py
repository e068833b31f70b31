"""Public DiVE API: the ``DiVELoss`` module (keeps the EMA vector m) and ``dive_loss``.

A call's checks and backend choice depend only on the inputs' shapes, dtypes and devices
and on the options: they run once per such key, and later calls find the packed
``DiVEConfig`` in a dictionary (the host cost of a call is then close to that of a bare
``autograd.Function`` calling the kernels: ``benchmarks/bench_dive_op.py --host``). Under
torch.compile the checks are traced instead.
"""
from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from . import backends
from .ops.dive import ALL, LOSS, LOSS_INFO, DiVEConfig, DiVEFunction, DiVEOutput
from .ops.dive_reference import INPUT_NAMES, accumulation_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensors(*inputs) -> None:
    for name, x in zip(INPUT_NAMES, inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_lam(lam) -> None:
    try:
        value = float(lam)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"lam must be a finite number >= 0 (a negative lam would reward "
                         f"drift from the pre-trained model), got {lam!r}")


def validate_inputs(img_ft, img_pre, txt_ft, txt_pre, m: Tensor) -> None:
    """Shape, dtype and device checks, free of host synchronisation."""
    check_tensors(img_ft, img_pre, txt_ft, txt_pre)
    tensors = dict(zip(INPUT_NAMES, (img_ft, img_pre, txt_ft, txt_pre)))
    for name, x in tensors.items():
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    shape = img_ft.shape
    for name, x in tensors.items():
        if x.shape != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but img_ft has {tuple(shape)}: "
                             "the four embeddings must have the same [batch, dim] shape")
        if x.device != img_ft.device:
            raise ValueError(f"{name} is on {x.device} but img_ft is on {img_ft.device}")
    if shape[0] == 0:
        raise ValueError("empty batch: img_ft has 0 rows; DiVE needs at least one reference pair")
    if txt_ft.dtype != img_ft.dtype or txt_pre.dtype != img_pre.dtype:
        raise TypeError("txt_ft must share img_ft's dtype and txt_pre img_pre's, got "
                        f"{img_ft.dtype}/{txt_ft.dtype} and {img_pre.dtype}/{txt_pre.dtype}")
    if (img_ft.dtype == torch.float64) != (img_pre.dtype == torch.float64):
        raise TypeError("float64 inputs must all be float64 (img_ft is "
                        f"{img_ft.dtype}, img_pre is {img_pre.dtype})")
    if m.shape != (shape[1],) or m.dtype not in FLOAT_DTYPES or m.device != img_ft.device:
        raise ValueError(f"m must be a float vector of shape [{shape[1]}] on {img_ft.device}, "
                         f"got {tuple(m.shape)} {m.dtype} on {m.device}")


def raise_on_bad_values(info: Tensor, normalize: bool, inputs) -> None:
    """One host sync: name the input holding NaN/Inf (or zero-norm rows when normalising).

    A row counted non-finite may hold only finite values whose squared norm overflows the
    accumulator; on this error path a second look at that input tells which it is.
    """
    counts = info.tolist()[2:]  # the whole vector: a slice of info first costs several us
    for i, (name, x) in enumerate(zip(INPUT_NAMES, inputs)):
        if counts[i]:
            nan_rows = int((~torch.isfinite(x)).any(1).sum())
            if nan_rows:
                raise ValueError(f"{name} has {nan_rows} row(s) with NaN or Inf values "
                                 "(m was left unchanged)")
            raise ValueError(f"{name} has {int(counts[i])} row(s) whose squared norm "
                             f"overflows {accumulation_dtype(x)} (finite values, too large; "
                             "m was left unchanged)")
        if normalize and counts[4 + i]:
            raise ValueError(f"{name} has {int(counts[4 + i])} row(s) of zero norm, which cannot "
                             "be L2-normalised (pass normalize=False if already normalised)")


def check_options(lam, momentum) -> None:
    check_lam(lam)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")


def make_config(img_ft, img_pre, txt_ft, txt_pre, m, m_out, *, lam, momentum, update, normalize,
                avl, pvl, distributed, backend, outputs) -> DiVEConfig:
    """Every check of a call's inputs and options, then the backend and the packed options."""
    validate_inputs(img_ft, img_pre, txt_ft, txt_pre, m)
    check_options(lam, momentum)
    if m_out is not None and (m_out.shape != m.shape or m_out.dtype != m.dtype
                              or m_out.device != m.device):
        raise ValueError(f"m_out must match m ({tuple(m.shape)} {m.dtype} on {m.device}), got "
                         f"{tuple(m_out.shape)} {m_out.dtype} on {m_out.device}")
    chosen = backends.select(img_ft.device.type, img_ft.dtype, img_ft.shape[1], backend)
    return DiVEConfig(float(momentum) if update else 1.0, bool(normalize),
                      float(lam) * float(avl), float(lam) * float(pvl), bool(distributed),
                      chosen, outputs)


# Validated configurations by call key (see the module docstring); a bounded memo.
_CONFIGS: dict = {}
_MAX_CONFIGS = 1024


def _remember(key, config: DiVEConfig) -> DiVEConfig:
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
    """Functional DiVE regulariser for callers that keep m themselves.

    Returns ``DiVEOutput(loss, avl, pvl, m, b, info)`` with m the updated EMA vector
    (``update=False`` leaves it as given). ``m_out`` (optional, may be m itself) receives
    the updated m too, written by the op (no extra copy). ``check_values`` costs one host
    sync per call and raises on NaN/Inf or zero-norm rows; without it such rows give a NaN
    loss, and m is left unchanged either way. Under torch.compile the check is skipped.
    """
    options = dict(lam=lam, momentum=momentum, update=update, normalize=normalize, avl=avl,
                   pvl=pvl, distributed=distributed, backend=backend, outputs=ALL)
    compiling = torch.compiler.is_compiling()
    key = config = None
    if not compiling:
        check_tensors(img_ft, img_pre, txt_ft, txt_pre)
        try:
            key = (img_ft.shape, img_ft.dtype, img_ft.device, img_pre.shape, img_pre.dtype,
                   img_pre.device, txt_ft.shape, txt_ft.dtype, txt_ft.device, txt_pre.shape,
                   txt_pre.dtype, txt_pre.device, m.shape, m.dtype, m.device,
                   None if m_out is None else (m_out.shape, m_out.dtype, m_out.device),
                   float(lam), float(momentum), bool(update), bool(normalize), bool(avl),
                   bool(pvl), bool(distributed), backend, os.environ.get(backends.ENV_VAR))
            config = _CONFIGS.get(key)
        except (AttributeError, TypeError, ValueError):  # the checks below name the problem
            key = None
    if config is None:
        config = _remember(key, make_config(img_ft, img_pre, txt_ft, txt_pre, m, m_out,
                                            **options))
    # m_out may be m itself (DiVELoss's buffer): then the op reads m from m_out.
    out = DiVEOutput(*DiVEFunction.apply(img_ft, _frozen(img_pre), txt_ft, _frozen(txt_pre),
                                         None if m_out is m else _frozen(m), m_out, config))
    if check_values and not compiling:
        raise_on_bad_values(out.info, normalize, (img_ft, img_pre, txt_ft, txt_pre))
    return out


class DiVELoss(nn.Module):
    """DiVE's regulariser ``lam * (L_AVL + L_PVL)`` with the EMA average vector as buffer ``m``.

    In training mode each call first updates m with the batch mean of both modalities'
    difference vectors, then computes the losses with the new m; in eval mode m is left
    alone. Under an initialised torch.distributed group the batch mean is averaged over
    ranks first, so every rank holds the same m.
    """

    def __init__(self, dim: int, lam: float = 1000.0, momentum: float = 0.99, *,
                 avl: bool = True, pvl: bool = True, normalize: bool = True,
                 backend: str | None = None, distributed: bool = True,
                 check_values: bool = True):
        super().__init__()
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        check_options(lam, momentum)
        self.dim, self.lam, self.momentum = dim, lam, momentum
        self.avl, self.pvl, self.normalize = avl, pvl, normalize
        self.backend, self.distributed, self.check_values = backend, distributed, check_values
        self.register_buffer("m", torch.zeros(dim, dtype=torch.float32))

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
        compiling = torch.compiler.is_compiling()
        key = config = None
        if not compiling:
            try:
                key = (img_ft.shape, img_ft.dtype, img_ft.device, img_pre.shape, img_pre.dtype,
                       img_pre.device, txt_ft.shape, txt_ft.dtype, txt_ft.device, txt_pre.shape,
                       txt_pre.dtype, txt_pre.device, m.shape, m.dtype, m.device, training,
                       return_parts, self.dim, self.lam, self.momentum, self.avl, self.pvl,
                       self.normalize, self.distributed, self.check_values, self.backend,
                       os.environ.get(backends.ENV_VAR))
                config = _CONFIGS.get(key)
            except (AttributeError, TypeError):  # not tensors: the checks below say so
                key = None
        if config is None:
            config = _remember(key, self._config(img_ft, img_pre, txt_ft, txt_pre, m,
                                                 return_parts))
        # In training the op updates the buffer in place (read from m_out, written there).
        result = DiVEFunction.apply(
            img_ft, img_pre.detach() if img_pre.requires_grad else img_pre, txt_ft,
            txt_pre.detach() if txt_pre.requires_grad else txt_pre, None if training else m,
            m if training else None, config)
        if config.outputs == LOSS:
            return result
        check = self.check_values and not compiling
        if config.outputs == LOSS_INFO:
            if check:
                raise_on_bad_values(result[1], self.normalize, (img_ft, img_pre, txt_ft, txt_pre))
            return result[0]
        out = DiVEOutput(*result)
        if check:
            raise_on_bad_values(out.info, self.normalize, (img_ft, img_pre, txt_ft, txt_pre))
        parts = {"avl": out.avl.detach(), "pvl": out.pvl.detach(), "b": out.b.detach(),
                 "mean_norm_u": out.info[0].detach(), "mean_norm_v": out.info[1].detach()}
        return out.loss, parts

    def _config(self, img_ft, img_pre, txt_ft, txt_pre, m, return_parts) -> DiVEConfig:
        check_tensors(img_ft, img_pre, txt_ft, txt_pre)  # before .device is read below
        if m.device != img_ft.device:
            raise ValueError(f"DiVELoss buffer m is on {m.device} but img_ft is on "
                             f"{img_ft.device}: move the loss with .to(device)")
        if img_ft.dim() == 2 and img_ft.shape[-1] != self.dim:
            raise ValueError(f"img_ft has dim {img_ft.shape[-1]} but DiVELoss(dim={self.dim})")
        outputs = ALL if return_parts else LOSS_INFO if self.check_values else LOSS
        return make_config(img_ft, img_pre, txt_ft, txt_pre, m, m if self.training else None,
                           lam=self.lam, momentum=self.momentum, update=self.training,
                           normalize=self.normalize, avl=self.avl, pvl=self.pvl,
                           distributed=self.distributed, backend=self.backend, outputs=outputs)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, lam={self.lam}, momentum={self.momentum}, avl={self.avl}, "
                f"pvl={self.pvl}, normalize={self.normalize}, backend={self.backend or 'auto'}")
