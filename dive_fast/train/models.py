"""CLIP models: open_clip ones by name (pretrained tag or local checkpoint) and the
project's own tiny configs, whose pre-trained weights ``dive_fast.train.pretrain`` caches."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from ..world.tasks import PRETRAIN_STREAM_VERSION
from . import text, validate
from .fileio import file_digest
from .parallel import residual_blocks

CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
CACHE_ENV = "DIVE_FAST_CACHE"
HF_HUB = "hf-hub:"  # open_clip's prefix of a model on the Hugging Face hub
open_clip.add_model_config(CONFIG_DIR)


def cache_dir() -> Path:
    """Where pre-trained tiny models live: $DIVE_FAST_CACHE or ~/.cache/dive_fast."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dive_fast")


# What makes a pre-trained tiny model's weights besides its config, world seed and the
# pre-training stream: the pre-training's own settings (``pretrain.pretrain``'s defaults;
# the steps keep dive-tiny's within ~13 minutes on 2 CPU cores, dive-wide's ~25).
PRETRAIN_STEPS = {"dive-tiny": 1500, "dive-micro": 40, "dive-wide": 1500}
PRETRAIN_DEFAULTS = {"batch_size": 128, "lr": 5e-4, "warmup": 100}


def tiny_checkpoint(name: str, seed: int = 0, **settings) -> Path:
    """The cache file of a pre-trained tiny model. Its name carries a digest of the model
    config, the pre-training stream's version and any pre-training ``settings`` (steps,
    batch_size, lr, warmup) that differ from the defaults, so that a change to any never
    reuses stale weights and a non-default pre-training never replaces the default's."""
    defaults = {"steps": PRETRAIN_STEPS.get(name, 600), **PRETRAIN_DEFAULTS}
    unknown = set(settings) - set(defaults)
    if unknown:
        raise TypeError(f"tiny_checkpoint: unknown setting(s) {sorted(unknown)}")
    custom = {k: v for k, v in sorted(settings.items()) if v is not None and v != defaults[k]}
    config = (CONFIG_DIR / f"{name}.json").read_bytes()
    key = config + str(PRETRAIN_STREAM_VERSION).encode() + (repr(custom).encode() if custom
                                                             else b"")
    digest = hashlib.sha1(key).hexdigest()[:8]
    return cache_dir() / f"{name}-world{seed}-{digest}.safetensors"


def tiny_intact(path: Path) -> bool:
    """Whether a cached tiny model's bytes match the digest recorded beside it when it was
    pre-trained (a file without a record passes: nothing to check it against)."""
    meta = path.with_suffix(".json")
    if not meta.is_file():
        return True
    expected = json.loads(meta.read_text()).get("sha256")
    return expected is None or file_digest(path) == expected


@dataclass
class ClipBundle:
    model: nn.Module
    preprocess_train: object
    preprocess_val: object
    tokenizer: object
    name: str
    pretrained: str | None

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length


def is_weights_path(pretrained: str | None) -> bool:
    """Whether ``pretrained`` names a local file rather than an open_clip tag."""
    return bool(pretrained) and ("/" in pretrained or pretrained.endswith(
        (".pt", ".pth", ".bin", ".safetensors")))


def model_and_tag(model: str, pretrained: str | None) -> None:
    """A model open_clip knows and, for an open_clip tag, a tag it has for that model (a
    wrong tag would otherwise surface as a download or loading error after other work)."""
    if model.startswith("hf-hub:"):  # a model card on the Hugging Face hub: open_clip's
        return
    if model not in open_clip.list_models():
        raise ValueError(f"--model {model}: unknown to open_clip (e.g. ViT-B-16, "
                         f"ViT-B-32, {', '.join(TINY_MODELS)}; open_clip.list_models() has all)")
    if pretrained and not is_weights_path(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model)
        spelled = lambda tag: tag.lower().replace("-", "_")  # noqa: E731  (as open_clip compares)
        if spelled(pretrained) not in {spelled(t) for t in tags}:
            raise ValueError(f"--pretrained {pretrained}: open_clip has no such tag for "
                             f"{model} (its tags: {', '.join(tags) or 'none'}); or give a "
                             "checkpoint path")


