"""`python -m dive_fast.info`: which DiVE backends can run here, and why not."""
from __future__ import annotations

import platform

import torch

from . import __version__, _extension, backends


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
    loaded, why = _extension.load()
    kernels = [k for k in ("CPU", "CUDA") if _extension.has_kernel(k)]
    out["dive_fast._C"] = f"loaded, kernels for {', '.join(kernels)}" if loaded else why
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
    out["TRITON_INTERPRET"] = str(backends.triton_interpreted())
    return out


def main() -> None:
    print("dive_fast backends")
    width = max(len(n) for n in backends.BACKENDS)
    for name, device, status in backend_table():
        print(f"  {name:<{width}}  {device:<4}  {status}")
    print("versions")
    for k, v in versions().items():
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
