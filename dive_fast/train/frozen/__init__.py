"""The frozen side of DiVE: the pre-trained model's reference embeddings f0(x), g0(t), live
(``reference.py``: a frozen copy's forward, on GPUs on a side stream) or read from the
embedding cache (``cache.py``: computed once per reference set, read by row).

``make_frozen_side`` is the one entry: the run builder calls it, and it chooses between
live and cached from the arguments and the reference set."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import distributed, parallel
from ..models import compile_towers, frozen_copy
from . import cache
from .reference import FrozenReference

__all__ = ["FrozenReference", "make_frozen_side"]
log = logging.getLogger("dive_fast.train")


def make_frozen_side(args, bundle, pretrained: str | None, reference, amp_dtype,
                     out: Path, world: int = 1) -> FrozenReference:
    """The frozen copy of ``bundle.model`` as loaded (call it before anything wraps, shards
    or compiles the trainable model), its matmul weights stored in the autocast dtype
    (``models.store_for_autocast``: the same embeddings), with the embedding cache attached
    when ``--frozen-cache`` is on and ``reference`` = (pairs, id) has an id (an indexed set:
    a CSV, the world; None when streamed). The cache lives in ``out/cache``, keyed by all
    that makes its rows: model, weights, data, transform, size, autocast, text truncation,
    attention path.

    Once the cache is there it answers every reference pair, and the tower is released:
    nothing later reads it (the zero-shot row is measured before, WiSE-FT mixes the weights
    recorded as loaded, RSA reloads them). Live, under ``--fsdp`` on ``world`` ranks, the
    tower is sharded as the trainable one is, and its forwards gather it block by block."""
    frozen = FrozenReference(frozen_copy(bundle.model, amp_dtype), args.device, amp_dtype,
                             co_schedule=args.co_schedule)
    sharded = args.fsdp and world > 1
    if args.compile and not sharded:  # the same compiled numerics on both sides: u = v = 0
        compile_towers(frozen.model)
    pairs, pairs_id = reference
    if args.frozen_cache and pairs_id is not None:
        key = cache.cache_key(model=args.model, weights=cache.weights_id(pretrained),
                              data=pairs_id, transform=repr(bundle.preprocess_val),
                              n=len(pairs), amp=str(amp_dtype),
                              text_truncation=str(args.text_truncation),
                              attention="unfused")
        path = out / "cache" / f"frozen-ref-{key}.npy"
        # Every rank embeds its share and rank 0 assembles them (or checks the cache there
        # against its digest, a read of the whole file); the others open what it wrote.
        rank, world_now = distributed.rank_and_world()
        frozen.cache = cache.build(frozen, bundle.tokenizer, pairs, path, workers=args.workers,
                                   progress=not args.no_progress, rank=rank, world=world_now)
        frozen.release()
        log.info("frozen tower released: the embedding cache answers every reference pair")
    elif sharded:
        parallel.shard(frozen.model, args.device)
        if args.compile:  # after sharding, as the trainable model (build.for_ranks)
            compile_towers(frozen.model)
    if frozen.model is not None:
        log.info("frozen tower: %.1f MiB of weights on this rank", frozen.tower_bytes / 2**20,
                 extra={"frozen_tower_bytes": frozen.tower_bytes})
    return frozen
