"""torchrun integration: process group set-up and rank helpers (single process: no-ops)."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

COLLECTIVE_MINUTES = 120
_owned = []  # the process group this module created (and so destroys at shutdown)


def world_size_from_env() -> int:
    """The number of ranks torchrun starts (1 outside torchrun), before any process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str) -> tuple[int, int, str]:
    """(rank, world_size, device) after torchrun's environment; gloo on CPU, nccl on GPU.
    A process group the caller already initialised is used as it is."""
    world = world_size_from_env()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        # Rank 0 alone builds the frozen cache and evaluates while the others wait in a
        # collective: on ImageNet-scale sets that outlasts the default 10 minutes. A rank
        # that dies is still caught at once by torchrun, which ends the others.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=COLLECTIVE_MINUTES))
        _owned.append(True)
    if world > 1 and device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return (dist.get_rank() if world > 1 else 0), world, device


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
