"""The paper's tables in miniature: every method on the embedded world, equal budgets,
three fine-tuning seeds (mean and spread).

    python benchmarks/research/replicate.py        # everything, 3 seeds: ~2.5 h on 2 CPU cores
    python benchmarks/research/replicate.py --seeds 0 --methods zeroshot flyp dive --lams
                                                   # a quick look

Each method fine-tunes the cached pre-trained dive-tiny with ``dive_fast.train``'s defaults
(steps, batch, lr, lambda 1000, momentum 0.99; override with --train-args) and each seed,
then is evaluated on ID, every OOD shift, every zero-shot task and RSA; WiSE-FT
(alpha 0.5) of each trained method is evaluated too. --lams adds DiVE rows at other lambdas
(the sweep 10 / 100 / 1000 / 10000 with the default row). A run whose report.json exists
under --runs is read, not run again, so an interrupted replication continues where it
stopped. Writes benchmarks/results/replication.{md,json}: a summary (ID, OOD mean, zero-shot
mean, RSA joint: mean +- sample standard deviation over the seeds) and the full table of
seed means.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from dive_fast import train
from dive_fast._cli.arguments import DefaultsFormatter  # noqa: E402
from dive_fast.train.report_tables import format_table

DEFAULT = ["zeroshot", "ft", "lp-ft", "flyp", "flyp+replay", "snd-like", "dive", "dive-avl",
           "dive-pvl"]


def merge(reports: list):
    """The seed mean of nested report dicts (numbers averaged, other values from the first)."""
    first = reports[0]
    if isinstance(first, dict):
        return {k: merge([r[k] for r in reports]) for k in first
                if all(isinstance(r, dict) and k in r for r in reports)}
    if isinstance(first, (int, float)) and not isinstance(first, bool) and \
            all(isinstance(r, (int, float)) for r in reports):
        return sum(reports) / len(reports)
    return first


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summary(rows: dict[str, list[dict]]) -> str:
    cols = (("ID", lambda r: r["id_mean"], 100), ("OOD mean", lambda r: r["ood_mean"], 100),
            ("zero-shot mean", lambda r: r["zeroshot_mean"], 100),
            ("RSA joint", lambda r: r["rsa"]["joint"] if r.get("rsa") else None, 1))
    lines = ["| method | seeds | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for name, reports in rows.items():
        cells = []
        for _, get, scale in cols:
            vals = [get(r) for r in reports]
            if any(v is None for v in vals):
                cells.append("–")
                continue
            mean, sd = statistics.fmean(vals) * scale, spread(vals) * scale
            digits = 1 if scale == 100 else 3
            cells.append(f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(vals) > 1 else ""))
        lines.append(f"| {name} | {len(reports)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--methods", nargs="*", default=DEFAULT, help="methods to run")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="fine-tuning seeds (the world and the pre-trained model stay fixed)")
    p.add_argument("--lams", type=float, nargs="*", default=[10, 100, 10000],
                   help="also run dive with these lambdas (rows 'dive lambda=X')")
    p.add_argument("--wise-ft", default="0.5", help="WiSE-FT weights evaluated per run")
    p.add_argument("--eval-per-task", type=int, default=500, help="test images per task")
    p.add_argument("--train-args", default="",
                   help="more dive_fast.train arguments for every run, e.g. '--steps 100'")
    p.add_argument("--runs", default="runs/replication", help="folder of the runs' outputs")
    p.add_argument("--existing-only", action="store_true",
                   help="train nothing: tabulate the runs whose report.json exists")
    p.add_argument("--out", default="benchmarks/results/replication",
                   help="path stem of the table (.md) and raw numbers (.json)")
    return p

def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    extra_all = ["--eval-per-task", str(args.eval_per_task), "--no-progress",
                 "--checkpoint-every", "1000000", *args.train_args.split()]
    runs = [(m, m, []) for m in args.methods] + \
        [(f"dive lambda={lam:g}", "dive", ["--lam", str(lam)]) for lam in args.lams]
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for label, method, extra in runs:
            if method == "zeroshot" and seed != args.seeds[0]:
                continue  # no training: the same numbers for every seed
            out = Path(args.runs) / f"seed{seed}" / label.replace(" ", "_")
            if (out / "report.json").is_file():
                report = json.loads((out / "report.json").read_text())
            elif args.existing_only:
                continue
            else:
                report = train.main(["--method", method, "--out", str(out), "--seed", str(seed),
                                     "--wise-ft", "" if method == "zeroshot" else args.wise_ft,
                                     *extra_all, *extra])
            for name, row in report.items():
                if name == "zero-shot" and method != "zeroshot":
                    continue
                rows.setdefault(name.replace(method, label, 1), []).append(row)
            write(args, rows)
    print((Path(f"{args.out}.md")).read_text())


def write(args, rows):
    means = {name: merge(reports) for name, reports in rows.items()}
    header = (f"dive-tiny on the embedded world; every method with dive_fast.train's defaults "
              f"(extra arguments: {args.train_args or 'none'}), lambda 1000 and momentum 0.99 "
              f"unless the row says otherwise; fine-tuning seeds {args.seeds} (the seeds column "
              f"says how many each row has); "
              f"{args.eval_per_task} test images per task. Regenerate: "
              f"`python benchmarks/research/replicate.py` (see its --help).\n\n"
              "Summary: mean ± sample standard deviation over the seeds (no spread: one seed), "
              "in %.\n\n")
    text = header + summary(rows) + "\n\nAll tasks (seed means, %):\n\n" + format_table(means)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(text + "\n")
    Path(f"{args.out}.json").write_text(json.dumps(
        {"settings": vars(args), "rows": rows, "means": means}, indent=1))


if __name__ == "__main__":
    main()
