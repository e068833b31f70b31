"""The frozen side's embedding cache: keyed by the reference data and the weights, checked
against its digest once a run, an error naming it when changed under a live run, and a full
disk while writing it one sentence with no partial file left."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.full_disk import limited_run
from helpers.runs import train_args

from dive_fast import train
from dive_fast.train.frozen import cache as frozen_cache
from dive_fast.world.export import write_captions


def test_frozen_cache_is_rebuilt_when_the_reference_or_the_weights_change(micro_cache, tmp_path):
    from safetensors.torch import save_file

    from dive_fast.train.models import load_clip, tiny_checkpoint
    root = write_captions(tmp_path / "ref", "reference", 24, 0, 16, 100, formats=("csv",))
    csv = root / "captions.csv"
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(tiny_checkpoint("dive-micro").read_bytes())
    args = train_args(tmp_path / "out", "--method", "dive", "--steps", "2", "--reference-csv",
                      str(csv), "--pretrained", str(weights), "--use-world", "target,eval,rsa")
    caches = lambda: sorted((tmp_path / "out" / "cache").glob("frozen-ref-*.npy"))  # noqa: E731
    train.main(args)
    assert len(caches()) == 1
    train.main(args + ["--resume", "auto"])  # nothing changed: the cache is reused
    assert len(caches()) == 1
    # The weights file overwritten in place (another model's weights, same architecture).
    torch.manual_seed(1)
    other = load_clip("dive-micro").model.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, weights)
    with pytest.raises(ValueError, match="not the weights the run started from"):
        train.main(args + ["--resume", "auto"])  # the run's start is gone: refused by name
    shutil.rmtree(tmp_path / "out" / "checkpoints")  # as a run killed before its first
    (tmp_path / "out" / "metrics.jsonl").unlink()  # checkpoint leaves its folder: the cache
    train.main(args)
    assert len(caches()) == 2
    # An image of the reference set regenerated in place: other data, so the run cannot
    # resume (test_checkpoint.py), and a new run's cache has another key.
    first = csv.parent / "images" / "0000000.jpg"
    first.write_bytes((csv.parent / "images" / "0000005.jpg").read_bytes())
    with pytest.raises(ValueError, match="the reference data differ"):
        train.main(args + ["--resume", "auto"])
    again = [a if a != str(tmp_path / "out") else str(tmp_path / "again") for a in args]
    train.main(again)
    rebuilt = sorted((tmp_path / "again" / "cache").glob("frozen-ref-*.npy"))
    assert len(rebuilt) == 1 and rebuilt[0].name not in {p.name for p in caches()}


def test_a_full_disk_during_the_cache_write_is_one_sentence(micro_cache, tmp_path):
    proc = limited_run(train_args(tmp_path / "out", "--method", "dive", "--ref-size", "64"),
                        4096, tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "could not write" in last and "frozen-ref-" in last, last
    assert not list((tmp_path / "out" / "cache").glob(".*.tmp"))


def test_a_cache_changed_under_a_live_run_is_an_error_naming_it(tmp_path):
    path = tmp_path / "frozen-ref-x.npy"
    np.save(path, np.ones((10, 2, 4), dtype=np.float32))
    cache = frozen_cache.EmbeddingCache(path)
    assert cache.rows([3, 1]).shape == (2, 2, 4)
    with open(path, "r+b") as f:
        f.truncate(200)  # another process cuts it short
    with pytest.raises(RuntimeError, match=r"frozen-ref-x.npy changed while this run reads it"):
        cache.rows([9])
    with pytest.raises(RuntimeError, match=r"is 200 bytes, expected .*cut short"):
        frozen_cache.EmbeddingCache(path)


def test_a_cache_is_checked_against_its_digest_once_a_run(micro_cache, tmp_path, monkeypatch):
    """The digest is a read of the whole cache (GBs for CC3M): a run reads it once, on rank
    0, whether it builds the cache (the record's digest) or reuses one (the check); the
    opening that skips it still checks the header and size."""
    read = []
    digest = frozen_cache.file_digest
    monkeypatch.setattr(frozen_cache, "file_digest",
                        lambda path: read.append(Path(path).name) or digest(path))
    args = train_args(tmp_path / "out", "--method", "dive", "--steps", "1")
    for extra in ([], ["--resume", "auto"]):  # builds it, then reuses it (evaluating again)
        read.clear()
        train.main(args + extra)
        assert sum(n.startswith("frozen-ref-") for n in read) == 1, read
    path = next((tmp_path / "out" / "cache").glob("frozen-ref-*.npy"))
    path.with_suffix(".sha256").write_text("0" * 64)  # a record the bytes do not match
    with pytest.raises(RuntimeError, match="does not match the digest"):
        frozen_cache.EmbeddingCache(path)
    assert len(frozen_cache.EmbeddingCache(path, verify_digest=False)) == 32
    with open(path, "r+b") as f:
        f.truncate(200)
    with pytest.raises(RuntimeError, match="cut short"):
        frozen_cache.EmbeddingCache(path, verify_digest=False)
