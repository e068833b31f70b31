"""Loaders read what dive_fast.world writes, in each format, and skip corrupt files."""
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from dive_fast.data import CsvCaptions, ImageFolderTask, ResumableSampler, collate, webdataset_captions
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
    pairs = list(webdataset_captions([str(s) for s in shards], TO_TENSOR, shuffle_buffer=1))
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
    assert len(list(webdataset_captions(str(bad), TO_TENSOR, shuffle_buffer=1))) == len(members) // 2 - 1


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
        webdataset_captions(str(tmp_path / "none.tar"), TO_TENSOR)


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
