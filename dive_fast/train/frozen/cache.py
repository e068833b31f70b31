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
from torch.utils.data import Dataset

from ..._cli.progress import progress_bar
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


@torch.no_grad()
def build(frozen, tokenizer, dataset, path: Path, batch_size=256, workers=0,
          progress=True, verify_digest=True) -> EmbeddingCache:
    """[N, 2, D] float32 (image, text) frozen embeddings, normalised, on disk beside a digest.
    ``frozen`` is a ``FrozenReference``. Rows of unreadable samples stay zero: the
    training loader never uses them (``data.Readable`` replaces such samples). A cache
    already at ``path`` is opened (``verify_digest``: see ``EmbeddingCache``)."""
    path = Path(path)
    if path.is_file():
        return EmbeddingCache(path, verify_digest)
    loader = in_order_loader(_Numbered(dataset), batch_size, workers, _collate)
    emb = None
    for rows, images, texts in progress_bar(loader, desc="frozen reference embeddings",
                                            disable=not progress, leave=False):
        if images is None:
            continue
        img, txt = frozen.embed(images.to(frozen.device), tokenizer(texts).to(frozen.device))
        if emb is None:
            emb = np.zeros((len(dataset), 2, img.shape[1]), dtype=np.float32)
        emb[rows.numpy()] = torch.stack((img, txt), 1).cpu().numpy()
    if emb is None:
        raise RuntimeError(f"no readable sample in the reference set ({len(dataset)} listed)")
    path.with_suffix(".sha256").unlink(missing_ok=True)  # never a stale record beside new rows
    atomic_write(path, lambda f: np.save(f, emb), size_hint=emb.nbytes)
    atomic_write_text(path.with_suffix(".sha256"), file_digest(path))
    return EmbeddingCache(path, verify_digest=False)  # the digest was just read from the file


def lookup(cache: EmbeddingCache, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(cache.rows(indices))
    rows = rows.pin_memory() if torch.device(device).type == "cuda" else rows
    rows = rows.to(device, non_blocking=True)
    return rows[:, 0], rows[:, 1]
