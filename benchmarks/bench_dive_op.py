"""DiVE op benchmark: every backend against eager PyTorch, torch.compile and the memory floor.

    python benchmarks/bench_dive_op.py                       # CPU, the issue's grid
    python benchmarks/bench_dive_op.py --host --impls cpu --batches 512 32768 --dims 512
    python benchmarks/bench_dive_op.py --device cuda --dtypes float32 bfloat16

``--host``: the Python layer's cost, B' = D = 8 on the CPU with one thread, interleaved
round by round: a DiVELoss forward+backward (check_values off and on), the functional
dive_loss, and the floor, a bare ``autograd.Function`` that calls the C++ ops directly
(``host_cost``). On a GPU each timed shape also gets its kernels' own device time
(``device_ms``: one profiler pass after the wall-clock timing) and the roofline model's
prediction (``model_ms``, ``roofline``).

Writes long-format CSV (op, impl, mode, B, D, dtype, median/p20/p80 ms, ratios to the
floors, device, versions) and a PNG. The floor of the exact algorithm: m must be updated
from every row before any gradient is final, so the forward reads the four inputs once
and the backward reads them again and writes two gradients: 10*B*D values (fwd 4, bwd 6).
``floor_ms`` is the best time of a device copy of those bytes, timed call by call
interleaved with the op's own calls (same footprint, hot with hot), and on a GPU whose peak is
known also at that peak (``hbm_floor_ms``: e.g. 4.8 TB/s on an H200). Small batches are
bound by launches instead: ``launch_floor_ms`` is the launches a call needs (GPU: fwd 2,
bwd 1; CPU: one op each way) at the cost of one trivial op measured in the same run.
What is timed is what a user's call costs: ``dive_loss`` (or the eager formula) and
``torch.autograd.grad``, nothing else.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, measure, pyplot, result_path, write_csv  # noqa: E402

from dive_fast import dive_loss  # noqa: E402
from dive_fast.ops import backends  # noqa: E402
from dive_fast.ops.dive_reference import dive_loss_eager  # noqa: E402
from dive_fast.testing import make_inputs  # noqa: E402

FLOOR_VALUES = {"fwd": 4, "bwd": 6, "fwd+bwd": 10}
LAUNCHES = {"cuda": {"fwd": 2, "bwd": 1, "fwd+bwd": 3}, "cpu": {"fwd": 1, "bwd": 1, "fwd+bwd": 2}}
PEAK_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # HBM, from the data sheets


def peak_bandwidth(name: str) -> float | None:
    """Bytes/s of the device's memory by its data sheet, where known."""
    return next((gbps * 1e9 for key, gbps in PEAK_GBPS.items() if key in name), None)


# The roofline model's constants, H100/H200-class: a dependent launch's gap on the device,
# and an L2 round trip under load (the finalisation's loops wait for a few of them).
DEVICE_LAUNCH_S = 3e-6
L2_ROUND_TRIP_S = 0.6e-6
MODEL_EFFICIENCY = 0.9  # of the data sheet's bandwidth that a streaming read reaches


def roofline(B: int, D: int, itemsize: int, bandwidth: float, parts: int = 264,
             finalize_warps: int = 16, unroll: int = 8) -> dict[str, float]:
    """Predicted device seconds of each kernel from its bytes and launches: the
    statistics read the four inputs once and write the parts' partials; the finalisation
    is a few chains of L2 round trips (two passes over the parts, then the last block's
    sums); the backward reads the inputs and writes both gradients."""
    partials = parts * (2 * D + 14) * 4
    stats = DEVICE_LAUNCH_S + (4 * B * D * itemsize + partials) / bandwidth
    rounds = 2 * math.ceil(parts / (finalize_warps * unroll)) + math.ceil(parts / (32 * 4)) + 3
    finalize = DEVICE_LAUNCH_S + rounds * L2_ROUND_TRIP_S
    backward = DEVICE_LAUNCH_S + (4 * B * D * itemsize + 2 * B * D * itemsize + 4 * D) / bandwidth
    return {"stats": stats, "finalize": finalize, "backward": backward,
            "fwd": stats + finalize, "bwd": backward, "fwd+bwd": stats + finalize + backward}


