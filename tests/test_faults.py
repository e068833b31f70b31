"""Nothing silent, nothing late (issue 21): user data that would have gone quietly wrong,
checks that must come before the model loads, and faults (a full disk, a cache changed
under a live run, a killed write's leftovers) that end in one sentence with nothing lost."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import train_args
from dive_fast import train
from dive_fast.train import data
from dive_fast.train import build as train_build
from dive_fast.train.frozen import cache as frozen_cache
from dive_fast.train.checkpoint import load_checkpoint
from dive_fast.train.data import CsvCaptions, ImageFolderTask, shard_list
from dive_fast.train.evaluate import trained_head
from dive_fast.world.export import write_captions, write_task

ROOT = Path(__file__).resolve().parents[1]


def folder(root, classes=("cat", "dog"), n=3, ext="png"):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / c / f"{i}.{ext}")
    return root


@pytest.fixture
def not_loaded(monkeypatch):
    def too_late(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(train_build, "load_clip", too_late)
    from dive_fast.train import evaluate
    monkeypatch.setattr(evaluate, "load_clip", too_late)


# --- silently wrong before ------------------------------------------------------------

def test_an_unclosed_quote_is_refused_with_its_line_and_closed_quotes_are_kept(tmp_path):
    root = write_captions(tmp_path / "w", "reference", 8, 0, 16, 100, formats=("csv",))
    rows = (root / "captions.csv").read_text().splitlines()
    paths = [r.split("\t")[0] for r in rows[1:]]
    unclosed = '"Unclosed quote: a red circle'
    comma = tmp_path / "comma.csv"
    comma.write_text("filepath,title\n" + "".join(
        f"{root / p},{unclosed if i == 2 else f'caption {i}'}\n" for i, p in enumerate(paths)))
    with pytest.raises(ValueError, match=r"comma.csv:4: a double quote opened on this line is "
                                         r"not closed before line 9"):
        CsvCaptions(comma, None, sep=",")
    tab = tmp_path / "tab.csv"  # open_clip's format: no quoting, quotes are caption text
    quoted = ['say "hi" %d' % i for i in range(8)]
    tab.write_text("filepath\ttitle\n" + "".join(
        f"{root / p}\t{unclosed if i == 2 else quoted[i]}\n" for i, p in enumerate(paths)))
    pairs = CsvCaptions(tab, None)
    assert len(pairs) == 8
    assert pairs.rows[2][1] == '"Unclosed quote: a red circle'
    assert pairs.rows[3][1] == 'say "hi" 3'


def test_empty_captions_are_dropped_and_counted_and_a_bom_is_stripped(tmp_path):
    root = folder(tmp_path / "img", classes=("a",), n=3)
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("\ufefffilepath\ttitle\n" + "".join(
        f"{root / 'a' / f'{i}.png'}\t{'' if i == 1 else 'x' * 200_000}\n" for i in range(3)))
    pairs = CsvCaptions(csv_path, None)  # a 200k-character caption is read, not an error
    assert len(pairs) == 2 and pairs.empty_captions == 1
    names = tmp_path / "f"
    folder(names)
    (names / "classnames.txt").write_text("\ufeffkitten\npuppy\n", encoding="utf-8")
    assert ImageFolderTask(names, None).classnames == ("kitten", "puppy")


def test_a_test_set_with_some_training_classes_uses_the_trained_head_rows():
    head = torch.arange(12.0).view(4, 3)
    rows, note = trained_head({("a", "b", "c", "d"): head}, ["c", "a"])
    assert torch.equal(rows, head[[2, 0]]) and "2 of its 4 classes" in note
    rows, note = trained_head({("a", "b", "c", "d"): head}, ["c", "z"])
    assert rows is None and "['z'] are not among" in note
    assert trained_head({("a", "b"): head}, ["a", "b"])[1] is None
    assert trained_head({("a", "b"): head}, ["n01", "n02"]) == \
        (None, "zero-shot head: no class of this set is among the trained head's")
    assert trained_head({}, ["a"]) == (None, None)  # no trained head: nothing to say


def test_resume_compares_data_contents_not_path_spellings(micro_cache, tmp_path):
    """The same folder spelled x/../x resumes; other classes at the same path are refused."""
    target = write_task(tmp_path / "w", "shapes", "train", 40, 0, 16)
    args = ["--method", "flyp", "--steps", "2", "--checkpoint-every", "1",
            "--use-world", "eval", "--train-size", "32"]
    out = tmp_path / "out"
    train.main(train_args(out, *args, "--train-folder", str(target)))
    spelled = f"{target.parent}/../{target.parent.name}/{target.name}"
    train.main(train_args(out, *args, "--train-folder", spelled,
                          "--resume", str(out / "checkpoints" / "step-00000001.pt")))
    (target / "classnames.txt").write_text(
        "\n".join(f"other {i}" for i in range(10)) + "\n")
    with pytest.raises(ValueError, match=r"cannot resume .*the target data differ"):
        train.main(train_args(out, *args, "--train-folder", str(target), "--resume", "auto"))


def test_fifos_named_like_images_are_skipped_not_opened(micro_cache, tmp_path):
    root = folder(tmp_path / "f", n=4)
    os.mkfifo(root / "cat" / "9.png")  # opening it would block forever
    listing = ImageFolderTask(root, None)
    assert len(listing) == 8 and all(p.name != "9.png" for p, _ in listing.samples)
    assert data._open_image(root / "cat" / "9.png") is None


def test_hidden_and_empty_folders_are_never_classes_and_gif_tif_are_read(tmp_path):
    root = folder(tmp_path / "f")
    folder(root, classes=("bird",), n=2, ext="gif")
    folder(root, classes=("fish",), n=2, ext="tif")
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
            buf = __import__("io").BytesIO()
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


# --- checked before the model loads -------------------------------------------------------

def _bad(tmp_path):
    """(arguments, the message they must give) for cases checked before any model loads."""
    imgs = folder(tmp_path / "imgs")
    missing_csv = tmp_path / "missing.csv"
    missing_csv.write_text("filepath\ttitle\n" + "".join(f"nowhere/{i}.png\tcap\n" for i in range(4)))
    two_rows = tmp_path / "two.csv"
    two_rows.write_text("filepath\ttitle\n" + "".join(
        f"{imgs / 'cat' / f'{i}.png'}\tcap {i}\n" for i in range(2)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "0.tar").write_bytes(b"")
    one = folder(tmp_path / "one", classes=("only",))
    metrics_dir = tmp_path / "m"
    (metrics_dir / "metrics.jsonl").mkdir(parents=True)
    ckpt_file = tmp_path / "c"
    ckpt_file.mkdir()
    (ckpt_file / "checkpoints").write_text("")
    world_refs = write_captions(tmp_path / "w", "reference", 4, 0, 16, 100, formats=("wds",))
    cuda_runs = torch.cuda.is_available()  # then the cuda backend is no bad input
    return [
        *([] if cuda_runs else [(["--dive-backend", "cuda"],
                                 r"--dive-backend cuda: this DiVE backend cannot run here")]),
        (["--dive-backend", "nope"], r"unknown backend 'nope'"),
        (["--device", "meta"], r"--device meta: dive_fast trains on cpu or cuda devices"),
        (["--device", "mps"], r"--device mps: dive_fast trains on cpu or cuda devices"),
        (["--out", ""], r"--out is empty"),
        (["--out", str(metrics_dir)], r"metrics.jsonl is a folder"),
        (["--out", str(ckpt_file)], r"checkpoints is a file"),
        (["--reference-csv", str(missing_csv), "--use-world", "target,eval"],
         r"--reference-csv: none of the first 4 images reads"),
        (["--rsa-csv", str(two_rows), "--use-world", "target,reference,eval"],
         r"--rsa-csv: .* has 2 pair\(s\) with a caption; at least 3 are needed"),
        (["--reference-shards", f"{tmp_path}/empty/*.tar", "--use-world", "target,eval"],
         r"--reference-shards: every webdataset shard is empty"),
        (["--reference-shards", f"{world_refs}/shards/*.tar", "--workers", "2",
          "--use-world", "target,eval"], r"1 shard\(s\) for 1 rank\(s\) x 2 loader worker\(s\)"),
        (["--train-folder", str(one), "--use-world", "reference,eval"], r"one class \('only'\)"),
        (["--seed", str(2 ** 70)], r"--seed must be between 0 and 2\*\*32 - 1"),
        (["--warmup", "9"], r"--warmup 9 is longer than the run's 4 steps"),
        (["--lam", "1e39"], r"--lam 1e\+39 overflows float32"),
        (["--eval-per-task", "0"], r"--eval-per-task must be a finite number >= 1"),
        (["--model", "ViT-B-32", "--pretrained", "nosuchtag"],
         r"--pretrained nosuchtag: open_clip has no such tag for ViT-B-32 \(its tags: openai"),
        (["--task", f"id:a:{imgs}", "--task", f"ood:a :{imgs}"], r"two tasks are named 'a'"),
        (["--reference-shards", "http://127.0.0.1:9/{0000..0003}.tar", "--use-world",
          "target,eval"], r"--reference-shards: cannot reach http://127.0.0.1:9/0000.tar"),
    ]


def test_every_late_case_fails_before_the_model_loads(micro_cache, tmp_path, not_loaded):
    for extra, message in _bad(tmp_path):
        out = tmp_path / "out"
        argv = train_args(out, *extra)
        if "--out" in extra:  # the case's own --out
            argv = [a for i, a in enumerate(argv) if not (a == "--out" or argv[i - 1] == "--out")]
            argv += ["--out", extra[extra.index("--out") + 1]]
        with pytest.raises((ValueError, OSError), match=message):
            train.main(argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend can run here")
def test_the_backend_variable_is_named(micro_cache, tmp_path, not_loaded, monkeypatch):
    monkeypatch.setenv("DIVE_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"\$DIVE_FAST_BACKEND cuda: this DiVE backend cannot"):
        train.main(train_args(tmp_path / "out"))


def test_steps_zero_is_evaluation_only(micro_cache, tmp_path):
    report = train.main(train_args(tmp_path / "out", "--method", "flyp", "--steps", "0"))
    assert list(report) == ["zero-shot"]


# --- faults end clearly, nothing lost -------------------------------------------------------

def _limited_run(argv, limit_bytes, cwd, after_checkpoints=0):
    """``train.main(argv)`` in a child process that may write no file past ``limit_bytes``
    (RLIMIT_FSIZE: a full disk's EFBIG, without filling a disk), from the start or once
    ``after_checkpoints`` checkpoints are written (a disk that fills during the run)."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from dive_fast import train
        from dive_fast.train import loop
        save, written = loop.atomic_save, [0]

        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))

        def save_then_fill(*args):
            if written[0] == {after_checkpoints}:
                limit()
            written[0] += 1
            return save(*args)
        loop.atomic_save = save_then_fill
        if {after_checkpoints} == 0:
            limit()
        train.main({argv!r})
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(micro_cache, tmp_path):
    """The disk fills after the step-2 checkpoint: the step-4 one fails in one sentence,
    leaves no partial file, step 2 stays intact, and the run resumes once there is room."""
    out = tmp_path / "out"
    args = train_args(out, "--method", "flyp", "--steps", "4", "--checkpoint-every", "2",
                      "--keep", "3")
    proc = _limited_run(args, 64 << 10, tmp_path, after_checkpoints=1)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "DiskFull" in last, proc.stderr[-3000:]
    assert "could not write" in last and "step-00000004.pt" in last and \
        "the last good checkpoint is" in last and "step-00000002.pt" in last, last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002.pt"]
    load_checkpoint(out / "checkpoints" / "step-00000002.pt")  # intact
    train.main(args + ["--resume", "auto"])  # room again: the run resumes and ends
    assert load_checkpoint(out / "checkpoints" / "step-00000004.pt")["step"] == 4


