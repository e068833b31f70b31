"""One atomic write for everything the project puts on disk (checkpoints, caches, weights,
reports): a temporary file unique to this process and call, fsync, then rename, so readers
see the old file or the new one, never half of one, and two writers never share a name."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no room: the disk, a size limit, a quota


class DiskFull(OSError):
    """A write that found no room; the partial file is gone and the old one untouched."""


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def atomic_write(path, write: Callable[[object], None], mode: str = "wb",
                 size_hint: int | None = None) -> Path:
    """Calls ``write(file)`` on a fresh temporary file beside ``path``, syncs it, renames it
    over ``path`` and syncs the folder, so the new file survives a crash once this returns.
    No room on the disk (or a file-size limit or quota) raises ``DiskFull``, one sentence
    naming the file and the room needed (``size_hint`` bytes when the caller knows them);
    the partial file is removed and an older ``path`` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from others
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_folder(path.parent)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        full = _no_room(exc)
        if full is None:
            raise
        free = shutil.disk_usage(path.parent).free
        need = f"about {_mib(size_hint)} needed, " if size_hint else ""
        raise DiskFull(full.errno or errno.ENOSPC,
                       f"could not write {path}: {full.strerror or 'no room'} ({need}"
                       f"{_mib(free)} free there); the partial file was removed") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _no_room(exc: BaseException | None) -> OSError | None:
    """The no-room error behind ``exc``, if any: writers wrap it (torch.save's zip writer
    raises its own error while the OSError is handled; numpy's tofile reports a short write
    as "N requested and M written", without an errno)."""
    while exc is not None:
        if isinstance(exc, OSError) and (exc.errno in FULL or
                                         (exc.errno is None and " written" in str(exc))):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename into it is durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders
    finally:
        os.close(fd)


def remove_stale_temporaries(folder) -> list[Path]:
    """Deletes the temporary files that a killed ``atomic_write`` left in ``folder`` (call
    it only on a folder this process owns, e.g. under the run's lock)."""
    stale = sorted(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_digest(path) -> str:
    """sha256 of a file's bytes, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def finite_json(obj, where: str = "", found: list | None = None):
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN);
    the dotted paths of those replaced are appended to ``found``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if found is not None:
            found.append(f"{where}: {obj}")
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v, f"{where}.{k}" if where else str(k), found)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, f"{where}[{i}]", found) for i, v in enumerate(obj)]
    return obj


def atomic_write_json(path, obj: dict) -> Path:
    """Strict JSON: a non-finite number is written as null, and listed with its value
    under "non_finite" (the reason it is null)."""
    found: list[str] = []
    clean = finite_json(obj, found=found)
    if found:
        clean["non_finite"] = found
    return atomic_write_text(path, json.dumps(clean, indent=2, allow_nan=False))


def append_rows(path, rows: list[dict]) -> Path:
    """Appends ``rows`` to a JSONL file as JSON lines (non-finite numbers as null), synced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(finite_json(r), allow_nan=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(lines)
        f.flush()
        os.fsync(f.fileno())
    return path
