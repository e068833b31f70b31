"""Loaders read what dive_fast.world writes, in each format, and skip corrupt files."""
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from dive_fast.train.data import (CsvCaptions, ImageFolderTask, Readable, ResumableSampler, ShardedCaptions,
                            collate, shard_list, shard_pairs, train_collate)
from dive_fast.world import TASKS, caption_pair, task_image

TO_TENSOR = __import__("torchvision").transforms.PILToTensor()


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    subprocess.run([sys.executable, "-m", "dive_fast.world", "--out", str(out), "--tasks",
                    "shapes,count", "--splits", "test", "--n", "30", "--pairs", "25",
                    "--shard-size", "10"], check=True, capture_output=True)
    return out


def test_image_folder_matches_generator(world_dir):
    ds = ImageFolderTask(world_dir / "tasks" / "shapes" / "test", TO_TENSOR)
    assert ds.classnames == TASKS["shapes"].classnames
    assert ds.templates == TASKS["shapes"].templates
    assert len(ds) == 30
    img, label = ds[0]
    expected, expected_label = task_image(TASKS["shapes"], "test", 0)
    assert label == expected_label
    assert torch.equal(img.permute(1, 2, 0), torch.from_numpy(expected))  # PNG is lossless
    assert ImageFolderTask(world_dir / "tasks" / "count" / "test", TO_TENSOR).classnames == \
        ("one shape", "two shapes", "three shapes")


def test_csv_and_shards_hold_the_same_pairs(world_dir):
    csv_ds = CsvCaptions(world_dir / "reference" / "captions.csv", TO_TENSOR)
    assert len(csv_ds) == 25
    assert csv_ds[3][1] == caption_pair("reference", 3)[1]
    shards = sorted((world_dir / "reference" / "shards").glob("*.tar"))
    assert len(shards) == 3
    counter = [0]
    pairs = [p for s in shards for p in shard_pairs(str(s), TO_TENSOR, counter)]
    assert counter == [0]
    assert sorted(t for _, t in pairs) == sorted(csv_ds.rows[i][1] for i in range(25))
    assert pairs[0][0].shape == (3, 32, 32)


def test_corrupt_and_missing_images_are_skipped_and_counted(world_dir, tmp_path):
    import shutil
    root = tmp_path / "ref"
    shutil.copytree(world_dir / "reference", root)
    (root / "images" / "0000002.jpg").write_bytes(b"not a jpeg")
    (root / "images" / "0000004.jpg").unlink()
    ds = CsvCaptions(root / "captions.csv", TO_TENSOR)
    n, skipped = 0, 0
    for images, texts, s in DataLoader(ds, batch_size=8, collate_fn=collate):
        n += len(texts)
        skipped += s
    assert (n, skipped) == (23, 2)
    # a corrupt shard member is skipped too
    shard = sorted((root / "shards").glob("*.tar"))[0]
    import tarfile
    members = tarfile.open(shard).getmembers()
    data = {m.name: tarfile.open(shard).extractfile(m).read() for m in members}
    data[members[0].name] = b"garbage"
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        import io
        for name, blob in data.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    counter = [0]
    assert len(list(shard_pairs(str(bad), TO_TENSOR, counter))) == len(members) // 2 - 1
    assert counter == [1]


