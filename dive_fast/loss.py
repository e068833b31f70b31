"""Public DiVE API: the ``DiVELoss`` module (keeps the EMA vector m) and ``dive_loss``.

A call's checks and backend choice depend only on the inputs' shapes, dtypes and devices
and on the options: they run once per such key, and later calls find the packed
``DiVEConfig`` in a dictionary (the host cost of a call is then close to that of a bare
``autograd.Function`` calling the kernels: ``benchmarks/bench_dive_op.py --host``). Under
torch.compile the checks are traced instead. What depends on the call's tensors themselves
is checked every call, without a host sync: no functorch transform active, and ``m_out``
(when given) sharing no memory with an input.
"""
from __future__ import annotations

import math
import numbers
import os

import torch
from torch import Tensor, nn

from . import backends
from .ops.dive import ALL, LOSS, LOSS_INFO, DiVEConfig, DiVEFunction, DiVEOutput
from .ops.dive_reference import INPUT_NAMES, accumulation_dtype

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


def make_config(img_ft, img_pre, txt_ft, txt_pre, m, m_out, *, lam, momentum, update, normalize,
                avl, pvl, distributed, backend, outputs) -> DiVEConfig:
    """Every check of a call's inputs and options, then the backend and the packed options."""
    validate_inputs(img_ft, img_pre, txt_ft, txt_pre, m)
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
        if torch._C._are_functorch_transforms_active():
            raise RuntimeError(TRANSFORMS_REFUSED)
        check_tensors(img_ft, img_pre, txt_ft, txt_pre)
        try:  # lam and momentum as given, with their types: "1000" or True is not 1000 or 1
            key = (img_ft.shape, img_ft.dtype, img_ft.device, img_pre.shape, img_pre.dtype,
                   img_pre.device, txt_ft.shape, txt_ft.dtype, txt_ft.device, txt_pre.shape,
                   txt_pre.dtype, txt_pre.device, m.shape, m.dtype, m.device,
                   None if m_out is None else (m_out.shape, m_out.dtype, m_out.device),
                   lam, type(lam), momentum, type(momentum), bool(update), bool(normalize),
                   bool(avl), bool(pvl), bool(distributed), backend,
                   os.environ.get(backends.ENV_VAR))
            config = _CONFIGS.get(key)
        except (AttributeError, TypeError, ValueError):  # the checks below name the problem
            key = None
    if config is None:
        config = _remember(key, make_config(img_ft, img_pre, txt_ft, txt_pre, m, m_out,
                                            **options))
    if m_out is not None and not compiling:
        check_m_out_overlap(m_out, m, (img_ft, img_pre, txt_ft, txt_pre))
    # m_out may be m itself (DiVELoss's buffer): then the op reads m from m_out.
    out = DiVEOutput(*DiVEFunction.apply(img_ft, _frozen(img_pre), txt_ft, _frozen(txt_pre),
                                         None if m_out is m else _frozen(m), m_out, config))
    if check_values and not compiling:
        raise_on_bad_values(out.info, normalize, (img_ft, img_pre, txt_ft, txt_pre), m, out.avl)
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
    ranks first, so every rank holds the same m.
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
        compiling = torch.compiler.is_compiling()
        key = config = None
        if not compiling:
            if torch._C._are_functorch_transforms_active():
                raise RuntimeError(TRANSFORMS_REFUSED)
            try:
                key = (img_ft.shape, img_ft.dtype, img_ft.device, img_pre.shape, img_pre.dtype,
                       img_pre.device, txt_ft.shape, txt_ft.dtype, txt_ft.device, txt_pre.shape,
                       txt_pre.dtype, txt_pre.device, m.shape, m.dtype, m.device, training,
                       return_parts, self.dim, self.lam, type(self.lam), self.momentum,
                       type(self.momentum), self.avl, self.pvl, self.normalize,
                       self.distributed, self.check_values, self.backend,
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
        check_not_meta(img_ft)
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
