"""The prepared GPU check: first the kernels (each kernel's device time, a finalisation
sweep over parts and dims, a pure-read bandwidth reference, an accuracy smoke test of every
kernel, host against device time at the per-rank size) and the op table (eager,
torch.compile, triton, cuda: wall and device time against the HBM floor); then every GPU
backend and dtype against the float64 oracle, the kernel launches per call, the
training-step benchmark, the co-scheduled frozen forward against the sequential one, and
the memory benchmark (FLYP against DiVE, full batch and micro-batched).

    bash benchmarks/gpu_check/gpu_check.sh             # on a CUDA machine (budget: 5 minutes)
    bash benchmarks/gpu_check/gpu_check.sh --dry-run   # anywhere: the same script on the CPU

The dry run takes every stage through its code on CPU tensors, with small shapes: the
Triton kernels under TRITON_INTERPRET=1, the CUDA backend skipped with the reason, the
step benchmark with the micro model. Writes, to $OUT or --out (default: on a GPU
benchmarks/results/local/, dry run a temporary folder), CSVs named by device:
kernels_<device>.csv, gpu_accuracy_<device>.csv, app_<device>.csv (the app's inputs and
uses, with output hashes that two devices' runs compare), gpu_launches_<device>.csv,
dive_op_<device>.csv (and .png),
step_<device>.csv, streams_<device>.csv, memory_B<batch>_<device>.csv. Exit status 0 only
when every stage passed.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # before triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

# benchmarks/ (common, bench_*); this folder (check_streams) is the script's own sys.path[0]
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from common import device_name, environment, write_csv  # noqa: E402

from dive_fast import DiVELoss, info  # noqa: E402
from dive_fast.ops import backends  # noqa: E402
from dive_fast.ops.dive import kernels as kernel_table  # noqa: E402
from dive_fast.testing import LaunchCounter, compare_with_oracle, failures, make_inputs  # noqa: E402

GPU_BACKENDS = ("triton", "cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (B', D): edge cases, odd dims, the per-rank batch, CLIP's widths, the large batch.
SHAPES = {"gpu": [(1, 1), (7, 19), (33, 130), (512, 512), (32768, 512), (300, 4096)],
          "dry": [(1, 1), (7, 19), (33, 130)]}
MAX_LAUNCHES = {"forward": 2, "backward": 1}
# The step table users compare: open_clip's own trainer, FLYP at B + B', fast DiVE, and fast
# DiVE compiled (last: a cut of the budget loses it first). Co-scheduling is the streams
# stage's (it also checks equality); naive DiVE and FLYP(B) were measured on the first run.
STEP_VARIANTS = ["open_clip_train", "flyp-B+B'", "dive-fast", "dive-fast-compiled"]
# Expected seconds of each stage on an H200, in running order, with where the figure comes
# from: the five-minute budget is the build (gpu_check.sh) plus these, and a stage whose
# expectation no longer fits in what is left is skipped, said so, not cut half-way.
EXPECTED_S = {"kernels": (50, "estimate"),   # Triton compiles + profiler windows
              "accuracy": (30, "estimate"),  # 54 s on the first run with 8 shapes; now 6
              "app": (20, "estimate"),       # the app's inputs, graphs, streams, 8 GiB view
              "op": (40, "estimate"),        # 81 s on the first run with four impls x 8 shapes
              "launches": (5, "first run: 0-12 s"),
              "step": (85, "estimate"),      # 4 processes; the compiled one ~40 s of compiling
              "streams": (20, "estimate"),   # B = 32, two modes (B = 64: run it alone)
              "memory": (100, "first run, B = 256")}  # only with --memory: past the budget
DEFAULT_STAGES = [name for name in EXPECTED_S if name != "memory"]
BUILD_S = (50, "first run: 55 s for sm_90a")  # gpu_check.sh's nvcc build


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Check:
    """Runs the stages, each timed; a stage that raises or fails is reported, and the
    others still run."""

    def __init__(self, budget_s: float | None = None):
        self.results: list[tuple[str, str, float]] = []
        self.deadline = None if budget_s is None else time.perf_counter() + budget_s

    def stage(self, name, fn, *args):
        t0 = time.perf_counter()
        expected = EXPECTED_S.get(name, (0, ""))[0]
        if self.deadline is not None and t0 + expected > self.deadline:
            left = self.deadline - t0
            print(f"\n== {name}: SKIPPED, {left:.0f} s of the budget left, {expected} s expected",
                  flush=True)
            self.results.append((name, "BUDGET", 0.0))
            return
        print(f"\n== {name}", flush=True)
        try:
            ok = fn(*args)
            status = "PASS" if ok is not False else "FAIL"
        except (Exception, SystemExit):  # a benchmark's exit must not end the whole check
            traceback.print_exc()
            status = "ERROR"
        self.results.append((name, status, time.perf_counter() - t0))
        print(f"== {name}: {status} ({self.results[-1][2]:.0f} s)", flush=True)

    def report(self) -> bool:
        print("\nstage                 status  seconds")
        for name, status, seconds in self.results:
            print(f"{name:20s}  {status:6s}  {seconds:7.1f}")
        return all(status in ("PASS", "BUDGET") for _, status, _ in self.results)


def skipped(backend: str, device: str, rows: list, env: dict) -> str | None:
    """None when the backend runs on this device, else why not (printed and recorded)."""
    why = backends.unavailable_reason(backend, device)
    if why is None and device == "cuda" and not torch.cuda.is_available():
        why = "no CUDA device visible"
    if why:
        print(f"SKIP {backend}: {why}")
        rows.append({"backend": backend, "status": f"skipped: {why}", **env})
    return why


def accuracy(device: str, shapes, out: Path) -> bool:
    rows, ok = [], True
    env = environment(device)
    for backend in GPU_BACKENDS:
        if skipped(backend, device, rows, env):
            ok &= device == "cpu"  # on a GPU machine both backends must run
            continue
        for (B, D), dtype in ((s, d) for s in shapes for d in DTYPES):
            for layout in ("contiguous", "transposed") if B * D < 1e6 else ("contiguous",):
                # The tests' inputs: seeded, m of the same scale (at D = 1, where u and v are
                # 0 up to rounding, a much smaller m puts the fp32 rounding of the
                # normalisation over the relative bound of every backend, the reference too).
                x = make_inputs(B, D, dtype=dtype, device=device, seed=B * 31 + D, layout=layout)
                m = 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(1)).to(device)
                t0 = time.perf_counter()
                res = compare_with_oracle(backend, x, m)
                bad = failures(res)
                ok &= not bad
                rows += [{"backend": backend, "B": B, "D": D, "dtype": str(dtype), "layout": layout,
                          "quantity": q, "error": err, "bound": bound,
                          "status": "ok" if err <= bound else "FAIL", **env}
                         for q, err, bound in res]
                verdict = "ok" if not bad else f"FAIL {bad}"
                print(f"{backend:6s} B={B:6d} D={D:5d} {str(dtype):15s} {layout:10s} {verdict} "
                      f"({time.perf_counter() - t0:.2f}s)", flush=True)
        x = make_inputs(64, 256, device=device, seed=1)
        for opts in (dict(momentum=0.0), dict(avl=False), dict(pvl=False), dict(update=False),
                     dict(normalize=False)):
            bad = failures(compare_with_oracle(backend, x, torch.zeros(256, device=device), **opts))
            ok &= not bad
            print(f"{backend:6s} options {opts}: {'ok' if not bad else 'FAIL ' + str(bad)}")
    write_csv(rows, out / f"gpu_accuracy_{slug(env['device'])}.csv")
    return ok


def app_inputs(B: int, D: int, device: str, case: str):
    """The training app's inputs: ``img_ft``, ``txt_ft`` bf16 row slices of one
    concatenated tower output, ``img_pre``, ``txt_pre`` fp32 views of the frozen cache's
    [N, 2D] rows (row stride 2D). ``misaligned``: the bf16 rows start 2 bytes off 16;
    ``expanded``: every frozen row one row (stride 0)."""
    g = torch.Generator().manual_seed(B * 7 + D)
    batch = torch.randn(2 * B * D + 8, generator=g).to(device, torch.bfloat16)
    start = 1 if case == "misaligned" else 0
    ft = batch[start:start + 2 * B * D].view(2 * B, D)
    cache = torch.randn(B + 3, 2 * D, generator=g, device="cpu").to(device)
    pre = cache[3:]
    if case == "expanded":
        pre = cache[:1].expand(B, 2 * D)
    return [ft[:B], pre[:, :D], ft[B:], pre[:, D:]]


def _digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _twice_on_one_workspace(backend: str, x, m) -> bool:
    """The finalisation run twice on the statistics' workspace: the same bits (its ticket
    reset by the first)."""
    k = kernel_table(backend)
    means, scalars, ws = k.stats(*x, True)
    runs = [k.finalize(means, scalars, ws, m, None, None, 0.99, 1e3, 1e3) for _ in range(2)]
    return all(torch.equal(a, b) for a, b in zip(*runs))


def _step(loss_fn, x):
    a, t = x[0].detach().clone().requires_grad_(True), x[2].detach().clone().requires_grad_(True)
    loss = loss_fn(a, x[1], t, x[3])
    loss.backward()
    return loss.detach(), a.grad, t.grad


def _graph_replay(backend: str, x, D: int) -> bool:
    """A whole DiVE step (forward, EMA update, backward) captured in a CUDA graph, replayed
    twice: the eager step's bits each time, m advanced as eagerly."""
    eager, graphed = (DiVELoss(D, backend=backend, check_values=False).to(x[0].device)
                      for _ in range(2))
    want = [_step(eager, x) for _ in range(3)]
    a = x[0].detach().clone().requires_grad_(True)
    t = x[2].detach().clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        warm = DiVELoss(D, backend=backend, check_values=False).to(x[0].device)
        warm(a, x[1], t, x[3]).backward()
    torch.cuda.current_stream().wait_stream(side)
    a.grad = t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = graphed(a, x[1], t, x[3])
        loss.backward()
    got = []  # the capture ran nothing: each replay is one step
    for _ in range(3):
        graph.replay()
        got.append((loss.clone(), a.grad.clone(), t.grad.clone()))
    return all(torch.equal(g, w) for gs, ws in zip(got, want) for g, w in zip(gs, ws)) \
        and torch.equal(graphed.m, eager.m)


