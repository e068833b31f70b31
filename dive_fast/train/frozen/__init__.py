"""The frozen side of DiVE: the pre-trained model's reference embeddings f0(x), g0(t), live
(``reference.py``: a frozen copy's forward, on GPUs on a side stream) or read from the
embedding cache (``cache.py``: computed once per reference set, read by row).

``make_frozen_side`` is the one entry: the run builder calls it, and it chooses between
live and cached from the arguments and the reference set."""
from __future__ import annotations

from pathlib import Path

from .. import distributed
from ..models import compile_towers, frozen_copy
from . import cache
from .reference import FrozenReference

__all__ = ["FrozenReference", "make_frozen_side"]


def make_frozen_side(args, bundle, pretrained: str | None, reference, amp_dtype,
                     out: Path) -> FrozenReference:
    """The frozen copy of ``bundle.model`` as loaded (call it before anything wraps, shards
    or compiles the trainable model), with the embedding cache attached when
    ``--frozen-cache`` is on and ``reference`` = (pairs, id) has an id (an indexed set: a
    CSV, the world; None when streamed). The cache lives in ``out/cache``, keyed by all
    that makes its rows: model, weights, data, transform, size, autocast, text truncation."""
    frozen = FrozenReference(frozen_copy(bundle.model), args.device, amp_dtype,
                             co_schedule=args.co_schedule)
    if args.compile:  # the same compiled numerics on both sides: u = v = 0 at the start
        compile_towers(frozen.model)
    pairs, pairs_id = reference
    if args.frozen_cache and pairs_id is not None:
        key = cache.cache_key(model=args.model, weights=cache.weights_id(pretrained),
                              data=pairs_id, transform=repr(bundle.preprocess_val),
                              n=len(pairs), amp=str(amp_dtype),
                              text_truncation=str(args.text_truncation))
        path = out / "cache" / f"frozen-ref-{key}.npy"
        # Rank 0 builds the cache, or checks the one there against its digest (a read of
        # the whole file); the other ranks open what it checked, once it is there.
        built = cache.build(frozen, bundle.tokenizer, pairs, path, workers=args.workers,
                            progress=not args.no_progress) if distributed.is_main() else None
        distributed.barrier()
        frozen.cache = built if built is not None else \
            cache.build(frozen, bundle.tokenizer, pairs, path, verify_digest=False)
    return frozen
