"""Frozen-model embeddings of a fixed reference set, computed once and memory-mapped.

Exact when the reference transform is deterministic (the default): the frozen model sees
the same pixels every epoch, so its embeddings never change. The key covers the model,
its weights (a local file by a digest of its bytes), the data set (an open_clip CSV by a
digest of its bytes and its images' sizes and times), the transform and the autocast
dtype, so a change of any of them recomputes, in place or not.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .fileio import atomic_write, file_digest


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
          progress=True) -> np.ndarray:
    """[N, 2, D] float32 (image, text) frozen embeddings, normalised, memory-mapped.
    ``frozen`` is a ``FrozenReference``. Rows of unreadable samples stay zero: the
    training loader never uses them (``data.Readable`` replaces such samples)."""
    path = Path(path)
    if path.is_file():
        return np.load(path, mmap_mode="r")
    loader = DataLoader(_Numbered(dataset), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate)
    emb = None
    for rows, images, texts in tqdm(loader, desc="frozen reference embeddings",
                                    disable=not progress, leave=False):
        if images is None:
            continue
        img, txt = frozen.embed(images.to(frozen.device), tokenizer(texts).to(frozen.device))
        if emb is None:
            emb = np.zeros((len(dataset), 2, img.shape[1]), dtype=np.float32)
        emb[rows.numpy()] = torch.stack((img, txt), 1).cpu().numpy()
    if emb is None:
        raise RuntimeError(f"no readable sample in the reference set ({len(dataset)} listed)")
    atomic_write(path, lambda f: np.save(f, emb))
    return np.load(path, mmap_mode="r")


def lookup(cache: np.ndarray, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.ascontiguousarray(cache[np.asarray(indices)]))
    rows = rows.pin_memory() if torch.device(device).type == "cuda" else rows
    rows = rows.to(device, non_blocking=True)
    return rows[:, 0], rows[:, 1]
