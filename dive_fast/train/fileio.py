"""One atomic write for everything the project puts on disk (checkpoints, caches, weights,
reports): a temporary file unique to this process and call, fsync, then rename, so readers
see the old file or the new one, never half of one, and two writers never share a name."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[object], None], mode: str = "wb") -> Path:
    """Calls ``write(file)`` on a fresh temporary file beside ``path``, then renames it."""
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        return {k: finite_json(v, f"{where}.{k}" if where else str(k), found) for k, v in obj.items()}
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
