"""Loaders read what dive_fast.world writes, in each format, and skip corrupt files; user
data that is unreadable, mis-encoded or oddly spelled (CSV quoting, BOMs, empty captions,
FIFOs, hidden folders, shard patterns) ends the run in one sentence or is read as meant."""
import io
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers.images import image_folder
from helpers.runs import train_args
from PIL import Image
from torch.utils.data import DataLoader

from dive_fast import train
from dive_fast.train import data, evaluate
from dive_fast.train.data import (
    CsvCaptions,
    ImageFolderTask,
    Readable,
    ResumableSampler,
    ShardedCaptions,
    collate,
    shard_list,
    shard_pairs,
    train_collate,
)
from dive_fast.world import TASKS, caption_pair, task_image
from dive_fast.world.export import write_captions

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
        ds = ShardedCaptions(shard_dir, TO_TENSOR, seed=3, shuffle_buffer=4, rank=rank,
                             world_size=2)
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


@contextmanager
def deadline(seconds):
    """Fails the test, rather than hanging the suite, if the block runs past ``seconds``."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def fresh_warning_count(monkeypatch):
    """Unreadable-sample warnings are rate-limited per process: count from zero here."""
    monkeypatch.setattr(data, "_warned", [0])


def test_all_unreadable_training_folder_stops_with_the_paths(micro_cache, tmp_path, caplog,
                                                           fresh_warning_count):
    """The checks find one readable image (the folder passes); the run then meets 64
    unreadable samples in a row and stops."""
    folder = image_folder(tmp_path / "train", n=40, broken=True)
    Image.new("RGB", (16, 16)).save(folder / "cat" / "0.png")
    caplog.set_level(logging.WARNING, logger="dive_fast.train.data")
    start = time.perf_counter()
    with deadline(60), pytest.raises(RuntimeError, match=r"64 consecutive unreadable .*train/"):
        train.main(train_args(tmp_path / "out", "--method", "flyp", "--train-folder", str(folder),
                              "--use-world", "eval"))
    assert time.perf_counter() - start < 60
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    # the first 10 logged, then every 100th (some hundreds of probes before 64 in a row)
    assert 0 < len(warnings) <= 20


@pytest.mark.parametrize("source", ["csv --no-frozen-cache", "csv --frozen-cache", "shards"])
def test_all_unreadable_reference_pairs_stop(micro_cache, tmp_path, source, caplog,
                                            fresh_warning_count):
    root = write_captions(tmp_path, "reference", 80, 0, 16, 20)
    images = sorted((root / "images").iterdir())
    for f in [*images[1:], *(root / "shards").iterdir()]:  # the checks find the first
        f.write_bytes(b"truncated")
    caplog.set_level(logging.WARNING, logger="dive_fast.train.data")
    refs, expected = {
        "csv --no-frozen-cache": (["--reference-csv", str(root / "captions.csv"),
                                   "--no-frozen-cache"], "64 consecutive unreadable .*images/"),
        "csv --frozen-cache": (["--reference-csv", str(root / "captions.csv")],
                               "64 consecutive unreadable .*images/"),
        "shards": (["--reference-shards", str(root / "shards" / "*.tar")],
                   r"no readable pairs in webdataset shards .*\(\d+ unreadable\)")}[source]
    with deadline(60), pytest.raises(RuntimeError, match=expected):
        train.main(train_args(tmp_path / "out", "--method", "dive", *refs,
                              "--use-world", "target,eval"))
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) <= 11


@pytest.mark.parametrize("template", ["a photo", "a {0} {1}", "a {name}"])
def test_templates_must_name_the_class(tmp_path, not_loaded, template):
    folder = image_folder(tmp_path / "t")
    (folder / "templates.txt").write_text(f"a photo of a {{}}.\n{template}\n")
    with pytest.raises(ValueError, match=r"templates.txt: prompt template .* must contain \{\}"):
        train.main(train_args(tmp_path / "out", "--task", f"id:t:{folder}"))
    with pytest.raises(ValueError, match=r"--train-folder: .*must contain \{\}"):
        train.main(train_args(tmp_path / "out", "--train-folder", str(folder)))


def test_class_names_given_twice_are_refused(tmp_path, not_loaded):
    folder = image_folder(tmp_path / "t")
    (folder / "classnames.txt").write_text("animal\nanimal\n")
    with pytest.raises(ValueError, match=r"class name\(s\) \['animal'\] given to more than one"):
        evaluate.main(["--task", f"id:t:{folder}"])


def test_a_latin1_csv_is_named(tmp_path, not_loaded):
    bad = tmp_path / "captions.csv"
    bad.write_bytes("filepath\ttitle\nimages/0000000.jpg\tun caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="--reference-csv: caption CSV .* is not UTF-8"):
        train.main(train_args(tmp_path / "out", "--reference-csv", str(bad)))
    folder = image_folder(tmp_path / "t")
    (folder / "classnames.txt").write_bytes("caf\xe9\nth\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="classnames.txt is not UTF-8"):
        train.main(train_args(tmp_path / "out", "--train-folder", str(folder)))


def test_an_unclosed_quote_or_a_stray_tab_is_refused_with_its_line(tmp_path):
    root = write_captions(tmp_path / "w", "reference", 8, 0, 16, 100, formats=("csv",))
    rows = (root / "captions.csv").read_text().splitlines()
    paths = [r.split("\t")[0] for r in rows[1:]]
    for name, sep, bad, expected in (
            ("comma.csv", ",", '"Unclosed quote: a red circle', "is never closed"),
            ("tab.csv", "\t", '"Unclosed quote: a red circle', "is never closed"),
            ("last.csv", "\t", '"Unclosed on the last line', "is never closed"),
            ("stray.csv", "\t", "a red\tcircle", "more fields than the header's 2")):
        at = 7 if name == "last.csv" else 2
        path = tmp_path / name
        path.write_text(f"filepath{sep}title\n" + "".join(
            f"{root / p}{sep}{bad if i == at else f'caption {i}'}\n" for i, p in enumerate(paths)))
        with pytest.raises(ValueError, match=f"{name}:{at + 2}: .*{expected}"):
            CsvCaptions(path, None, sep=sep)


# Captions as pandas reads them (open_clip's CsvDataset: pd.read_csv(path, sep="\t")): a
# quoted field holds tabs and newlines, "" is a quote, a quote inside a field is text.
AS_PANDAS = {'"a cat\twith a tab"': "a cat\twith a tab", '"two\nlines"': "two\nlines",
             'say "hi" there': 'say "hi" there', '"an ""inner"" quote"': 'an "inner" quote',
             '"x"y': "xy"}


def tsv_as_open_clip_writes(tmp_path, captions) -> Path:
    root = image_folder(tmp_path / "img", classes=("a",), n=len(captions))
    path = tmp_path / "quoted.tsv"
    path.write_text("filepath\ttitle\n" + "".join(
        f"{root / 'a' / f'{i}.png'}\t{c}\n" for i, c in enumerate(captions)))
    return path


def test_a_tsv_reads_as_pandas_reads_it(tmp_path):
    path = tsv_as_open_clip_writes(tmp_path, list(AS_PANDAS))
    assert [c for _, c in CsvCaptions(path, None).rows] == list(AS_PANDAS.values())


def test_pandas_reads_the_same_tsv_as_ours(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tsv_as_open_clip_writes(tmp_path, list(AS_PANDAS))
    theirs = pd.read_csv(path, sep="\t")
    assert CsvCaptions(path, None).rows == list(zip(theirs["filepath"], theirs["title"]))


def test_empty_captions_are_dropped_and_counted_and_a_bom_is_stripped(tmp_path):
    root = image_folder(tmp_path / "img", classes=("a",), n=3)
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("\ufefffilepath\ttitle\n" + "".join(
        f"{root / 'a' / f'{i}.png'}\t{'' if i == 1 else 'x' * 200_000}\n" for i in range(3)))
    pairs = CsvCaptions(csv_path, None)  # a 200k-character caption is read, not an error
    assert len(pairs) == 2 and pairs.empty_captions == 1
    names = tmp_path / "f"
    image_folder(names)
    (names / "classnames.txt").write_text("\ufeffkitten\npuppy\n", encoding="utf-8")
    assert ImageFolderTask(names, None).classnames == ("kitten", "puppy")


def test_fifos_named_like_images_are_skipped_not_opened(micro_cache, tmp_path):
    root = image_folder(tmp_path / "f", n=4)
    os.mkfifo(root / "cat" / "9.png")  # opening it would block forever
    listing = ImageFolderTask(root, None)
    assert len(listing) == 8 and all(p.name != "9.png" for p, _ in listing.samples)
    assert data._open_image(root / "cat" / "9.png") is None


def test_hidden_and_empty_folders_are_never_classes_and_gif_tif_are_read(tmp_path):
    root = image_folder(tmp_path / "f")
    image_folder(root, classes=("bird",), n=2, ext="gif")
    image_folder(root, classes=("fish",), n=2, ext="tif")
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "x.png")
    (root / "empty").mkdir()
    listing = ImageFolderTask(root, lambda im: im)
    assert listing.classnames == ("bird", "cat", "dog", "fish")
    assert listing[0][0].size == (16, 16)  # a gif's first frame


def test_shard_patterns_as_webdataset_writes_and_reads_them(tmp_path):
    import webdataset as wds
    shards = tmp_path / "d1"
    shards.mkdir()
    for name in ("a", "b", "c,d"):
        with wds.TarWriter(str(shards / f"{name}.tar")) as w:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8)).save(buf, "webp")
            w.write({"__key__": f"{name}.x", "webp": buf.getvalue(), "txt": "a caption"})
    assert shard_list(f"{shards}/{{a,b}}.tar") == [f"{shards}/a.tar", f"{shards}/b.tar"]
    assert shard_list(f"{shards}/c,d.tar") == [f"{shards}/c,d.tar"]  # a comma in a name
    assert shard_list(f"{tmp_path}/d*/a.tar") == [f"{shards}/a.tar"]  # a glob in a folder
    counter = [0]
    pairs = list(data.shard_pairs(f"{shards}/a.tar", lambda im: im, counter))
    assert len(pairs) == 1 and counter == [0]  # a dotted key and a .webp image are read
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "0.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="every webdataset shard is empty"):
        shard_list(f"{tmp_path}/e/*.tar")