def load_clip(name: str, pretrained: str | None = None, device="cpu",
              image_size: int | list[int] | None = None,
              text_truncation: bool = True) -> ClipBundle:
    """An open_clip model with its transforms and tokenizer.

    ``pretrained``: an open_clip tag (e.g. "openai", downloads weights), a local checkpoint
    path (.safetensors, or a torch file loaded with weights_only=True: no code runs), or
    None for random weights. A checkpoint written by dive_fast.train also loads here.
    ``name``: also ``hf-hub:org/repo``, whose config and weights open_clip fetches from the
    Hugging Face hub (``pretrained`` is then ignored, as open_clip ignores it).
    ``image_size``: another input resolution than the config's (--force-image-size, the
    benchmarks' small runs): H, or [H, W].
    ``text_truncation``: the tokenizer trims each batch to its longest caption and the text
    tower runs on that length (exact; ``text.py``), where the tower allows it.
    """
    known = open_clip.list_models()
    if name not in known and not name.startswith(HF_HUB):  # hub names: open_clip resolves them
        raise ValueError(f"unknown model {name!r}; open_clip knows e.g. "
                         f"{', '.join(TINY_MODELS + ('ViT-B-16', 'ViT-B-32'))} "
                         f"({len(known)} in all, see open_clip.list_models())")
    if is_weights_path(pretrained):
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained}")
    validate.device(str(device), "device")
    if pretrained and not is_weights_path(pretrained):
        download(name, pretrained)
    try:
        model, train_tf, val_tf = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, weights_only=True,
            force_image_size=image_size)
    except (RuntimeError, AssertionError, KeyError, ValueError) as exc:
        # open_clip reports weights of another model as a size mismatch, a missing key or
        # an assertion ("text pos_embed width changed!")
        raise RuntimeError(f"could not load weights {pretrained!r} into {name!r}: they do not "
                           f"fit this model (weights of another model?): "
                           f"{type(exc).__name__}: {exc}") from exc
    tokenizer = text.install(model, open_clip.get_tokenizer(name), text_truncation)
    return ClipBundle(model, train_tf, val_tf, tokenizer, name, pretrained)


class DownloadFailed(OSError):
    """Weights of an open_clip tag that could not be downloaded (nor found in the cache)."""


def download(name: str, tag: str) -> None:
    """Fetches a tag's weights into open_clip's cache before the model is built, so that a
    failure is said as the download it is (open_clip would log it and go on)."""
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg
    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        return  # not a tag of this model: open_clip's own error follows
    try:
        download_pretrained(cfg)
    except Exception as exc:  # noqa: BLE001  (hub, HTTP and file errors alike)
        from huggingface_hub.constants import HF_HUB_CACHE
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DownloadFailed(
            f"--pretrained {tag}: downloading {name}'s weights failed ({first}); check the "
            f"network, or put them in the Hugging Face cache ({HF_HUB_CACHE}) and set "
            "HF_HUB_OFFLINE=1, or give a local checkpoint path") from None


def compile_towers(model: nn.Module) -> str:
    """torch.compile in place, per residual block where the towers have them (regional
    compilation: a tower's blocks share one compiled graph, so compile time does not grow
    with depth, and state-dict keys stay as they are); else each tower's encoder whole.
    Returns what was compiled, for the log."""
    blocks = residual_blocks(model)
    if blocks:
        for block in blocks:
            block.compile()
        return f"{len(blocks)} residual blocks"
    model.encode_image = torch.compile(model.encode_image)
    model.encode_text = torch.compile(model.encode_text)
    return "encode_image and encode_text"


