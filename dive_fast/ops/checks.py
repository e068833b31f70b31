"""Every check of a DiVE call's inputs and options, and the config they yield.

What depends only on shapes, dtypes, devices and options is checked once per such key
(``checked_config``; the API memoises its result); what depends on the call's tensors
themselves is checked per call without a host sync (``check_m_out_overlap``); the values
(NaN/Inf, zero-norm rows) after the kernels, from their counts (``raise_on_bad_values``,
one host sync). Each message names the argument, what it got and what was expected.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import backends
from .dive import DiVEConfig
from .dive_reference import INPUT_NAMES, accumulation_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
FLOAT32_MAX = torch.finfo(torch.float32).max
TRANSFORMS_REFUSED = ("DiVE does not support functorch transforms (torch.func.grad, vmap, "
                      "jacrev, jvp, functorch.*): its kernels have no batching rule and no "
                      "derivatives beyond the first; differentiate it with loss.backward() or "
                      "torch.autograd.grad")


def check_tensors(*inputs) -> None:
    for name, x in zip(INPUT_NAMES, inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def real_number(name: str, value) -> float:
    """``value`` as a float when it is a real number: an int or float (numpy's too), not a
    bool, a string or a tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (int or float), got {_shown(value)} "
                        f"({type(value).__name__})")
    try:
        return float(value)
    except OverflowError:  # an int beyond any float
        return math.inf


def check_lam(lam) -> None:
    """A finite real >= 0 that float32 holds (the kernels and the loss are float32)."""
    value = real_number("lam", lam)
    if math.isnan(value):
        raise ValueError("lam must be a finite number >= 0, got nan")
    if value < 0:
        raise ValueError(f"lam must be a number >= 0 (a negative lam would reward drift "
                         f"from the pre-trained model), got {_shown(lam)}")
    if value > FLOAT32_MAX:
        raise ValueError(f"lam must be finite and fit in float32 (at most {FLOAT32_MAX:.4g}: "
                         f"the losses are float32), got {_shown(lam)}")


def check_momentum(momentum) -> None:
    value = real_number("momentum", momentum)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (the EMA's weight on the old m), "
                         f"got {_shown(momentum)}")


def check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be a positive int (the embeddings' width, the length of "
                        f"m), got {_shown(dim)} ({type(dim).__name__})")
    if dim <= 0:
        raise ValueError(f"dim must be a positive int (the embeddings' width, the length of "
                         f"m), got {dim}")
    return int(dim)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_not_meta(img_ft: Tensor) -> None:
    if img_ft.device.type == "meta":
        raise ValueError("img_ft and the other inputs are meta tensors (shapes without values): "
                         "DiVE computes values and cannot run on the meta device; pass real "
                         "tensors (torch.compile traces it with fake tensors of its own)")


def validate_inputs(img_ft, img_pre, txt_ft, txt_pre, m: Tensor) -> None:
    """Shape, dtype and device checks, free of host synchronisation."""
    check_tensors(img_ft, img_pre, txt_ft, txt_pre)
    if not isinstance(m, Tensor):
        raise TypeError(f"m must be a torch.Tensor, got {type(m).__name__}")
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
    check_not_meta(img_ft)
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


def check_order(img_ft, img_pre, txt_ft, txt_pre) -> None:
    """A frozen input that requires grad beside a trainable partner that does not is the
    mark of swapped arguments: the tower that should learn would silently get nothing."""
    for ft, pre, ft_name, pre_name in ((img_ft, img_pre, "img_ft", "img_pre"),
                                       (txt_ft, txt_pre, "txt_ft", "txt_pre")):
        if pre.requires_grad and not ft.requires_grad:
            raise ValueError(f"{pre_name} requires grad but {ft_name} does not: the arguments "
                             "look swapped. The order is (img_ft, img_pre, txt_ft, txt_pre): "
                             "the fine-tuned model's embeddings first, then the frozen "
                             f"model's; {pre_name} never gets a gradient")


