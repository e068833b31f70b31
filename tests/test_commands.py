"""The project's commands end a user error in one line naming the argument, exit code 2,
no traceback, before any work (argparse's own convention)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OP_BENCH = str(ROOT / "benchmarks" / "bench_dive_op.py")


@pytest.mark.parametrize("argv, named", [
    ([OP_BENCH, "--impls", "nonsense"], "--impls: unknown nonsense"),
    ([OP_BENCH, "--dtypes", "float8"], "--dtypes: float8"),
    ([OP_BENCH, "--batches", "0"], "--batches must be positive"),
    ([OP_BENCH, "--repeats", "-3"], "--repeats must be positive"),
    ([OP_BENCH, "--device", "tpu"], "--device"),
    (["-m", "dive_fast.info", "--foo"], "unrecognized arguments: --foo"),
], ids=["impls", "dtypes", "batches", "repeats", "device", "info"])
def test_a_bad_argument_is_one_line_and_exit_2(argv, named):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and named in last and "Traceback" not in proc.stderr, \
        proc.stderr[-2000:]
