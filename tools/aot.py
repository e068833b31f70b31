"""Every GPU kernel compiled ahead of time for named targets, without a GPU, with its
resource use (registers, spills, shared memory) as ptxas reports it.

    python -m tools.aot --out benchmarks/results/gpu_kernels.csv   # sm_80 and sm_90

Triton: every configuration the launchers can choose (``launch_config`` over the D
buckets, fp32/bf16/fp16 for the fine-tuned and for the frozen inputs, normalisation on and
off; the finalisation's variants, for every dtype of m) compiled by ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` down to a cubin, specialised as the runtime would for
contiguous, 16-byte aligned inputs; registers and spills from ptxas's report of that
compile, shared memory from the compiled metadata.
CUDA: ``csrc/dive_cuda.cu`` compiled to a cubin per architecture by nvcc with
``--resource-usage`` (the device code of the build: same flags), one row per template
instance; the statistics kernels' dynamic shared memory is their launcher's plan
(``cuda_stats_plan``, from ``csrc/dive_cuda_plan.h``).

``blocks_per_sm`` estimates how many blocks of the kernel fit on one SM at once, the
least of the register, thread and shared-memory limits; ``bytes_in_flight_per_sm`` that
times the bytes of input a block has requested ahead of its arithmetic. The other columns
are read from the SASS (``tools.sass.kernel_facts``): the statistics tile loop's
barriers and loads, the backward's loads and stores, the finalisation's loops, and the
atomics of every kernel; ``tests/ops/test_gpu_kernels.py`` holds them to the design.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import io
import itertools
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from tools import sass

ARCHS = (80, 90)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ROOT = Path(__file__).resolve().parents[1]  # the checkout: csrc/ and benchmarks/
# Per SM: 64K registers, 2048 threads; shared memory per SM and per block (opt-in maximum).
REGISTERS_PER_SM, THREADS_PER_SM, REGISTER_UNIT = 65536, 2048, 256
SHARED_PER_SM = {80: 167936, 90: 233472}
SHARED_PER_BLOCK = {80: 166912, 90: 232448}
FIELDS = ("backend", "kernel", "config", "arch", "registers", "spill_store_bytes",
          "spill_load_bytes", "stack_bytes", "shared_bytes", "threads", "blocks_per_sm",
          "bytes_in_flight_per_sm", "barriers_per_tile", "inner_loop_barriers",
          "narrow_loads_hot", "wide_loads_hot", "async_loads_hot", "narrow_loads", "wide_loads",
          "narrow_stores", "wide_stores", "loops", "loop_barriers", "loop_divisions",
          "loop_calls", "atomics", "float_atomics", "acq_rel_ticket", "waves_A100",
          "waves_H100_SXM", "waves_H100_PCIe", "waves_H200", "waves_L40S", "error")
# The statistics kernels' waves per GPU (their parts: one full wave by the launchers' rule):
# SMs, the compile whose registers stand for the GPU's, threads and shared memory per SM.
GPUS = {"A100": (108, 80, 2048, 167936), "H100_SXM": (132, 90, 2048, 233472),
        "H100_PCIe": (114, 90, 2048, 233472), "H200": (132, 90, 2048, 233472),
        "L40S": (142, 80, 1536, 102400)}
KIND = {"_dive_stats_kernel": "stats", "_dive_backward_kernel": "backward",
        "_dive_finalize_kernel": "finalize", "dive_stats_kernel": "stats",
        "dive_stats_rows_kernel": "stats", "dive_backward_kernel": "backward",
        "dive_backward_rows_kernel": "backward", "dive_finalize_kernel": "finalize"}


def blocks_per_sm(registers: int, threads: int, shared: int, arch: int,
                  threads_per_sm: int = THREADS_PER_SM, shared_per_sm: int | None = None) -> int:
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    limits = [REGISTERS_PER_SM // max(1, per_warp * warps), threads_per_sm // threads, 32]
    if shared:  # 1 KiB reserved per block
        limits.append((shared_per_sm or SHARED_PER_SM[arch]) // (shared + 1024))
    return min(limits)


def _launcher_blocks_per_sm(row: dict, resident: int) -> int:
    """The blocks per SM the launcher counts for a statistics row: Triton's table for its
    launch configuration; CUDA's occupancy query, i.e. what fits (``resident``)."""
    if row["backend"] != "triton":
        return resident
    from dive_fast.ops.dive_triton import STATS_BLOCKS_PER_SM
    cfg = dict(kv.split("=") for kv in row["config"].split() if "=" in kv)
    return STATS_BLOCKS_PER_SM[int(cfg["CHUNKS"]) * int(cfg["VEC"]), int(cfg["warps"])]


