"""One prepared GPU check: every GPU backend against the float64 oracle, then timings.

    bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU (a few minutes)

Writes to $OUT (or benchmarks/results/): gpu_accuracy.csv (each backend x shape x dtype
x layout: quantity errors and bounds, pass/fail), dive_op_cuda.csv/.png (op timings vs
eager, torch.compile and the memory floor) and step_cuda.csv (ViT-B-16, bf16, B = B' =
256: samples/s, peak memory, breakdown, MFU) when open_clip is importable.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_csv  # noqa: E402

from dive_fast import backends, info  # noqa: E402
from dive_fast.testing import compare_with_oracle, failures, make_inputs  # noqa: E402

SHAPES = [(1, 1), (7, 19), (33, 130), (512, 512), (4096, 768), (32768, 512), (1000, 1024),
          (300, 4096)]


def accuracy(out: Path) -> bool:
    rows, ok = [], True
    env = environment("cuda")
    for backend in ("triton", "cuda"):
        why = backends.unavailable_reason(backend, "cuda")
        if why:
            print(f"SKIP {backend}: {why}")
            rows.append({"backend": backend, "status": f"unavailable: {why}", **env})
            ok = False
            continue
        for B, D in SHAPES:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for layout in (("contiguous", "transposed") if B * D < 1e6 else ("contiguous",)):
                    x = make_inputs(B, D, dtype=dtype, device="cuda", seed=B + D, layout=layout)
                    m = 0.05 * torch.randn(D, device="cuda")
                    t0 = time.perf_counter()
                    res = compare_with_oracle(backend, x, m)
                    bad = failures(res)
                    ok &= not bad
                    for q, err, bound in res:
                        rows.append({"backend": backend, "B": B, "D": D, "dtype": str(dtype),
                                     "layout": layout, "quantity": q, "error": err,
                                     "bound": bound, "status": "ok" if err <= bound else "FAIL",
                                     **env})
                    print(f"{backend:6s} B={B:6d} D={D:5d} {str(dtype):15s} {layout:10s} "
                          f"{'ok' if not bad else 'FAIL ' + str(bad)} ({time.perf_counter() - t0:.2f}s)",
                          flush=True)
        # the options and EMA paths, once per backend
        x = make_inputs(64, 256, device="cuda", seed=1)
        for opts in (dict(momentum=0.0), dict(avl=False), dict(pvl=False), dict(update=False),
                     dict(normalize=False)):
            bad = failures(compare_with_oracle(backend, x, torch.zeros(256, device="cuda"), **opts))
            ok &= not bad
            print(f"{backend:6s} options {opts}: {'ok' if not bad else 'FAIL ' + str(bad)}")
    write_csv(rows, out / "gpu_accuracy.csv")
    return ok


def main():
    out = Path(os.environ.get("OUT") or "benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    info.main()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible: this script is for a GPU machine")
    ok = accuracy(out)
    import bench_dive_op
    bench_dive_op.main(["--device", "cuda", "--dtypes", "float32", "bfloat16", "--repeats", "50",
                        "--out", str(out / "dive_op_cuda.csv")])
    try:
        import open_clip  # noqa: F401
    except ImportError as exc:
        print(f"SKIP step benchmark: open_clip not importable ({exc})")
    else:
        import bench_step
        bench_step.main(["--device", "cuda", "--model", "ViT-B-16", "--batch", "256", "--amp",
                         "bf16", "--data", "synthetic", "--steps", "10", "--warmup", "3",
                         "--rounds", "1", "--workers", "6", "--ref-size", "2048",
                         "--out", str(out / "step_cuda.csv")])
    print("ACCURACY", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