def _two_streams(backend: str, xs, D: int) -> bool:
    """Two steps on two streams at once: each the bits of the same step alone."""
    alone = [_step(DiVELoss(D, backend=backend).to(x[0].device), x) for x in xs]
    streams = [torch.cuda.Stream() for _ in xs]
    fns = [DiVELoss(D, backend=backend, check_values=False).to(x[0].device) for x in xs]
    outs = [None] * len(xs)
    for i, (stream, x) in enumerate(zip(streams, xs)):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs[i] = _step(fns[i], x)
    torch.cuda.synchronize()
    return all(torch.equal(g, w) for o, a in zip(outs, alone) for g, w in zip(o, a))


def _wide_view(backend: str, device: str, D: int = 16) -> bool:
    """B' x row stride past 2^31 elements: a bf16 view of row stride 2^30 over 8 GiB, a NaN
    planted where a 32-bit offset would wrap; the contiguous copy's bits."""
    B, stride, base = 3, 2**30, 2**31
    try:
        storage = torch.empty(base + (B - 1) * stride + D, dtype=torch.bfloat16, device=device)
    except (RuntimeError, MemoryError):
        print(f"{backend:6s} wide view: skipped (8 GiB not available)")
        return True
    storage[:D] = float("nan")
    x = make_inputs(B, D, dtype=torch.bfloat16, device=device, seed=5)
    view = storage.as_strided((B, D), (stride, 1), base)
    view.copy_(x[0])
    got = _step(DiVELoss(D, backend=backend, check_values=False).to(device), [view, *x[1:]])
    want = _step(DiVELoss(D, backend=backend, check_values=False).to(device), x)
    del storage, view
    return all(torch.equal(g, w) for g, w in zip(got, want))