def add_waves(rows: list[dict]) -> list[dict]:
    """Each statistics row's waves on each GPU of its architecture: the launcher's parts
    (SMs x its blocks per SM) over what the GPU holds at once (the kernel's registers,
    threads and shared memory against the GPU's)."""
    from dive_fast.ops.dive_triton import stats_parts, waves
    for row in rows:
        if KIND.get(row["kernel"]) != "stats" or row.get("error") or not row.get("registers"):
            continue
        for name, (sms, arch, threads_per_sm, shared_per_sm) in GPUS.items():
            if row["arch"] != f"sm_{arch}":
                continue
            resident = blocks_per_sm(int(row["registers"]), int(row["threads"]),
                                     int(row["shared_bytes"]), arch, threads_per_sm,
                                     shared_per_sm)
            parts = stats_parts(sms, _launcher_blocks_per_sm(row, resident))
            row[f"waves_{name}"] = waves(parts, sms, resident)
    return rows


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """{entry function: registers, spill stores/loads, stack frame, static shared} from
    ``ptxas -v`` (as nvcc --resource-usage and Triton's compile print it)."""
    out = {}
    for block in log.split("Compiling entry function '")[1:]:
        name = block.split("'", 1)[0]
        def grab(pattern):
            m = re.search(pattern, block)
            return int(m.group(1)) if m else 0
        out[name] = {"registers": grab(r"Used (\d+) registers"),
                     "spill_store_bytes": grab(r"(\d+) bytes spill stores"),
                     "spill_load_bytes": grab(r"(\d+) bytes spill loads"),
                     "stack_bytes": grab(r"(\d+) bytes stack frame"),
                     "static_shared": grab(r"(\d+) bytes smem")}
    return out


# --- Triton ------------------------------------------------------------------------------

def _dim_buckets():
    from dive_fast.ops.dive_triton import MAX_DIM, MIN_BLOCK_D
    d = MIN_BLOCK_D
    while d <= MAX_DIM:
        yield d
        d *= 2


def triton_jobs() -> list[tuple[str, str, dict]]:
    """(kernel, config label, job) for every configuration the launchers can choose."""
    from dive_fast.ops.dive_triton import FINALIZE, launch_config
    jobs = []
    pairs = list(itertools.product(DTYPES, repeat=2))
    for D, (ft, pre), normalize in itertools.product(_dim_buckets(), pairs, (True, False)):
        sizes = (ELEMENT_BYTES[ft], ELEMENT_BYTES[pre])
        cfg = launch_config(D, min(sizes), max(sizes))
        label = (f"D<={D} BLOCK_B={cfg.block_b} CHUNKS={cfg.chunks} VEC={cfg.vec} "
                 f"rows_in_warp={int(cfg.rows_in_warp)} warps={cfg.num_warps} "
                 f"ft={ft} pre={pre} normalize={int(normalize)}")
        for kernel in ("_dive_stats_kernel", "_dive_backward_kernel"):
            jobs.append((kernel, label, dict(kernel=kernel, D=D, ft=ft, pre=pre,
                                             normalize=normalize, num_warps=cfg.num_warps,
                                             block_b=cfg.block_b, chunks=cfg.chunks,
                                             vec=cfg.vec, rows_in_warp=cfg.rows_in_warp)))
    for m, has_b, has_m_out in itertools.product(DTYPES, (False, True), (False, True)):
        label = (f"BLOCK_K={FINALIZE['BLOCK_K']} BLOCK_D={FINALIZE['BLOCK_D']} "
                 f"BLOCK_P={FINALIZE['BLOCK_P']} warps={FINALIZE['num_warps']} m={m} "
                 f"all_reduced_b={int(has_b)} m_out={int(has_m_out)}")
        jobs.append(("_dive_finalize_kernel", label,
                     dict(kernel="_dive_finalize_kernel", m=m, has_b=has_b, has_m_out=has_m_out)))
    return jobs


