"""What a training step needs besides its batches: models, tokenizer, prompts, the
concatenated trainable forward and the frozen reference embeddings (cached or computed
on a side CUDA stream, overlapping the trainable forward)."""
from __future__ import annotations

import torch
from torch import nn

from . import frozen_cache


class Encoders(nn.Module):
    """Both towers behind one forward, so DDP sees (and syncs) every trainable call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, tokens):
        img = self.model.encode_image(images) if images is not None else None
        txt = self.model.encode_text(tokens) if tokens is not None else None
        return img, txt


class StepContext:
    def __init__(self, model, frozen, tokenizer, classnames, templates, device, *, seed=0,
                 rank=0, world_size=1, clip_loss=None, cache=None, amp_dtype=None, ddp_kwargs=None):
        self.model, self.frozen, self.tokenizer = model, frozen, tokenizer
        self.classnames, self.templates = list(classnames), list(templates)
        self.device, self.seed, self.clip_loss, self.cache = device, seed, clip_loss, cache
        self.amp_dtype, self.rank, self.world_size = amp_dtype, rank, world_size
        self.embed_dim = model.text_projection.shape[1] if getattr(model, "text_projection", None) is not None \
            else model.visual.output_dim
        self.encoders = Encoders(model)
        if ddp_kwargs is not None:
            self.encoders = nn.parallel.DistributedDataParallel(self.encoders, **ddp_kwargs)
        # Prompt tokens for every (class, template), computed once.
        prompts = [t.format(c) for c in self.classnames for t in self.templates]
        self.prompt_tokens = tokenizer(prompts).view(len(self.classnames), len(self.templates), -1)
        self.side_stream = torch.cuda.Stream() if str(device).startswith("cuda") else None
        with torch.no_grad():
            from .evaluate import zeroshot_head
            self.zeroshot_head = zeroshot_head(model, tokenizer, self.classnames, self.templates,
                                               device)

    def tokenize(self, texts):
        return self.tokenizer(list(texts)).to(self.device, non_blocking=True)

    def prompts(self, labels, step: int):
        """FLYP: one random template per image, reproducible from (seed, step) and drawn
        for the global batch, so that data parallel runs pick what one process would."""
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        n = len(labels)
        which = torch.randint(len(self.templates), (n * self.world_size,), generator=g)
        which = which[self.rank * n:(self.rank + 1) * n]
        return self.prompt_tokens[labels.cpu(), which].to(self.device, non_blocking=True)

    def encode(self, image_batches, token_batches):
        """One trainable forward per tower over the concatenated batches; raw features back
        split as given (image list, text list)."""
        images = torch.cat([b.to(self.device, non_blocking=True) for b in image_batches]) \
            if image_batches else None
        tokens = torch.cat(token_batches) if token_batches else None
        with torch.autocast(str(self.device).split(":")[0], dtype=self.amp_dtype,
                            enabled=self.amp_dtype is not None):
            img, txt = self.encoders(images, tokens)
        split = lambda x, bs: list(x.split([len(b) for b in bs])) if x is not None else []  # noqa: E731
        return split(img, image_batches), split(txt, token_batches)

    @torch.no_grad()
    def frozen_reference(self, images, tokens, indices):
        """Normalised frozen (image, text) embeddings of the reference batch (no_grad, not
        inference_mode: the DiVE op saves them for its backward). ``tokens`` are the
        captions' tokens, already made for the trainable forward; None skips the text."""
        if self.cache is not None:
            return frozen_cache.lookup(self.cache, indices, self.device)
        stream = self.side_stream
        if stream is not None:
            # Co-scheduling: the frozen forward copies its own inputs and runs on a side
            # stream, overlapping the trainable forward already queued on the main stream.
            with torch.cuda.stream(stream), torch.autocast("cuda", dtype=torch.bfloat16):
                out = self._frozen_forward(images, tokens)
            main = torch.cuda.current_stream()
            main.wait_stream(stream)
            for t in out:
                if t is not None:
                    t.record_stream(main)  # freed blocks must not be reused before main is done
            return out
        return self._frozen_forward(images, tokens)

    def _frozen_forward(self, images, tokens):
        img = self.frozen.encode_image(images.to(self.device, non_blocking=True), normalize=True)
        txt = None if tokens is None else self.frozen.encode_text(tokens, normalize=True).float()
        return img.float(), txt
