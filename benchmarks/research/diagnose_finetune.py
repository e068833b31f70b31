"""Fine-tuning levers on the embedded world: runs dive_fast.train for each given setting and
prints one compact row each (ID, OOD mean, zero-shot mean, RSA joint, seconds).

    python benchmarks/research/diagnose_finetune.py --label flyp-vs-dive \\
        --run "flyp=--method flyp" --run "dive=--method dive" \\
        --run "dive-l10=--method dive --lam 10" --common "--steps 150 --eval-per-task 200"

Each --run is NAME=ARGS (dive_fast.train arguments); --common is added to every run.
Every run gets a fresh --out under --runs, no WiSE-FT and no checkpoints unless given.
Set DIVE_FAST_CACHE to use a pre-trained model other than the default cache's.
Rows are merged into benchmarks/results/diagnosis.json under --label.
"""
from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from dive_fast import train
from dive_fast._cli.arguments import DefaultsFormatter  # noqa: E402
from dive_fast.train import methods
from dive_fast.world import tasks

RESULTS = Path(__file__).resolve().parents[1] / "results" / "diagnosis.json"


def compact(report: dict) -> dict:
    row = {k: report[k] for k in ("id_mean", "ood_mean", "zeroshot_mean")}
    row.update(report["ood"])
    row.update(report["zeroshot"])
    if report.get("rsa"):
        row["rsa_joint"] = report["rsa"]["joint"]
    return row


def line(name: str, row: dict) -> str:
    rsa = f"{row['rsa_joint']:.3f}" if "rsa_joint" in row else "  –  "
    return (f"{name:28s} ID {100 * row['id_mean']:5.1f}  OOD {100 * row['ood_mean']:5.1f}  "
            f"ZS {100 * row['zeroshot_mean']:5.1f}  RSA {rsa}  "
            f"{row.get('seconds', 0):6.0f} s")


def free_tower(tower: str):
    """Detach one tower's reference embeddings before DiVE's regulariser sees them: its
    losses still read them (the EMA vector and PVL's pairing), but only the other tower
    receives their gradient. Splits where DiVE's constraint binds the ID task."""
    objective = methods.DiVE.objective
    which = 0 if tower == "image" else 1

    def detached(self, batch, step, imgs, txts, frozen):
        towers = [list(imgs), list(txts)]
        towers[which][1] = towers[which][1].detach()
        return objective(self, batch, step, *towers, frozen)

    methods.DiVE.objective = detached


def subset_of(options: tuple[str, ...]):
    """An argparse type: a comma-separated, non-empty subset of ``options``."""
    def parse(value: str) -> tuple[str, ...]:
        chosen = tuple(v.strip() for v in value.split(",") if v.strip())
        unknown = [v for v in chosen if v not in options]
        if not chosen or unknown:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(options)}; got {value!r}")
        return chosen
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsFormatter)
    p.add_argument("--run", action="append", default=[], help="NAME=ARGS, repeated")
    p.add_argument("--common", default="", help="dive_fast.train arguments for every run")
    p.add_argument("--label", required=True, help="key of the rows in diagnosis.json")
    p.add_argument("--runs", default="/tmp/dive-diagnosis", help="folder of the runs' outputs")
    p.add_argument("--reference-includes-id", action="store_true",
                   help="the reference set drawn from the whole world, the ID slice included")
    p.add_argument("--spurious-colour", type=float, default=tasks.ID_TRAIN_SPURIOUS_COLOUR,
                   help="the share of ID training samples in their class's own colour")
    p.add_argument("--reference-family-only", action="store_true",
                   help="reference captions name shapes by family, never exactly")
    p.add_argument("--reference-shapes", type=subset_of(tasks.SHAPES),
                   help="comma-separated shapes the reference scenes may show (unset: all)")
    p.add_argument("--reference-styles", type=subset_of(tasks.STYLES),
                   help="comma-separated styles the reference scenes may show (unset: all)")
    p.add_argument("--reference-empty-share", type=float, default=0.0,
                   help="the share of reference pairs that show no object, only a background")
    p.add_argument("--free-tower", choices=("image", "text"),
                   help="DiVE's regulariser sees this tower's reference embeddings detached, "
                        "so it constrains only the other tower (unset: both constrained)")
    return p

def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.free_tower:
        free_tower(args.free_tower)
    if args.reference_includes_id:
        tasks.REFERENCE_EXCLUDES_ID = False
    tasks.REFERENCE_NAMES_EXACT_SHAPE = not args.reference_family_only
    tasks.REFERENCE_SHAPES = args.reference_shapes
    tasks.REFERENCE_STYLES = args.reference_styles
    tasks.REFERENCE_EMPTY_SHARE = args.reference_empty_share
    tasks.ID_TRAIN_SPURIOUS_COLOUR = args.spurious_colour
    stamp = time.strftime("%H%M%S")
    results = {}
    zs_done = False
    for spec in args.run:
        name, _, extra = spec.partition("=")
        out = Path(args.runs) / f"{args.label}-{stamp}" / name
        argv_ = ["--out", str(out), "--no-progress", "--checkpoint-every", "1000000",
                 "--wise-ft", "", *shlex.split(args.common), *shlex.split(extra)]
        start = time.time()
        report = train.main(argv_)
        seconds = time.time() - start
        if not zs_done:
            results["zero-shot"] = compact(report["zero-shot"])
            print(line("zero-shot", results["zero-shot"]), flush=True)
            zs_done = True
        key = [k for k in report if k != "zero-shot"]
        if key:
            results[name] = {**compact(report[key[0]]), "seconds": round(seconds, 1),
                             "argv": " ".join(argv_[7:])}
            print(line(name, results[name]), flush=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    settings = {k: v for k, v in vars(args).items() if k not in ("run", "label", "runs")}
    data[args.label] = {**settings, "rows": results}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))
    print("\n".join(line(k, v) for k, v in results.items()))


if __name__ == "__main__":
    main()