def raise_on_bad_values(info: Tensor, normalize: bool, inputs, m: Tensor | None = None,
                        avl: Tensor | None = None) -> None:
    """One host sync: name the input holding NaN/Inf (or zero-norm rows when normalising),
    and, given ``m`` and the call's ``avl``, a NaN/Inf m.

    A row counted non-finite may hold only finite values whose squared norm overflows the
    accumulator, and a row counted of zero norm may hold tiny values whose squares underflow
    it; a NaN/Inf m makes avl NaN/Inf (so does an overflow). On this error path a second
    look at the tensor tells which it is.
    """
    if avl is None or info.is_cpu:  # on the CPU no sync to save: two reads beat a cat
        counts = info.tolist()[2:]  # the whole vector: a slice of info first costs several us
        avl_value = 0.0 if avl is None else avl.item()
    else:  # avl and info in one transfer: one sync
        *counts, avl_value = torch.cat((info, avl.detach().view(1))).tolist()[2:]
    if not math.isfinite(avl_value):
        bad = int((~torch.isfinite(m)).sum())
        if bad:
            raise ValueError(f"m has {bad} NaN or Inf value(s) of {m.numel()}: every loss "
                             "computed with it is NaN; start from a finite m (zeros)")
    for i, (name, x) in enumerate(zip(INPUT_NAMES, inputs)):
        if counts[i]:
            nan_rows = int((~torch.isfinite(x)).any(1).sum())
            if nan_rows:
                raise ValueError(f"{name} has {nan_rows} row(s) with NaN or Inf values "
                                 "(m was left unchanged)")
            raise ValueError(f"{name} has {int(counts[i])} row(s) whose squared norm "
                             f"overflows {_dtype_name(accumulation_dtype(x))} (finite values, "
                             "too large; m was left unchanged)")
        if normalize and counts[4 + i]:
            zero = int((x == 0).all(1).sum())
            tiny = int(counts[4 + i]) - zero
            kinds = ([f"{zero} row(s) of zero norm"] if zero else []) + (
                [f"{tiny} row(s) whose norm is too small to normalise (subnormal: the "
                 f"squared norm underflows {_dtype_name(accumulation_dtype(x))})"] if tiny else [])
            raise ValueError(f"{name} has {' and '.join(kinds)}, which cannot be L2-normalised "
                             "(pass normalize=False if already normalised)")


def check_options(lam, momentum) -> None:
    check_lam(lam)
    check_momentum(momentum)


def _byte_range(x: Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes of x's elements in memory (a strided tensor's hull)."""
    span = sum((n - 1) * s for n, s in zip(x.shape, x.stride()))
    return x.data_ptr(), x.data_ptr() + (span + 1) * x.element_size()


def check_m_out_overlap(m_out: Tensor, m: Tensor, inputs) -> None:
    """m_out is written by the forward: it must not share memory with an input (the
    backward would read the new m in its place) nor with m unless it is m itself.

    Per call, no sync: storages compared by address range (about 1 us for five), the
    tensors' own byte ranges only where two storages overlap.
    """
    storage = m_out.untyped_storage()
    start = storage.data_ptr()
    end = start + storage.nbytes()
    for x in (*inputs, m) if m_out is not m else inputs:
        other = x.untyped_storage()
        if other.data_ptr() < end and start < other.data_ptr() + other.nbytes():
            _raise_if_overlapping(m_out, x, m, inputs)


def _raise_if_overlapping(m_out: Tensor, x: Tensor, m: Tensor, inputs) -> None:
    if not (m_out.numel() and x.numel()):
        return
    (a0, a1), (b0, b1) = _byte_range(m_out), _byte_range(x)
    if a0 < b1 and b0 < a1:
        if x is m:
            raise ValueError("m_out shares memory with m: pass m_out=m itself to update m "
                             "in place, or a separate tensor")
        name = next(n for n, y in zip(INPUT_NAMES, inputs) if y is x)
        raise ValueError(f"m_out shares memory with {name}: the forward would overwrite "
                         f"{name} with the new m and the backward read it: pass a separate "
                         "tensor")


def checked_config(img_ft, img_pre, txt_ft, txt_pre, m, m_out, *, lam, momentum, update,
                   normalize, avl, pvl, distributed, backend, outputs) -> DiVEConfig:
    """Every check of a call's inputs and options, then the backend and the packed options."""
    validate_inputs(img_ft, img_pre, txt_ft, txt_pre, m)
    check_order(img_ft, img_pre, txt_ft, txt_pre)
    check_options(lam, momentum)
    backends.check_name(backend)
    if m_out is not None and not isinstance(m_out, Tensor):
        raise TypeError(f"m_out must be a torch.Tensor or None, got {type(m_out).__name__}")
    if m_out is not None and (m_out.shape != m.shape or m_out.dtype != m.dtype
                              or m_out.device != m.device):
        raise ValueError(f"m_out must match m ({tuple(m.shape)} {m.dtype} on {m.device}), got "
                         f"{tuple(m_out.shape)} {m_out.dtype} on {m_out.device}")
    chosen = backends.select(img_ft.device.type, img_ft.dtype, img_ft.shape[1], backend)
    return DiVEConfig(float(momentum) if update else 1.0, bool(normalize),
                      float(lam) * float(avl), float(lam) * float(pvl), bool(distributed),
                      chosen, outputs)


