"""Markdown tables from the benchmark CSVs (what the README and docs/results.md show).

    python benchmarks/tables.py benchmarks/results/dive_op_cpu.csv benchmarks/results/step_cpu.csv
    python benchmarks/tables.py --mode fwd benchmarks/results/dive_op_nvidia-h200.csv
    python benchmarks/tables.py benchmarks/results/*.csv      # every kind of result CSV

The op and step CSVs get their summary tables; any other CSV its rows as they are, with the
columns that only describe the machine (device, versions, date) said once below it.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path


def op_table(rows, mode: str = "fwd+bwd") -> str:
    rows = [r for r in rows if r["mode"] == mode]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    shapes = list(dict.fromkeys((r["dtype"], int(r["B"]), int(r["D"])) for r in rows))
    dtypes = list(dict.fromkeys(dtype for dtype, _, _ in shapes))
    by_dtype = len(dtypes) > 1  # a dtype column only where the run had several
    out = [("| dtype " if by_dtype else "") + "| B' | D | floor ms | "
           + " | ".join(f"{i} ms (x floor)" for i in impls) + " |",
           ("|---" if by_dtype else "") + "|---|---|---|" + "---|" * len(impls)]
    for dtype, B, D in shapes:
        sel = {r["impl"]: r for r in rows
               if (r["dtype"], int(r["B"]), int(r["D"])) == (dtype, B, D)}
        floor = float(next(iter(sel.values()))["floor_ms"])
        cells = [f"{float(sel[i]['median_ms']):.2f} ({float(sel[i]['ratio_to_floor']):.2f}x)"
                 if i in sel else "–" for i in impls]
        dtype_cell = f"| {dtype.replace('torch.', '')} " if by_dtype else ""
        out.append(f"{dtype_cell}| {B} | {D} | {floor:.2f} | " + " | ".join(cells) + " |")
    first = rows[0]
    out.append(f"\n{first['device']}, copy bandwidth {float(first['copy_GBps']):.1f} GB/s, "
               f"torch {first['torch']}, {', '.join(d.replace('torch.', '') for d in dtypes)}, "
               f"{mode}.")
    return "\n".join(out)


def _num(row, key):
    value = row.get(key, "")
    return float(value) if value not in ("", None) else None


def step_table(rows) -> str:
    """One row per variant (medians over the rounds): step time, samples/s, memory, the
    ratios to FLYP(B+B') and, when present, MFU, compile time and the phase breakdown; then
    the comparisons the benchmark exists for."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))

    def med(v, key):
        vals = [x for r in rows if r["variant"] == v and (x := _num(r, key)) is not None]
        return statistics.median(vals) if vals else None

    base = "flyp-B+B'" if "flyp-B+B'" in variants else variants[0]
    has_mfu = any(med(v, "MFU") for v in variants)
    has_flops = any(med(v, "GFLOP_per_step") for v in variants)
    phases = ["data_ms", "trainable_fwd_ms", "frozen_fwd_ms", "losses_ms", "backward_ms",
              "optimizer_ms"]
    out = [f"| variant | samples/step | step ms | samples/s | peak MiB | time vs {base} | "
           + ("GFLOP/step | " if has_flops else "") + ("MFU | " if has_mfu else "")
           + "compile s | data / trainable fwd / frozen fwd / losses / backward / optimizer ms |",
           "|---|---|---|---|---|---|" + ("---|" if has_flops else "") + ("---|" if has_mfu else "")
           + "---|---|"]
    for v in variants:
        s = next(r for r in rows if r["variant"] == v)
        cells = [v, s["samples_per_step"], f"{med(v, 'step_ms'):.1f}",
                 f"{med(v, 'samples_per_s'):.1f}", f"{med(v, 'peak_mem_MiB'):.0f}",
                 f"{med(v, 'step_ms') / med(base, 'step_ms'):.3f}x"]
        profiled = s.get("flop_count") == "open_clip profile"  # not counted: its trainer's
        cells += [f"{med(v, 'GFLOP_per_step'):.1f}" + ("*" if profiled else "")
                  if med(v, "GFLOP_per_step") else "–"] if has_flops else []
        cells += [f"{med(v, 'MFU'):.3f}" if med(v, "MFU") else "–"] if has_mfu else []
        cells += [f"{med(v, 'compile_s'):.1f}" if med(v, "compile_s") else "–"]
        cells += [" / ".join("–" if med(v, p) is None else f"{med(v, p):.1f}" for p in phases)]
        out.append("| " + " | ".join(map(str, cells)) + " |")
    ratio = lambda a, b: med(b, "step_ms") / med(a, "step_ms")  # noqa: E731  (a faster: > 1)

    def spread(a, b) -> str:
        """The ratio round by round (interleaved rounds share the machine's slow spells)."""
        step = {(r["variant"], r.get("round")): _num(r, "step_ms") for r in rows}
        each = [step[b, k] / step[a, k] for (v, k) in step if v == a and (b, k) in step]
        return f" (rounds {min(each):.2f}-{max(each):.2f})" if len(each) > 1 else ""
    notes = []
    pairs = [("flyp-B+B'", "open_clip_train", "flyp-B+B' against open_clip_train (samples/s)"),
             ("dive-fast", "flyp-B+B'", None), ("dive-fast", "replay-B+B'", "replay"),
             ("dive-fast-notrunc", "flyp-B+B'-notrunc", None),
             ("dive-fast", "dive-naive", "dive-fast over dive-naive"),
             ("flyp-B+B'", "flyp-B+B'-notrunc", "text truncation (flyp-B+B')"),
             ("flyp-B+B'-compiled", "flyp-B+B'", "--compile (flyp-B+B')"),
             ("dive-fast-compiled", "dive-fast", "--compile (dive-fast)"),
             ("open_clip_train-compiled", "open_clip_train", "open_clip_train --torchcompile"),
             ("dive-cosched", "dive-seq", "co-scheduling over sequential")]
    for a, b, label in pairs:
        if a in variants and b in variants:
            if label in (None, "replay"):
                work = med(a, "GFLOP_per_step"), med(b, "GFLOP_per_step")
                notes.append(f"{a} costs {1 / ratio(a, b):.3f}x the step time of {b}"
                             + spread(b, a) + (f" and does {work[0] / work[1]:.3f}x its FLOPs"
                                               if all(work) else ""))
            else:
                notes.append(f"{label}: {ratio(a, b):.2f}x" + spread(a, b))
    if any(r.get("flop_count") == "open_clip profile" for r in rows):
        notes.append("GFLOP*: open_clip's per-pair profile of the model (77-token text), the "
                     "others counted as the step ran")
    first = rows[0]
    notes.append(f"{first['device']}, torch {first['torch']}, commit {first.get('commit', '?')}; "
                 f"peak memory: {first['peak_mem_kind']}")
    return "\n".join(out) + "\n\n" + "; ".join(notes) + "."


ENVIRONMENT = ("device", "torch", "dive_fast", "python", "date", "triton", "nvcc", "commit")


def plain_table(rows, max_rows: int) -> str:
    """Any result CSV: its columns, the environment columns said once below."""
    env = [k for k in rows[0] if k in ENVIRONMENT]
    cols = [k for k in rows[0] if k not in ENVIRONMENT]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(r[k] for k in cols) + " |" for r in rows[:max_rows]]
    if len(rows) > max_rows:
        out.append(f"\n({len(rows) - max_rows} more rows; --max-rows to show them)")
    if env:
        out.append("\n" + ", ".join(f"{k} {rows[0][k]}" for k in env if rows[0][k]) + ".")
    return "\n".join(out)


def table(rows, mode: str, max_rows: int) -> str:
    if "variant" in rows[0] and "step_ms" in rows[0] and "samples_per_step" in rows[0]:
        return step_table(rows)
    if {"impl", "mode", "median_ms"} <= set(rows[0]):
        return op_table(rows, mode)
    return plain_table(rows, max_rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("paths", nargs="+", help="result CSVs")
    p.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"],
                   help="which timing of the op benchmark to tabulate")
    p.add_argument("--max-rows", type=int, default=40,
                   help="rows shown of a CSV without a summary table")
    return p


def check_args(args) -> None:
    for path in args.paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such result CSV")


def main(argv):
    from dive_fast._cli.arguments import run_checked
    run_checked(build_parser(), check_args, run, argv)


def run(args) -> None:
    for path in args.paths:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        print(f"{path}\n")
        print(table(rows, args.mode, args.max_rows) if rows else "(no rows)")
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
