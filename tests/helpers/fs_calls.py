"""Counts the file-system look-ups a piece of code makes: ``os.stat``/``os.lstat`` (which
``Path.exists``, ``is_file``, ``is_dir``, ``os.path.*`` call), ``os.scandir``/``os.listdir``
(``Path.iterdir``, ``glob``) and ``DirEntry.stat`` (a C method no patch of ``os`` reaches:
the entries of a counted ``os.scandir`` are wrapped). Python's own imports are not counted
(they stat in C)."""
from __future__ import annotations

import collections
import contextlib
import os
import threading


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
        from dive_fast.train.listing import is_image_name
        root = os.path.abspath(root) + os.sep
        return sum(os.path.abspath(p).startswith(root) and is_image_name(os.path.basename(p))
                   for kind in ("stat", "lstat", "entry.stat") for p in self.paths[kind])

    def listings_of(self, folder) -> int:
        """``os.scandir`` and ``os.listdir`` calls on ``folder`` itself."""
        folder = os.path.abspath(folder)
        return sum(os.path.abspath(p) == folder for kind in ("scandir", "listdir")
                   for p in self.paths[kind])


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
