"""Memory measurements for the benchmarks: the activation bytes autograd saves for backward
(exact and the same on any device), the bytes a module's weights hold on this rank and the
process's peak memory."""
from __future__ import annotations

import resource

import torch
from torch import nn


class SavedTensorMeter:
    """Bytes of the tensors autograd saves for backward while the block runs: now and at
    their peak. A storage counts once while any saved tensor views it, and is released when
    the last one is (a backward frees its graph's). Storages of ``exclude``'s parameters
    and buffers (weights saved by linear layers) are not activations: left out.

        with SavedTensorMeter(exclude=[model]) as meter:
            loss = model(x).sum(); loss.backward()
        meter.peak  # bytes
    """

    def __init__(self, exclude: list[nn.Module] = ()):
        self.excluded = {t.untyped_storage().data_ptr() for m in exclude
                         for t in (*m.parameters(), *m.buffers())}
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.bytes = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0:
            return t
        return _Held(self, t, key, storage.nbytes())

    def _add(self, key: int, nbytes: int) -> None:
        if key not in self.refs:
            self.refs[key], self.sizes[key] = 0, nbytes
            self.bytes += nbytes
            self.peak = max(self.peak, self.bytes)
        self.refs[key] += 1

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.bytes -= self.sizes.pop(key)


class _Held:
    """A saved tensor as autograd keeps it; its end is the end of the saved reference."""
    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor, key: int, nbytes: int):
        self.meter, self.tensor, self.key = meter, tensor, key
        meter._add(key, nbytes)

    def __del__(self):
        self.meter._release(self.key)


def _unpack(held):
    return held.tensor if isinstance(held, _Held) else held


def peak_memory_mib(device) -> float:
    """The peak allocated by torch on a GPU (since the last reset); on a CPU, the whole
    process's peak resident memory (Linux's ru_maxrss, in KiB)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def module_bytes(module: nn.Module) -> int:
    """The bytes of ``module``'s parameters and buffers held by this rank: each storage once,
    a sharded (DTensor) one by its local shard."""
    from torch.distributed.tensor import DTensor
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        t = t.to_local() if isinstance(t, DTensor) else t
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
