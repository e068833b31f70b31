"""Checkpoints: written atomically (temporary file, fsync, rename) with a digest of their
payload, read without running code (weights_only) and checked against that digest, with
clear errors for missing or corrupt files.

The digest (``payload_sha256``, beside ``state_dict`` in the saved dict, so open_clip
still reads the file) covers every tensor's bytes, dtype and shape and every other value:
a file damaged inside a tensor, which ``torch.load`` reads without complaint, is refused."""
from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch

from .fileio import atomic_write

DIGEST_KEY = "payload_sha256"


def payload_digest(obj) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, x) -> None:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(x.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().data)
    elif isinstance(x, dict):
        h.update(f"D{len(x)}|".encode())
        for k in sorted(x, key=repr):
            h.update(f"{k!r}=".encode())
            _feed(h, x[k])
    elif isinstance(x, (list, tuple)):  # a saved tuple may load as a list: one encoding
        h.update(f"L{len(x)}|".encode())
        for v in x:
            _feed(h, v)
    else:  # str, int, float, bool, None
        h.update(f"{x!r}|".encode())


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in ``obj`` (about a checkpoint file's size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def atomic_save(obj, path) -> Path:
    if isinstance(obj, dict):
        obj = {**obj, DIGEST_KEY: payload_digest(obj)}
    return atomic_write(path, lambda f: torch.save(obj, f), size_hint=tensor_bytes(obj))


class CorruptCheckpoint(RuntimeError):
    pass


def _load(path: Path, map_location):
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt or not a torch checkpoint: "
                                f"{exc}") from exc
    if isinstance(ckpt, dict) and DIGEST_KEY in ckpt:
        expected = ckpt.pop(DIGEST_KEY)
        if payload_digest(ckpt) != expected:
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt: its contents do not match "
                                    "the digest written with them")
    return ckpt


def last_good(path) -> Path | None:
    """The newest other checkpoint beside ``path`` that loads and matches its digest."""
    path = Path(path)
    for other in sorted(path.parent.glob(f"*{path.suffix}"), reverse=True):
        if other.resolve() != path.resolve():
            try:
                _load(other, "cpu")
                return other
            except CorruptCheckpoint:
                continue
    return None


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return _load(path, map_location)
    except CorruptCheckpoint as exc:
        good = last_good(path)
        hint = (f"; the newest intact checkpoint beside it is {good} (--resume {good})" if good
                else "; no intact checkpoint beside it")
        raise CorruptCheckpoint(f"{exc}{hint}") from exc.__cause__


def load_model_weights(model: torch.nn.Module, path) -> dict:
    """Load the model part of a dive_fast.train checkpoint (or a bare state dict)."""
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RuntimeError(f"checkpoint {path} does not fit this model: {exc}") from exc
    return ckpt


def prune(written: list[Path], keep: int) -> None:
    """Deletes all but the newest ``keep`` of ``written`` (the checkpoints this run wrote or
    resumed among, oldest first), after the newest is durable: never a file another
    process made, and a folder deleted under the run is no error."""
    while len(written) > keep:
        written.pop(0).unlink(missing_ok=True)
