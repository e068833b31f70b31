"""Every GPU kernel configuration compiles for sm_80 and sm_90, without a GPU, and none
spills (``tools.aot``: Triton through ``triton.compile`` for a named target,
CUDA through nvcc --resource-usage); the committed benchmarks/results/gpu_kernels.csv is
what this code compiles to. The machine code (SASS) holds to the design (docs/design.md):
statistics tile loops that load with cp.async and at most two barriers a tile, backward
loads and stores of 8 or 16 bytes, a finalisation whose loops over parts hold no barrier,
division or call, exactly one acquire-release integer ticket and no floating-point
atomics anywhere, at least 32 KiB of input in flight per SM, and a number of parts that
does not depend on the batch."""
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import aot  # the checkout's tools/ (pytest's pythonpath), not the package

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "benchmarks" / "results" / "gpu_kernels.csv"
KEY = ("backend", "kernel", "config", "arch")

triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
HAS_NVCC = bool(shutil.which("nvcc") or os.environ.get("CUDA_HOME"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """One compile of everything per test session (a few minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("aot") / "gpu_kernels.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "tools.aot", "--out", str(out)]
    proc = subprocess.run(cmd + ([] if HAS_NVCC else ["--no-cuda"]), capture_output=True,
                          text=True, env=env, timeout=1800, cwd=ROOT)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return list(csv.DictReader(f))


def _label(r):
    return " ".join(r[k] for k in KEY)


def _of(rows, backend, *kernels):
    return [r for r in rows if r["backend"] == backend and r["kernel"] in kernels]


def _int(value) -> int:
    return int(value) if value not in ("", None) else 0


# Triton's rows wider than 512 values span warps: a row sum crosses them through shared
# memory, one barrier a round, and a tile needs two rounds (the four squared norms, then
# the previous row's |u|^2 and |v|^2) after the pipeline's wait.
TRITON_ACROSS_WARPS_BARRIERS = 4
KIB = 1024


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
    assert kernels == {"dive_stats_kernel", "dive_stats_rows_kernel", "dive_finalize_kernel",
                       "dive_backward_kernel", "dive_backward_rows_kernel"}
    # Per architecture: the fast statistics kernel with 2 chunks a thread for the 9 dtype
    # pairs and with 4 for the 5 pairs that hold a float32 (4-element chunks reach D = 4096),
    # the portable statistics and both backward kernels for 9 pairs, 3 dtypes of m.
    assert len(cuda) == (9 + 5 + 9 + 9 + 9 + 3) * len(aot.ARCHS)
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
    """Regenerate with `python -m tools.aot` after changing a kernel or a launcher."""
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


def test_statistics_tile_loops_stream(rows):
    """The statistics kernels the launchers choose for aligned rows: the tile loop copies
    with cp.async (LDGSTS), loads nothing narrower than 8 bytes into registers, and takes at
    most two barriers a tile, none in inner loops (Triton's rows across warps: four)."""
    stats = _of(rows, "cuda", "dive_stats_kernel") + _of(rows, "triton", "_dive_stats_kernel")
    assert stats
    bad = []
    for r in stats:
        limit = (TRITON_ACROSS_WARPS_BARRIERS if r["backend"] == "triton"
                 and "rows_in_warp=0" in r["config"] else 2)
        if not (_int(r["async_loads_hot"]) > 0 and _int(r["narrow_loads_hot"]) == 0
                and _int(r["inner_loop_barriers"]) == 0 and _int(r["barriers_per_tile"]) <= limit):
            bad.append(f"{_label(r)}: {r['async_loads_hot']} async, {r['narrow_loads_hot']} "
                       f"narrow loads, {r['barriers_per_tile']} barriers a tile")
    assert not bad, "\n".join(bad)


def test_backward_loads_and_stores_wide(rows):
    """The backward kernels (fast CUDA, every Triton configuration): every load of a row
    and every store of a gradient is 8 or 16 bytes; the only narrow loads are the three
    upstream gradients."""
    backward = (_of(rows, "cuda", "dive_backward_kernel")
                + _of(rows, "triton", "_dive_backward_kernel"))
    assert backward
    bad = [f"{_label(r)}: {r['narrow_loads']} narrow loads, {r['narrow_stores']} narrow stores"
           for r in backward if _int(r["narrow_loads"]) > 3 or _int(r["narrow_stores"]) > 0
           or _int(r["wide_loads"]) == 0 or _int(r["wide_stores"]) == 0]
    assert not bad, "\n".join(bad)


def test_finalisation_loops_hold_no_barrier_division_or_call(rows):
    fin = _of(rows, "cuda", "dive_finalize_kernel") + _of(rows, "triton", "_dive_finalize_kernel")
    assert fin
    bad = [f"{_label(r)}: {r['loop_barriers']} barriers, {r['loop_divisions']} divisions, "
           f"{r['loop_calls']} calls in loops" for r in fin
           if _int(r["loops"]) == 0 or _int(r["loop_barriers"]) or _int(r["loop_divisions"])
           or _int(r["loop_calls"])]
    assert not bad, "\n".join(bad)


def test_one_acquire_release_ticket_and_no_float_atomics(rows):
    """Determinism: no floating-point atomic anywhere; the finalisation's one atomic is
    the integer ticket, acquire-release at GPU scope; the other kernels have none."""
    assert not [_label(r) for r in rows if _int(r["float_atomics"])]
    for r in rows:
        if r["kernel"].strip("_") == "dive_finalize_kernel":
            assert _int(r["atomics"]) == 1 and _int(r["acq_rel_ticket"]) == 1, _label(r)
        else:
            assert _int(r["atomics"]) == 0, _label(r)


def test_bytes_in_flight(rows):
    """Enough loads outstanding per SM to cover HBM's latency at full bandwidth (~32 KiB
    on an H100/H200): blocks per SM times the bytes a block requests ahead."""
    fast = (_of(rows, "cuda", "dive_stats_kernel", "dive_backward_kernel")
            + _of(rows, "triton", "_dive_stats_kernel", "_dive_backward_kernel"))
    short = [f"{_label(r)}: {r['bytes_in_flight_per_sm']}" for r in fast
             if _int(r["bytes_in_flight_per_sm"]) < 32 * KIB]
    assert not short, "\n".join(short)


def test_parts_do_not_depend_on_the_batch(monkeypatch):
    """The statistics' parts are one wave of the device (the CUDA launcher's grid, the
    Triton launcher's programs on a GPU), whatever the batch, so every result is the same
    at every batch size on one kind of GPU; under the interpreter the Triton launcher keeps
    its own constant."""
    import torch

    from dive_fast.ops import dive_triton, extension
    from dive_fast.testing import make_inputs
    monkeypatch.setattr(dive_triton, "_sm_count", lambda index: 114)  # an H100 PCIe
    for D in (16, 512, 1024, 4096):
        cfg = dive_triton.launch_config(D)
        blocks = dive_triton.STATS_BLOCKS_PER_SM[cfg.block_d, cfg.num_warps]
        assert dive_triton.num_parts(torch.device("cuda", 0), cfg) == 114 * blocks
    if extension.load()[0]:
        ops = extension.ops()
        assert {int(ops.cuda_stats_plan(d, 4, 4, True, 232448)[7]) for d in (8, 512, 4096)} \
            == {int(ops.cuda_parts())}
    if os.environ.get("TRITON_INTERPRET") == "1":
        for B in (1, 300):
            means, scalars, _ = dive_triton.triton_stats(*make_inputs(B, 24, seed=B), True)
            assert means.shape[0] == dive_triton.INTERPRETED_PARTS
            assert scalars[:, 0].sum().item() == B


def test_statistics_take_one_wave_on_each_gpu(rows):
    """Every compiled statistics configuration holds at least the blocks per SM the Triton
    launcher counts, so its parts (SMs x those blocks) are one wave on an A100, an H100
    SXM/PCIe and an H200 (the L40S column is reported: its 100 KB an SM may hold fewer)."""
    from dive_fast.ops import dive_triton
    stats = [r for r in rows if aot.KIND.get(r["kernel"]) == "stats" and not r["error"]]
    assert stats
    for r in stats:
        if r["backend"] == "triton":
            cfg = dict(kv.split("=") for kv in r["config"].split() if "=" in kv)
            need = dive_triton.STATS_BLOCKS_PER_SM[int(cfg["CHUNKS"]) * int(cfg["VEC"]),
                                                   int(cfg["warps"])]
            assert int(r["blocks_per_sm"]) >= need, (_label(r), r["blocks_per_sm"], need)
        for gpu in ("A100", "H100_SXM", "H100_PCIe", "H200"):
            assert r[f"waves_{gpu}"] in ("", 1, "1"), (_label(r), gpu, r[f"waves_{gpu}"])


def test_waves_column_by_hand():
    """The kernel table's waves for rows written by hand: the D = 512 configuration at 166
    registers (one block an SM) and a CUDA kernel at two, on each GPU of their arch."""
    triton_row = {"backend": "triton", "kernel": "_dive_stats_kernel", "arch": "sm_90",
                  "config": "D<=512 BLOCK_B=8 CHUNKS=2 VEC=256 rows_in_warp=1 warps=8",
                  "registers": "166", "threads": "256", "shared_bytes": "65536", "error": ""}
    cuda_row = {"backend": "cuda", "kernel": "dive_stats_kernel", "arch": "sm_80",
                "config": "ft=fp32 pre=bf16 chunks=2 stages=3", "registers": "80",
                "threads": "256", "shared_bytes": "75264", "error": ""}
    aot.add_waves([triton_row, cuda_row])
    assert [triton_row.get(f"waves_{g}") for g in ("H100_SXM", "H100_PCIe", "H200", "A100")] \
        == [1, 1, 1, None]
    assert [cuda_row.get(f"waves_{g}") for g in ("A100", "L40S", "H200")] == [1, 1, None]
