"""Checkpoints: written atomically (temporary file, fsync, rename), read without running
code (weights_only), with clear errors for missing or corrupt files."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch


def atomic_save(obj, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise RuntimeError(f"checkpoint {path} is corrupt or not a torch checkpoint: {exc}") from exc


def load_model_weights(model: torch.nn.Module, path) -> dict:
    """Load the model part of a dive_fast.train checkpoint (or a bare state dict)."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RuntimeError(f"checkpoint {path} does not fit this model: {exc}") from exc
    return ckpt


def prune(folder, pattern: str, keep: int) -> None:
    """Delete all but the newest ``keep`` files matching pattern (sorted by name)."""
    files = sorted(Path(folder).glob(pattern))
    for f in files[:-keep] if keep > 0 else []:
        f.unlink(missing_ok=True)
