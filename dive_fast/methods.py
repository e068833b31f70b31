"""Fine-tuning methods as small strategies over one training step.

Each method says which data it needs and turns a step's batches into a loss; the loop in
``train.py`` does the rest. The trainable forward is one concatenated pass over target
and reference samples; frozen reference embeddings come from ``StepContext``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .loss import DiVELoss


class Method:
    name = "base"
    uses_reference = False  # needs reference image-caption pairs
    uses_frozen = False  # needs the frozen model's reference embeddings
    trains = True

    def build(self, ctx, args) -> None:
        """Create method state (heads, losses) once the context exists."""

    def extra_modules(self) -> dict[str, nn.Module]:
        """Modules whose parameters are optimised and checkpointed with the model."""
        return {}

    def before_step(self, ctx, step: int) -> None:
        pass

    def loss(self, ctx, target, reference, step: int):
        raise RuntimeError(f"{self.name} does not train")

    def eval_heads(self, ctx, alpha: float = 1.0) -> dict:
        """Trained classifier heads for evaluation, by class-name tuple (none: zero-shot)."""
        return {}


class ZeroShot(Method):
    name, trains = "zeroshot", False


class FLYP(Method):
    """CLIP loss between target images and a random class prompt each (FLYP)."""
    name = "flyp"

    def clip_part(self, ctx, img_t, txt_t):
        return ctx.clip_loss(F.normalize(img_t, dim=-1), F.normalize(txt_t, dim=-1),
                             ctx.model.logit_scale.exp())

    def loss(self, ctx, target, reference, step):
        images, labels = target
        (img_t,), (txt_t,) = ctx.encode([images], [ctx.prompts(labels, step)])
        loss = self.clip_part(ctx, img_t, txt_t)
        return loss, {"clip": loss.detach()}


class _WithReference(FLYP):
    uses_reference = True

    def encode_both(self, ctx, target, reference, step):
        """Features of target and reference samples, and the caption tokens (reused by the
        frozen forward when its embeddings are not cached)."""
        images, labels = target
        ref_images, (texts, _) = reference
        ref_tokens = ctx.tokenize(texts)
        (img_t, img_r), (txt_t, txt_r) = ctx.encode(
            [images, ref_images], [ctx.prompts(labels, step), ref_tokens])
        return img_t, txt_t, img_r, txt_r, ref_tokens


class FLYPReplay(_WithReference):
    """FLYP plus the CLIP loss on reference pairs (a stand-in for replay methods)."""
    name = "flyp+replay"

    def loss(self, ctx, target, reference, step):
        img_t, txt_t, img_r, txt_r, _ = self.encode_both(ctx, target, reference, step)
        clip, replay = self.clip_part(ctx, img_t, txt_t), self.clip_part(ctx, img_r, txt_r)
        return clip + replay, {"clip": clip.detach(), "replay": replay.detach()}


class SnDLike(_WithReference):
    """FLYP + lam * mean |f(x_ref) - f0(x_ref)|^2 on normalised image embeddings."""
    name, uses_frozen = "snd-like", True

    def build(self, ctx, args):
        self.lam = args.lam

    def loss(self, ctx, target, reference, step):
        images, labels = target
        ref_images, (_, idx) = reference
        (img_t, img_r), (txt_t,) = ctx.encode([images, ref_images], [ctx.prompts(labels, step)])
        img0, _ = ctx.frozen_reference(ref_images, None, idx)
        clip = self.clip_part(ctx, img_t, txt_t)
        dist = (F.normalize(img_r.float(), dim=-1) - img0.float()).pow(2).sum(-1).mean()
        return clip + self.lam * dist, {"clip": clip.detach(), "snd": dist.detach()}


class DiVE(_WithReference):
    """FLYP + lam * (L_AVL + L_PVL) on the reference pairs, through dive_fast's fused op."""
    name, uses_frozen = "dive", True
    avl, pvl = True, True

    def build(self, ctx, args):
        self.reg = DiVELoss(ctx.embed_dim, lam=args.lam, momentum=args.momentum, avl=self.avl,
                            pvl=self.pvl, backend=args.dive_backend, check_values=False
                            ).to(ctx.device)

    def loss(self, ctx, target, reference, step):
        img_t, txt_t, img_r, txt_r, ref_tokens = self.encode_both(ctx, target, reference, step)
        ref_images, (_, idx) = reference
        img0, txt0 = ctx.frozen_reference(ref_images, ref_tokens, idx)
        clip = self.clip_part(ctx, img_t, txt_t)
        reg, parts = self.reg(img_r, img0, txt_r, txt0, return_parts=True)
        return clip + reg, {"clip": clip.detach(), "avl": parts["avl"], "pvl": parts["pvl"]}


class DiVEAVL(DiVE):
    name, pvl = "dive-avl", False


class DiVEPVL(DiVE):
    name, avl = "dive-pvl", False


class FT(Method):
    """Image encoder + linear head initialised from the zero-shot head, cross-entropy."""
    name = "ft"
    lp_steps = 0

    def build(self, ctx, args):
        self.head = nn.Linear(ctx.embed_dim, len(ctx.classnames), bias=False).to(ctx.device)
        with torch.no_grad():
            self.head.weight.copy_(ctx.zeroshot_head)
        self.scale = float(ctx.model.logit_scale.exp().detach())
        ctx.model.transformer.requires_grad_(False)  # the text tower is not trained by FT
        for name in ("token_embedding", "positional_embedding", "ln_final", "text_projection",
                     "logit_scale"):
            part = getattr(ctx.model, name, None)
            if part is not None:
                part.requires_grad_(False)

    def extra_modules(self):
        return {"head": self.head}

    def eval_heads(self, ctx, alpha=1.0):
        """The linear head for the ID label set; WiSE-FT interpolates it with the
        zero-shot head it started from."""
        w = self.head.weight.detach()
        return {tuple(ctx.classnames): (1 - alpha) * ctx.zeroshot_head + alpha * w}

    def before_step(self, ctx, step):
        ctx.model.visual.requires_grad_(step >= self.lp_steps)

    def loss(self, ctx, target, reference, step):
        images, labels = target
        (img_t,), _ = ctx.encode([images], [])
        logits = self.scale * self.head(F.normalize(img_t, dim=-1))
        loss = F.cross_entropy(logits, labels.to(ctx.device))
        return loss, {"ce": loss.detach()}


class LPFT(FT):
    """Linear probe (encoder frozen) for the first lp_steps, then FT."""
    name = "lp-ft"

    def build(self, ctx, args):
        super().build(ctx, args)
        self.lp_steps = args.lp_steps if args.lp_steps is not None else args.steps // 3


METHODS = {m.name: m for m in (ZeroShot, FT, LPFT, FLYP, FLYPReplay, SnDLike, DiVE, DiVEAVL,
                               DiVEPVL)}


def make_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]()
