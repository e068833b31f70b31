"""CoOp's split files (``split_zhou_<Name>.json``, CoOp's DATASETS.md), the layout the
DiVE/FLYP-family papers evaluate their zero-shot sets in: "train", "val" and "test" lists
of [image path relative to the set's image folder, label, class name]. Read here: the
"test" list, checked (one name per label, labels 0..C-1), and the names of its classes.

Each label is named by the name CLIP_benchmark gives its images when the release's own
files in the same folder say what that is (``release_name``: an image's relative path to
its name, or None), checked to be one name per label and a label per name; else by the
split file's own names, '_' read as a space (CoOp writes ``Apply_Eye_Makeup``)."""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def _entries(file: Path) -> list[tuple[str, int, str]]:
    try:
        listed = json.loads(file.read_text(encoding="utf-8"))["test"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{file}: not a CoOp split file with a \"test\" list "
                         f"({type(exc).__name__}: {exc})") from None
    entries = []
    for entry in listed if isinstance(listed, list) else [listed]:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and type(entry[1]) is int and isinstance(entry[2], str)):
            raise ValueError(f"{file}: a \"test\" entry is {entry!r}; expected [image path, "
                             "label, class name]")
        entries.append(tuple(entry))
    if not entries:
        raise ValueError(f"{file}: its \"test\" list is empty")
    return entries


def _one_name_per_label(file: Path, entries) -> list[str]:
    """The split file's names by label, refused unless one name per label, a label per
    name and labels 0..C-1."""
    named: dict[int, set] = {}
    for _, label, name in entries:
        named.setdefault(label, set()).add(name)
    two = next(((k, sorted(v)) for k, v in sorted(named.items()) if len(v) > 1), None)
    if two:
        raise ValueError(f"{file}: label {two[0]} is named {two[1][:3]}; expected one name "
                         "per label")
    if sorted(named) != list(range(len(named))):
        gaps = sorted(set(range(max(named) + 1)) - set(named))[:5]
        raise ValueError(f"{file}: its labels are not 0..{len(named) - 1} (missing "
                         f"{gaps or 'none'}, lowest {min(named)}, highest {max(named)})")
    names = [named[k].pop() for k in range(len(named))]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})[:3]
        raise ValueError(f"{file}: class name(s) {twice} given to more than one label")
    return names


def _release_names(file, entries, count: int, release_name) -> list[str] | None:
    """Each label's name as the release names its images, or None (with the reason
    logged) when an image has none or a label gets two, or two labels one."""
    by_label: dict[int, set] = {k: set() for k in range(count)}
    for path, label, _ in entries:
        by_label[label].add(release_name(path))
    names = [next(iter(v)) if len(v) == 1 else None for _, v in sorted(by_label.items())]
    if None in names or len(set(names)) != count:
        log.warning("%s: its labels do not match the release's own classes one to one; "
                    "the split file's class names are used", file)
        return None
    return names


def read_test(file: Path, image_dir: Path,
              release_name: Callable[[str], str | None] | None) -> tuple[list, tuple]:
    """(samples, class names) of a split file's "test" list; images under ``image_dir``."""
    entries = _entries(file)
    names = _one_name_per_label(file, entries)
    released = release_name and _release_names(file, entries, len(names), release_name)
    names = released or [n.replace("_", " ") for n in names]
    return [(image_dir / path, label) for path, label, _ in entries], tuple(names)