def _kernel_args(job: dict):
    """Example arguments (tiny tensors for the pointers: only dtype and alignment count),
    constexprs and compile options for one job, as its launcher passes them."""
    import torch

    from dive_fast.ops import dive_triton as k
    from dive_fast.ops.dive_reference import NUM_SCALARS

    ptr = lambda name: torch.empty(16, dtype=getattr(torch, DTYPES[name]))  # noqa: E731
    f32, i32 = ptr("fp32"), torch.empty(16, dtype=torch.int32)
    if job["kernel"] == "_dive_finalize_kernel":
        m = ptr(job["m"])
        args = [f32, f32, m, f32, m, m, f32, f32, f32, f32, f32, i32, 100, 512, 0.99, 0.01,
                1000.0, 1000.0]
        fin = k.FINALIZE
        return k._dive_finalize_kernel, args, dict(
            HAS_B=job["has_b"], HAS_M_OUT=job["has_m_out"], NUM_SCAL=NUM_SCALARS,
            BLOCK_K=fin["BLOCK_K"], BLOCK_D=fin["BLOCK_D"], BLOCK_P=fin["BLOCK_P"]), dict(
                num_warps=fin["num_warps"], num_stages=fin["num_stages"])
    D, B = job["D"], 1000  # contiguous rows: stride D, column stride 1
    a, p = ptr(job["ft"]), ptr(job["pre"])
    strides = [D, 1] * 4
    constexprs = dict(NORMALIZE=job["normalize"], BLOCK_B=job["block_b"], CHUNKS=job["chunks"],
                      VEC=job["vec"], ROWS_IN_WARP=job["rows_in_warp"],
                      WIDE=job.get("wide", False))
    if job["kernel"] == "_dive_stats_kernel":
        args = [a, p, a, p, f32, f32, i32, B, D, *strides]
        stats = dict(constexprs, NUM_SCAL=NUM_SCALARS, NUM_STAGES=k.STAGES,
                     SUMS64=job["block_b"] <= k.SUMS64_MAX_ROWS)
        return k._dive_stats_kernel, args, stats, dict(num_warps=job["num_warps"])
    args = [a, p, a, p, f32, f32, f32, f32, a, a, B, D, *strides, 20.0, 20.0, 0.01, 0.01]
    return k._dive_backward_kernel, args, constexprs, dict(num_warps=job["num_warps"])


def _triton_compile(job: dict, arch: int):
    """(compiled kernel, its launch options): ``triton.compile`` for the named target."""
    import triton
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import native_specialize_impl

    kernel, args, constexprs, options = _kernel_args(job)
    names = [n for n in kernel.arg_names if n not in constexprs]
    signature, attrs = {}, {}
    for name, value in zip(names, args):  # the runtime's own specialisation of each argument
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif attr:
            attrs[(kernel.arg_names.index(name),)] = BaseBackend.parse_attr(attr)
    signature.update({n: "constexpr" for n in constexprs})
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                          target=GPUTarget("cuda", arch, 32), options=options), options


def triton_ptx(kernel: str, D: int, arch: int = 90, normalize: bool = True,
               dtype: str = "fp32") -> str:
    """The PTX of one statistics or backward configuration (what the launcher would choose
    for rows of D values of ``dtype``), compiled without a GPU."""
    from dive_fast.ops.dive_triton import launch_config
    cfg = launch_config(D, ELEMENT_BYTES[dtype])
    job = dict(kernel=kernel, D=D, ft=dtype, pre=dtype, normalize=normalize,
               num_warps=cfg.num_warps, block_b=cfg.block_b, chunks=cfg.chunks, vec=cfg.vec,
               rows_in_warp=cfg.rows_in_warp)
    return _triton_compile(job, arch)[0].asm["ptx"]


def compile_triton(job: dict, arch: int) -> dict:
    """One configuration for one architecture: the ptxas report of a real compile."""
    num_warps = _kernel_args(job)[3]["num_warps"]
    row = {"backend": "triton", "kernel": job["kernel"], "arch": f"sm_{arch}",
           "threads": 32 * num_warps, "error": ""}
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled, _ = _triton_compile(job, arch)
    except Exception as exc:  # a configuration that does not compile is a finding
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    (entry,) = parse_ptxas(log.getvalue()).values()
    shared = compiled.metadata.shared
    blocks = blocks_per_sm(entry["registers"], 32 * num_warps, shared, arch)
    (instrs,) = sass.disassemble(compiled.asm["cubin"]).values()
    return {**row, **{k: entry[k] for k in ("registers", "spill_store_bytes", "spill_load_bytes",
                                            "stack_bytes")},
            "shared_bytes": shared, "compile_s": round(time.perf_counter() - t0, 2),
            "blocks_per_sm": blocks, "bytes_in_flight_per_sm": _triton_in_flight(job, blocks),
            "cubin_bytes": len(compiled.asm["cubin"]),
            **sass.kernel_facts(instrs, KIND[job["kernel"]])}


