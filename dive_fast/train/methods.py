"""Fine-tuning methods, each a module that owns its model and losses: the shape of
open_clip's ``task`` modules, called method modules here, where a task is a labelled
classification task.

Each method is an ``nn.Module`` that owns what its loss needs: the trainable CLIP, its
class prompts, the contrastive loss, and where used the frozen reference embeddings,
``DiVELoss`` (with its EMA vector m) or FT's linear head. ``forward(batch, step)`` returns
a dict of named losses whose sum is the objective; ``state_dict()`` holds all that a
resume needs. Towers a method does not train are frozen in its constructor, so DDP,
wrapping the whole method, sees only the parameters that learn.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import Tensor, nn
from torch.profiler import record_function

from ..loss import DiVELoss
from .frozen import FrozenReference
from .heads import zeroshot_head


@dataclass
class Batch:
    """One step's data: target images and labels; reference images, caption tokens and
    cache rows (methods that use reference pairs); unreadable samples replaced."""
    images: Tensor
    labels: Tensor
    ref_images: Tensor | None = None
    ref_tokens: Tensor | None = None
    ref_index: Tensor | None = None  # rows of the frozen-embedding cache; None when streamed
    skipped: int = 0

    @property
    def samples(self) -> int:
        return len(self.images) + (len(self.ref_images) if self.ref_images is not None else 0)

    def to(self, device) -> "Batch":
        """Tensors to ``device`` without blocking the host (the cache rows stay on the CPU,
        where the cache is)."""
        move = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return replace(self, images=move(self.images), labels=move(self.labels),
                       ref_images=move(self.ref_images), ref_tokens=move(self.ref_tokens))


@dataclass
class MethodConfig:
    lam: float = 1000.0  # DiVE / SnD weight
    ema_momentum: float = 0.99  # DiVE's moving average momentum
    dive_backend: str | None = None
    lp_steps: int = 0  # LP-FT: linear-probe steps

    @classmethod
    def from_args(cls, args) -> "MethodConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


def embed_dim(model) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, nn.Linear):
        return proj.out_features
    return proj.shape[1] if proj is not None else model.visual.output_dim


class Method(nn.Module):
    name = "base"
    trains = True
    uses_reference = False  # needs reference image-caption pairs
    uses_frozen = False  # needs the frozen model's reference embeddings
    frozen_text = True  # ... of the captions too, not only of the images
    find_unused_parameters = False  # for DDP: parameters that may miss a step's graph

    def __init__(self, model, tokenizer, classnames, templates, *, device, config=None,
                 frozen: FrozenReference | None = None, amp_dtype=None, seed=0, rank=0,
                 world_size=1, siglip: bool = False):
        super().__init__()
        self.model, self.tokenizer, self.config = model, tokenizer, config or MethodConfig()
        self.classnames, self.templates = tuple(classnames), tuple(templates)
        self.device, self.amp_dtype = torch.device(device), amp_dtype
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.frozen = frozen  # a plain object: the frozen weights are not this module's state
        self.embed_dim = embed_dim(model)
        # A model with a logit bias (SigLIP's) trains with open_clip's sigmoid loss, never
        # with the softmax one; --siglip asks for it, and is refused for a model without one.
        self.siglip = siglip or getattr(model, "logit_bias", None) is not None
        self.clip_loss = SigLipLoss(rank=rank, world_size=world_size) if self.siglip else \
            ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True, rank=rank,
                     world_size=world_size)
        prompts = [t.format(c) for c in self.classnames for t in self.templates]
        self.prompt_tokens = tokenizer(prompts).view(len(self.classnames), len(self.templates),
                                                     -1).to(self.device)
        self.metrics: dict[str, Tensor] = {}  # extra per-step values to log (detached)

    def forward(self, batch: Batch, step: int) -> dict[str, Tensor]:
        pending = self.reference(batch)  # launched first: on GPUs it overlaps the towers
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.tower_grad(step)):
            imgs, txts = self.encode(*self.inputs(batch, step))
        return self.objective(batch, step, imgs, txts, pending() if pending else None)

    # --- what a method defines; ``forward`` and the micro-batched step (step.forward_backward)
    # --- both compose them, so the two compute the same objective

    def inputs(self, batch: Batch, step: int) -> tuple[list[Tensor], list[Tensor]]:
        """What the trainable towers encode: (image batches, token batches)."""
        raise RuntimeError(f"{self.name} does not train")

    def objective(self, batch: Batch, step: int, imgs: list[Tensor], txts: list[Tensor],
                  frozen: tuple[Tensor, Tensor | None] | None) -> dict[str, Tensor]:
        """The named losses from the towers' raw features (as ``inputs`` lists them) and the
        frozen reference embeddings (methods that use them)."""
        raise RuntimeError(f"{self.name} does not train")

    def tower_grad(self, step: int) -> bool:
        """Whether the towers learn at this step (LP-FT's probe steps: no)."""
        return True

    def reference(self, batch: Batch, chunks: int = 1):
        """The frozen embeddings of the batch's reference pairs, launched (or None)."""
        if not self.uses_frozen:
            return None
        return self.frozen.launch(batch, text=self.frozen_text, chunks=chunks)

    def eval_heads(self, alpha: float = 1.0) -> dict:
        """Trained classifier heads for evaluation, by class-name tuple (none: zero-shot)."""
        return {}

    # --- the pieces a method's forward is made of ---

    def prompts(self, labels: Tensor, step: int) -> Tensor:
        """FLYP: one random template per image, reproducible from (seed, step) and drawn for
        the global batch, so that data parallel ranks pick what one process would."""
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        n = len(labels)
        which = torch.randint(len(self.templates), (n * self.world_size,), generator=g)
        which = which[self.rank * n:(self.rank + 1) * n]
        if self.device.type == "cuda":  # a pageable copy would wait for the queued step
            which = which.pin_memory()
        which = which.to(self.device, non_blocking=True)
        return self.prompt_tokens[labels, which]

    def encode(self, images: list[Tensor], tokens: list[Tensor]):
        """The trainable forwards under the run's autocast; raw features back, as given
        (image list, text list). The images run as one concatenated batch; token batches
        too when their (trimmed) lengths agree, else each at its own length: class prompts
        beside longer captions would otherwise run padded to the captions' length."""
        split = lambda x, parts: list(x.split([len(p) for p in parts])) if parts else []  # noqa: E731
        with record_function("dive_fast.trainable_forward"), torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            imgs = split(self.model.encode_image(torch.cat(images)), images) if images else []
            if len({t.shape[-1] for t in tokens}) <= 1:
                txts = split(self.model.encode_text(torch.cat(tokens)), tokens) if tokens else []
            else:
                txts = [self.model.encode_text(t) for t in tokens]
        return imgs, txts

    def clip(self, img: Tensor, txt: Tensor) -> Tensor:
        """The contrastive loss of the model's kind (CLIP's softmax, SigLIP's sigmoid with
        its bias) on L2-normalised features."""
        scale = self.model.logit_scale.exp()
        img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
        if self.siglip:
            return self.clip_loss(img, txt, scale, self.model.logit_bias)
        return self.clip_loss(img, txt, scale)


class ZeroShot(Method):
    name, trains = "zeroshot", False


class FLYP(Method):
    """CLIP loss between target images and a random class prompt each (FLYP)."""
    name = "flyp"

    def inputs(self, batch, step):
        return [batch.images], [self.prompts(batch.labels, step)]

    def objective(self, batch, step, imgs, txts, frozen):
        return {"clip": self.clip(imgs[0], txts[0])}


class FLYPReplay(Method):
    """FLYP plus the CLIP loss on reference pairs (a stand-in for replay methods)."""
    name, uses_reference = "flyp+replay", True

    def inputs(self, batch, step):
        return ([batch.images, batch.ref_images],
                [self.prompts(batch.labels, step), batch.ref_tokens])

    def objective(self, batch, step, imgs, txts, frozen):
        return {"clip": self.clip(imgs[0], txts[0]), "replay": self.clip(imgs[1], txts[1])}


class SnDLike(Method):
    """FLYP + lam * mean |f(x_ref) - f0(x_ref)|^2 on normalised image embeddings."""
    name, uses_reference, uses_frozen, frozen_text = "snd-like", True, True, False

    def inputs(self, batch, step):
        return [batch.images, batch.ref_images], [self.prompts(batch.labels, step)]

    def objective(self, batch, step, imgs, txts, frozen):
        (img_t, img_r), img0 = imgs, frozen[0]
        dist = (F.normalize(img_r.float(), dim=-1) - img0).pow(2).sum(-1).mean()
        self.metrics = {"snd_dist": dist.detach()}
        return {"clip": self.clip(img_t, txts[0]), "snd": self.config.lam * dist}


class DiVE(Method):
    """FLYP + lam * (L_AVL + L_PVL) on the reference pairs, through dive_fast's fused op."""
    name, uses_reference, uses_frozen = "dive", True, True
    avl, pvl = True, True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.dive = DiVELoss(self.embed_dim, lam=c.lam, momentum=c.ema_momentum, avl=self.avl,
                             pvl=self.pvl, backend=c.dive_backend, check_values=False
                             ).to(self.device)

    inputs = FLYPReplay.inputs

    def objective(self, batch, step, imgs, txts, frozen):
        (img_t, img_r), (txt_t, txt_r), (img0, txt0) = imgs, txts, frozen
        reg, parts = self.dive(img_r, img0, txt_r, txt0, return_parts=True)  # one update of m
        self.metrics = {"avl": parts["avl"], "pvl": parts["pvl"]}
        return {"clip": self.clip(img_t, txt_t), "dive": reg}


class DiVEAVL(DiVE):
    name, pvl = "dive-avl", False


class DiVEPVL(DiVE):
    name, avl = "dive-pvl", False


class FT(Method):
    """Image encoder + linear head initialised from the zero-shot head, cross-entropy. The
    text tower and the logit scale are frozen: FT does not train them."""
    name = "ft"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        zs = zeroshot_head(self.model, self.tokenizer, self.classnames, self.templates,
                           self.device)
        self.register_buffer("zeroshot_weight", zs, persistent=False)
        self.head = nn.Linear(self.embed_dim, len(self.classnames), bias=False).to(self.device)
        with torch.no_grad():
            self.head.weight.copy_(zs)
        self.scale = float(self.model.logit_scale.exp().detach())
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.startswith("visual."))

    @property
    def lp_steps(self) -> int:
        return 0

    def eval_heads(self, alpha=1.0):
        """The linear head for the ID label set; WiSE-FT interpolates it with the zero-shot
        head it started from."""
        w = self.head.weight.detach()
        return {self.classnames: (1 - alpha) * self.zeroshot_weight + alpha * w}

    def tower_grad(self, step):
        return step >= self.lp_steps

    def inputs(self, batch, step):
        return [batch.images], []

    def objective(self, batch, step, imgs, txts, frozen):
        logits = self.scale * self.head(F.normalize(imgs[0].float(), dim=-1))
        return {"ce": F.cross_entropy(logits, batch.labels)}


class LPFT(FT):
    """Linear probe (encoder frozen) for the first lp_steps, then FT."""
    name = "lp-ft"
    find_unused_parameters = True  # the image tower sits out the linear-probe steps

    @property
    def lp_steps(self) -> int:
        return self.config.lp_steps


METHODS = {m.name: m for m in (ZeroShot, FT, LPFT, FLYP, FLYPReplay, SnDLike, DiVE, DiVEAVL,
                               DiVEPVL)}


def make_method(name: str, *args, **kwargs) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](*args, **kwargs)
