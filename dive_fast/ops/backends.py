"""Which DiVE backend runs where, and why not (xformers' not_supported_reasons in spirit).

``select`` names the backend a call runs; ``dive.kernels`` gives that backend's kernels."""
from __future__ import annotations

import os
import warnings

import torch

from . import extension

BACKENDS = ("torch", "cpu", "triton", "cuda")
ALIASES = {"reference": "torch"}  # the plain-PyTorch backend's earlier name
ENV_VAR = "DIVE_FAST_BACKEND"
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({exc})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(backend: str, device_type: str, dtype: torch.dtype = torch.float32,
                       dim: int = 512) -> str | None:
    """None when ``backend`` can run on inputs of this device type and dtype, else why not."""
    backend = ALIASES.get(backend, backend)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {BACKENDS}"
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend takes CPU tensors, got {device_type}"
        loaded, why = extension.load()
        if not loaded:
            return why
        return None if extension.has_kernel("CPU") else "dive_fast._C has no CPU kernel"
    if dtype not in LOW_PRECISION:
        return f"the {backend} backend takes float32, bfloat16 or float16, got {dtype}"
    if backend == "triton":
        why = triton_import_error()
        if why:
            return why
        if device_type == "cpu" and not triton_interpreted():
            return "triton needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        if device_type not in ("cpu", "cuda"):
            return f"triton does not run on {device_type} tensors"
        from .dive_triton import MAX_DIM
        if dim > MAX_DIM:
            return (f"the triton kernels keep a whole row in registers: dim {dim} > {MAX_DIM} "
                    "(wider rows would spill)")
        return None
    # cuda
    if device_type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device_type}"
    loaded, why = extension.load()
    if not loaded:
        return why
    if not extension.has_kernel("CUDA"):
        return ("dive_fast._C was built without CUDA kernels (no CUDA toolkit at build time; "
                "rebuild with DIVE_FAST_BUILD_CUDA=1)")
    if dim > extension.cuda_max_dim():
        return (f"the cuda kernels take rows of at most {extension.cuda_max_dim()} values, "
                f"got dim {dim}")
    return None


def check_name(backend) -> None:
    """An argument naming a backend: None (or "", as ``select`` reads it), "auto", a
    backend or an alias. Whether it can run is decided per call (the inputs' device is not
    known before)."""
    if backend is None or backend == "":
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    if backend != "auto" and ALIASES.get(backend, backend) not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of "
                         f"{', '.join(BACKENDS)}, 'auto' or None (the fastest usable)")


_warned: set[str] = set()


@torch.compiler.assume_constant_result  # a host-side decision: dynamo records the answer
def select(device_type: str, dtype: torch.dtype, dim: int, requested: str | None = None) -> str:
    """The backend to run: the requested one (argument, else $DIVE_FAST_BACKEND) or the
    fastest one available. A forced backend that cannot run raises, naming why."""
    source = ""
    if not requested and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], f" (set by ${ENV_VAR})"
    requested = ALIASES.get(requested, requested)
    if requested and requested != "auto":
        why = unavailable_reason(requested, device_type, dtype, dim)
        if why:
            raise RuntimeError(f"DiVE backend {requested!r} cannot run here: {why}{source}")
        return requested
    preferred = ("cpu",) if device_type == "cpu" else ("triton", "cuda")
    reasons = []
    for name in preferred:
        why = unavailable_reason(name, device_type, dtype, dim)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    key = f"{device_type}/{dtype}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn("dive_fast: using the torch backend for "
                      f"{device_type} {dtype} inputs ({'; '.join(reasons)})", RuntimeWarning,
                      stacklevel=3)
    return "torch"