def test_a_full_disk_during_the_cache_write_is_one_sentence(micro_cache, tmp_path):
    proc = _limited_run(train_args(tmp_path / "out", "--method", "dive", "--ref-size", "64"),
                        4096, tmp_path)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "could not write" in last and "frozen-ref-" in last, last
    assert not list((tmp_path / "out" / "cache").glob(".*.tmp"))


def test_a_killed_writes_leftovers_are_removed_at_the_next_start(micro_cache, tmp_path):
    out = tmp_path / "out"
    args = train_args(out, "--method", "flyp", "--steps", "2")
    train.main(args)
    leftover = out / "checkpoints" / ".step-00000004.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    train.main([*args, "--resume", "auto"])
    assert not leftover.exists()


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


# --- the other command lines ----------------------------------------------------------------

@pytest.mark.parametrize("case", ["file", "foreign", "huge", "disk"])
def test_world_export_writes_only_where_it_may(tmp_path, capsys, case):
    from dive_fast.world.export import main
    out = tmp_path / "w"
    args = ["--out", str(out), "--tasks", "colour", "--splits", "test", "--n", "2", "--pairs", "0"]
    if case == "file":
        out.write_text("mine")
        message = "is a file; give a folder"
    elif case == "foreign":
        (out / "reference").mkdir(parents=True)
        (out / "reference" / "captions.csv").write_text("a user's own file")
        message = "holds files that no `python -m dive_fast.world` wrote"
    elif case == "huge":
        args += ["--size", "100000"]
        message = "GiB of memory to render"
    else:
        args += ["--size", "1024", "--n", "10000000"]
        message = "GiB free"
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    if case == "foreign":
        assert (out / "reference" / "captions.csv").read_text() == "a user's own file"


