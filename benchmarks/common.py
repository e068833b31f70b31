"""What the benchmark scripts share: timing, the environment, long-format CSV, the
training app's run as a user's command line builds it (``user_run``, with synthetic data
for model-bound timing), and file-system look-ups counted (``counted``, which the start-up
benchmark and its test use)."""
from __future__ import annotations

import collections
import contextlib
import csv
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch


def check_common(args, at_least: dict[str, int]) -> None:
    """The step and memory benchmarks' shared argument checks, before anything is timed
    (ValueError: one line, exit 2, through ``run_checked``): each ``at_least`` flag's bound,
    a device that exists here, a model open_clip knows, --out a file."""
    from dive_fast.train import validate
    from dive_fast.train.models import model_and_tag
    for name, low in at_least.items():
        validate.number(f"--{name.replace('_', '-')}", getattr(args, name), low)
    validate.device(args.device)
    model_and_tag(args.model, None)
    if args.out and Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the CSV file to write")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    except OSError:
        pass
    return platform.processor() or platform.machine()


RESULTS = Path(__file__).parent / "results"


def device_slug(device: str) -> str:
    """'cpu', or the GPU's name in lower case with dashes ('nvidia-h200')."""
    if not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def result_path(kind: str, device: str, ext: str = "csv") -> Path:
    """Where a benchmark writes by default: ``results/local/<kind>_<device>.<ext>``, a folder
    git ignores, so that no run overwrites the committed figures unless ``--out`` says so."""
    return RESULTS / "local" / f"{kind}_{device_slug(device)}.{ext}"


def git_commit() -> str:
    """The checkout's commit (with '+dirty' when files differ from it), or 'unknown'."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def environment(device: str) -> dict[str, str]:
    import dive_fast
    env = {"device": device_name(device), "torch": torch.__version__,
           "dive_fast": dive_fast.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": os.environ.get("DIVE_FAST_COMMIT") or git_commit()}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "none"
    return env


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, repeats: int = 10, warmup: int = 2, min_time_s: float = 0.0,
            beside=None):
    """Median, 20th and 80th percentile of wall time in ms over ``repeats`` calls. With
    ``beside`` (a yardstick, e.g. a copy of the same bytes), that call is timed after each
    of ``fn``'s too: ``beside_best_ms`` and ``beside_median_ms``, measured in the same
    moments as ``fn``, so a busy spell of a shared machine slows both."""
    calls = [fn] if beside is None else [fn, beside]
    for _ in range(warmup):
        for call in calls:
            call()
    synchronize(device)
    times = [[] for _ in calls]
    start = time.perf_counter()
    while len(times[0]) < repeats or time.perf_counter() - start < min_time_s:
        for call, out in zip(calls, times):
            t0 = time.perf_counter()
            call()
            synchronize(device)
            out.append((time.perf_counter() - t0) * 1e3)
    own = sorted(times[0])
    q = statistics.quantiles(own, n=5) if len(own) > 1 else [own[0]] * 4
    out = {"median_ms": statistics.median(own), "p20_ms": q[0], "p80_ms": q[3],
           "repeats": len(own)}
    if beside is not None:
        out.update(beside_best_ms=min(times[1]), beside_median_ms=statistics.median(times[1]))
    return out


def write_csv(rows: list[dict], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None, said why, when matplotlib is not
    installed (it comes with the extra `train`): a benchmark then writes its CSV, no plot."""
    try:
        import matplotlib
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib, or the extra "
              "`.[train]`); the results are written all the same", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def train_cli(method: str, model: str, batch: int, ref_batch: int, ref_size: int, amp: str,
              device: str, workers: int, steps: int, out, *extra: str) -> list[str]:
    """The command line a user would give ``dive_fast.train`` (random weights, no bars, no
    augmentation, one warm-up step: the timed steps run at the base lr)."""
    return ["--method", method, "--model", model, "--pretrained", "", "--batch-size", str(batch),
            "--ref-batch-size", str(ref_batch), "--ref-size", str(ref_size), "--amp", amp,
            "--device", device, "--workers", str(workers), "--steps", str(steps),
            "--warmup", "1", "--no-augment", "--out", str(out), "--no-progress", *extra]


class SyntheticTask(torch.utils.data.Dataset):
    """Seeded random images with shape labels, at any resolution: model-bound timing of
    big models without rendering images."""
    classnames = tuple(f"shape {i}" for i in range(10))
    templates = ("a photo of a {}.", "a {}.")

    def __init__(self, n, size):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), i % 10


class SyntheticCaptions(SyntheticTask):
    """Random images with the world's reference captions, drawn once here: the loader then
    does what it does with a user's pairs (tokenising), not the world's rendering."""

    def __init__(self, n, size):
        from dive_fast.world import caption_pair
        super().__init__(n, size)
        self.captions = [caption_pair("reference", i, size=1)[1] for i in range(n)]

    def __getitem__(self, i):
        return super().__getitem__(i)[0], self.captions[i]