def app(device: str, out: Path) -> bool:
    """What the app runs, per GPU backend: its inputs (bf16 slices beside fp32 cache views,
    plain, misaligned and expanded) against the float64 oracle with output hashes; the
    finalisation twice on one workspace; on a GPU a CUDA-graph step, two streams and a view
    past 2^31 elements (the dry run takes the last through the interpreter)."""
    rows, ok = [], True
    env = environment(device)
    gpu = device == "cuda"
    B, D = (4096, 512) if gpu else (9, 24)
    for backend in GPU_BACKENDS:
        if skipped(backend, device, rows, env):
            ok &= device == "cpu"
            continue
        m = 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(1)).to(device)
        checks = {}
        for case in ("plain", "misaligned", "expanded"):
            x = app_inputs(B, D, device, case)
            bad = failures(compare_with_oracle(backend, x, m))
            loss_fn = DiVELoss(D, backend=backend).to(device)
            rows.append({"backend": backend, "case": case, "B": B, "D": D,
                         "hash": _digest(*_step(loss_fn, x), loss_fn.m),
                         "status": "ok" if not bad else f"FAIL {bad}", **env})
            checks[f"oracle {case}"] = not bad
        x = app_inputs(B, D, device, "plain")
        checks["finalisation twice"] = _twice_on_one_workspace(backend, x, m)
        if gpu:
            checks["cuda graph"] = _graph_replay(backend, x, D)
            checks["two streams"] = _two_streams(
                backend, [x, app_inputs(B // 2, D, device, "misaligned")], D)
        checks["wide view"] = _wide_view(backend, device)
        for name, passed in checks.items():
            print(f"{backend:6s} {name}: {'ok' if passed else 'FAIL'}", flush=True)
            ok &= passed
        rows += [{"backend": backend, "case": name, "status": "ok" if passed else "FAIL", **env}
                 for name, passed in checks.items() if not name.startswith("oracle")]
    write_csv(rows, out / f"app_{slug(env['device'])}.csv")
    return ok


def _cuda_kernels(fn) -> tuple[list[str], list[float]]:
    """Names and device durations (us) of the GPU kernels fn issues (the profiler's
    device-side events)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name for e in events], [e.time_range.elapsed_us() for e in events]


# Where the launches are counted, and (on a GPU) each kernel timed: the per-rank size, and
# a large batch in bf16, where the first H200 run put the forward at 5-25x the HBM floor
# (the kernel times say whether the statistics or the finalisation costs it).
LAUNCH_SHAPES = {"gpu": [(512, 512, torch.float32), (32768, 1024, torch.bfloat16)],
                 "dry": [(16, 32, torch.float32)]}


def launches(device: str, out: Path) -> bool:
    """Kernels per DiVELoss forward and backward: at most two and one. On a GPU the
    profiler counts device kernels and times each; on the CPU (dry run) the Triton path is
    counted under the interpreter (LaunchCounter), as the tests do."""
    rows, ok = [], True
    env = environment(device)
    for backend in GPU_BACKENDS:
        if skipped(backend, device, rows, env):
            continue
        for B, D, dtype in LAUNCH_SHAPES["gpu" if device == "cuda" else "dry"]:
            ok &= _count_launches(backend, device, B, D, dtype, rows, env)
    write_csv(rows, out / f"gpu_launches_{slug(env['device'])}.csv")
    return ok


def _count_launches(backend: str, device: str, B: int, D: int, dtype, rows: list,
                    env: dict) -> bool:
    """One shape's forward and backward: their kernels (names and, on a GPU, device us)."""
    ok = True
    x = make_inputs(B, D, dtype=dtype, device=device, seed=0)
    a, t = (x[i].clone().requires_grad_(True) for i in (0, 2))
    loss_fn = DiVELoss(D, backend=backend, check_values=False).to(device)
    loss_fn(a, x[1], t, x[3]).backward()  # compile and warm up first
    seed = torch.ones((), device=device)
    calls = {"forward": lambda: loss_fn(a, x[1], t, x[3])}
    loss = calls["forward"]()
    calls["backward"] = lambda: torch.autograd.grad(loss, (a, t), seed, retain_graph=True)
    for direction, call in calls.items():
        if device == "cuda":
            call()  # a second call: no first-call work in the profile
            (kernels, micros), other = _cuda_kernels(call), []
        else:
            with LaunchCounter() as counter:
                call()
            kernels, micros, other = counter.kernels, [], counter.kernel_ops()
        passed = len(kernels) <= MAX_LAUNCHES[direction] and not other
        ok &= passed
        short = [re.sub(r"^void |\(.*$|dive_fast::\(anonymous namespace\)::", "", k)
                 for k in kernels]
        rows.append({"backend": backend, "direction": direction, "B": B, "D": D,
                     "dtype": str(dtype), "kernels": len(kernels), "names": " ".join(kernels),
                     "kernel_us": " ".join(f"{us:.1f}" for us in micros),
                     "other_ops": " ".join(other), "status": "ok" if passed else "FAIL", **env})
        timed = [f"{k} {us:.1f} us" for k, us in zip(short, micros)] or short
        print(f"{backend:6s} {direction:8s} B={B} D={D} {str(dtype):14s} {len(kernels)} "
              f"kernel(s): {timed}{' + ops ' + str(other) if other else ''} "
              f"{'ok' if passed else 'FAIL'}")
    return ok


# Per-kernel device times at the large batch (the forward's two kernels and the backward).
KERNEL_SHAPES = [(32768, 512), (32768, 1024)]
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
SWEEP = {"parts": (8, 64, 264, 1024), "dims": (512, 1024, 4096)}
SMOKE_SHAPES = {"gpu": [(512, 512), (33, 130), (1000, 1024), (32768, 1024)],
                "dry": [(9, 16), (5, 19)]}


def _kernel_calls(backend: str, x, m, g):
    """The three kernels of one forward and backward, each a call (statistics, the
    finalisation of their output, the backward with m_new), on these inputs."""
    k = kernel_table(backend)
    B = x[0].shape[0]
    means, scalars, ws = k.stats(*x, True)
    m_new = k.finalize(means, scalars, ws, m, None, None, 0.99, 1e3, 1e3)[3]
    return {"stats": lambda: k.stats(*x, True),
            "finalize": lambda: k.finalize(means, scalars, ws, m, None, None, 0.99, 1e3, 1e3),
            "backward": lambda: k.backward(*x, m_new, g, None, None, 1e3, 1e3, 2.0 / B, True),
            }, means.shape[0]


def _finalize_call(backend: str, K: int, D: int):
    """A finalisation of K synthetic parts of D columns (100 rows each), on the workspace
    the backend's own statistics make for width D."""
    k = kernel_table(backend)
    g = torch.Generator(device="cuda").manual_seed(K + D)
    means = torch.randn(K, 2, D, device="cuda", generator=g)
    scalars = torch.zeros(K, 14, device="cuda")
    scalars[:, 0] = 100.0
    m = torch.zeros(D, device="cuda")
    ws = k.stats(*(torch.randn(2, D, device="cuda", generator=g) for _ in range(4)), True)[2]
    return lambda: k.finalize(means, scalars, ws, m, None, None, 0.99, 1e3, 1e3)


def kernels(device: str, out: Path) -> bool:
    """Each kernel's device time (the profiler) against its bytes at the data sheet's
    bandwidth and against the roofline model; the finalisation over parts and dims; a
    pure read's bandwidth; every kernel against the float64 oracle (a smoke test); host
    against device time of a DiVELoss step at 512 x 512."""
    import bench_dive_op as bench
    rows, ok = [], True
    env = environment(device)
    gpu = device == "cuda"
    peak = bench.peak_bandwidth(env["device"]) if gpu else None
    bandwidth = bench.MODEL_EFFICIENCY * (peak or 4.8e12)
    print(f"roofline model ({'this GPU' if peak else 'an H200'}: {bandwidth / 1e12:.2f} TB/s, "
          f"{bench.DEVICE_LAUNCH_S * 1e6:.0f} us a launch, {bench.L2_ROUND_TRIP_S * 1e6:.1f} us an "
          "L2 round trip), microseconds:")
    for (B, D), dtype in ((s, d) for s in KERNEL_SHAPES for d in KERNEL_DTYPES):
        model = bench.roofline(B, D, torch.empty((), dtype=dtype).element_size(), bandwidth)
        print(f"  B'={B} D={D} {str(dtype):15s} " + " ".join(
            f"{k} {v * 1e6:6.1f}" for k, v in model.items()))
        rows.append({"stage": "model", "B": B, "D": D, "dtype": str(dtype),
                     **{f"model_{k}_us": v * 1e6 for k, v in model.items()}, **env})
    if gpu:
        x = torch.empty(1 << 28, device="cuda")  # 1 GiB, read once by a sum
        (read_ms,) = bench.kernel_device_ms({"read": lambda: x.sum()}).values()
        read_bw = x.numel() * 4 / (read_ms / 1e3)
        del x
        print(f"pure read (sum of 1 GiB): {read_ms:.3f} ms, {read_bw / 1e9:.0f} GB/s"
              f"{f' ({read_bw / peak:.0%} of the data sheet)' if peak else ''}")
        rows.append({"stage": "read", "device_ms": read_ms, "GBps": read_bw / 1e9, **env})
    for backend in GPU_BACKENDS:
        if skipped(backend, device, rows, env):
            ok &= not gpu
            continue
        for (B, D), dtype in ((s, d) for s in SMOKE_SHAPES["gpu" if gpu else "dry"]
                              for d in KERNEL_DTYPES):
            x = make_inputs(B, D, dtype=dtype, device=device, seed=B + D)
            bad = failures(compare_with_oracle(backend, x, 0.1 * torch.ones(D, device=device)))
            ok &= not bad
            print(f"smoke {backend:6s} B={B:6d} D={D:5d} {str(dtype):15s} "
                  f"{'ok' if not bad else 'FAIL ' + str(bad)}")
            rows.append({"stage": "smoke", "backend": backend, "B": B, "D": D,
                         "dtype": str(dtype), "status": "ok" if not bad else f"FAIL {bad}",
                         **env})
        if not gpu:
            continue
        for (B, D), dtype in ((s, d) for s in KERNEL_SHAPES for d in KERNEL_DTYPES):
            x = make_inputs(B, D, dtype=dtype, device=device, seed=0)
            calls, parts = _kernel_calls(backend, x, torch.zeros(D, device=device),
                                         torch.ones((), device=device))
            times = bench.kernel_device_ms(calls)
            itemsize = x[0].element_size()
            model = bench.roofline(B, D, itemsize, bandwidth, parts)
            nbytes = {"stats": 4 * B * D * itemsize, "finalize": 2 * parts * (2 * D + 14) * 4,
                      "backward": 6 * B * D * itemsize}
            for kernel, ms in times.items():
                floor = nbytes[kernel] / peak * 1e3 if peak else float("nan")
                rows.append({"stage": "kernel", "backend": backend, "kernel": kernel, "B": B,
                             "D": D, "dtype": str(dtype), "device_ms": ms,
                             "bytes": nbytes[kernel], "GBps": nbytes[kernel] / ms / 1e6,
                             "hbm_floor_ms": floor, "ratio_to_hbm": ms / floor,
                             "model_ms": model[kernel] * 1e3, **env})
                print(f"{backend:6s} {kernel:9s} B'={B} D={D} {str(dtype):15s} {ms * 1e3:8.1f} us "
                      f"{nbytes[kernel] / ms / 1e6:7.0f} GB/s {ms / floor:5.2f}x floor "
                      f"(model {model[kernel] * 1e6:6.1f} us)")
            total = sum(times.values())
            fwd_bwd_floor = 10 * B * D * itemsize / peak * 1e3 if peak else float("nan")
            print(f"{backend:6s} fwd+bwd   B'={B} D={D} {str(dtype):15s} {total * 1e3:8.1f} us "
                  f"{total / fwd_bwd_floor:5.2f}x the fwd+bwd floor")
        sweep = {f"K={K} D={D}": _finalize_call(backend, K, D)
                 for K in SWEEP["parts"] for D in SWEEP["dims"]}
        for label, ms in bench.kernel_device_ms(sweep).items():
            print(f"{backend:6s} finalize {label:14s} {ms * 1e3:7.1f} us")
            rows.append({"stage": "finalize sweep", "backend": backend, "config": label,
                         "device_ms": ms, **env})
        D = 512
        x = make_inputs(512, D, device=device, seed=1)
        a, t = (x[i].clone().requires_grad_(True) for i in (0, 2))
        loss_fn = DiVELoss(D, backend=backend, check_values=False).to(device)
        step = lambda: loss_fn(a, x[1], t, x[3]).backward()  # noqa: E731
        wall = bench.measure(step, device, repeats=50)["median_ms"]
        step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            step()
        issue = (time.perf_counter() - t0) / 200 * 1e3  # the host's rate, before the sync
        torch.cuda.synchronize()
        (device_ms,) = bench.kernel_device_ms({"step": step}).values()
        print(f"{backend:6s} DiVELoss fwd+bwd 512 x 512: wall {wall * 1e3:6.1f} us (synced), "
              f"host {issue * 1e3:6.1f} us a call, device {device_ms * 1e3:6.1f} us")
        rows.append({"stage": "host vs device", "backend": backend, "B": 512, "D": D,
                     "wall_ms": wall, "host_ms": issue, "device_ms": device_ms, **env})
    write_csv(rows, out / f"kernels_{slug(env['device'])}.csv")
    return ok


def op_timings(device: str, out: Path) -> bool:
    import bench_dive_op
    name = slug(device_name(device))
    if device == "cuda":
        args = ["--dtypes", "float32", "bfloat16", "--batches", "512", "32768", "--dims", "512",
                "1024", "--repeats", "50", "--min-time", "0.3"]
    else:
        args = ["--dtypes", "float32", "--batches", "64", "--dims", "32", "--repeats", "3",
                "--min-time", "0"]
    bench_dive_op.main(["--device", device, *args, "--out", str(out / f"dive_op_{name}.csv")])


def open_clip_missing(stage: str) -> bool:
    """The training stages need open_clip, which a bare GPU image may lack."""
    try:
        import open_clip  # noqa: F401
    except ImportError as exc:
        print(f"SKIP {stage}: open_clip not importable ({exc})")
        return True
    return False


def step(device: str, out: Path) -> bool:
    if open_clip_missing("step benchmark"):
        return device == "cpu"
    import bench_step
    name = slug(device_name(device))
    if device == "cuda":
        args = ["--model", "ViT-B-16", "--batch", "256", "--amp", "bf16", "--data", "synthetic",
                "--steps", "6", "--warmup", "3", "--rounds", "1", "--workers", "6",
                "--ref-size", "1024"]
    else:
        args = ["--model", "dive-micro", "--batch", "8", "--data", "synthetic", "--steps", "2",
                "--warmup", "1", "--rounds", "1", "--workers", "0", "--ref-size", "32"]
    variants = list(STEP_VARIANTS)
    try:
        import open_clip_train.main  # noqa: F401  (it needs pandas, which a bare image may lack)
    except ImportError as exc:
        print(f"SKIP the open_clip_train variant: not importable ({exc})")
        variants.remove("open_clip_train")
    bench_step.main(["--device", device, *args, "--variants", *variants,
                     "--out", str(out / f"step_{name}.csv")])


def streams(device: str, out: Path) -> bool:
    """The co-scheduled frozen forward (side stream) against the sequential one: equal
    losses and gradients, and both timed (on the CPU there is no side stream)."""
    if open_clip_missing("stream check"):
        return device == "cpu"
    import check_streams
    name = slug(device_name(device))
    # The small per-rank batch of a multi-GPU run, where one forward idles the GPU; B = 64
    # and up: benchmarks/gpu_check/check_streams.py --batch 64 (the check's five minutes
    # hold one batch since it gained the app stage).
    ok = True
    for batch in ("32",) if device == "cuda" else ("8",):
        args = (["--model", "ViT-B-16", "--amp", "bf16", "--steps", "6"] if device == "cuda"
                else ["--model", "dive-micro", "--steps", "3"])
        ok &= check_streams.main(["--device", device, *args, "--batch", batch,
                                  "--out", str(out / f"streams_B{batch}_{name}.csv")])
    return ok


def memory(device: str, out: Path) -> bool:
    """Activation memory, peak allocated and step time of FLYP against DiVE (full batch and
    micro-batched, ``benchmarks/bench_memory.py``), ViT-B-16 bf16 at B = B' = 512 (at 256 the
    step stage already records FLYP's and DiVE's peaks)."""
    if open_clip_missing("memory benchmark"):
        return device == "cpu"
    import bench_memory
    name = slug(device_name(device))
    if device == "cuda":
        # dive-k4 (not measured on the first run) last: a cut of the budget loses it first.
        runs = [("512", ["flyp-B", "dive", "dive-k4+ckpt", "dive-k4"])]
        common = ["--model", "ViT-B-16", "--amp", "bf16", "--data", "synthetic", "--steps", "3",
                  "--ref-size", "2048"]
    else:
        runs = [("8", ["flyp-B", "dive", "dive-k2+ckpt"])]
        common = ["--model", "dive-micro", "--data", "synthetic", "--steps", "1",
                  "--ref-size", "32"]
    for batch, variants in runs:
        bench_memory.main(["--device", device, *common, "--batch", batch, "--variants", *variants,
                           "--out", str(out / f"memory_B{batch}_{name}.csv")])


def build_parser() -> argparse.ArgumentParser:
    from dive_fast._cli.arguments import DefaultsFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="run every stage on the CPU (Triton interpreted, CUDA skipped)")
    p.add_argument("--out", default=os.environ.get("OUT") or None,
                   help="folder of the CSVs (unset: $OUT, else benchmarks/results/local on a GPU, "
                        "so committed figures are replaced only on purpose, and a temporary "
                        "folder in a dry run)")
    p.add_argument("--skip", nargs="*", default=[], choices=list(EXPECTED_S),
                   help="stages not to run")
    p.add_argument("--memory", action="store_true",
                   help="also the memory benchmark (about 100 s; measured on the first run)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds the stages may take (gpu_check.sh passes what the build left "
                        "of five minutes); unset: no limit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device visible: run on a GPU machine, or pass --dry-run")
        return 2
    out = Path(args.out or (tempfile.mkdtemp(prefix="gpu-check-") if args.dry_run
                            else "benchmarks/results/local"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"gpu_check on {device_name(device)}{' (dry run)' if args.dry_run else ''} -> {out}")
    info.main([])
    check = Check(args.budget)
    stages = {"kernels": (kernels, device, out),
              "accuracy": (accuracy, device, SHAPES["dry" if args.dry_run else "gpu"], out),
              "app": (app, device, out),
              "op": (op_timings, device, out), "launches": (launches, device, out),
              "step": (step, device, out), "streams": (streams, device, out),
              "memory": (memory, device, out)}
    assert list(stages) == list(EXPECTED_S)  # one order, one budget table
    for name, (fn, *fn_args) in stages.items():
        if name not in args.skip and (name in DEFAULT_STAGES or args.memory):
            check.stage(name, fn, *fn_args)
    ok = check.report()
    print("GPU CHECK", "PASS" if ok else "FAIL", f"(results in {out})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
