"""Public DiVE API: the ``DiVELoss`` module (keeps the EMA vector m) and ``dive_loss``."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import backends
from .ops.dive import INFO_SIZE, DiVEFunction, DiVEOutput
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
    counts = info[2:INFO_SIZE].tolist()
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
    validate_inputs(img_ft, img_pre, txt_ft, txt_pre, m)
    check_lam(lam)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if m_out is not None and (m_out.shape != m.shape or m_out.dtype != m.dtype
                              or m_out.device != m.device):
        raise ValueError(f"m_out must match m ({tuple(m.shape)} {m.dtype} on {m.device}), got "
                         f"{tuple(m_out.shape)} {m_out.dtype} on {m_out.device}")
    chosen = backends.select(img_ft.device.type, img_ft.dtype, img_ft.shape[1], backend)
    # The frozen embeddings never receive a gradient: detach so autograd keeps no graph.
    # m_out may be m itself (DiVELoss's buffer): then the op reads m from m_out.
    out = DiVEOutput(*DiVEFunction.apply(
        img_ft, img_pre.detach(), txt_ft, txt_pre.detach(), None if m_out is m else m.detach(),
        m_out, float(momentum), bool(update), bool(normalize), float(lam), float(avl), float(pvl),
        bool(distributed), chosen))
    if check_values and not torch.compiler.is_compiling():
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
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        check_lam(lam)
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
        check_tensors(img_ft, img_pre, txt_ft, txt_pre)  # before .device is read below
        if self.m.device != img_ft.device:
            raise ValueError(f"DiVELoss buffer m is on {self.m.device} but img_ft is on "
                             f"{img_ft.device}: move the loss with .to(device)")
        if img_ft.dim() == 2 and img_ft.shape[-1] != self.dim:
            raise ValueError(f"img_ft has dim {img_ft.shape[-1]} but DiVELoss(dim={self.dim})")
        out = dive_loss(img_ft, img_pre, txt_ft, txt_pre, self.m, lam=self.lam,
                        momentum=self.momentum, update=self.training, normalize=self.normalize,
                        avl=self.avl, pvl=self.pvl, distributed=self.distributed,
                        check_values=self.check_values, backend=self.backend,
                        m_out=self.m if self.training else None)  # m updated in place
        if not return_parts:
            return out.loss
        parts = {"avl": out.avl.detach(), "pvl": out.pvl.detach(), "b": out.b.detach(),
                 "mean_norm_u": out.info[0].detach(), "mean_norm_v": out.info[1].detach()}
        return out.loss, parts

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, lam={self.lam}, momentum={self.momentum}, avl={self.avl}, "
                f"pvl={self.pvl}, normalize={self.normalize}, backend={self.backend or 'auto'}")
