"""A training run in a child process whose disk fills up (RLIMIT_FSIZE), for the fault tests."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def limited_run(argv, limit_bytes, cwd, after_checkpoints=0):
    """``train.main(argv)`` in a child process that may write no file past ``limit_bytes``
    (RLIMIT_FSIZE: a full disk's EFBIG, without filling a disk), from the start or once
    ``after_checkpoints`` checkpoints are written (a disk that fills during the run)."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(TESTS)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from dive_fast import train
        from dive_fast.train import loop
        save, written = loop.atomic_save, [0]

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))

        def save_then_fill(*args):
            if written[0] == {after_checkpoints}:
                limit()
            written[0] += 1
            return save(*args)
        loop.atomic_save = save_then_fill
        if {after_checkpoints} == 0:
            limit()
        train.main({argv!r})
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
