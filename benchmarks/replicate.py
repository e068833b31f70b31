"""The paper's tables in miniature: every method on the embedded world, equal budgets.

    python benchmarks/replicate.py                      # ~40 min on 2 CPU cores
    python benchmarks/replicate.py --steps 50 --methods flyp dive   # a quick look
    python benchmarks/replicate.py --methods --extra-lams 10 100 --append  # lambda sweep

Each method fine-tunes the cached pre-trained dive-tiny with the same steps, batch, lr
and seeds (stated in the output), then is evaluated on ID, every OOD shift, every
zero-shot task and RSA; WiSE-FT (alpha 0.5) of each trained method is evaluated too.
Writes benchmarks/results/replication.{md,json}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dive_fast import train
from dive_fast.evaluate import format_table

DEFAULT = ["zeroshot", "ft", "flyp", "flyp+replay", "snd-like", "dive", "dive-avl", "dive-pvl"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="*", default=DEFAULT)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-per-task", type=int, default=500)
    p.add_argument("--extra-lams", type=float, nargs="*", default=[],
                   help="also run dive with these lambdas (rows 'dive lambda=X')")
    p.add_argument("--append", action="store_true", help="add rows to an existing table")
    p.add_argument("--runs", default="runs/replication")
    p.add_argument("--out", default="benchmarks/results/replication")
    args = p.parse_args(argv)
    rows = json.loads(Path(f"{args.out}.json").read_text())["rows"] if args.append else {}
    settings = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr",
                str(args.lr), "--seed", str(args.seed), "--eval-per-task",
                str(args.eval_per_task), "--no-progress", "--checkpoint-every", "1000000"]
    runs = [(m, m, []) for m in args.methods] + \
        [(f"dive lambda={lam:g}", "dive", ["--lam", str(lam)]) for lam in args.extra_lams]
    for label, method, extra in runs:
        report = train.main(["--method", method, "--out", f"{args.runs}/{label.replace(' ', '_')}",
                             "--wise-ft", "" if method == "zeroshot" else "0.5", *settings,
                             *extra])
        for name, row in report.items():
            if name == "zero-shot" and "zero-shot" in rows:
                continue
            rows[name.replace(method, label, 1)] = row
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table = format_table(rows)
        header = (f"dive-tiny on the embedded world (seed {args.seed}); each method: "
                  f"{args.steps} steps, batch {args.batch_size} (+ {args.batch_size} reference "
                  f"pairs where used), lr {args.lr}, lambda 1000, momentum 0.99; "
                  f"{args.eval_per_task} test images per task.\n\n")
        Path(f"{args.out}.md").write_text(header + table + "\n")
        Path(f"{args.out}.json").write_text(json.dumps({"settings": vars(args), "rows": rows},
                                                       indent=2))
    print(header + table)


if __name__ == "__main__":
    main()
