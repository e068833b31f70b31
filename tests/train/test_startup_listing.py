"""A run's start lists its data once: the file-system look-ups of a run, per image, counted
(``benchmarks/common.counted``), and under torchrun only rank 0 walks the folders."""
import json
import sys
from pathlib import Path

from helpers.images import image_folder
from helpers.runs import two_processes

from dive_fast import train

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from common import counted  # noqa: E402

MAX_STATS_PER_IMAGE = 1.2  # the goal for a whole job's start
BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_startup.py"  # its --worker


def data_tree(root, per_class=50, refs=40):
    """train/ (4 classes x ``per_class``), val/ (2 a class), and ``refs`` reference pairs in
    ref/ named by ref/captions.csv (paths relative to the CSV's folder)."""
    classes = ("cat", "dog", "cow", "owl")
    image_folder(root / "train", classes, n=per_class)
    image_folder(root / "val", classes, n=2)
    image_folder(root / "ref" / "images", ("all",), n=refs)
    rows = [f"images/all/{i}.png\ta photo number {i}" for i in range(refs)]
    (root / "ref" / "captions.csv").write_text("filepath\ttitle\n" + "\n".join(rows) + "\n")
    return len(classes) * (per_class + 2) + refs


def start_args(root, out, method="dive"):
    """One step of a user's run: the folders, the CSV and the zero-shot row before step 1."""
    return ["--model", "dive-micro", "--method", method, "--out", str(out), "--steps", "1",
            "--batch-size", "4", "--no-augment", "--workers", "0", "--no-progress",
            "--wise-ft", "", "--log-every", "1",
            "--train-folder", str(root / "train"), "--task", f"id:own:{root / 'val'}",
            "--reference-csv", str(root / "ref" / "captions.csv")]


def test_a_run_stats_each_image_about_once(micro_cache, tmp_path):
    """Listing, fingerprints, validation, the frozen cache and the zero-shot row together:
    at most 1.2 path stats an image (today's 1.0: the listing's), each folder listed once."""
    images = data_tree(tmp_path / "data")
    with counted() as calls:
        train.main(start_args(tmp_path / "data", tmp_path / "out"))
    per_image = calls.image_stats(tmp_path / "data") / images
    assert per_image <= MAX_STATS_PER_IMAGE, (per_image, dict(calls.paths))
    listed = calls.listings_under(tmp_path / "data")
    assert [listed.get(str(tmp_path / "data" / f)) for f in ("train", "train/cat", "val")] == \
        [1, 1, 1]


def test_under_torchrun_rank_1_walks_nothing(micro_cache, tmp_path):
    """Two gloo processes: rank 0 lists the folders and stats the images (once each, for
    the job), rank 1 receives the listings and digests and looks up no image path (it
    reads its images by opening them)."""
    data = tmp_path / "data"
    images = data_tree(data, per_class=10, refs=16)
    two_processes(str(BENCH), "--worker", str(tmp_path / "figures"), "--",
                  *start_args(data, tmp_path / "out"), timeout=600)
    ranks = [json.loads((tmp_path / f"figures.{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1]["listings"] == {} and ranks[1]["image_stats"] == 0
    assert [ranks[0]["listings"].get(f) for f in ("train", "train/cat", "val")] == [1, 1, 1]
    job = sum(r["image_stats"] for r in ranks) / images
    assert job <= MAX_STATS_PER_IMAGE, job


def test_digests_are_those_checkpoints_recorded_before(tmp_path):
    """The listing's digests equal the formulas checkpoints recorded with one stat a file
    per use (so that older checkpoints resume): the folder's over class folder/name, label,
    size and time in label order, the CSV's over its bytes and each image's size and time."""
    import hashlib
    import os

    from dive_fast.train.data import CsvCaptions, ImageFolderTask
    data_tree(tmp_path, per_class=3, refs=4)
    folder = ImageFolderTask(tmp_path / "train", None)
    h = hashlib.sha256(repr((folder.classnames, folder.templates)).encode())
    for file, label in folder.samples:
        st = os.stat(file)
        h.update(f"{file.parent.name}/{file.name}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n"
                 .encode())
    assert folder.fingerprint() == f"folder:{h.hexdigest()}"
    pairs = CsvCaptions(tmp_path / "ref" / "captions.csv", None)
    h = hashlib.sha256((tmp_path / "ref" / "captions.csv").read_bytes())
    for file, _ in pairs.rows:
        st = os.stat(tmp_path / "ref" / file)
        h.update(f"{file}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    assert pairs.fingerprint() == f"csv:{h.hexdigest()}"