def user_run(argv: list[str], data: str = "world", image_size: int | None = None,
             data_size: int = 4096):
    """The run ``python -m dive_fast.train <argv>`` builds (the app's argument checks, then
    ``dive_fast.train.build.build_run``), on random weights at ``image_size`` (None: the
    model's own) with ``data_size`` target samples, its method in training mode. ``data``:
    "world" (the app's own, rendered at the model's resolution) or "synthetic" (random
    images: model-bound timing without rendering). The frozen cache is in ``--out``/cache."""
    from dive_fast.train import cli
    from dive_fast.train.build import build_run
    from dive_fast.train.models import load_clip

    args = cli.parse([*argv, "--train-size", str(data_size)])
    cli.check_args(args)
    bundle = load_clip(args.model, None, args.device, image_size=image_size,
                       text_truncation=args.text_truncation)
    size, data_sets = bundle.image_size, {}
    if data == "synthetic":
        data_sets = {"target": SyntheticTask(data_size, size),
                     "reference": (SyntheticCaptions(args.ref_size, size),
                                   f"synthetic:{args.ref_size}:{size}")}
    run = build_run(args, bundle=bundle, **data_sets)
    run.method.train()
    return run


# --- file-system look-ups, counted ------------------------------------------------------
# ``os.stat``/``os.lstat`` (which ``Path.exists``, ``is_file``, ``is_dir`` and ``os.path``
# call), ``os.scandir``/``os.listdir`` (``Path.iterdir``, ``glob``) and ``DirEntry.stat`` (a
# C method no patch of ``os`` reaches: the entries of a counted ``os.scandir`` are wrapped).
# Python's imports stat in C and are not counted; nor is ``os.fstat`` (no path look-up).

class CountedEntry:
    """A ``DirEntry`` whose ``stat()`` calls are counted; the rest is the entry's own."""

    def __init__(self, entry, calls):
        self._entry, self._calls = entry, calls

    def stat(self, *, follow_symlinks=True):
        self._calls.add("entry.stat", self._entry.path)
        return self._entry.stat(follow_symlinks=follow_symlinks)

    def __getattr__(self, name):
        return getattr(self._entry, name)

    def __fspath__(self):
        return self._entry.path


class Calls:
    """{kind: [path, ...]} of the counted calls of this process's threads."""

    def __init__(self):
        self.paths = collections.defaultdict(list)
        self._lock = threading.Lock()

    def add(self, kind, path) -> None:
        with self._lock:
            self.paths[kind].append(f"fd:{path}" if isinstance(path, int)
                                    else os.path.abspath(os.fsdecode(os.fspath(path))))

    def image_stats(self, root) -> int:
        """Path stats (``os.stat``, ``os.lstat``, ``DirEntry.stat``) of image files under
        ``root`` (the data's fixed costs, its folders and CSVs, apart)."""
        from dive_fast.train.data import IMAGE_EXTENSIONS
        root = os.path.abspath(root) + os.sep
        return sum(p.startswith(root) and os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS
                   for kind in ("stat", "lstat", "entry.stat") for p in self.paths[kind])

    def listings_under(self, root) -> dict[str, int]:
        """{folder: its ``os.scandir`` and ``os.listdir`` calls} of ``root`` and the folders
        under it."""
        root = os.path.abspath(root)
        found = collections.Counter(p for kind in ("scandir", "listdir") for p in self.paths[kind]
                                    if p == root or p.startswith(root + os.sep))
        return dict(found)


class _CountedScandir:
    def __init__(self, it, calls):
        self._it, self._calls = it, calls

    def __iter__(self):
        return (CountedEntry(e, self._calls) for e in self._it)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._it.close()

    def close(self):
        self._it.close()


@contextlib.contextmanager
def counted():
    """``Calls`` counting while the block runs (``os``'s own functions restored after)."""
    calls = Calls()
    real = {name: getattr(os, name) for name in ("stat", "lstat", "scandir", "listdir")}

    def stat(path, *a, **k):
        calls.add("stat", path)
        return real["stat"](path, *a, **k)

    def lstat(path, *a, **k):
        calls.add("lstat", path)
        return real["lstat"](path, *a, **k)

    def scandir(path="."):
        calls.add("scandir", path)
        return _CountedScandir(real["scandir"](path), calls)

    def listdir(path="."):
        calls.add("listdir", path)
        return real["listdir"](path)

    for name, fn in (("stat", stat), ("lstat", lstat), ("scandir", scandir),
                     ("listdir", listdir)):
        setattr(os, name, fn)
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(os, name, fn)
