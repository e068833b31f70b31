"""Exact text truncation: the text tower runs on a batch's longest caption, not on 77 tokens.

open_clip pads every caption and class prompt to the context length (77 for CLIP), where
captions and prompts hold 8 to 20 tokens. With a causal attention mask and pooling at the
end-of-text token (CLIP's ``argmax`` pooling: the EOT id is the largest), the pooled
embedding depends only on the tokens up to the EOT, so cutting the padding off changes no
embedding (up to the rounding of another matrix shape). Two parts:

- ``TrimmingTokenizer`` cuts each tokenised batch on the CPU, where it is made (loader
  workers, prompt heads), to its longest sequence rounded up to a multiple of 8 (few
  distinct shapes for compiled code and kernels); no device value is read.
- ``install`` gives the model a text forward that takes such short batches: the positional
  embedding and the causal mask sliced to the batch's length. Classic ``CLIP`` towers
  (ViT-B-16, ViT-B-32, the tiny configs) and ``CustomTextCLIP``'s ``TextTransformer``.

A tower that is not causal, pools elsewhere than at the EOT, or appends a class token is
left at full length, and the log says so once.
"""
from __future__ import annotations

import logging
import types

from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor, nn

log = logging.getLogger(__name__)
MULTIPLE = 8
PAD_ID = 0  # open_clip's SimpleTokenizer pads with 0; argmax pooling implies that tokenizer


def trimmed_length(tokens: Tensor, multiple: int = MULTIPLE) -> int:
    """The batch's longest sequence (up to its last non-padding token), rounded up."""
    used = (tokens != PAD_ID).any(0).nonzero()
    longest = int(used[-1]) + 1 if len(used) else 1
    return min(tokens.shape[-1], -(-longest // multiple) * multiple)


def trim(tokens: Tensor, multiple: int = MULTIPLE) -> Tensor:
    """``tokens`` ([..., context]) cut to ``trimmed_length``; call on CPU tensors (a device
    tensor would make the host wait for it)."""
    flat = tokens.reshape(-1, tokens.shape[-1])
    return tokens[..., :trimmed_length(flat, multiple)]


class TrimmingTokenizer:
    """An open_clip tokenizer whose batches come out trimmed (picklable, for loader workers)."""

    def __init__(self, tokenizer, multiple: int = MULTIPLE):
        self.tokenizer, self.multiple = tokenizer, multiple

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    def __call__(self, texts, *args, **kwargs) -> Tensor:
        return trim(self.tokenizer(texts, *args, **kwargs), self.multiple)


def unsupported_reason(model: nn.Module) -> str | None:
    """None when the model's text tower can be truncated exactly, else why not."""
    if isinstance(model, CLIP):
        if model.text_pool_type != "argmax":
            return f"its text tower pools with {model.text_pool_type!r}, not at the EOT token"
        if getattr(model, "attn_mask", None) is None:
            return "its text tower has no causal mask"
        return None
    if isinstance(model, CustomTextCLIP) and isinstance(model.text, TextTransformer):
        text = model.text
        if text.pool_type != "argmax":
            return f"its text tower pools with {text.pool_type!r}, not at the EOT token"
        if text.attn_mask is None or text.cls_emb is not None or text.use_pad_mask:
            return "its text tower is not purely causal (no mask, a class token or a pad mask)"
        return None
    return f"{type(model).__name__} text towers are not supported (only open_clip's CLIP and " \
           "CustomTextCLIP with a TextTransformer)"


def _clip_encode_text(self: CLIP, text: Tensor, normalize: bool = False) -> Tensor:
    """``CLIP.encode_text`` for a batch of any length up to the context."""
    n = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:n].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type)
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) \
            else x @ self.text_projection
    return nn.functional.normalize(x, dim=-1) if normalize else x


def _text_transformer_forward(self: TextTransformer, text: Tensor):
    """``TextTransformer.forward`` (causal, argmax pooling) for a batch of any length."""
    n = text.shape[1]
    x, attn_mask = self._embeds(text)  # open_clip slices the positional embedding itself
    x = self.transformer(x, attn_mask=attn_mask[:n, :n])
    x = self.ln_final(x)
    pooled = text_global_pool(x, text, pool_type=self.pool_type)
    if self.text_projection is not None:
        pooled = self.text_projection(pooled) if isinstance(self.text_projection, nn.Linear) \
            else pooled @ self.text_projection
    return (pooled, x) if self.output_tokens else pooled


_told: set[str] = set()


def install(model: nn.Module, tokenizer, enabled: bool = True):
    """Makes ``model``'s text forward take trimmed batches and returns the tokenizer to use
    with it (trimming), or the tokenizer as it is when disabled or unsupported."""
    why = "--no-text-truncation" if not enabled else unsupported_reason(model)
    if why is not None:
        name = type(model).__name__
        if enabled and name not in _told:
            _told.add(name)
            log.info("text truncation off for this %s: %s; captions run at the full context "
                     "length", name, why)
        return tokenizer
    if isinstance(model, CLIP):  # bound to the instance: a deep copy (the frozen model) keeps it
        model.encode_text = types.MethodType(_clip_encode_text, model)
    else:
        model.text.forward = types.MethodType(_text_transformer_forward, model.text)
    return TrimmingTokenizer(tokenizer)
