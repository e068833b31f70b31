"""The frozen side's embedding cache: keyed by the reference data and the weights, checked
against its digest once a run, an error naming it when changed under a live run, and a full
disk while writing it one sentence with no partial file left. The frozen tower's memory: gone
once the cache serves, its matmul weights in the autocast dtype, sharded under FSDP; the
run's results the same as with a whole float32 tower."""
import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.full_disk import limited_run
from helpers.runs import train_args, two_processes

from dive_fast import train
from dive_fast.train import models
from dive_fast.train.frozen import FrozenReference
from dive_fast.train.frozen import cache as frozen_cache
from dive_fast.train.memory import module_bytes
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


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_the_frozen_tower_embeds_as_the_trainable_model_does(dtype):
    """u = v = 0 at identical weights, bit for bit: the trainable model's forward (training,
    with grad) and the frozen tower's, its matmul weights stored in the autocast dtype
    (attention's packed projections too) and nn.MultiheadAttention kept off its fused fast
    path, which eval without grad would take in float32 and which rounds differently."""
    torch.manual_seed(0)
    bundle = models.load_clip("dive-micro")
    images = torch.randn(6, 3, bundle.image_size, bundle.image_size)
    tokens = bundle.tokenizer([f"a small red cube number {i}" for i in range(6)])
    whole, stored = models.frozen_copy(bundle.model), models.frozen_copy(bundle.model, dtype)
    bundle.model.train()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        trained = [F.normalize(bundle.model.encode_image(images).float(), dim=-1),
                   F.normalize(bundle.model.encode_text(tokens).float(), dim=-1)]
    frozen = FrozenReference(stored, "cpu", dtype).embed(images, tokens)
    assert all(torch.equal(a.detach(), b) for a, b in zip(trained, frozen))
    if dtype is None:
        return
    params = dict(stored.named_parameters())
    cast = {n for n, p in params.items() if p.dtype == dtype}
    assert {"visual.conv1.weight", "visual.proj", "text_projection",
            "transformer.resblocks.0.mlp.c_fc.weight",
            "visual.transformer.resblocks.0.attn.in_proj_weight",
            "visual.transformer.resblocks.0.attn.out_proj.weight"} <= cast
    assert not any(n.endswith(("ln_1.weight", "embedding", "embedding.weight")) for n in cast)
    fp32 = sum(p.numel() * 4 for n, p in whole.named_parameters() if n in cast)
    assert module_bytes(whole) - module_bytes(stored) == fp32 // 2  # those weights: half
    with pytest.raises(ValueError, match="float64, expected an autocast dtype"):
        models.store_for_autocast(stored, torch.float64)


def test_unfused_attention_restores_the_fast_path_flag():
    assert torch.backends.mha.get_fastpath_enabled()
    with pytest.raises(KeyError):
        with models.unfused_attention():
            assert not torch.backends.mha.get_fastpath_enabled()
            raise KeyError
    assert torch.backends.mha.get_fastpath_enabled()


def test_flyp_and_dive_train_on_the_same_crops(micro_cache, tmp_path):
    """Building the frozen cache (DiVE's alone) draws nothing from the global RNG, which
    drives the augmentation under --workers 0: both methods' first step sees the same crops
    (48 px, where random crops of the world's images differ), so their contrastive losses
    agree (DiVE's term is ~0 at the start)."""
    def first_clip(method):
        out = tmp_path / method
        train.main(train_args(out, "--method", method, "--steps", "1", "--force-image-size",
                              "48", "--pretrained", "", "--train-size", "64", "--ref-size",
                              "64", "--eval-per-task", "8", "--rsa-size", "16"))
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["clip"]

    assert first_clip("flyp") == first_clip("dive")


def test_the_frozen_tower_is_released_once_the_cache_serves(micro_cache, tmp_path, monkeypatch):
    """The tower leaves as soon as the cache is built: nothing holds it any more (on a CPU,
    freed, not moved), and a reference batch without cache rows is then an error."""
    released = []
    release = FrozenReference.release

    def watched(self):
        tower = weakref.ref(next(self.model.parameters()))
        release(self)
        released.append(tower() is None)
        with pytest.raises(RuntimeError, match="frozen tower was released"):
            self.embed(torch.zeros(1, 3, 16, 16), None)
    monkeypatch.setattr(FrozenReference, "release", watched)
    train.main(train_args(tmp_path / "out", "--method", "dive", "--steps", "1"))
    assert released == [True]


@pytest.mark.parametrize("case", ["cache", "live bf16"])
def test_a_run_gives_the_results_of_one_holding_a_whole_float32_tower(micro_cache, tmp_path,
                                                                      monkeypatch, case):
    """Losses, zero-shot, fine-tuned and WiSE-FT rows and RSA equal those of a run that keeps
    the whole float32 frozen tower on the device (the behaviour before the tower could
    leave or be stored in bf16)."""
    extra = ["--method", "dive", "--steps", "3", "--accum-freq", "2", "--wise-ft", "0.5"] + \
        (["--no-frozen-cache", "--precision", "amp_bf16"] if case == "live bf16" else [])

    def results(out):
        train.main(train_args(out, *extra))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        timings = ("samples_per_s", "samples_per_s_per_gpu", "data_time")
        losses = [{k: v for k, v in r.items() if k not in timings} for r in rows]
        return losses, json.loads((out / "report.json").read_text())

    now = results(tmp_path / "now")
    with monkeypatch.context() as m:
        m.setattr(FrozenReference, "release", lambda self: None)
        m.setattr(models, "store_for_autocast", lambda model, dtype: model)
        kept = results(tmp_path / "kept")
    assert now == kept
    assert {"zero-shot", "dive", "dive wise-ft 0.5"} <= set(now[1]) and "rsa" in now[1]["dive"]


def test_under_fsdp_each_of_two_ranks_holds_half_the_frozen_tower(tmp_path):
    """``make_frozen_side`` with --fsdp on two gloo processes, in float32 and under bf16
    autocast: each rank holds half the tower's bytes (counted after a forward, when it is
    back to its shards), and its embeddings equal a whole copy's."""
    two_processes(str(Path(__file__).parents[1] / "helpers" / "frozen_shards.py"),
                  str(tmp_path), timeout=600)
    for rank in (0, 1):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for precision, f in found.items():
            assert f["equal"], (rank, precision)
            # half, up to FSDP's padding of uneven rows and the replicated logit scale
            assert f["whole_bytes"] / 2 <= f["sharded_bytes"] <= f["whole_bytes"] / 2 + 4096, f
        assert found["amp_bf16"]["whole_bytes"] < found["fp32"]["whole_bytes"]


def test_building_the_cache_leaves_the_run_s_random_stream_alone(micro_cache, tmp_path):
    """A run that builds the cache (and releases the tower) takes its first step on the
    batch a run without the cache takes (its augmentation drawn from the global stream with
    --workers 0), to the same loss: at identical weights DiVE adds nothing."""
    def first_step(out, *extra):
        train.main(train_args(out, "--method", "dive", "--steps", "1", "--augment", *extra))
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        return row["loss"], row["clip"]
    assert first_step(tmp_path / "cached") == first_step(tmp_path / "live", "--no-frozen-cache")
