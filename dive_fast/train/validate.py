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
class TaskSpec:
    """One ``--task KIND:NAME:PATH``: an evaluation image folder."""
    kind: str
    name: str
    path: str


def task_specs(specs: list[str], arg: str = "--task", check_folders: bool = True) -> list[TaskSpec]:
    """Parses ``--task`` entries: a known kind, a non-empty name used once (names key the
    report), and an image folder that lists as one (``image_folder``)."""
    out, seen = [], set()
    for spec in specs:
        kind, _, rest = spec.partition(":")
        name, sep, path = rest.partition(":")
        if not sep or not path:
            raise ValueError(f"{arg} wants KIND:NAME:PATH, got {spec!r}")
        if kind not in KINDS:
            raise ValueError(f"{arg} {spec!r}: KIND must be one of {', '.join(KINDS)}, got {kind!r}")
        if not name.strip():
            raise ValueError(f"{arg} {spec!r}: NAME is empty (it names the task's column "
                             "in the report)")
        if name in seen:
            raise ValueError(f"{arg}: two tasks are named {name!r}; names must be unique (each "
                             "names a column of the report)")
        seen.add(name)
        if check_folders:
            image_folder(path, f"{arg} {spec!r}")
        out.append(TaskSpec(kind, name, path))
    return out


def image_folder(path, arg: str) -> None:
    """Lists an image folder as ``data.ImageFolderTask`` does (class folders, images,
    classnames.txt, templates.txt), so that a bad one fails now, not after training."""
    from .data import ImageFolderTask
    _opens(arg, lambda: ImageFolderTask(path, transform=None))


def caption_csv(path, arg: str, **csv_options) -> None:
    """Reads an open_clip CSV as ``data.CsvCaptions`` does (UTF-8, its columns, its rows)."""
    from .data import CsvCaptions
    _opens(arg, lambda: CsvCaptions(path, transform=None, **csv_options))


def _opens(arg: str, open_it) -> None:
    try:
        open_it()
    except (OSError, ValueError) as exc:
        raise type(exc)(f"{arg}: {exc}") from None
