"""A run owns its ``--out`` folder while it runs: an exclusive ``flock`` on ``--out/.lock``
(taken by rank 0 under torchrun), holding the owner's pid, host and start time, so that a
second run on the same folder refuses at once and names the holder. The lock goes with
the process: released at the end of the run, on an exception, or when the process dies."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path


class FolderInUse(RuntimeError):
    pass


@contextmanager
def hold(folder, enabled: bool = True):
    if not enabled:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = open(folder / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise FolderInUse(f"--out {folder} is in use by another run ({holder}): wait for it "
                          "to end, or give another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.truncate(0)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
