"""Which shards, and which samples of them, each reader of a webdataset stream reads in each
epoch: pure and seeded, so that it is tested without processes and a resumed run draws again
what it drew. A reader is one loader worker of one rank: reader ``rank + world * worker`` of
``world * workers`` (the order in which the shard split below deals shards out).

Three plans:
- shard split (at least as many shards as readers): each epoch shuffles the shard list with
  (seed, epoch), and reader q takes every R-th shard from rank r, then every W-th of those
  from worker w; each pair once per epoch.
- sample split (fewer shards than readers, a small corpus): every reader reads every shard
  of the epoch's order and decodes only the samples at positions q, q + Q, q + 2Q, ... of
  their concatenation (Q readers). Each pair is still read once per epoch by one reader, and
  the readers' shares differ by at most one pair, so no pair is seen more often than another
  over a long run (giving a shard to each of several readers whole would show it several
  times an epoch; splitting shards into unequal groups would show small groups' pairs more
  often). The price is that each reader reads every shard's bytes (Q times the corpus per
  epoch, mostly from the page cache for a small corpus); decoding, the expensive part, is
  not repeated.
- resampled (``--dataset-resampled``, open_clip's ResampledShards2): each reader draws its
  shards with replacement, seeded by (seed, rank, worker, epoch), weighted as open_clip
  weighs them: every shard of a '::' source weighs that source's upsampling factor, so a
  source's share is its factor times its shard count (factors 1 everywhere: shards, hence
  pairs, uniformly). No pair is promised once per epoch.
"""
from __future__ import annotations

import itertools
import math
import random


def reader(rank: int, world: int, worker: int, workers: int) -> tuple[int, int]:
    """(this reader's index, the number of readers)."""
    return rank + world * worker, world * workers


def epoch_order(shards: list[str], seed: int, epoch: int) -> list[str]:
    """The shard list in epoch ``epoch``'s order (the same on every rank and worker)."""
    order = list(shards)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def splits_samples(n_shards: int, readers: int) -> bool:
    """Whether a stream of ``n_shards`` unresampled shards is split by samples (fewer shards
    than readers) rather than by shards."""
    return n_shards < readers


def shard_split(order: list[str], rank: int, world: int, worker: int, workers: int) -> list[str]:
    """The shard split's share of one reader: shard i goes to rank i mod R, then worker
    (i div R) mod W."""
    return order[rank::world][worker::workers]


def sample_share(index: int, readers: int):
    """The sample split's ``select`` for reader ``index``: called once per sample over the
    epoch's concatenated shards, in order, true at positions index, index + Q, ..."""
    positions = itertools.count()
    return lambda: next(positions) % readers == index


def draws_per_epoch(n_shards: int, readers: int) -> int:
    """How many shards a reader draws in a resampled epoch: its share of one pass (at least
    one), so that an epoch is about one pass over the corpus in all."""
    return max(1, math.ceil(n_shards / readers))


def resampled(shards: list[str], weights: list[float] | None, seed: int, epoch: int,
              rank: int, worker: int, k: int) -> list[str]:
    """``k`` shards drawn with replacement for one reader's epoch (weights: one per shard,
    None for uniform)."""
    rng = random.Random(f"resampled/{seed}/{rank}/{worker}/{epoch}")
    return rng.choices(shards, weights=weights, k=k)


def parse_factors(factors: str, n_sources: int) -> list[float]:
    """The upsampling factors 'F1::F2::...' (open_clip's spelling), one per '::' source:
    numbers >= 0, not all 0."""
    parts = factors.split("::")
    if len(parts) != n_sources:
        raise ValueError(f"{factors!r}: {len(parts)} factor(s) for {n_sources} '::'-separated "
                         "shard source(s); give one factor per source")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{factors!r}: expected numbers separated by '::', such as 1::10") \
            from None
    if not all(math.isfinite(v) and v >= 0 for v in values) or not any(values):
        raise ValueError(f"{factors!r}: expected finite factors >= 0, at least one above 0")
    return values


def shard_weights(sources: list[list[str]], factors: list[float]) -> list[float]:
    """One weight per shard of the concatenated sources: its source's factor, as open_clip's
    ``expand_urls`` gives it (not divided by the source's shard count)."""
    return [f for source, f in zip(sources, factors) for _ in source]