def _triton_in_flight(job: dict, blocks: int) -> int | str:
    """Bytes of the inputs a SM has requested and not yet received, at most: the
    statistics kernel's pipelined tiles (STAGES - 1 ahead), the backward's one tile."""
    from dive_fast.ops.dive_triton import STAGES
    if job["kernel"] == "_dive_finalize_kernel":
        return ""
    tile = job["block_b"] * job["chunks"] * job["vec"] * 2 * (ELEMENT_BYTES[job["ft"]]
                                                              + ELEMENT_BYTES[job["pre"]])
    return blocks * tile * ((STAGES - 1) if job["kernel"] == "_dive_stats_kernel" else 1)


def _worker_init(cache_dir: str) -> None:
    import triton
    triton.knobs.cache.dir = cache_dir  # a fresh cache: every compile runs ptxas (and logs)
    triton.knobs.nvidia.dump_ptxas_log = True


def _compile_one(item):
    (kernel, label, job), arch = item
    return {**compile_triton(job, arch), "config": label}


def triton_rows(archs=ARCHS, jobs: int | None = None) -> list[dict]:
    """Every Triton configuration for every architecture, in worker processes (spawned:
    the kernels must be real JIT functions, not the interpreter's)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    items = list(itertools.product(triton_jobs(), archs))
    with tempfile.TemporaryDirectory() as cache, concurrent.futures.ProcessPoolExecutor(
            jobs or os.cpu_count(), mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init, initargs=(cache,)) as pool:
        return list(pool.map(_compile_one, items, chunksize=4))


# --- CUDA --------------------------------------------------------------------------------

CXX_TYPES = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16"}


def _nvcc():
    home = os.environ.get("CUDA_HOME")
    return str(Path(home) / "bin" / "nvcc") if home else shutil.which("nvcc")


def _cuda_config(demangled: str) -> tuple[str, dict]:
    """(kernel name, template arguments by name) from a demangled instance's name."""
    name = re.search(r"(\w+)<", demangled).group(1)
    types = re.search(r"<(.*?)>\(", demangled).group(1).split(", ")
    labels = [CXX_TYPES.get(t, t) for t in types]
    keys = ("m",) if name == "dive_finalize_kernel" else ("ft", "pre", "chunks")
    return name, dict(zip(keys, labels))


def _cuda_launch(ops, kernel: str, args: dict, arch: int):
    """(threads, dynamic shared bytes, bytes one block has in flight, label) of a CUDA
    kernel instance as its launcher would start it: the statistics kernels at a dim that
    selects them (their shared memory does not depend on D otherwise: the fast kernel's
    ring holds chunks of 256 threads, the portable one rows of at most 4096 values), the
    fast backward at 256 threads (its widest rows take 512, with the same registers)."""
    if ops is None or kernel == "dive_finalize_kernel":
        return 256, 0, 0, ""
    ft, pre = ELEMENT_BYTES[args["ft"]], ELEMENT_BYTES[args["pre"]]
    chunk = 16 // max(ft, pre)
    if kernel == "dive_stats_kernel":
        dim = int(args["chunks"]) * 256 * chunk  # the widest row with these chunks a thread
        plan = [int(v) for v in ops.cuda_stats_plan(dim, ft, pre, True, SHARED_PER_BLOCK[arch])]
        stages, stage_bytes, shared, threads = plan[4], plan[5], plan[6], plan[8]
        return threads, shared, (stages - 1) * stage_bytes, f"stages={stages}"
    if kernel == "dive_stats_rows_kernel":
        dim = int(ops.cuda_max_dim())
        plan = [int(v) for v in ops.cuda_stats_plan(dim, ft, pre, False, SHARED_PER_BLOCK[arch])]
        return 256, plan[6], 0, f"dynamic_shared@D={dim}"
    if kernel == "dive_backward_kernel":
        return 256, 0, 256 * 2 * chunk * (2 * ft + 2 * pre), ""
    return 256, 0, 0, ""


def _plan_ops():
    """The extension's launch-plan ops (csrc/dive_cuda_plan_ops.cpp), or None when
    dive_fast._C is not built (the statistics kernels' dynamic shared memory is then left
    out of their rows)."""
    import torch
    try:
        import dive_fast._C  # noqa: F401  (importing it registers the ops)
    except ImportError:
        return None
    return torch.ops.dive_fast_C


