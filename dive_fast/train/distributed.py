"""Process group set-up and rank helpers, for torchrun or SLURM's ``srun`` (single process:
no-ops). Also the rank's share of a set (``batch_slice``) and the collectives that put the
shares back together."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

# Every rank builds its share of the frozen cache and scores its share of the evaluation
# sets, so no rank waits on another's whole job any more; what rank 0 still does alone (the
# digest read of a reused multi-GB cache, assembling a new one from the ranks' parts, a
# checkpoint write) can outlast the default 10 minutes on a slow shared file system. A rank
# that dies is still caught at once by torchrun, which ends the others.
COLLECTIVE_MINUTES = 30
_owned = []  # the process group this module created (and so destroys at shutdown)

# (local rank, rank, world size): torchrun's names first, then SLURM's, as open_clip_train's
# ``world_info_from_env`` reads them (srun starts one task per rank and sets the second).
LAUNCHER_VARIABLES = (("LOCAL_RANK", "SLURM_LOCALID"), ("RANK", "SLURM_PROCID"),
                      ("WORLD_SIZE", "SLURM_NTASKS"))


def world_info_from_env() -> tuple[int, int, int]:
    """(local rank, rank, world size) that torchrun or srun gave this process ((0, 0, 1)
    outside both). Under srun alone, MASTER_ADDR and MASTER_PORT must name rank 0's host
    and a free port (torchrun sets them itself): a one-line error names what is missing."""
    found = []
    for names in LAUNCHER_VARIABLES:
        value = next((os.environ[n] for n in names if n in os.environ), None)
        found.append(int(value) if value is not None else (1 if names[0] == "WORLD_SIZE" else 0))
    local, rank, world = found
    if world > 1 and "WORLD_SIZE" not in os.environ:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise ValueError(f"srun started {world} tasks (SLURM_NTASKS) but "
                             f"{' and '.join(missing)} unset: export MASTER_ADDR (rank 0's "
                             "host, e.g. the first of $SLURM_JOB_NODELIST) and MASTER_PORT "
                             "(a free port) before srun")
    return local, rank, world


def world_size_from_env() -> int:
    """The number of ranks torchrun or srun starts (1 outside both), before any process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return world_info_from_env()[2]


def init_from_env(device: str) -> tuple[int, int, str]:
    """(rank, world_size, device) after torchrun's or srun's environment; gloo on CPU, nccl on
    GPU. A process group the caller already initialised is used as it is."""
    local, rank, world = world_info_from_env()
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=COLLECTIVE_MINUTES))
        _owned.append(True)
    if world > 1 and device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return (rank if world > 1 else 0), world, device


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Destroys the group this module created, once every rank is done with it (a rank that
    tears down while a peer still talks to it keeps gloo's threads alive)."""
    if _owned and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _owned.clear()


def sum_over_ranks(value: int, device) -> int:
    """The sum of a host integer over all ranks (itself in a single process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t)
    return int(t.item())


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group ((0, 1) without one)."""
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def batch_slice(n: int, batch_size: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` rows, whole batches of ``batch_size`` each
    (the last rank's last batch may be short). One process cuts the same batches: a batch's
    results can depend on its other rows (a CPU matmul's blocking), so the ranks' shares put
    together are bit for bit what one process computes."""
    batches = -(-n // batch_size)
    first, last = batches * rank // world, batches * (rank + 1) // world
    return range(min(first * batch_size, n), min(last * batch_size, n))


def sum_tensor_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of an integer tensor over all ranks (exact; itself in a single
    process), on the tensor's device (nccl wants the rank's GPU)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def gather_in_rank_order(part):
    """[rank 0's ``part``, rank 1's, ...] on every rank (pickled: small objects only, such
    as RSA's embeddings); [part] in a single process."""
    if not dist.is_initialized():
        return [part]
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, part)
    return found


def from_rank0(make):
    """``make()`` computed once: on rank 0, its result (or its error, raised on every rank
    alike, so that none waits for a result that never comes) sent to all ranks; in a single
    process, called. Every rank must call it at the same point (a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return make()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [(make(), None)]
        except Exception as exc:  # noqa: BLE001  (whatever it is, every rank raises it)
            box = [(None, exc)]
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result