def kernel_device_ms(calls: dict, repeats: int = 5) -> dict[str, float]:
    """Median device milliseconds per call of each labelled function: the durations of the
    GPU kernels that start inside its profiled window (a synchronize closes each window,
    so kernels issued from autograd's own thread count too)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    for fn in calls.values():
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for label, fn in calls.items():
            for i in range(repeats):
                with record_function(f"{label}#{i}"):
                    fn()
                    torch.cuda.synchronize()
    events = prof.events()
    kernels = [(e.time_range.start, e.time_range.elapsed_us()) for e in events
               if e.device_type == torch.autograd.DeviceType.CUDA]
    out = {}
    for label in calls:
        per_call = []
        for e in events:
            if e.name.startswith(f"{label}#") and e.device_type == torch.autograd.DeviceType.CPU:
                start, end = e.time_range.start, e.time_range.end
                per_call.append(sum(us for t, us in kernels if start <= t <= end))
        # No kernel seen in a window (a profiler that did not record the device): NaN, not 0.
        out[label] = (statistics.median(per_call) / 1e3 if per_call and max(per_call) > 0
                      else float("nan"))
    return out


def host_cost(rounds: int = 30, calls: int = 200) -> list[dict]:
    """Microseconds of a DiVELoss forward+backward at B' = D = 8 on the CPU, one thread,
    against a bare autograd.Function calling the C++ ops (the floor of any Python layer):
    the implementations take turns, round by round; each round's best of ``calls``, and
    the median over rounds."""
    from dive_fast import DiVELoss
    from dive_fast.ops import extension
    from dive_fast.testing import make_inputs
    if not extension.load()[0]:
        return []
    ops = extension.ops()

    class Bare(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, a0, t, t0, m):
            out = ops.dive_forward(a, a0, t, t0, m, m, True, 0.99, 1000.0, 1000.0)
            ctx.save_for_backward(a, a0, t, t0, out[3])
            return out[0]

        @staticmethod
        def backward(ctx, g):
            a, a0, t, t0, m_new = ctx.saved_tensors
            ga, gt = ops.dive_backward(a, a0, t, t0, m_new, g, None, None, 1000.0, 1000.0,
                                       2.0 / a.shape[0], True)
            return ga, None, gt, None, None

    x = make_inputs(8, 8, seed=0)
    a, t = x[0].clone().requires_grad_(True), x[2].clone().requires_grad_(True)
    m = torch.zeros(8)
    quiet, checked = DiVELoss(8, check_values=False), DiVELoss(8, check_values=True)
    impls = {
        "bare autograd.Function": lambda: torch.autograd.grad(Bare.apply(a, x[1], t, x[3], m),
                                                              (a, t)),
        "DiVELoss": lambda: torch.autograd.grad(quiet(a, x[1], t, x[3]), (a, t)),
        "DiVELoss check_values": lambda: torch.autograd.grad(checked(a, x[1], t, x[3]), (a, t)),
        "dive_loss": lambda: torch.autograd.grad(
            dive_loss(a, x[1], t, x[3], m, check_values=False).loss, (a, t)),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {name: [] for name in impls}
        for _ in range(rounds):
            for name, fn in impls.items():
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                best[name].append(min(times) * 1e6)
    finally:
        torch.set_num_threads(threads)
    floor = statistics.median(best["bare autograd.Function"])
    return [{"op": "host", "impl": name, "mode": "fwd+bwd", "B": 8, "D": 8, "dtype": "float32",
             "median_us": statistics.median(v), "min_us": min(v),
             "ratio_to_bare": statistics.median(v) / floor} for name, v in best.items()]


def launch_seconds(device: str) -> float:
    """One trivial op, issued back to back: the per-launch (GPU) or per-call (CPU) cost."""
    x = torch.zeros(1, device=device)
    n = 200
    burst = measure(lambda: [x.add_(1.0) for _ in range(n)], device, repeats=5)
    return burst["median_ms"] / n / 1e3


def eager_impl(inputs, m):
    return dive_loss_eager(*inputs, m)[0]


def backend_impl(name):
    def run(inputs, m):
        return dive_loss(*inputs, m, backend=name, check_values=False).loss
    return run


def implementations(device: str, dtype, D: int, wanted):
    # A fresh compile per shape: dynamo's cache is per code object, and past its
    # recompile limit it silently falls back to eager.
    torch._dynamo.reset()
    impls = {"eager": eager_impl, "torch.compile": torch.compile(eager_impl, dynamic=False)}
    for name in backends.BACKENDS:
        if backends.unavailable_reason(name, device.split(":")[0], dtype, D) is None:
            impls[name] = backend_impl(name)
    return {k: v for k, v in impls.items() if not wanted or k in wanted}


def copy_of(nbytes: int, device: str, dtype):
    """A device copy that moves ``nbytes`` (half read, half written): the floor's yardstick
    at the op's own footprint, so a small op and its copy are both cache-hot or both not."""
    src = torch.empty(max(1, nbytes // 2 // dtype.itemsize), dtype=dtype, device=device)
    src.uniform_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def set_floors(rows: list[dict]) -> None:
    """Each shape and mode's floor: the best copy of its bytes seen beside any of its
    implementations' calls; every implementation's ratio is to that one floor."""
    best: dict = {}
    for r in rows:
        key = (r["dtype"], r["B"], r["D"], r["mode"])
        best[key] = min(best.get(key, math.inf), r["copy_best_ms"])
    for r in rows:
        floor_ms = best[(r["dtype"], r["B"], r["D"], r["mode"])]
        r.update(floor_ms=floor_ms, copy_GBps=r["bytes"] / floor_ms / 1e6,
                 ratio_to_floor=r["median_ms"] / floor_ms)


def time_modes(fn, inputs, m, device, repeats, min_time_s):
    """Each mode's timing, interleaved with a copy of the mode's floor bytes."""
    a, t = (inputs[i].detach().requires_grad_(True) for i in (0, 2))
    args = [a, inputs[1], t, inputs[3]]
    B, D = a.shape

    def fwd():
        with torch.no_grad():
            fn(args, m)

    def fwd_bwd():
        torch.autograd.grad(fn(args, m), (a, t))

    loss = fn(args, m)

    def bwd():
        torch.autograd.grad(loss, (a, t), retain_graph=True)

    modes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    out = {}
    for mode, call in modes.items():
        copy = copy_of(FLOOR_VALUES[mode] * B * D * a.element_size(), device, a.dtype)
        stats = measure(call, device, repeats, min_time_s=min_time_s, beside=copy)
        stats["copy_best_ms"] = stats.pop("beside_best_ms")
        stats["copy_median_ms"] = stats.pop("beside_median_ms")
        out[mode] = stats
    if device.startswith("cuda"):
        for mode, ms in kernel_device_ms(modes).items():
            out[mode]["device_ms"] = ms
    return out


def plot(rows, path) -> bool:
    """The fwd+bwd bar chart at ``path``; False (and said why) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    sel = [r for r in rows if r["mode"] == "fwd+bwd"]
    shapes = sorted({(r["dtype"], r["B"], r["D"]) for r in sel})
    impls = list(dict.fromkeys(r["impl"] for r in sel))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(shapes)), 4.5))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        ys = [next((r["ratio_to_floor"] for r in sel if (r["dtype"], r["B"], r["D"]) == s
                    and r["impl"] == impl), float("nan")) for s in shapes]
        ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=impl)
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="memory floor")
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels([f"B={b}\nD={d}\n{t}" for t, b, d in shapes], fontsize=8)
    ax.set_ylabel("fwd+bwd time / memory floor (log)")
    ax.set_title(f"DiVE regulariser on {sel[0]['device']}" if sel else "DiVE regulariser")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    from dive_fast._cli.arguments import DefaultsFormatter
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    p.add_argument("--batches", type=int, nargs="+", default=[512, 4096, 32768],
                   help="reference batch sizes B'")
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768], help="embedding widths D")
    p.add_argument("--dtypes", nargs="+", default=["float32"],
                   help="input dtypes: float32, bfloat16, float16")
    p.add_argument("--impls", nargs="*", default=None, help="subset of implementations")
    p.add_argument("--repeats", type=int, default=10, help="at least this many calls per mode")
    p.add_argument("--min-time", type=float, default=1.0,
                   help="and at least this many seconds per mode: on a shared machine a few "
                        "stalled calls must not move the median of a sub-millisecond op")
    p.add_argument("--host", action="store_true",
                   help="also the Python layer's cost at B' = D = 8 against a bare Function")
    p.add_argument("--out", default=None,
                   help="CSV, and a PNG beside it (unset: benchmarks/results/local/"
                        "dive_op_<device>.csv, so a run never overwrites the committed figures)")
    return p


def check_args(args) -> None:
    """Each bad value named before anything is timed (ValueError: one line, exit 2)."""
    known = ("eager", "torch.compile", *backends.BACKENDS)
    if unknown := [i for i in args.impls or [] if i not in known]:
        raise ValueError(f"--impls: unknown {', '.join(unknown)}; expected some of "
                         f"{', '.join(known)}")
    if bad := [d for d in args.dtypes if d not in ("float32", "bfloat16", "float16")]:
        raise ValueError(f"--dtypes: {', '.join(bad)} is not one of float32, bfloat16, float16")
    for flag, values in (("--batches", args.batches), ("--dims", args.dims),
                         ("--repeats", [args.repeats])):
        if min(values) < 1:
            raise ValueError(f"{flag} must be positive integers, got {min(values)}")
    if args.min_time < 0:
        raise ValueError(f"--min-time must be >= 0 seconds, got {args.min_time}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is visible here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device}")


def main(argv=None):
    from dive_fast._cli.arguments import run_checked
    parser = build_parser()
    return run_checked(parser, check_args, run, argv)


def run(args):
    args.out = str(args.out or result_path("dive_op", args.device))
    env = environment(args.device)
    peak = peak_bandwidth(env["device"]) if args.device.startswith("cuda") else None
    launch_s = launch_seconds(args.device)
    launches = LAUNCHES["cuda" if args.device.startswith("cuda") else "cpu"]
    # The floor of each timing: the best of the copies of the same bytes interleaved with
    # its calls (same footprint: hot with hot), for every implementation alike.
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for D in args.dims:
            for B in args.batches:
                inputs = make_inputs(B, D, dtype=dtype, device=args.device, seed=0)
                m = torch.zeros(D, device=args.device)
                itemsize = inputs[0].element_size()
                for impl, fn in implementations(args.device, dtype, D, args.impls).items():
                    for mode, stats in time_modes(fn, inputs, m, args.device, args.repeats,
                                                  args.min_time).items():
                        nbytes = FLOOR_VALUES[mode] * B * D * itemsize
                        launch_ms = launches[mode] * launch_s * 1e3
                        hbm = {"hbm_floor_ms": nbytes / peak * 1e3,
                               "ratio_to_hbm": stats["median_ms"] / (nbytes / peak * 1e3),
                               "device_ratio_to_hbm": stats.get("device_ms", math.nan)
                               / (nbytes / peak * 1e3),
                               "model_ms": roofline(B, D, itemsize, MODEL_EFFICIENCY * peak)[mode]
                               * 1e3, "peak_GBps": peak / 1e9} if peak else {}
                        rows.append({"op": "dive", "impl": impl, "mode": mode, "B": B, "D": D,
                                     "dtype": dtype_name, **stats, "bytes": nbytes, **hbm,
                                     "launch_floor_ms": launch_ms,
                                     "ratio_to_launch_floor": stats["median_ms"] / launch_ms,
                                     **env})
                        r = rows[-1]
                        hbm_note = (f" {r['ratio_to_hbm']:7.2f}x HBM, device "
                                    f"{r['device_ms']:8.3f} ms {r['device_ratio_to_hbm']:6.2f}x "
                                    f"(model {r['model_ms']:.3f})" if peak else "")
                        print(f"{dtype_name:9s} B={B:6d} D={D:4d} {impl:14s} {mode:8s} "
                              f"{r['median_ms']:9.3f} ms  copy {r['copy_best_ms']:7.3f} ms"
                              f"{hbm_note} {r['ratio_to_launch_floor']:7.1f}x launches",
                              flush=True)
    set_floors(rows)
    print(f"{env['device']}{f', peak {peak / 1e9:.0f} GB/s' if peak else ''}, "
          f"one launch {launch_s * 1e6:.1f} us")
    for r in rows:
        if r["mode"] == "fwd+bwd":
            print(f"{r['dtype']:9s} B={r['B']:6d} D={r['D']:4d} {r['impl']:14s} fwd+bwd "
                  f"{r['median_ms']:9.3f} ms  {r['ratio_to_floor']:7.2f}x floor "
                  f"({r['floor_ms']:.3f} ms at {r['copy_GBps']:.1f} GB/s)")
    if args.host:
        host = host_cost()
        for r in host:
            print(f"host B'=D=8 {r['impl']:24s} fwd+bwd {r['median_us']:7.1f} us (best round "
                  f"{r['min_us']:6.1f}) {r['ratio_to_bare']:5.2f}x the bare Function")
        rows += [{**r, **env} for r in host]
    write_csv(rows, args.out)
    png = Path(args.out).with_suffix(".png")
    plotted = plot([r for r in rows if r["op"] == "dive"], png)
    print(f"wrote {args.out}" + (f" and {png}" if plotted else ""))


if __name__ == "__main__":
    main()
