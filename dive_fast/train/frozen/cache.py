"""Frozen-model embeddings of a fixed reference set, computed once and read by row.

Exact when the reference transform is deterministic (the default): the frozen model sees
the same pixels every epoch, so its embeddings never change. The key covers the model,
its weights (a local file by a digest of its bytes), the data set (an open_clip CSV by a
digest of its bytes and its images' sizes and times), the transform and the autocast
dtype, so a change of any of them recomputes, in place or not.

The file is checked when opened (its size, and the digest recorded when it was written)
and read with positioned reads rather than a memory map: a cache truncated or rewritten
under a live run is an error naming it at the next read, not a bus error.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..._cli.progress import progress_bar
from .. import distributed
from ..data import in_order_loader
from ..fileio import atomic_write, atomic_write_text, file_digest


class EmbeddingCache:
    """An ``np.save``d [N, 2, D] float32 array, read row by row (``rows``). Opening checks
    its header and size, and with ``verify_digest`` reads the whole file against the digest
    recorded beside it (one rank does that for a run: the others open what it checked)."""

    def __init__(self, path, verify_digest: bool = True):
        self.path = Path(path)
        record = self.path.with_suffix(".sha256")
        if verify_digest and record.is_file() and \
                file_digest(self.path) != record.read_text().strip():
            raise RuntimeError(f"frozen embedding cache {self.path} does not match the digest "
                               "recorded when it was written (changed or damaged): delete it "
                               "and it is built again")
        self.fd = os.open(self.path, os.O_RDONLY)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            self.offset = f.tell()
        if dtype != np.float32 or len(shape) != 3:
            raise RuntimeError(f"frozen embedding cache {self.path}: {dtype} {shape}, expected "
                               "float32 [N, 2, D]")
        self.shape, self.row_bytes = shape, shape[1] * shape[2] * 4
        self.stamp = self._stamp()
        if self.stamp[0] != self.offset + shape[0] * self.row_bytes:
            raise RuntimeError(f"frozen embedding cache {self.path} is {self.stamp[0]} bytes, "
                               f"expected {self.offset + shape[0] * self.row_bytes}: cut short")

    def __len__(self):
        return self.shape[0]

    def _stamp(self):
        st = os.fstat(self.fd)
        return st.st_size, st.st_mtime_ns

    def rows(self, indices) -> np.ndarray:
        if self._stamp() != self.stamp:
            raise RuntimeError(f"frozen embedding cache {self.path} changed while this run "
                               "reads it (size or modification time); rebuild it by starting "
                               "the run again")
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.float32)
        for j, i in enumerate(np.asarray(indices).tolist()):
            data = os.pread(self.fd, self.row_bytes, self.offset + i * self.row_bytes)
            if len(data) != self.row_bytes:
                raise RuntimeError(f"frozen embedding cache {self.path}: row {i} cut short")
            out[j] = np.frombuffer(data, dtype=np.float32).reshape(self.shape[1:])
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        return self.rows([i])[0]

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_id(pretrained: str | None) -> str | None:
    """What the frozen model's weights are, for the key: a local file by its bytes (so a
    file overwritten in place is new weights), anything else (an open_clip tag, random
    weights) as given."""
    if pretrained and Path(pretrained).is_file():
        return f"sha256:{file_digest(pretrained)}"
    return pretrained


class _Numbered(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return i, self.dataset[i]


def _collate(batch):
    kept = [(i, x) for i, x in batch if x is not None]
    if not kept:
        return torch.empty(0, dtype=torch.long), None, []
    return (torch.tensor([i for i, _ in kept]), torch.stack([x[0] for _, x in kept]),
            [x[1] for _, x in kept])


def _embed_rows(frozen, tokenizer, dataset, rows: range, batch_size, workers, progress):
    """[len(rows), 2, D] float32 embeddings of ``dataset``'s ``rows``, batched from their
    first; an empty array (shape (0,)) when none of them is readable (D unknown)."""
    loader = in_order_loader(Subset(_Numbered(dataset), rows), batch_size, workers, _collate)
    emb = np.zeros((0,), dtype=np.float32)
    for index, images, texts in progress_bar(loader, desc="frozen reference embeddings",
                                             disable=not progress, leave=False):
        if images is None:
            continue
        img, txt = frozen.embed(images.to(frozen.device), tokenizer(texts).to(frozen.device))
        if not emb.size:
            emb = np.zeros((len(rows), 2, img.shape[1]), dtype=np.float32)
        emb[index.numpy() - rows.start] = torch.stack((img, txt), 1).cpu().numpy()
    return emb


def _write_npy(f, parts: list[np.ndarray], lengths: list[int], block_rows=4096) -> None:
    """The bytes ``np.save`` writes for the rows of ``parts`` stacked (a part of shape (0,)
    stands for ``lengths``' count of zero rows), part by part, a block at a time: memory
    flat in the reference set's size."""
    dim = next(p.shape[2] for p in parts if p.size)
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(
        np.dtype(np.float32)), "fortran_order": False, "shape": (sum(lengths), 2, dim)})
    for part, n in zip(parts, lengths):
        for start in range(0, n, block_rows):
            stop = min(start + block_rows, n)
            block = part[start:stop] if part.size else \
                np.zeros((stop - start, 2, dim), dtype=np.float32)
            f.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())


