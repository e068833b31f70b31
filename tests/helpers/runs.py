"""The training command line of the tests' short runs, and two processes under torchrun."""
import os
import subprocess
import sys


def train_args(out, *extra):
    """A few seconds of training on the world with the micro model."""
    return ["--model", "dive-micro", "--out", str(out), "--steps", "4", "--batch-size", "8",
            "--train-size", "32", "--ref-size", "32", "--eval-per-task", "10", "--workers", "0",
            "--no-progress", "--wise-ft", "", "--checkpoint-every", "2", "--log-every", "1",
            "--lr", "1e-3", *extra]


def two_processes(*target, timeout=900):
    """``torchrun --nproc_per_node=2 <target>``; asserts that both processes exit cleanly."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", *target],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
