"""Frozen-model embeddings of a fixed reference set, computed once and memory-mapped.

Exact when the reference transform is deterministic (the default): the frozen model sees
the same pixels every epoch, so its embeddings never change. The key covers the model,
its weights, the data set and the transform, so a change of any of them recomputes.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import collate


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def build(frozen, tokenizer, dataset, path: Path, device="cpu", batch_size=256, workers=0,
          progress=True) -> np.ndarray:
    """[N, 2, D] float32 (image, text) frozen embeddings, normalised, memory-mapped."""
    path = Path(path)
    if path.is_file():
        return np.load(path, mmap_mode="r")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    rows = []
    for images, texts, skipped in tqdm(loader, desc="frozen reference embeddings",
                                       disable=not progress, leave=False):
        if skipped:
            raise RuntimeError("the reference set has unreadable images; an embedding cache "
                               "needs every sample: fix the data or use --no-frozen-cache")
        img = frozen.encode_image(images.to(device), normalize=True).float()
        txt = frozen.encode_text(tokenizer(texts).to(device), normalize=True).float()
        rows.append(torch.stack((img, txt), 1).cpu())
    emb = torch.cat(rows).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, emb)
    tmp.replace(path)
    return np.load(path, mmap_mode="r")


def lookup(cache: np.ndarray, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(np.ascontiguousarray(cache[np.asarray(indices)])).to(device)
    return rows[:, 0], rows[:, 1]
