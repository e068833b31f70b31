"""Checkpoints: written atomically (temporary file, fsync, rename), read without running
code (weights_only), with clear errors for missing or corrupt files."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from .fileio import atomic_write


def atomic_save(obj, path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


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
