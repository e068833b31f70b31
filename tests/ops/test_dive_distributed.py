"""Under torch.distributed, m stays identical on every rank and equals the global-batch m."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.backends import backend_params

from dive_fast.ops.dive_reference import dive_loss_float64
from dive_fast.testing import make_inputs

HELPER = Path(__file__).parents[1] / "helpers" / "dist_dive_check.py"


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu", "triton")))
def test_two_ranks_share_m_of_global_batch(tmp_path, backend):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           str(HELPER), str(tmp_path / "out"), backend]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in range(2)]
    m = torch.zeros(16, dtype=torch.float64)
    for step in range(3):
        x = make_inputs(16, 16, seed=step)
        *_, m = dive_loss_float64(*x, m, lam=10.0, momentum=0.5)
        for r in range(2):
            torch.testing.assert_close(torch.tensor(ranks[r][step]["m"], dtype=torch.float64), m,
                                       rtol=1e-5, atol=1e-7)
            local = [z[r * 8:(r + 1) * 8] for z in x]
            # each rank's loss: its local rows against the shared (global) m
            expected = dive_loss_float64(*local, m, lam=10.0, update=False)[0]
            assert ranks[r][step]["loss"] == pytest.approx(expected.item(), rel=1e-5)
