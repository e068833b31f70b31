"""`python -m dive_fast.info`: which DiVE backends can run here, and why not."""
from __future__ import annotations

import os
import platform

import torch

from . import __version__
from .ops import backends, extension


def backend_table() -> list[tuple[str, str, str]]:
    """(backend, device, "usable" or the reason it is not) for CPU and CUDA inputs."""
    rows = []
    devices = ["cpu", "cuda"]
    for name in backends.BACKENDS:
        for device in devices:
            why = backends.unavailable_reason(name, device)
            if why is None and device == "cuda" and not torch.cuda.is_available():
                why = "no CUDA device visible"
            rows.append((name, device, "usable" if why is None else why))
    return rows


def override_lines(rows=None) -> list[str]:
    """What $DIVE_FAST_BACKEND does to calls that name no backend: nothing (unset or auto),
    force a backend (usable or not, per device), or make every such call raise."""
    var = backends.ENV_VAR
    value = os.environ.get(var)
    if not value:
        return [f"${var}: not set (each call takes the fastest usable backend)"]
    name = backends.ALIASES.get(value, value)
    if name == "auto":
        return [f"${var}={value!r}: the fastest usable backend, as when unset"]
    if name not in backends.BACKENDS:
        return [f"${var}={value!r}: unknown backend, expected one of "
                f"{', '.join(backends.BACKENDS)}; every call without backend= will raise"]
    lines = [f"${var}={value!r}: overrides the default; calls without backend= use {name}"]
    for backend, device, status in rows or backend_table():
        if backend == name:
            lines.append(f"  {device} inputs: " + (
                "usable" if status == "usable" else f"cannot run here ({status}); calls raise"))
    return lines


def extension_status() -> str:
    """The compiled extension: loaded (with its kernels), or why not."""
    loaded, why = extension.load()
    if loaded:
        kernels = [k for k in ("CPU", "CUDA") if extension.has_kernel(k)]
        return f"loaded, kernels for {', '.join(kernels)}"
    return f"absent, {why.removeprefix('dive_fast._C ')}"


def versions() -> dict[str, str]:
    out = {"dive_fast": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "torch.version.cuda": str(torch.version.cuda)}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = f"unavailable ({exc})"
    try:
        import open_clip
        out["open_clip"] = open_clip.__version__
    except Exception as exc:
        out["open_clip"] = f"unavailable ({exc})"
    out["dive_fast._C"] = extension_status()
    out["device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                     else platform.processor() or platform.machine())
    out["TRITON_INTERPRET"] = str(backends.triton_interpreted())
    return out


def main(argv=None) -> None:
    import argparse
    argparse.ArgumentParser(prog="python -m dive_fast.info",
                            description="Which DiVE backends can run here, and why not; the "
                                        "$DIVE_FAST_BACKEND override; versions. Takes no "
                                        "arguments.").parse_args(argv)
    print("dive_fast backends")
    width = max(len(n) for n in backends.BACKENDS)
    rows = backend_table()
    for name, device, status in rows:
        print(f"  {name:<{width}}  {device:<4}  {status}")
    print("override")
    for line in override_lines(rows):
        print(f"  {line}")
    print("versions")
    for k, v in versions().items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
