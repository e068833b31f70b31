"""Reference streams as open_clip_train offers them: '::' sources, --dataset-resampled draws
(seeded, weighted as open_clip weighs them) and small corpora on more readers than shards,
each pair once per epoch. Readers (a rank's loader workers) are simulated by their
(rank, worker) arguments, without processes."""
import io
from collections import Counter
from types import SimpleNamespace

import pytest
import webdataset as wds
from helpers.runs import train_args
from open_clip_train.data import expand_urls
from PIL import Image

from dive_fast.train import cli, data
from dive_fast.train.data import ShardedCaptions, shard_list, shard_sources

TO_NONE = lambda image: None  # noqa: E731 (no pixels needed: the captions name the pairs)


def write_shards(folder, name: str, shards: int, pairs: int) -> str:
    """``shards`` tars of ``pairs`` pairs each, captioned 'NAME-SHARD-PAIR'; their brace
    pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "png")
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{name}-{s}.tar")) as w:
            for i in range(pairs):
                w.write({"__key__": f"{s}-{i}", "png": png.getvalue(), "txt": f"{name}-{s}-{i}"})
    return f"{folder}/{name}-{{0..{shards - 1}}}.tar"


def captions(pairs) -> list[str]:
    return [caption for _, caption in pairs]


def test_sources_are_read_one_after_another(tmp_path):
    a = write_shards(tmp_path, "a", 3, 1)
    b = write_shards(tmp_path, "b", 2, 1)
    assert [len(s) for s in shard_sources(f"{a}::{b}")] == [3, 2]
    assert shard_list(f"{a}::{b}") == [f"{tmp_path}/a-{i}.tar" for i in range(3)] + \
        [f"{tmp_path}/b-{i}.tar" for i in range(2)]
    ds = ShardedCaptions(f"{a}::{b}", TO_NONE)
    assert sorted(captions(ds.epoch_pairs(0))) == ["a-0-0", "a-1-0", "a-2-0", "b-0-0", "b-1-0"]


def test_weights_are_open_clips(tmp_path):
    """Each shard weighs its source's factor, as open_clip_train's own expand_urls says."""
    a = write_shards(tmp_path, "a", 10, 1)
    b = write_shards(tmp_path, "b", 2, 1)
    ds = ShardedCaptions(f"{a}::{b}", TO_NONE, resampled=True, upsampling_factors="1::10")
    assert (ds.shards, ds.weights) == expand_urls(f"{a}::{b}", "1::10")


def test_weighted_draws_follow_the_factors(tmp_path):
    """Source a: 10 shards of factor 1, source b: 2 shards of factor 10, so b's share of the
    draws is 2*10 / (10*1 + 2*10) = 2/3 (factor / shard count would give 10/11, unweighted
    draws 1/6). 250 epochs of 12 draws: 3000 draws, b's count 2000 +- 26 (one standard
    deviation, sqrt(3000 * 2/3 * 1/3)); the bound is 5 of them."""
    a = write_shards(tmp_path, "a", 10, 1)
    b = write_shards(tmp_path, "b", 2, 1)
    ds = ShardedCaptions(f"{a}::{b}", TO_NONE, seed=5, resampled=True,
                         upsampling_factors="1::10")
    draws = [s for epoch in range(250) for s in ds.my_shards(epoch)]
    assert len(draws) == 3000  # one reader draws the 12 shards' worth each epoch
    from_b = sum("/b-" in s for s in draws)
    assert abs(from_b - 2000) <= 130
    each_b = Counter(s for s in draws if "/b-" in s)  # within a source: uniform
    assert all(abs(n - 1000) <= 5 * 26 for n in each_b.values()), each_b
    unweighted = ShardedCaptions(f"{a}::{b}", TO_NONE, seed=5, resampled=True)
    from_b = sum("/b-" in s for e in range(250) for s in unweighted.my_shards(e))
    assert abs(from_b - 500) <= 5 * 21  # 2 of 12 shards: 500 +- 20.4


def test_resampled_draws_repeat_and_are_seeded_per_rank_worker_and_epoch(tmp_path):
    shards = write_shards(tmp_path, "a", 8, 2)

    def draws(seed=0, rank=0, worker=0, epoch=0):
        ds = ShardedCaptions(shards, TO_NONE, seed=seed, rank=rank, world_size=2,
                             resampled=True)
        return ds.my_shards(epoch, worker, workers=2)
    first = draws()
    assert len(first) == 2  # 8 shards over 2 ranks x 2 workers: 2 draws each an epoch
    assert draws() == first  # a second process (a resumed run) draws the same
    others = [draws(seed=1), draws(rank=1), draws(worker=1), draws(epoch=1)]
    assert all(d != first for d in others)
    # with replacement: some epoch draws a shard twice (without, never; with, in 1 of 8)
    assert any(len(set(d)) < len(d) for d in (draws(epoch=e) for e in range(40)))
    # a resumed stream (start_epoch: the step it resumes at) yields the same pairs again
    stream = [ShardedCaptions(shards, TO_NONE, seed=0, resampled=True, start_epoch=7,
                              shuffle_buffer=3) for _ in range(2)]
    first, again = ([x[1] for _, x in zip(range(20), s)] for s in stream)
    assert first == again


def test_factors_need_resampling_and_one_per_source(tmp_path):
    a = write_shards(tmp_path, "a", 2, 1)
    with pytest.raises(ValueError, match="need resampled=True"):
        ShardedCaptions(f"{a}::{a}", TO_NONE, upsampling_factors="1::2")
    for factors, message in [("1", r"1 factor\(s\) for 2"), ("1::x", "expected numbers"),
                             ("0::0", "at least one above 0"), ("1::-1", "finite factors >= 0")]:
        with pytest.raises(ValueError, match=message):
            ShardedCaptions(f"{a}::{a}", TO_NONE, resampled=True, upsampling_factors=factors)


def test_the_command_refuses_factors_without_resampling_in_one_sentence(tmp_path):
    a = write_shards(tmp_path / "s", "a", 2, 1)
    b = write_shards(tmp_path / "s", "b", 1, 1)
    argv = train_args(tmp_path / "out", "--reference-shards", f"{a}::{b}",
                      "--train-data-upsampling-factors", "1::10", "--use-world", "target,eval")
    with pytest.raises(ValueError) as refused:
        cli.check_args(cli.parse(argv))
    message = str(refused.value)
    assert message.startswith("--reference-upsampling-factors 1::10: ")
    assert "needs --dataset-resampled (as in open_clip_train)" in message
    assert message.count(". ") == 0 and "\n" not in message  # one sentence
    args = cli.parse(argv + ["--dataset-resampled"])
    cli.check_args(args)
    assert (args.dataset_resampled, args.reference_upsampling_factors) == (True, "1::10")


@pytest.mark.parametrize("shards, pairs, expected", [
    # 2 shards of 3 pairs, positions 0-5 of the epoch's order; reader q = rank + 2 * worker
    # of 4 decodes positions q and q + 4: 2, 2, 1 and 1 pairs
    (2, 3, {(0, 0): [(0, 0), (1, 1)], (1, 0): [(0, 1), (1, 2)], (0, 1): [(0, 2)],
            (1, 1): [(1, 0)]}),
    # 1 shard of 5 pairs: reader 0 takes pairs 0 and 4, readers 1-3 pairs 1, 2 and 3
    (1, 5, {(0, 0): [(0, 0), (0, 4)], (1, 0): [(0, 1)], (0, 1): [(0, 2)], (1, 1): [(0, 3)]}),
])
def test_small_corpora_give_each_pair_once_per_epoch(tmp_path, shards, pairs, expected):
    """(rank, worker) -> [(shard in the epoch's order, pair in the shard)], for 2 ranks x 2
    workers, in two epochs (each its own shard order)."""
    pattern = write_shards(tmp_path, "a", shards, pairs)
    for epoch in (0, 1):
        seen = []
        for (rank, worker), share in expected.items():
            ds = ShardedCaptions(pattern, TO_NONE, seed=2, rank=rank, world_size=2)
            order = ds.my_shards(epoch, worker, workers=2)
            assert sorted(order) == sorted(ds.shards)  # every reader reads every shard
            names = [f"a-{order[s].rsplit('-', 1)[1][:-4]}-{i}" for s, i in share]
            got = captions(ds.epoch_pairs(epoch, worker, workers=2))
            assert got == names
            seen += got
        assert sorted(seen) == sorted(f"a-{s}-{i}" for s in range(shards) for i in range(pairs))


def test_a_small_corpus_streams_on_every_reader(tmp_path, monkeypatch):
    """The stream itself (as loader workers run it): each reader's first epoch, drained from
    its shuffle buffer, is its share; together every pair once."""
    pattern = write_shards(tmp_path, "a", 2, 3)
    seen = []
    for rank in range(2):
        for worker, share in enumerate((2, 1)):  # readers 0, 1: 2 pairs; readers 2, 3: 1
            monkeypatch.setattr(data, "get_worker_info",
                                lambda w=worker: SimpleNamespace(id=w, num_workers=2))
            stream = iter(ShardedCaptions(pattern, TO_NONE, rank=rank, world_size=2))
            seen += [next(stream)[1] for _ in range(share)]
    assert sorted(seen) == sorted(f"a-{s}-{i}" for s in range(2) for i in range(3))


def test_fewer_pairs_than_readers_say_so(tmp_path, monkeypatch):
    pattern = write_shards(tmp_path, "a", 1, 3)
    monkeypatch.setattr(data, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    stream = iter(ShardedCaptions(pattern, TO_NONE, rank=1, world_size=2))  # reader 3 of 4
    with pytest.raises(RuntimeError, match="fewer readable pairs than readers; use fewer"):
        next(stream)
