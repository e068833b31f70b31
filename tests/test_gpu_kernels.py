"""Every GPU kernel configuration compiles for sm_80 and sm_90, without a GPU, and none
spills (``dive_fast.ops.aot``: Triton through ``triton.compile`` for a named target,
CUDA through nvcc --resource-usage); the committed benchmarks/results/gpu_kernels.csv is
what this code compiles to."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dive_fast.ops import aot

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "benchmarks" / "results" / "gpu_kernels.csv"
KEY = ("backend", "kernel", "config", "arch")

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
HAS_NVCC = bool(shutil.which("nvcc") or os.environ.get("CUDA_HOME"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """One compile of everything per test session (a few minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("aot") / "gpu_kernels.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "dive_fast.ops.aot", "--out", str(out)]
    proc = subprocess.run(cmd + ([] if HAS_NVCC else ["--no-cuda"]), capture_output=True,
                          text=True, env=env, timeout=1800)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return list(csv.DictReader(f))


def _label(r):
    return " ".join(r[k] for k in KEY)


def test_every_configuration_compiles(rows):
    failed = [f"{_label(r)}: {r['error']}" for r in rows if r["error"]]
    assert not failed, "\n".join(failed)
    triton_rows = [r for r in rows if r["backend"] == "triton"]
    assert len(triton_rows) == len(aot.triton_jobs()) * len(aot.ARCHS)
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in aot.ARCHS}


@pytest.mark.skipif(not HAS_NVCC, reason="no CUDA toolkit (nvcc): CUDA kernels not compiled")
def test_every_cuda_kernel_reports_resources(rows):
    cuda = [r for r in rows if r["backend"] == "cuda"]
    kernels = {r["kernel"] for r in cuda}
    assert kernels == {"dive_stats_kernel", "dive_finalize_kernel", "dive_backward_kernel"}
    # 9 dtype pairs of the statistics and backward kernels, 3 dtypes of m, per architecture
    assert len(cuda) == (9 + 9 + 3) * len(aot.ARCHS)
    assert all(int(r["registers"]) > 0 for r in cuda)


def test_no_spills(rows):
    spills = [f"{_label(r)}: {r['registers']} registers, {r['spill_store_bytes']} B stored, "
              f"{r['spill_load_bytes']} B loaded" for r in rows
              if int(r["spill_store_bytes"] or 0) or int(r["spill_load_bytes"] or 0)]
    assert not spills, "\n".join(spills)


def test_shared_memory_fits(rows):
    over = [_label(r) for r in rows
            if int(r["shared_bytes"]) > aot.SHARED_PER_BLOCK[int(r["arch"][3:])]]
    assert not over, over


def test_committed_csv_is_current(rows):
    """Regenerate with `python -m dive_fast.ops.aot` after changing a kernel or a launcher."""
    with open(COMMITTED) as f:
        committed = {tuple(r[k] for k in KEY): r for r in csv.DictReader(f)}
    fresh = {tuple(r[k] for k in KEY): r for r in rows}
    if not HAS_NVCC:
        committed = {k: v for k, v in committed.items() if k[0] == "triton"}
    assert fresh.keys() == committed.keys(), sorted(fresh.keys() ^ committed.keys())[:10]
    for key, r in fresh.items():
        old = committed[key]
        tool = "triton" if r["backend"] == "triton" else "nvcc"
        if old[tool] == r[tool]:  # the same compiler: the same resources
            for field in ("registers", "spill_store_bytes", "shared_bytes"):
                assert old[field] == r[field], (key, field, old[field], r[field])
