"""What a run's data folders hold, read once: one ``os.scandir`` walk of an image folder
gives its class folders, their image files and each file's size and modification time (one
stat an image, which the fingerprint reuses), and the listing serves every later use of the
same folder in the run (the argument checks, the data set, the evaluation sets). Under
torchrun rank 0 walks and sends its listing to the other ranks, which walk nothing.

A listing lives from one run's checks to its end (``forget`` starts afresh): folders that
change between two runs of one process are read anew, and within a run the data set is
the one its fingerprint describes."""
from __future__ import annotations

import os
import stat
from array import array
from dataclasses import dataclass, field

from . import distributed

# What open_clip's loaders and PIL read (a .gif counts as its first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class ImageFiles:
    """One class folder's regular image files, sorted by name, with their sizes and
    modification times (ns) in the same order; ``named``: how many entries were named as
    images (the others were not regular files: FIFOs, devices, folders, broken links)."""
    names: list[str] = field(default_factory=list)
    sizes: array = field(default_factory=lambda: array("q"))
    mtimes: array = field(default_factory=lambda: array("q"))
    named: int = 0


@dataclass
class FolderListing:
    """An image folder ``root``: its visible class folders that hold image names, by name
    (sorted); the hidden ones and those without image names (never classes); the paths
    named as images that are not regular files; and the root's own regular files
    (classnames.txt, templates.txt)."""
    root: str
    folders: dict[str, ImageFiles]
    hidden: list[str]
    empty: list[str]
    special: list[str]
    root_files: frozenset[str]


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def _class_folder(path: str) -> tuple[ImageFiles, list[str]]:
    """(its regular image files, the paths named as images that are not regular files)."""
    found, special = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            if not is_image_name(entry.name):
                continue
            try:
                st = entry.stat()  # after links: the one stat this image costs
            except OSError:
                st = None
            if st is None or not stat.S_ISREG(st.st_mode):
                special.append(entry.path)
            else:
                found.append((entry.name, st.st_size, st.st_mtime_ns))
    found.sort()
    files = ImageFiles(named=len(found) + len(special))
    for name, size, mtime in found:
        files.names.append(name)
        files.sizes.append(size)
        files.mtimes.append(mtime)
    return files, sorted(special)


def walk(root) -> FolderListing:
    """The listing of image folder ``root``: one ``os.scandir`` of it and of each visible
    class folder, one stat an image."""
    root = os.fspath(root)
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"image folder not found: {root}") from None
    subfolders = sorted(e.name for e in entries if e.is_dir())
    root_files = frozenset(e.name for e in entries if e.is_file())
    folders, empty, special = {}, [], []
    for name in subfolders:
        if name.startswith("."):
            continue
        files, odd = _class_folder(os.path.join(root, name))
        special += odd
        if files.named:
            folders[name] = files
        else:
            empty.append(name)
    return FolderListing(root, folders, [n for n in subfolders if n.startswith(".")], empty,
                         special, root_files)


_this_run: dict[str, FolderListing] = {}


def folder(root) -> FolderListing:
    """The run's listing of ``root``: walked on first use (rank 0, sent to every rank under
    torchrun, a collective then), the same object after."""
    key = os.path.realpath(root)  # one folder however it is spelled
    if key not in _this_run:
        _this_run[key] = distributed.from_rank0(lambda: walk(root))
    return _this_run[key]


def forget() -> None:
    """A new run starts: listings are read anew."""
    _this_run.clear()
