"""All ranks at start-up: the launchers' variables (torchrun's, else SLURM's as srun sets
them), and two processes started as srun starts them building the frozen cache and scoring
the evaluation sets in shares, equal to one process bit for bit."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.runs import train_args

from dive_fast import train
from dive_fast.train import distributed

LAUNCHERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
             "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture
def no_launcher(monkeypatch):
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_srun_s_variables_are_read_and_torchrun_s_come_first(no_launcher):
    assert distributed.world_info_from_env() == (0, 0, 1)
    for name, value in (("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "1"),
                        ("MASTER_ADDR", "node7"), ("MASTER_PORT", "29500")):
        no_launcher.setenv(name, value)
    assert distributed.world_info_from_env() == (1, 3, 4)
    assert distributed.world_size_from_env() == 4
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        no_launcher.setenv(name, value)  # torchrun inside a SLURM allocation
    assert distributed.world_info_from_env() == (0, 0, 2)


def test_srun_without_a_rendezvous_address_is_one_line_naming_it(no_launcher, tmp_path):
    no_launcher.setenv("SLURM_NTASKS", "2")
    no_launcher.setenv("SLURM_PROCID", "0")
    no_launcher.setenv("MASTER_ADDR", "node7")
    with pytest.raises(ValueError, match=r"SLURM_NTASKS\) but MASTER_PORT unset"):
        distributed.world_info_from_env()
    proc = subprocess.run([sys.executable, "-m", "dive_fast.train", "--model", "dive-micro",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "MASTER_PORT unset" in last and "MASTER_ADDR" in last, last


@pytest.mark.parametrize("batch", [(45, 8, 2), (45, 8, 3), (5, 8, 2), (0, 4, 2)])
def test_the_ranks_shares_are_whole_batches_covering_the_rows_in_order(batch):
    n, size, world = batch
    shares = [distributed.batch_slice(n, size, r, world) for r in range(world)]
    assert [i for s in shares for i in s] == list(range(n))
    assert all(s.start % size == 0 and (s.stop % size == 0 or s.stop == n) for s in shares)


def srun_env(rank: int, world: int, port: int) -> dict:
    """The environment srun gives task ``rank`` of ``world`` on one node (no torchrun
    variable), with the rendezvous address the job script exports."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHERS}
    return {**env, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world),
            "SLURM_LOCALID": str(rank), "MASTER_ADDR": "localhost", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}


def srun(command: list[str], world: int = 2, timeout: int = 600) -> None:
    """``command`` as ``srun --ntasks WORLD`` starts it: one process per rank, on this machine."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    tasks = [subprocess.Popen(command, env=srun_env(r, world, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    outputs = [t.communicate(timeout=timeout) for t in tasks]
    assert all(t.returncode == 0 for t in tasks), "\n".join(o[1][-3000:] for o in outputs)


def test_two_srun_tasks_build_the_cache_and_evaluate_as_one_process(tmp_path):
    """The cache's bytes and digest, and every figure of the report (two variants, RSA),
    equal one process's, bit for bit; each rank embedded a share of its own."""
    helper = [sys.executable, str(Path(__file__).parents[1] / "helpers" / "sharded_start.py")]
    subprocess.run([*helper, str(tmp_path / "one")], check=True, timeout=600,
                   env=srun_env(0, 1, 0))
    srun([*helper, str(tmp_path / "two")])
    for name in ("frozen-ref.npy", "frozen-ref.sha256"):
        one, two = ((tmp_path / n / "cache" / name).read_bytes() for n in ("one", "two"))
        assert one == two, name
    assert not list((tmp_path / "two" / "cache").glob(".*"))  # the parts are gone
    rows = np.load(tmp_path / "two" / "cache" / "frozen-ref.npy")
    assert (rows[3::7] == 0).all() and (np.abs(rows[4]).sum(-1) > 0).all()  # holes stay zero
    one, two = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    assert one["cache_shares"] == [[0, 45]] and two["cache_shares"] == [[0, 24], [24, 45]]
    assert two["reports"] == one["reports"]
    first = one["reports"][0]
    assert set(first["id"]) and set(first["rsa"]) == {"image", "text", "joint"}
    assert one["reports"][0] != one["reports"][1]  # the variants differ: both were scored


def test_srun_runs_the_cli_and_its_start_equals_one_process(micro_cache, tmp_path):
    """``python -m dive_fast.train`` under two srun tasks: the frozen cache (300 pairs: two
    batches of the cache's 256, one a rank) and the zero-shot row (300 images a set) equal
    one process's bit for bit."""
    args = train_args(tmp_path / "one", "--method", "dive", "--steps", "0", "--ref-size", "300",
                      "--eval-per-task", "300")
    train.main(args)
    args[args.index("--out") + 1] = str(tmp_path / "two")
    srun([sys.executable, "-m", "dive_fast.train", *args])
    caches = [sorted((tmp_path / n / "cache").iterdir()) for n in ("one", "two")]
    assert [p.name for p in caches[0]] == [p.name for p in caches[1]] and len(caches[0]) == 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*caches))
    one, two = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("one", "two"))
    assert two == one and one["zero-shot"]["id"]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
