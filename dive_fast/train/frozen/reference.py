"""The frozen pre-trained model's normalised reference embeddings f0(x), g0(t): looked up in
the embedding cache (``cache.py``), or computed, on GPUs on a side stream that overlaps the
trainable forward. Same numerics as the trainable model (its weights' dtype, the run's
autocast, nn.MultiheadAttention's unfused path), so identical weights give u = v = 0 up to
the rounding of one batch shape against another."""
from __future__ import annotations

import gc
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.fsdp import FSDPModule
from torch.profiler import record_function

from ..memory import module_bytes
from ..models import unfused_attention
from .cache import lookup

Pending = Callable[[], tuple[Tensor, Tensor | None]]


class FrozenReference:
    def __init__(self, model, device, amp_dtype=None, cache=None,
                 co_schedule: bool = True):
        self.model, self.device = model, torch.device(device)
        self.amp_dtype, self.cache = amp_dtype, cache
        on_gpu = self.device.type == "cuda"
        self.side_stream = torch.cuda.Stream(self.device) if on_gpu and co_schedule else None

    def release(self) -> None:
        """Lets go of the frozen tower (the cache answers every reference pair): its memory
        is freed, on a CPU too, once nothing else holds it. A forward asked for later is an
        error naming why (``embed``)."""
        self.model = None
        gc.collect()  # a compiled block refers to itself: a cycle only a collection frees

    @property
    def tower_bytes(self) -> int:
        """The bytes of the frozen tower's weights on this rank (its shards under FSDP; 0
        once released)."""
        return 0 if self.model is None else module_bytes(self.model)

    @torch.no_grad()
    def embed(self, images: Tensor, tokens: Tensor | None,
              chunks: int = 1) -> tuple[Tensor, Tensor | None]:
        """Normalised float32 (image, text) embeddings; ``tokens`` None skips the text.
        ``chunks``: encode in that many pieces (the micro-batches of an accumulated step),
        so the frozen forward's transient memory shrinks with the trainable one's.
        no_grad, not inference_mode: the DiVE op saves them for its backward."""
        if self.model is None:
            raise RuntimeError("the frozen tower was released once the embedding cache was "
                               "built (it covers the reference set): a reference batch without "
                               "cache rows cannot be embedded")

        def encode(encoder, x):
            return None if x is None else torch.cat([encoder(c) for c in x.tensor_split(chunks)])

        with record_function("dive_fast.frozen_forward"), unfused_attention(), torch.autocast(
                self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            img = encode(self.model.encode_image, images)
            txt = encode(self.model.encode_text, tokens)
        if isinstance(self.model, FSDPModule):
            # FSDP2 keeps its root's gathered weights for the backward a trainable model runs
            # next; a frozen tower runs none, so it goes back to its shards at once.
            self.model.reshard()
        norm = lambda x: None if x is None else F.normalize(x.float(), dim=-1)  # noqa: E731
        return norm(img), norm(txt)

    def launch(self, batch, text: bool = True, chunks: int = 1) -> Pending:
        """Starts the frozen embeddings of ``batch``'s reference pairs; the returned call
        waits for them. Launch before the trainable forward so that the two overlap."""
        if self.cache is not None and batch.ref_index is not None:
            with record_function("dive_fast.frozen_forward"):  # a cache look-up
                img, txt = lookup(self.cache, batch.ref_index, self.device)
            return lambda: (img, txt if text else None)
        images, tokens = batch.ref_images, batch.ref_tokens if text else None
        stream = self.side_stream
        if stream is None:
            out = self.embed(images, tokens, chunks)
            return lambda: out
        main = torch.cuda.current_stream(self.device)
        stream.wait_stream(main)  # the batch's host-to-device copies were queued on main
        with torch.cuda.stream(stream):
            out = self.embed(images, tokens, chunks)
        for t in (images, tokens):  # made on main, read on the side stream
            if t is not None:
                t.record_stream(stream)

        def wait():
            main.wait_stream(stream)
            for t in out:  # made on the side stream, read on main
                if t is not None:
                    t.record_stream(main)
            return out
        return wait
