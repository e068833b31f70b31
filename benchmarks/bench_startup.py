"""A run's start on a big data set of one's own: a synthetic image tree (--files images in
--classes class folders, ImageNet's shape) and a caption CSV (--rows pairs, each its own
image file), one step of DiVE trained by 1, 2 and 4 gloo processes on the CPU (torchrun).
Per rank: seconds from the launch to step 1, path stats of image files, listings of the
data's folders, and the seconds the frozen side took to build (the reference CSV's
embedding cache). The job's figure: image stats of all ranks per image (the issue's goal
is at most 1.2).

The images are hard links to one 8 x 8 PNG: start-up lists and stats files and decodes
only the pairs the cache embeds, one batch and the zero-shot set (the world's, so that no
evaluation folder adds its own images). The model is dive-micro at random weights.
Default sizes are the issue's (100 k files, 200 k rows); the committed CPU figures were
measured at a tenth (see benchmarks/README.md)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import counted, environment, result_path, write_csv  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/bench_startup.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--files", type=int, default=100_000, help="images in the training tree")
    p.add_argument("--classes", type=int, default=1000, help="class folders of the tree")
    p.add_argument("--rows", type=int, default=200_000, help="rows of the reference CSV")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4],
                   help="process counts to launch, one job each")
    p.add_argument("--data", default=None,
                   help="folder for the synthetic data (kept and reused when its sizes "
                        "match; default: a folder under benchmarks/results/local/)")
    p.add_argument("--out", default=None, help="CSV to write (default: results/local/)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds a job may take")
    p.add_argument("--worker", default=None,
                   help="internal: run one rank of a job, writing its figures to this "
                        "JSON file (the arguments after -- are the app's)")
    return p


def check(args) -> None:
    for name in ("files", "classes", "rows"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.classes > args.files:
        raise ValueError(f"--classes {args.classes} is more than --files {args.files}")
    if any(n < 1 for n in args.procs):
        raise ValueError(f"--procs wants process counts >= 1, got {args.procs}")


def one_png() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def write_data(root: Path, files: int, classes: int, rows: int) -> Path:
    """root/train/cNNNN/NNNNNN.png and root/ref/captions.csv naming root/ref/pNNN/NNNNNN.png
    (hard links to one PNG); written once a size, reused after (its marker file)."""
    marker = root / f"written-{files}-{classes}-{rows}"
    if marker.is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    source = root / "source.png"
    source.write_bytes(one_png())
    for i in range(files):
        folder = root / "train" / f"c{i % classes:04d}"
        if i < classes:
            folder.mkdir(parents=True, exist_ok=True)
        os.link(source, folder / f"{i:06d}.png")
    lines = ["filepath\ttitle"]
    for i in range(rows):
        rel = f"p{i // 1000:03d}/{i:06d}.png"
        if i % 1000 == 0:
            (root / "ref" / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(source, root / "ref" / rel)
        lines.append(f"{rel}\ta photo of thing number {i}")
    (root / "ref" / "captions.csv").write_text("\n".join(lines) + "\n")
    marker.write_text("")
    return root


def app_args(data: Path, out: Path) -> list[str]:
    """One step of DiVE on the tree and the CSV, the world's evaluation (10 a task)."""
    return ["--model", "dive-micro", "--pretrained", "", "--method", "dive", "--out", str(out),
            "--steps", "1", "--batch-size", "8", "--no-augment", "--workers", "0",
            "--no-progress", "--wise-ft", "", "--log-every", "1", "--use-world", "eval",
            "--eval-per-task", "10", "--train-folder", str(data / "train"),
            "--reference-csv", str(data / "ref" / "captions.csv")]


def worker(figures: str, argv: list[str]) -> None:
    """One rank: the app's run with its look-ups counted, the moment its first step starts
    and the seconds its frozen side took."""
    from dive_fast.train import build, cli
    data = Path(argv[argv.index("--train-folder") + 1]).parent
    marks = {}
    step, frozen_side = build.train_step, build.make_frozen_side

    def first_step(*a, **k):
        marks.setdefault("step1", time.time())
        return step(*a, **k)

    def timed_frozen_side(*a, **k):
        t0 = time.perf_counter()
        try:
            return frozen_side(*a, **k)
        finally:
            marks["cache_build_s"] = time.perf_counter() - t0
    build.train_step, build.make_frozen_side = first_step, timed_frozen_side
    with counted() as calls:
        cli.main(argv)
    listed = {os.path.relpath(p, data): n for p, n in calls.listings_under(data).items()}
    Path(f"{figures}.{os.environ.get('RANK', '0')}.json").write_text(json.dumps({
        "step1": marks.get("step1"), "cache_build_s": marks.get("cache_build_s"),
        "image_stats": calls.image_stats(data), "listings": listed}))


def launch(procs: int, figures: Path, argv: list[str], timeout: int) -> float:
    """torchrun of ``procs`` gloo processes (one thread each); returns the launch time."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run",
                           f"--nproc_per_node={procs}", "--rdzv_backend=c10d",
                           "--rdzv_endpoint=localhost:0", __file__, "--worker", str(figures),
                           "--", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        raise RuntimeError(f"{procs} process(es) failed:\n{proc.stderr[-4000:]}")
    return started


def job_rows(args, data: Path, procs: int, work: Path) -> list[dict]:
    figures = work / f"figures-{procs}"
    started = launch(procs, figures, app_args(data, work / f"run-{procs}"), args.timeout)
    ranks = [json.loads(Path(f"{figures}.{r}.json").read_text()) for r in range(procs)]
    images = args.files + args.rows
    job_stats = sum(r["image_stats"] for r in ranks)
    return [{"procs": procs, "rank": r, "files": args.files, "rows": args.rows,
             "seconds_to_step1": round(fig["step1"] - started, 3),
             "image_stats": fig["image_stats"],
             "folder_listings": sum(fig["listings"].values()),
             "cache_build_s": round(fig["cache_build_s"] or 0.0, 3),
             "job_image_stats_per_image": round(job_stats / images, 4)}
            for r, fig in enumerate(ranks)]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:  # one rank of a job
        split = argv.index("--")
        return worker(build_parser().parse_args(argv[:split]).worker, argv[split + 1:])
    from dive_fast._cli.arguments import run_checked
    run_checked(build_parser(), check, run, argv)


def run(args) -> None:
    import tempfile
    local = result_path("startup", "cpu").parent
    data = write_data(Path(args.data or local / f"startup-data-{args.files}-{args.rows}"),
                      args.files, args.classes, args.rows)
    env = environment("cpu")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for procs in args.procs:
            for row in job_rows(args, data, procs, Path(work)):
                rows.append({**row, **env})
                print(", ".join(f"{k}={row[k]}" for k in row), flush=True)
    out = args.out or result_path("startup", "cpu")
    write_csv(rows, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