def _part_path(path: Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` leaves its share: a temporary name (``.*.tmp``), so what a killed
    run left is removed at the next start (``fileio.remove_stale_temporaries``)."""
    return path.with_name(f".{path.name}.part-{rank}-of-{world}.tmp")


@torch.no_grad()
def build(frozen, tokenizer, dataset, path: Path, batch_size=256, workers=0,
          progress=True, verify_digest=True, rank=0, world=1) -> EmbeddingCache:
    """[N, 2, D] float32 (image, text) frozen embeddings, normalised, on disk beside a digest.
    ``frozen`` is a ``FrozenReference``. Rows of unreadable samples stay zero: the
    training loader never uses them (``data.Readable`` replaces such samples). A cache
    already at ``path`` is opened (``verify_digest``: see ``EmbeddingCache``; rank 0 reads
    the digest, the others open what it checked).

    On ``world`` ranks every rank calls it: each embeds its share of the rows
    (``distributed.batch_slice``: the batches one process makes) into a part file beside
    ``path``, and rank 0 puts the parts together into the bytes one process writes."""
    path = Path(path)
    exists = distributed.from_rank0(path.is_file)  # rank 0's view decides
    if exists:
        opened = EmbeddingCache(path, verify_digest) if rank == 0 else None
        distributed.barrier()
        return opened or EmbeddingCache(path, verify_digest=False)
    shares = [distributed.batch_slice(len(dataset), batch_size, r, world) for r in range(world)]
    rows = _embed_rows(frozen, tokenizer, dataset, shares[rank], batch_size, workers,
                       progress and rank == 0)
    if world > 1:
        atomic_write(_part_path(path, rank, world), lambda f: np.save(f, rows),
                     size_hint=rows.nbytes)
        distributed.barrier()
        parts = [np.load(_part_path(path, r, world), mmap_mode="r") for r in range(world)]
    else:
        parts = [rows]
    if not any(p.size for p in parts):  # every rank sees it: none waits for rank 0
        raise RuntimeError(f"no readable sample in the reference set ({len(dataset)} listed)")
    if rank == 0:
        lengths = [len(s) for s in shares]
        path.with_suffix(".sha256").unlink(missing_ok=True)  # never a stale record by new rows
        atomic_write(path, lambda f: _write_npy(f, parts, lengths),
                     size_hint=sum(lengths) * next(p[0].nbytes for p in parts if p.size))
        atomic_write_text(path.with_suffix(".sha256"), file_digest(path))
    parts.clear()  # the part files' maps, before rank 0 deletes them
    if rank == 0 and world > 1:
        for r in range(world):
            _part_path(path, r, world).unlink()
    distributed.barrier()
    return EmbeddingCache(path, verify_digest=False)  # rank 0 just read its digest


def lookup(cache: EmbeddingCache, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(cache.rows(indices))
    rows = rows.pin_memory() if torch.device(device).type == "cuda" else rows
    rows = rows.to(device, non_blocking=True)
    return rows[:, 0], rows[:, 1]
