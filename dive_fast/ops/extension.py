"""Lazy loading of the compiled ``dive_fast._C`` extension (C++ CPU and CUDA kernels).

``import dive_fast`` never requires it: when it is missing or broken the torch backend
serves, and ``backends.select`` warns once, saying why.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

OP_NAMESPACE = "dive_fast_C"
# Left beside where dive_fast._C would be by setup.py's build_ext when it skipped or failed
# the build: its text is the reason (an import error alone says only "no module").
BUILD_NOTE = Path(__file__).resolve().parents[1] / "_C_not_built.txt"


@functools.lru_cache(maxsize=None)
def load() -> tuple[bool, str]:
    """(loaded, reason). Importing the module registers its ops with torch.library."""
    try:
        from dive_fast import _C  # noqa: F401
    except Exception as exc:  # ImportError, or a symbol/ABI error from a stale build
        if BUILD_NOTE.is_file():
            return False, f"dive_fast._C {BUILD_NOTE.read_text().strip()}"
        reason = f"dive_fast._C is not importable ({type(exc).__name__}: {exc}); " \
                 "build it with `pip install --no-build-isolation -e .`"
        return False, reason
    return True, ""


@functools.lru_cache(maxsize=None)  # fixed once loaded; the lookup costs ~10 us per call
def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for this device (CPU or CUDA)."""
    if not load()[0]:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{OP_NAMESPACE}::dive_stats", dispatch_key)


@functools.lru_cache(maxsize=None)  # the namespace object is fixed; the lookup is not free
def ops():
    return getattr(torch.ops, OP_NAMESPACE)


@functools.lru_cache(maxsize=None)
def cuda_max_dim() -> int:
    """The widest row the CUDA kernels take (their launch plan's limit)."""
    return int(ops().cuda_max_dim())


def cpu_gradient_cache_bytes() -> int:
    """Bytes of recycled gradient blocks the CPU backward holds (0 without the extension)."""
    return int(ops().cpu_cached_bytes()) if load()[0] else 0


def release_cpu_gradient_cache() -> None:
    """Frees the CPU backward's cached gradient blocks (those of live tensors stay theirs)."""
    if load()[0]:
        ops().cpu_release_cached()