def test_world_export_may_add_to_a_world_it_wrote(tmp_path):
    from dive_fast.world.export import main
    out = tmp_path / "w"
    main(["--out", str(out), "--tasks", "colour", "--splits", "test", "--n", "2", "--pairs", "0"])
    main(["--out", str(out), "--tasks", "size", "--splits", "test", "--n", "2", "--pairs", "0"])
    assert {p.name for p in (out / "tasks").iterdir()} == {"colour", "size"}


@pytest.mark.parametrize("bad,message", [
    (["--steps", "0"], "--steps must be a finite number >= 1, got 0"),
    (["--model", "ViT-B-32"], "--model ViT-B-32: pre-training on the world is meant for the tiny"),
])
def test_pretrain_refuses_what_cannot_make_sense(bad, message):
    from dive_fast.train import pretrain
    with pytest.raises(ValueError, match=message):
        pretrain.main(bad)


@pytest.mark.parametrize("k,message", [
    (0, "k must be a positive integer, got 0"), (-1, "k must be a positive integer, got -1"),
    (2.0, "k must be a positive integer, got 2.0"),
])
def test_micro_batched_backward_checks_its_arguments(k, message):
    from dive_fast import micro_batched_backward
    x = torch.randn(4, 3)
    with pytest.raises((ValueError, TypeError), match=message):
        micro_batched_backward(lambda xs: [xs[0]], [x], lambda fs: fs[0].sum(), k)


