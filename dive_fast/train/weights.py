"""Weights-only files: ``final.safetensors`` at the end of every run, ``best.safetensors``
(``--keep-best``) and WiSE-FT's mixes (``evaluate --save-weights``). They hold the open_clip
model's state dict and nothing else, so open_clip reads them as they are:
``open_clip.create_model_and_transforms(NAME, pretrained=FILE)``. A method's trained
linear head (FT, LP-FT) is not part of that model and not in them."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .fileio import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FINAL = "final.safetensors"
BEST = "best.safetensors"
BEST_RECORD = "best.json"


def save_weights(state: dict, path) -> Path:
    """``state`` (a model's state dict) as safetensors, atomically."""
    from safetensors.torch import save
    payload = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    return atomic_write(path, lambda f: f.write(payload), size_hint=len(payload))


def load_weights(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


class KeepBest:
    """``--keep-best METRIC``: keeps ``best.safetensors`` in --out, the weights of the
    evaluation with the highest METRIC so far (the earliest among equals), and
    ``best.json`` saying which step and value. A resumed run continues from the record."""

    def __init__(self, out, metric: str, resumed: bool):
        self.path, self.record, self.metric = Path(out) / BEST, Path(out) / BEST_RECORD, metric
        self.value = None
        if resumed and self.record.is_file() and self.path.is_file():
            self.value = json.loads(self.record.read_text())["value"]

    def offer(self, step: int, value: float | None, state: dict) -> bool:
        """Keeps ``state`` when ``value`` beats the best so far; returns whether it did."""
        if value is None or value != value or (self.value is not None and value <= self.value):
            return False
        save_weights(state, self.path)
        atomic_write_json(self.record, {"metric": self.metric, "value": value, "step": step,
                                        "file": self.path.name})
        self.value = value
        log.info("--keep-best %s: step %d (%.4f) kept in %s", self.metric, step, value, self.path)
        return True


def model_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
