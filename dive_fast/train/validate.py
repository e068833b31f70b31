"""Checks of arguments and inputs that run before any expensive work (model loading,
pre-training, embedding caches, evaluation). Each failure names the argument, what it got
and what was expected."""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .protocol import PRESETS
from .suite import suite_name

KINDS = ("id", "ood", "zeroshot")


def number(arg: str, value, low=None, high=None, *, above: bool = False,
           below: bool = False) -> None:
    """``value`` a finite number in [low, high] (``above``/``below``: open ends); None passes."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (low is None or (value > low if above else value >= low))
    ok = ok and (high is None or (value < high if below else value <= high))
    if not ok:
        bounds = [f"{'>' if above else '>='} {low:g}"] if low is not None else []
        bounds += [f"{'<' if below else '<='} {high:g}"] if high is not None else []
        expected = " ".join(["a finite number", " and ".join(bounds)]).strip()
        raise ValueError(f"{arg} must be {expected}, got {value!r}")


def device(value: str, arg: str = "--device") -> None:
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{arg} wants a torch device such as cpu, cuda or cuda:1, "
                         f"got {value!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{arg} {value}: dive_fast trains on cpu or cuda devices, not "
                         f"{dev.type}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{arg} {value}: CUDA is not available on this machine "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{arg} {value}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")


def writable_folder(path, arg: str) -> Path:
    """Creates ``path`` if needed and proves a file can be written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{arg} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"{arg}: cannot write in {path} ({exc.strerror or exc}); "
                              "choose a writable folder") from None
    return path


@dataclass(frozen=True)
class EvalFolder:
    """One ``--task KIND:NAME:PATH``: an evaluation image folder (the flag keeps open_clip's
    and the paper's word; in the code "task" is a labelled classification task).
    ``preset``: NAME when it is a standard set's (``protocol.PRESETS``), read by that set's
    protocol; ``metric``: what the report gives for it, from a ``PATH@METRIC`` suffix
    (``@macro_f1``: WILDS's)."""
    kind: str
    name: str
    path: str
    preset: str | None = None
    metric: str = "top1"


def eval_folders(specs: list[str], arg: str = "--task",
                 check_folders: bool = True) -> list[EvalFolder]:
    """Parses ``--task`` entries: a known kind, a non-empty name used once (names key the
    report), and an image folder that lists as one (``image_folder``)."""
    out, seen = [], set()
    for spec in specs:
        kind, _, rest = spec.partition(":")
        name, sep, path = rest.partition(":")
        if not sep or not path:
            raise ValueError(f"{arg} wants KIND:NAME:PATH, got {spec!r}")
        if kind not in KINDS:
            raise ValueError(f"{arg} {spec!r}: KIND must be one of {', '.join(KINDS)}, "
                             f"got {kind!r}")
        name = name.strip()
        if not name:
            raise ValueError(f"{arg} {spec!r}: NAME is empty (it names the task's column "
                             "in the report)")
        if name in seen:
            raise ValueError(f"{arg}: two tasks are named {name!r}; names must be unique (each "
                             "names a column of the report)")
        seen.add(name)
        path, metric = task_metric(path, f"{arg} {spec!r}")
        preset = name.lower() if name.lower() in PRESETS else suite_name(name)
        if check_folders:
            image_folder(path, f"{arg} {spec!r}", preset=preset)
        out.append(EvalFolder(kind, name, path, preset, metric))
    return out


TASK_METRICS = ("top1", "top5", "macro_f1")  # evaluate.METRICS


def task_metric(path: str, arg: str) -> tuple[str, str]:
    """(PATH, METRIC) of ``PATH@METRIC``; a PATH with no such suffix, or one that exists as
    written (an '@' in a folder's name), is top-1's."""
    head, at, metric = path.rpartition("@")
    if not at or Path(path).exists():
        return path, "top1"
    if metric not in TASK_METRICS:
        raise ValueError(f"{arg}: unknown metric @{metric} (and no folder {path}); expected "
                         f"one of {', '.join('@' + m for m in TASK_METRICS)}")
    return head, metric


def image_folder(path, arg: str, templates=None, preset=None):
    """Lists an image folder as ``data.ImageFolderTask`` does (class folders, images,
    classnames.txt, templates.txt; the run's listing, ``listing.folder``) and opens its
    images until one reads, so that a bad folder fails now, not after training. Returns the
    data set."""
    from .suite import eval_dataset
    folder = _opens(arg, lambda: eval_dataset(path, None, preset, templates))
    _one_readable(arg, folder)
    return folder