def test_micro_batched_backward_names_bad_inputs_and_encoders():
    from dive_fast import micro_batched_backward
    lin = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"inputs: an empty batch \(0 rows"):
        micro_batched_backward(lambda xs: [lin(xs[0])], [torch.randn(0, 3)], lambda fs: fs[0].sum(), 1)
    with pytest.raises(ValueError, match="inputs must be a non-empty list of tensors"):
        micro_batched_backward(lambda xs: [lin(xs[0])], [], lambda fs: fs[0].sum(), 1)
    with pytest.raises(ValueError, match=r"inputs: an empty batch \(0 rows; rows per tensor: \[4, 0\]"):
        micro_batched_backward(lambda xs: [lin(xs[0])], [torch.randn(4, 3), torch.randn(0, 3)],
                               lambda fs: fs[0].sum(), 2)
    with pytest.raises(TypeError, match=r"encode must return a list or tuple of tensors, got Tensor"):
        micro_batched_backward(lambda xs: lin(xs[0]), [torch.randn(4, 3)], lambda fs: fs.sum(), 2)


def test_evaluate_refuses_a_folder_as_its_report_file(tmp_path, not_loaded):
    from dive_fast.train import evaluate
    with pytest.raises(ValueError, match=r"--out .* is a folder; give the JSON file to write"):
        evaluate.main(["--out", str(tmp_path)])
