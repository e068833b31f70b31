"""A run's starting weights, the ones RSA and WiSE-FT compare with: their record (what
``--pretrained`` named, the file holding them, the digest of their tensors), written to
config.json, every checkpoint and the table. Random weights, which no flag reloads, are
kept in ``--out/start-weights.safetensors``; a file or tag whose weights no longer match
the recorded digest is refused by name."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from .checkpoint import load_checkpoint, payload_digest, state_dict_in
from .models import is_weights_path
from .weights import save_weights

KEPT_NAME = "start-weights.safetensors"


class StartMismatch(ValueError):
    """Weights offered as a run's start that are not the ones it started from."""


def record(state: dict, pretrained: str | None, out, keep: bool = True) -> dict:
    """The record of ``state``, loaded from ``pretrained`` (a tag, a file, or ''/None for
    random weights, which are written to ``out`` when ``keep``)."""
    path = pretrained if is_weights_path(pretrained) else None
    if not pretrained:
        path = Path(out) / KEPT_NAME
        if keep:
            save_weights(state, path)
    return {"pretrained": pretrained, "path": str(Path(path).resolve()) if path else None,
            "sha256": payload_digest(state)}


def read(path) -> dict:
    """The model state in a weights file: safetensors, or a torch checkpoint / state dict."""
    if str(path).endswith(".safetensors"):
        return load_file(str(path))
    return state_dict_in(load_checkpoint(path))


def check(state: dict, start: dict | None, source: str) -> None:
    """``state`` (loaded from ``source``, as the user named it) must be ``start``'s weights."""
    if start and payload_digest(state) != start["sha256"]:
        raise StartMismatch(
            f"{source}: these are not the weights the run started from (their digest differs "
            f"from the recorded sha256 {start['sha256'][:16]}...; the run started from "
            f"{describe(start)})")


def describe(start: dict) -> str:
    """One line for the table: what the start was, where it is, its digest."""
    what = "random weights" if not start["pretrained"] else start["pretrained"]
    where = f" in {start['path']}" if start["path"] and start["path"] != what else ""
    return f"{what}{where} (sha256 {start['sha256'][:16]})"
