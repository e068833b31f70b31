"""Checkpoints, their format and the resume policy in one room.

The format: written atomically (temporary file, fsync, rename) with a digest of their
payload, read without running code (weights_only) and checked against that digest, with
clear errors for missing or corrupt files. The digest (``payload_sha256``, beside
``state_dict`` in the saved dict, so open_clip still reads the file) covers every tensor's
bytes, dtype and shape and every other value: a file damaged inside a tensor, which
``torch.load`` reads without complaint, is refused.

The policy: what a checkpoint holds (``checkpoint_state``: weights, method state,
optimiser, schedule, loss scale, random states and the settings a resume must share), which
one ``--resume`` names (``find_resume``), the refusal of one written with other settings
or data (``ResumeMismatch``), its restoring into a built run (``restore``), and a run's
claim on its ``--out`` (``claim_out``: a folder holding a run only to continue that run)."""
from __future__ import annotations

import hashlib
import json
import pickle
import random
import zipfile
from pathlib import Path

import torch

from . import parallel
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
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # no object needing code: not a checkpoint
            raise CorruptCheckpoint(f"checkpoint {path} is corrupt or not a torch checkpoint "
                                    "(not a pickle torch reads)") from exc
        raise CorruptCheckpoint(f"checkpoint {path} holds Python objects that need code to "
                                "load (torch.load's weights_only refusal); only tensors and "
                                "plain values are read, so no code runs: save its state_dict "
                                "alone") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpoint(f"checkpoint {path} is corrupt, truncated, empty or not a "
                                f"torch checkpoint ({first})") from exc
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