def cuda_rows(archs=ARCHS) -> list[dict]:
    """Each CUDA kernel instance's resources and machine-code facts per architecture, from
    nvcc --resource-usage and the cubin's SASS."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("no CUDA toolkit (nvcc) found")
    ops = _plan_ops()
    flags = ["-O3", "-lineinfo", "-std=c++20", *COMMON_NVCC_FLAGS, f"-I{ROOT / 'csrc'}",
             *(f"-I{p}" for p in include_paths(device_type="cuda")),
             f"-I{sysconfig.get_paths()['include']}",
             "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]

    def compile_arch(arch):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            proc = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "--resource-usage", *flags,
                                   str(ROOT / "csrc" / "dive_cuda.cu"), "-o", f"{tmp}/k.cubin"],
                                  capture_output=True, text=True)
            code = sass.disassemble(f"{tmp}/k.cubin") if proc.returncode == 0 else {}
            return arch, proc, code, time.perf_counter() - t0

    rows = []
    with concurrent.futures.ThreadPoolExecutor(len(archs)) as pool:
        for arch, proc, code, seconds in pool.map(compile_arch, archs):
            if proc.returncode != 0:
                rows.append({"backend": "cuda", "kernel": "dive_cuda.cu", "config": "",
                             "arch": f"sm_{arch}", "error": proc.stderr[-500:]})
                continue
            entries = parse_ptxas(proc.stdout + proc.stderr)
            demangled = subprocess.run(["c++filt"], input="\n".join(entries), capture_output=True,
                                       text=True).stdout.splitlines()
            for (mangled, entry), readable in sorted(zip(entries.items(), demangled),
                                                     key=lambda x: x[1]):
                kernel, args = _cuda_config(readable)
                threads, dynamic, per_block, launch = _cuda_launch(ops, kernel, args, arch)
                config = " ".join([f"{k}={v}" for k, v in args.items()]
                                  + ([launch] if launch else []))
                shared = entry["static_shared"] + dynamic
                blocks = blocks_per_sm(entry["registers"], threads, shared, arch)
                rows.append({"backend": "cuda", "kernel": kernel, "config": config,
                             "arch": f"sm_{arch}", "threads": threads,
                             **{k: entry[k] for k in ("registers", "spill_store_bytes",
                                                      "spill_load_bytes", "stack_bytes")},
                             "shared_bytes": shared, "blocks_per_sm": blocks,
                             "bytes_in_flight_per_sm": blocks * per_block if per_block else "",
                             "compile_s": round(seconds, 1), "error": "",
                             **sass.kernel_facts(code[mangled], KIND[kernel])})
    return rows


def collect(archs=ARCHS, jobs: int | None = None, cuda: bool = True) -> list[dict]:
    return add_waves(triton_rows(archs, jobs) + (cuda_rows(archs) if cuda else []))


def write_csv(rows: list[dict], path) -> None:
    import triton
    versions = {"triton": triton.__version__, "nvcc": _nvcc_version()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS + tuple(versions), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, **versions} for r in rows)


def _nvcc_version() -> str:
    nvcc = _nvcc()
    if nvcc is None:
        return "none"
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


def summary(rows: list[dict]) -> str:
    """Per backend, kernel and architecture: configurations, registers, spills, shared."""
    lines = ["| backend | kernel | arch | configs | registers | spilling configs | shared bytes "
             "| blocks/SM |", "|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["backend"], r["kernel"], r["arch"])  # noqa: E731
    for (backend, kernel, arch), group in itertools.groupby(sorted(rows, key=key), key=key):
        group = [r for r in group if not r.get("error")]
        if not group:
            continue
        def span(field):
            lo, hi = min(int(r[field]) for r in group), max(int(r[field]) for r in group)
            return f"{lo}-{hi}" if lo != hi else str(lo)
        spills = sum(int(r["spill_store_bytes"]) + int(r["spill_load_bytes"]) > 0 for r in group)
        lines.append(f"| {backend} | {kernel.strip('_')} | {arch} | {len(group)} | "
                     f"{span('registers')} | {spills} | {span('shared_bytes')} | "
                     f"{span('blocks_per_sm')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_kernels.csv"))
    p.add_argument("--archs", type=int, nargs="+", default=list(ARCHS))
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPUs)")
    p.add_argument("--no-cuda", action="store_true", help="Triton only (no CUDA toolkit)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = collect(tuple(args.archs), args.jobs, cuda=not args.no_cuda)
    write_csv(rows, args.out)
    print(summary(rows))
    errors = [r for r in rows if r.get("error")]
    for r in errors:
        print(f"FAILED {r['backend']} {r['kernel']} {r['config']} {r['arch']}: {r['error']}")
    print(f"{len(rows)} kernel configurations in {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
