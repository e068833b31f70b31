"""Weights-only files: ``final.safetensors`` at the end of every run, ``best.safetensors``
(``--keep-best``) and WiSE-FT's mixes (``evaluate --save-weights``). They hold the open_clip
model's state dict and nothing else, so open_clip reads them as they are:
``open_clip.create_model_and_transforms(NAME, pretrained=FILE)``. A method's trained
linear head (FT, LP-FT) is not part of that model and not in them."""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import torch

from .fileio import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

FINAL = "final.safetensors"
BEST = "best.safetensors"
BEST_RECORD = "best.json"


def save_weights(state: dict, path) -> Path:
    """``state`` (a model's state dict) as safetensors, atomically: the bytes of
    safetensors' ``save``, written tensor by tensor (``save`` builds the whole file in
    memory, twice the weights at its peak, on top of the run's own memory)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    header, order = _safetensors_header(tensors)
    return atomic_write(path, lambda f: _write_safetensors(f, header, order, tensors),
                        size_hint=len(header) + sum(t.nbytes for t in tensors.values()))


def _safetensors_header(tensors: dict) -> tuple[bytes, list]:
    """(8-byte length + JSON header, names in file order) as safetensors' ``save`` lays them
    out: by dtype in its order (asked of safetensors on one element of each), then name."""
    from safetensors.torch import save
    dtypes = list(dict.fromkeys(t.dtype for t in tensors.values()))
    probe = _header_of(save({str(i): torch.zeros(1, dtype=d) for i, d in enumerate(dtypes)}))
    rank = {dtypes[int(i)]: at for at, i in enumerate(probe)}
    names = {dtypes[int(i)]: entry["dtype"] for i, entry in probe.items()}
    order = sorted(tensors, key=lambda k: (rank[tensors[k].dtype], k))
    entries, offset = {}, 0
    for k in order:
        t = tensors[k]
        entries[k] = {"dtype": names[t.dtype], "shape": list(t.shape),
                      "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _header_of(payload: bytes) -> dict:
    return json.loads(payload[8:8 + struct.unpack("<Q", payload[:8])[0]])


def _write_safetensors(f, header: bytes, order: list, tensors: dict) -> None:
    f.write(header)
    for k in order:
        if tensors[k].numel():
            f.write(tensors[k].reshape(-1).view(torch.uint8).numpy().data)


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