def frozen_copy(model: nn.Module, autocast_dtype: torch.dtype | None = None) -> nn.Module:
    """The pre-trained reference f0, g0: eval mode, no gradients. It runs under the run's
    autocast and gives the embeddings the trainable model gives at the same weights
    (u = v = 0): under ``autocast_dtype`` the weights autocast casts before every use are
    stored cast (``store_for_autocast``), the rest stays in the trainable model's dtype. A
    copy cast to bf16 whole would hand DiVE a rounding-noise floor to equalise."""
    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    if autocast_dtype is not None:
        store_for_autocast(frozen, autocast_dtype)
    return frozen


MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Packed attention projections, which nn.MultiheadAttention's unfused path (the only one the
# frozen tower takes: ``unfused_attention``) and open_clip's own Attention pass to F.linear.
ATTENTION_WEIGHTS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight",
                     "v_proj_weight")
# open_clip's projections held as bare parameters, applied with ``@`` (matmul).
PROJECTIONS = ("proj", "text_projection")


@contextlib.contextmanager
def unfused_attention():
    """nn.MultiheadAttention on its unfused path, the one a training model takes. Its fused
    fast path (eval mode, no grad, weights in the input's dtype) rounds differently, so a
    frozen tower on it would embed identical weights differently from the trainable model
    (~1e-6 in float32); on it, identical weights give u = v = 0 bit for bit. A process-wide
    flag (torch.backends.mha), restored on exit."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def store_for_autocast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Stores in ``dtype``, in place, the weights autocast casts to ``dtype`` before every
    use (linear layers, convolutions, packed attention projections through linear, open_clip's
    ``proj`` and ``text_projection`` through matmul; biases with their weights), so that a
    forward under that autocast and ``unfused_attention`` is bit-identical and holds them at
    half the bytes. Norms, embeddings and everything added outside a matmul keep their dtype
    (autocast runs norms in float32 and casts no embedding look-up)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"store_for_autocast: dtype {dtype}, expected an autocast dtype "
                         "(torch.bfloat16 or torch.float16)")

    def cast(module, name):
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor) and p.is_floating_point():
            p.data = p.data.to(dtype)

    # open_clip's text towers cast their input embeddings to the dtype of a block's weight
    # (``get_cast_dtype``): pinned to what it was, so the residual stream keeps its dtype.
    for module in model.modules():
        if callable(getattr(module, "get_cast_dtype", None)):
            module.get_cast_dtype = lambda pinned=module.get_cast_dtype(): pinned
    for module in model.modules():
        names = ("weight", "bias") if isinstance(module, MATMUL_MODULES) else ()
        names += tuple(n for n in ATTENTION_WEIGHTS + PROJECTIONS
                       if isinstance(getattr(module, n, None), nn.Parameter))
        for name in names:
            cast(module, name)
    return model


def find_pretrained(name: str, pretrained: str | None, world_seed: int = 0) -> str | None:
    """The weights to load: ``pretrained`` as given, or for a tiny config without it the
    cached pre-trained file, which must exist and be intact (this loader never trains: run
    ``python -m dive_fast.train.pretrain``, or let ``dive_fast.train`` build it with
    ``build.ensure_pretrained``)."""
    if pretrained is not None or name not in TINY_MODELS:
        return pretrained
    path = tiny_checkpoint(name, world_seed)
    if path.is_file() and not tiny_intact(path):
        raise RuntimeError(f"the cached pre-trained {name} {path} does not match the digest "
                           "recorded when it was pre-trained (changed or damaged): delete it "
                           f"and run `python -m dive_fast.train.pretrain --model {name} --seed "
                           f"{world_seed}`")
    if not path.is_file():
        raise FileNotFoundError(
            f"no pre-trained {name} (world seed {world_seed}) in {cache_dir()}: run "
            f"`python -m dive_fast.train.pretrain --model {name} --seed {world_seed}` first, "
            "or pass --pretrained PATH ('' for random weights)")
    return str(path)