def _one_readable(arg: str, dataset, tries: int = 64) -> None:
    """At least one of the first ``tries`` samples opens (a set of only missing or broken
    images fails now, not after the model loads); later ones are skipped as they come."""
    for i in range(min(tries, len(dataset))):
        if dataset.image(i) is not None:
            return
    raise ValueError(f"{arg}: none of the first {min(tries, len(dataset))} images reads "
                     f"(e.g. {dataset.describe(0)}): missing, broken or not images")


def caption_csv(path, arg: str, min_rows: int = 1, **csv_options):
    """Reads an open_clip CSV as ``data.CsvCaptions`` does (UTF-8, its columns, its rows,
    quoting) and opens its images until one reads. Returns the data set."""
    from .data import CsvCaptions
    pairs = _opens(arg, lambda: CsvCaptions(path, transform=None, **csv_options))
    if len(pairs) < min_rows:
        raise ValueError(f"{arg}: {path} has {len(pairs)} pair(s) with a caption; at least "
                         f"{min_rows} are needed")
    _one_readable(arg, pairs)
    return pairs


def _opens(arg: str, open_it):
    try:
        return open_it()
    except (OSError, ValueError) as exc:
        raise type(exc)(f"{arg}: {exc}") from None


def output_paths(out, arg: str = "--out") -> Path:
    """--out as a writable folder whose run files can be written: metrics.jsonl and the
    reports files, checkpoints/ and cache/ folders (a file or folder of the wrong kind in
    their place would fail only at the first log step or checkpoint)."""
    if str(out).strip() == "":
        raise ValueError(f"{arg} is empty; give a folder for the run's files")
    out = writable_folder(out, arg)
    for name in ("metrics.jsonl", "report.json", "table.md", "config.json", "curves.png"):
        if (out / name).is_dir():
            raise ValueError(f"{arg}: {out / name} is a folder; the run writes a file there")
    for name in ("checkpoints", "cache"):
        if (out / name).exists() and not (out / name).is_dir():
            raise ValueError(f"{arg}: {out / name} is a file; the run writes a folder there")
    return out


def outside_inputs(out, arg: str, inputs: dict) -> None:
    """``out`` not inside an input folder ({flag: folder or None}): a run's checkpoints/ and
    cache/ would become classes of a training folder, or files among its images."""
    inside = Path(out).resolve()
    for flag, folder in inputs.items():
        if folder and Path(folder).is_dir() and inside.is_relative_to(Path(folder).resolve()):
            raise ValueError(f"{arg} {out} is inside the input folder of {flag} ({folder}); "
                             "write the run's files outside its data")


def float32_number(arg: str, value) -> None:
    """A value the float32 kernels can hold (1e39 is inf there)."""
    if value is not None and math.isfinite(value) and \
            not math.isfinite(torch.tensor(value, dtype=torch.float32).item()):
        raise ValueError(f"{arg} {value!r} overflows float32 (at most about 3.4e38)")


def seed(arg: str, value: int) -> None:
    """Seeds feed torch and numpy generators: 0 to 2**32 - 1."""
    if not 0 <= value < 2 ** 32:
        raise ValueError(f"{arg} must be between 0 and 2**32 - 1, got {value}")


def rsa_pairs(args) -> None:
    """The held-out pairs for RSA, ``--rsa-csv`` or ``--rsa-shards`` (one of them): at least
    3 readable pairs in the CSV, read with the run's CSV flags; shards that exist and answer."""
    from .data import csv_options
    if args.rsa_csv and args.rsa_shards:
        raise ValueError("give one of --rsa-csv and --rsa-shards, not both")
    if args.rsa_csv:
        caption_csv(args.rsa_csv, "--rsa-csv", min_rows=3, **csv_options(args))
    if args.rsa_shards:
        shard_urls("--rsa-shards", args.rsa_shards)


def shard_urls(arg: str, urls: str) -> list[str]:
    """The shard list of ``urls``: missing, empty or unreachable shards fail now, naming
    ``arg``, not at the first step."""
    from .data import shard_list
    try:
        shards = shard_list(urls)
    except (OSError, ValueError) as exc:
        raise type(exc)(f"{arg}: {exc}") from None
    _reachable(arg, shards)
    return shards


def _reachable(arg: str, shards: list[str], timeout_s: float = 10.0) -> None:
    """An http(s) shard list must be reachable now (its first shard answers a HEAD request),
    not at the first step after the model loaded."""
    import urllib.error
    import urllib.request
    remote = [u for u in shards if u.startswith(("http://", "https://"))]
    if not remote:
        return
    try:
        urllib.request.urlopen(urllib.request.Request(remote[0], method="HEAD"),
                               timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # the server answered (a URL signed for GET may refuse HEAD): reachable
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"{arg}: cannot reach {remote[0]} ({reason}); check the address "
                         "and the network, or copy the shards to a local disk") from None