def state_dict_in(ckpt) -> dict:
    """The model's state dict in a loaded checkpoint (dive_fast's or open_clip_train's, whose
    DDP-wrapped models save keys with a ``module.`` prefix, stripped as open_clip does) or a
    bare state dict."""
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"a checkpoint holds {type(state).__name__}, not a state dict")
    if state and all(str(k).startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model_weights(model: torch.nn.Module, path, ckpt=None) -> dict:
    """Load the model part of a dive_fast.train checkpoint (or a bare state dict, an
    open_clip_train checkpoint, or a weights-only .safetensors: final.safetensors,
    best.safetensors); ``ckpt``: the file already loaded."""
    if ckpt is None:
        ckpt = load_weights_file(path) if str(path).endswith(".safetensors") \
            else load_checkpoint(path)
    try:
        model.load_state_dict(state_dict_in(ckpt))
    except RuntimeError as exc:
        raise WrongModel(f"checkpoint {path} does not fit this model: "
                         f"{str(exc).splitlines()[0]}") from exc
    return ckpt


def load_weights_file(path) -> dict:
    from .weights import load_weights
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return load_weights(path)


class WrongModel(RuntimeError):
    """A checkpoint of another model than the one it is loaded into."""


def prune(written: list[Path], keep: int) -> None:
    """Deletes all but the newest ``keep`` of ``written`` (the checkpoints this run wrote or
    resumed among, oldest first), after the newest is durable: never a file another
    process made, and a folder deleted under the run is no error."""
    while len(written) > keep:
        written.pop(0).unlink(missing_ok=True)


# --- the resume policy ------------------------------------------------------------------

# Settings a resumed run must share with the checkpoint it resumes: everything that
# changes the result (model and weights, method, optimiser and schedule, data, batches).
RESUME_KEYS = ("method", "model", "pretrained", "batch_size", "ref_batch_size", "world_size",
               "lr", "wd", "steps", "warmup", "grad_clip", "lp_steps", "lam", "ema_momentum",
               "precision", "augment", "data_ids", "world_parts", "train_size", "ref_size",
               "world_seed", "seed", "fsdp", "accum_freq", "beta1", "beta2", "eps",
               "lock_image", "lock_image_unlocked_groups", "lock_text",
               "lock_text_unlocked_layers", "force_image_size", "siglip",
               "dataset_resampled", "reference_upsampling_factors")
# What checkpoints written before data_ids (2026-12-05) recorded of their data, by path.
OLD_DATA_KEYS = ("train_folder", "reference_csv", "reference_shards")


class ResumeMismatch(ValueError):
    """A checkpoint written with other settings or data than this run's."""


def checkpoint_state(step, args, method, opt, sched, scaler=None) -> dict:
    """What a resume needs; under FSDP a collective (every rank calls it) whose full,
    unsharded state is rank 0's, so that the checkpoint loads anywhere."""
    method_state = {k: v for k, v in method.state_dict().items() if not k.startswith("model.")}
    if parallel.is_sharded(method.model):
        model_state = parallel.full_model_state(method.model)
        opt_state = parallel.full_optimizer_state(method, opt)
    else:
        model_state, opt_state = method.model.state_dict(), opt.state_dict()
    return {"state_dict": model_state, "method_state": method_state,
            "step": step, **{k: getattr(args, k) for k in RESUME_KEYS},
            "run_id": getattr(args, "run_id", None), "start": getattr(args, "start", None),
            "optimizer": opt_state, "scheduler": sched.state_dict(),
            **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}


def claim_out(args, out: Path) -> None:
    """A run owns its --out: a folder holding a run (checkpoints or metrics) is refused
    unless this run continues that very run (``--resume auto``, or a checkpoint of the same
    run identity, ``run_id``); else its checkpoints would be overwritten and pruned."""
    held = sorted((out / "checkpoints").glob("step-*.pt"))
    metrics = out / "metrics.jsonl"
    if not held and not (metrics.is_file() and metrics.stat().st_size):
        return
    where = held[-1] if held else metrics
    if args.resume is None:
        raise FileExistsError(
            f"--out {out} already holds a run ({where}): pass --resume auto to continue it, "
            "or give another --out")
    if args.resume != "auto" and not continues(Path(args.resume), out):
        raise FileExistsError(
            f"--out {out} already holds another run ({where}) than the one --resume "
            f"{args.resume} continues: resume into that run's own folder or a new --out")


def continues(checkpoint: Path, out: Path) -> bool:
    """Whether ``checkpoint`` belongs to the run in ``out``: it lies in its checkpoints/,
    or it records the run identity that ``out/config.json`` records."""
    if checkpoint.resolve().parent == (out / "checkpoints").resolve():
        return True
    try:
        folder_id = json.loads((out / "config.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return False
    return folder_id is not None and folder_id == recorded(checkpoint, "run_id")


def recorded(path: Path, key: str):
    """One setting a checkpoint records, read without loading its tensors (None when the
    file records none or does not read: the full load reports why)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001  (any unreadable file: load_checkpoint names it)
        return None
    return ckpt.get(key) if isinstance(ckpt, dict) else None


def find_resume(args) -> Path | None:
    if args.resume is None:
        return None
    if args.resume != "auto":
        return Path(args.resume)
    found = sorted((Path(args.out) / "checkpoints").glob("step-*.pt"))
    return found[-1] if found else None


def load_resume(args) -> dict | None:
    """The checkpoint to resume (checked against its digest and this run's settings)."""
    path = find_resume(args)
    if path is None:
        return None
    ckpt = load_checkpoint(path)
    if not (isinstance(ckpt, dict) and "step" in ckpt and "rng" in ckpt):
        raise ResumeMismatch(f"--resume {path}: it holds no dive_fast run state (step, "
                             "optimiser, random state; open_clip's weights?): to start from "
                             f"its weights, use --pretrained {path}")
    keys = RESUME_KEYS if "data_ids" in ckpt else RESUME_KEYS + OLD_DATA_KEYS
    for key in keys:
        if key == "data_ids" and key in ckpt:
            changed = [part for part, digest in ckpt[key].items()
                       if args.data_ids.get(part) != digest]
            if changed:
                raise ResumeMismatch(f"cannot resume from {path}: the {' and '.join(changed)} "
                                     "data differ from what it was trained on (other class "
                                     "names, files, sizes or modification times)")
        elif key in ckpt and ckpt[key] != getattr(args, key):
            raise ResumeMismatch(f"cannot resume from {path}: it was written with {key}="
                                 f"{ckpt[key]!r}, this run has {key}={getattr(args, key)!r}")
    ckpt["path"] = str(path)
    return ckpt


def restore(ckpt, method, opt, sched, scaler=None) -> tuple[int, dict]:
    """Loads a checkpoint into the run; returns its step and the RNG states to resume."""
    if parallel.is_sharded(method.model):
        parallel.load_full_state(method.model, ckpt["state_dict"], method, opt, ckpt["optimizer"])
        method.load_state_dict(ckpt.get("method_state", {}), strict=False)
    else:
        state = {f"model.{k}": v for k, v in ckpt["state_dict"].items()}
        method.load_state_dict({**state, **ckpt.get("method_state", {})})
        opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    return int(ckpt["step"]), ckpt["rng"]