def test_bad_paths_and_malformed_csv(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderTask(tmp_path / "nope", TO_TENSOR)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderTask(tmp_path / "empty", TO_TENSOR)
    with pytest.raises(FileNotFoundError, match="caption CSV not found"):
        CsvCaptions(tmp_path / "x.csv", TO_TENSOR)
    bad = tmp_path / "bad.csv"
    bad.write_text("path,caption\na.jpg,hello\n")
    with pytest.raises(ValueError, match="lacks column"):
        CsvCaptions(bad, TO_TENSOR)
    with pytest.raises(FileNotFoundError, match="shard not found"):
        shard_list(str(tmp_path / "none.tar"))
    with pytest.raises(FileNotFoundError, match="no webdataset shard matches"):
        shard_list(str(tmp_path / "*.tar"))


def test_resumable_sampler_continues_and_splits_ranks():
    full = ResumableSampler(10, seed=1, batch_size=4)
    it = iter(full)
    first = [next(it) for _ in range(24)]  # six batches, crossing epochs
    resumed = iter(ResumableSampler(10, seed=1, batch_size=4, start_step=3))
    assert [next(resumed) for _ in range(12)] == first[12:]
    assert sorted(first[:10]) == list(range(10))  # each epoch a permutation
    r0 = iter(ResumableSampler(10, seed=1, batch_size=2, rank=0, world_size=2))
    r1 = iter(ResumableSampler(10, seed=1, batch_size=2, rank=1, world_size=2))
    assert [next(r0) for _ in range(2)] + [next(r1) for _ in range(2)] == first[:4]


def test_training_view_replaces_unreadable_samples_and_counts_them(world_dir, tmp_path):
    import shutil
    root = tmp_path / "ref"
    shutil.copytree(world_dir / "reference", root)
    (root / "images" / "0000002.jpg").write_bytes(b"not a jpeg")
    ds = Readable(CsvCaptions(root / "captions.csv", TO_TENSOR))
    images, texts, index, skipped, tokens = train_collate([ds[i] for i in range(8)], tokenizer=len)
    assert images.shape[0] == 8 and skipped == 1 and tokens == 8  # a full batch
    assert 2 not in index.tolist() and index.tolist()[:2] == [0, 1]
    assert texts[2] == ds.dataset.rows[index[2]][1]  # the replacement's own caption
    assert ds[2][2] == index[2]  # deterministic: a resumed run reads the same replacement


def test_all_unreadable_data_stops_with_the_paths(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(5):
        (tmp_path / "a" / f"{i}.png").write_bytes(b"broken")
    ds = Readable(ImageFolderTask(tmp_path, TO_TENSOR))
    with pytest.raises(RuntimeError, match=r"5 consecutive unreadable .*a/\d.png"):
        ds[0]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    subprocess.run([sys.executable, "-m", "dive_fast.world", "--out", str(out), "--tasks",
                    "shapes", "--splits", "test", "--n", "1", "--pairs", "40", "--shard-size", "5",
                    "--formats", "wds"], check=True, capture_output=True)
    return sorted(str(p) for p in (out / "reference" / "shards").glob("*.tar"))


def test_shards_split_by_rank_and_worker_each_pair_once_per_epoch(shard_dir):
    assert len(shard_dir) == 8
    seen = []
    for rank in range(2):
        ds = ShardedCaptions(shard_dir, TO_TENSOR, seed=3, shuffle_buffer=4, rank=rank, world_size=2)
        batches = iter(DataLoader(ds, batch_size=5, num_workers=2, collate_fn=train_collate))
        for _ in range(4):  # 20 pairs: this rank's share of an epoch
            _, texts, index, skipped, _ = next(batches)
            assert index.tolist() == [-1] * 5 and skipped == 0
            seen += texts
    expected = [caption_pair("reference", i)[1] for i in range(40)]
    assert sorted(seen) == sorted(expected)  # every pair once, none twice


def test_truncated_shard_is_skipped_and_counted(shard_dir, tmp_path):
    cut = tmp_path / "cut.tar"
    blob = open(shard_dir[0], "rb").read()
    cut.write_bytes(blob[:len(blob) // 2])
    counter = [0]
    pairs = list(shard_pairs(str(cut), TO_TENSOR, counter))
    assert 0 < len(pairs) < 5 and counter[0] >= 1
    ds = ShardedCaptions([str(cut), shard_dir[1]], TO_TENSOR, shuffle_buffer=1)
    items = [x for _, x in zip(range(12), ds)]
    assert sum(x[3] for x in items) >= 1 and all(x[1] for x in items)  # counted, never a crash
