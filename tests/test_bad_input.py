"""Bad input and faults (issue 12), as an adversarial new user meets them: each fails early
with a message naming the argument, never hangs, never drops data silently, and never
lets two runs or a stale cache corrupt a result. dive-micro, a few seconds a case."""
import json
import logging
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

from conftest import train_args
from dive_fast import train
from dive_fast.train import evaluate, validate
from dive_fast.train import build as train_build
from dive_fast.train.checkpoint import CorruptCheckpoint, atomic_save, load_checkpoint
from dive_fast.train.fileio import atomic_write, atomic_write_json
from dive_fast.world.export import write_captions


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


def image_folder(root, classes=("cat", "dog"), n=3, broken=False):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = root / c / f"{i}.png"
            if broken:
                path.write_bytes(b"not an image")
            else:
                Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(path)
    return root


@pytest.fixture(autouse=True)
def fresh_warning_count(monkeypatch):
    """Unreadable-sample warnings are rate-limited per process: count from zero here."""
    from dive_fast.train import data
    monkeypatch.setattr(data, "_warned", [0])


@pytest.fixture
def not_loaded(monkeypatch):
    """Model loading fails the test: what is checked must be checked before it."""
    def too_late(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(train_build, "load_clip", too_late)
    monkeypatch.setattr(evaluate, "load_clip", too_late)


# --- 1. unreadable data ends the run, quickly, with few log lines ------------------------

def test_all_unreadable_training_folder_stops_with_the_paths(micro_cache, tmp_path, caplog):
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
def test_all_unreadable_reference_pairs_stop(micro_cache, tmp_path, source, caplog):
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


# --- 2, 3. task names ---------------------------------------------------------------------

def test_duplicate_and_empty_task_names_are_refused(tmp_path, not_loaded):
    folder = image_folder(tmp_path / "t")
    twice = ["--task", f"id:a:{folder}", "--task", f"ood:a:{folder}"]
    with pytest.raises(ValueError, match="two tasks are named 'a'"):
        train.main(train_args(tmp_path / "out", *twice))
    with pytest.raises(ValueError, match="two tasks are named 'a'"):
        evaluate.main(twice)
    with pytest.raises(ValueError, match="NAME is empty"):
        train.main(train_args(tmp_path / "out", "--task", f"id::{folder}"))
    with pytest.raises(ValueError, match="KIND must be one of"):
        evaluate.main(["--task", f"test:a:{folder}"])
    with pytest.raises(FileNotFoundError, match="--task 'id:a:.*image folder not found"):
        train.main(train_args(tmp_path / "out", "--task", f"id:a:{tmp_path / 'none'}"))


def test_format_table_takes_any_task_name():
    row = {"id": {"": 0.5}, "ood": {}, "ood_mean": None, "zeroshot": {}, "zeroshot_mean": None}
    assert "| 50.0 |" in evaluate.format_table({"m": row})


# --- 4, 5. arguments parsed and prompts checked before training -----------------------------

def test_wise_ft_is_parsed_before_anything_runs(tmp_path, not_loaded):
    with pytest.raises(ValueError, match="--wise-ft wants comma-separated numbers, got 'abc'"):
        train.main(train_args(tmp_path, "--wise-ft", "abc"))
    with pytest.raises(ValueError, match="--wise-ft must be a finite number, got nan"):
        train.main(train_args(tmp_path, "--wise-ft", "0.5,nan"))
    assert not (tmp_path / "config.json").exists()


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


# --- 6. content-keyed caches --------------------------------------------------------------

def test_frozen_cache_is_rebuilt_when_the_reference_or_the_weights_change(micro_cache, tmp_path):
    from dive_fast.train.models import load_clip, tiny_checkpoint
    from safetensors.torch import save_file
    csv = write_captions(tmp_path / "ref", "reference", 24, 0, 16, 100, formats=("csv",)) / "captions.csv"
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
    train.main(args + ["--resume", "auto"])
    assert len(caches()) == 2
    # An image of the reference set regenerated in place: other data, so the run cannot
    # resume (test_faults), and a new run's cache has another key.
    first = csv.parent / "images" / "0000000.jpg"
    first.write_bytes((csv.parent / "images" / "0000005.jpg").read_bytes())
    with pytest.raises(ValueError, match="the reference data differ"):
        train.main(args + ["--resume", "auto"])
    again = [a if a != str(tmp_path / "out") else str(tmp_path / "again") for a in args]
    train.main(again)
    rebuilt = sorted((tmp_path / "again" / "cache").glob("frozen-ref-*.npy"))
    assert len(rebuilt) == 1 and rebuilt[0].name not in {p.name for p in caches()}


def test_cached_tiny_model_is_checked_against_its_digest(tmp_path, monkeypatch):
    from dive_fast.train import pretrain as pretrain_mod
    from dive_fast.train.models import CACHE_ENV, find_pretrained, tiny_checkpoint, tiny_intact
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = tiny_checkpoint("dive-micro")
    pretrain_mod.pretrain("dive-micro", steps=2, batch_size=8, workers=0, progress=False,
                          eval_per_task=0, out=path)
    assert tiny_intact(path)
    blob = bytearray(path.read_bytes())
    blob[-300:-50] = bytes(250)
    path.write_bytes(bytes(blob))
    assert not tiny_intact(path)
    with pytest.raises(RuntimeError, match="does not match the digest"):
        find_pretrained("dive-micro", None)
    calls = []
    monkeypatch.setattr(pretrain_mod, "pretrain", lambda **kw: calls.append(kw) or kw["out"])
    pretrain_mod.ensure_pretrained_tiny("dive-micro")
    assert len(calls) == 1  # pre-trained again, not reused


# --- 7, 8. a run owns its --out -----------------------------------------------------------

def test_a_finished_runs_folder_is_refused_and_resume_checks_every_setting(micro_cache, tmp_path):
    out = tmp_path / "out"
    train.main(train_args(out, "--method", "flyp", "--steps", "2"))
    config = (out / "config.json").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds a run .*step-00000002.pt.*--resume auto"):
        train.main(train_args(out, "--method", "flyp", "--steps", "2"))
    assert (out / "config.json").read_bytes() == config
    assert [p.name for p in sorted((out / "checkpoints").glob("*.pt"))] == ["step-00000002.pt"]
    for changed, key in ((["--lr", "5e-4"], "lr"), (["--warmup", "0"], "warmup"),
                         (["--grad-clip", "1"], "grad_clip"), (["--lam", "10"], "lam"),
                         (["--train-size", "16"], "train_size")):
        with pytest.raises(ValueError, match=f"cannot resume .* {key}="):
            train.main(train_args(out, "--method", "flyp", "--steps", "2", *changed,
                                  "--resume", "auto"))


def test_a_second_run_on_one_out_refuses_at_once_naming_the_holder(micro_cache, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dive_fast.train import runlock\n"
         f"with runlock.hold({str(out)!r}):\n print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match=f"in use by another run \\(pid {holder.pid} on "):
            train.main(train_args(out, "--method", "flyp", "--steps", "2"))
        assert time.perf_counter() - start < 5
        assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    train.main(train_args(out, "--method", "flyp", "--steps", "2"))  # the lock died with it
    assert (out / ".lock").read_text() == ""  # released at the end of the run


def test_the_lock_is_released_when_a_run_fails(micro_cache, tmp_path, monkeypatch):
    from dive_fast.train import methods
    monkeypatch.setattr(methods.FLYP, "forward", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train.main(train_args(tmp_path, "--method", "flyp", "--steps", "2"))
    monkeypatch.undo()
    train.main(train_args(tmp_path, "--method", "flyp", "--steps", "2", "--resume", "auto"))


def test_temporary_files_are_unique_per_writer(tmp_path):
    target = tmp_path / "x.pt"

    def outer(f):  # a second writer of the same file while the first is writing
        atomic_write(target, lambda g: g.write(b"inner"))
        f.write(b"outer")
    atomic_write(target, outer)
    assert target.read_bytes() == b"outer" and not list(tmp_path.glob(".*.tmp"))


# --- 10. checkpoints carry a digest -------------------------------------------------------

def corrupt_inside_a_tensor(path, tensor):
    """Overwrites 250 bytes inside ``tensor``'s stored bytes (no zip header touched)."""
    blob = bytearray(path.read_bytes())
    data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    at = blob.find(data[:64])
    assert at > 0 and len(data) > 300
    blob[at + 20:at + 270] = bytes(250)
    path.write_bytes(bytes(blob))


def test_a_checkpoint_damaged_inside_a_tensor_is_refused(micro_cache, tmp_path):
    out = tmp_path / "out"
    args = train_args(out, "--method", "flyp", "--keep", "5")
    train.main(args)
    ckpts = sorted((out / "checkpoints").glob("step-*.pt"))
    state = load_checkpoint(ckpts[-1])["state_dict"]
    name = max(state, key=lambda k: state[k].numel())
    corrupt_inside_a_tensor(ckpts[-1], state[name])
    torch.load(ckpts[-1], weights_only=True)  # torch itself reads it without complaint
    expected = r"step-00000004.pt is corrupt.*intact checkpoint beside it is .*step-00000002.pt"
    with pytest.raises(CorruptCheckpoint, match=expected):
        train.main(args + ["--resume", "auto"])
    with pytest.raises(CorruptCheckpoint, match=expected):
        evaluate.main(["--model", "dive-micro", "--checkpoint", str(ckpts[-1]),
                       "--n-per-task", "2"])
    train.main(args + ["--resume", str(ckpts[0])])  # the suggested one resumes


def test_checkpoints_without_a_digest_still_load(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)  # e.g. written by another tool
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    atomic_save({"w": torch.ones(2), "step": 1}, path)
    assert set(load_checkpoint(path)) == {"w", "step"}


# --- poor: misleading messages, silently accepted values, late failures -------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_named(tmp_path, not_loaded):
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        train.main(train_args(tmp_path, "--device", "cuda"))
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        evaluate.main(["--device", "cuda"])


def test_another_models_weights_are_named(tmp_path):
    from dive_fast.train.models import load_clip
    from safetensors.torch import save_file
    other = load_clip("dive-tiny").model.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, tmp_path / "tiny.safetensors")
    with pytest.raises(RuntimeError, match="into 'dive-micro': they do not fit this model"):
        load_clip("dive-micro", str(tmp_path / "tiny.safetensors"))


def test_a_latin1_csv_is_named(tmp_path, not_loaded):
    bad = tmp_path / "captions.csv"
    bad.write_bytes("filepath\ttitle\nimages/0000000.jpg\tun caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="--reference-csv: caption CSV .* is not UTF-8"):
        train.main(train_args(tmp_path / "out", "--reference-csv", str(bad)))
    folder = image_folder(tmp_path / "t")
    (folder / "classnames.txt").write_bytes("caf\xe9\nth\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="classnames.txt is not UTF-8"):
        train.main(train_args(tmp_path / "out", "--train-folder", str(folder)))


@pytest.mark.parametrize("bad, message", [
    (["--checkpoint-every", "0"], "--checkpoint-every must be a finite number >= 1, got 0"),
    (["--steps", "-5"], "--steps must be a finite number >= 0, got -5"),
    (["--ref-batch-size", "0"], "--ref-batch-size must be .* >= 1, got 0"),
    (["--lam", "-1"], "--lam must be a finite number >= 0, got -1"),
    (["--lam", "nan"], "--lam must be a finite number >= 0, got nan"),
    (["--momentum", "1.5"], "--momentum must be .* <= 1, got 1.5"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lp-steps", "9"], "--lp-steps must be .* <= 4, got 9"),
    (["--keep", "0"], "--keep must be .* >= 1, got 0"),
    (["--device", "gpu"], "--device wants a torch device"),
])
def test_invalid_values_are_refused_before_any_work(tmp_path, not_loaded, bad, message):
    with pytest.raises(ValueError, match=message):
        train.main(train_args(tmp_path, *bad))


@pytest.mark.parametrize("bad, message", [
    (["--pairs", "-3"], "--pairs must be at least 0, got -3"),
    (["--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    (["--formats", "nope"], "--formats wants a comma-separated subset of csv,wds, got 'nope'"),
    (["--tasks", "shapes,nope"], "unknown task 'nope'"),
])
def test_world_export_refuses_invalid_values(tmp_path, capsys, bad, message):
    from dive_fast.world.export import main
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path / "w"), "--n", "1", *bad])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()  # nothing written before the check


def test_wrong_resume_path_and_mismatched_resume_fail_before_loading(micro_cache, tmp_path,
                                                                     monkeypatch):
    train.main(train_args(tmp_path / "a", "--method", "flyp", "--steps", "2"))
    monkeypatch.setattr(train_build, "load_clip",
                        lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(FileNotFoundError, match="--resume: checkpoint not found"):
        train.main(train_args(tmp_path / "b", "--resume", str(tmp_path / "none.pt")))
    with pytest.raises(ValueError, match="cannot resume .* lr="):
        train.main(train_args(tmp_path / "a", "--method", "flyp", "--steps", "2", "--lr", "1",
                              "--resume", "auto"))


def test_unwritable_cache_and_out_fail_before_pretraining(tmp_path, monkeypatch):
    from dive_fast.train import pretrain
    from dive_fast.train.models import CACHE_ENV
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "file" / "cache"))  # cannot be a folder
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("pre-trained first"))
    with pytest.raises(PermissionError, match=r"the model cache \(\$DIVE_FAST_CACHE.*cannot write"):
        train.main(train_args(tmp_path / "out"))
    with pytest.raises(ValueError, match="--out .*file is a file, not a folder"):
        train.main(train_args(tmp_path / "file"))


def test_nan_in_a_report_is_written_as_null_with_the_reason(micro_cache, tmp_path):
    """A task whose images all fail to read is refused before the run (test_faults); one
    whose images break during the run is null in the report, with the reason."""
    from dive_fast.train.evaluate import evaluate as evaluate_sets
    from dive_fast.train.models import load_clip
    broken = image_folder(tmp_path / "broken", broken=True)
    bundle = load_clip("dive-micro")
    sets = evaluate.folder_eval_sets(validate.eval_folders([f"id:broken:{broken}"],
                                                           check_folders=False),
                                     bundle.preprocess_val)
    report = evaluate_sets(bundle.model, bundle.tokenizer, sets, progress=False)
    atomic_write_json(tmp_path / "report.json", {"zero-shot": report})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert report["zero-shot"]["id"]["broken"] is None
    assert report["zero-shot"]["notes"]["broken"] == "no readable image (6 unreadable)"
    atomic_write_json(tmp_path / "r.json", {"a": {"rsa": float("nan")}, "b": [1.0, float("inf")]})
    strict = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert strict == {"a": {"rsa": None}, "b": [1.0, None],
                      "non_finite": ["a.rsa: nan", "b[1]: inf"]}


# --- metrics.jsonl and plots --------------------------------------------------------------

def test_a_resumed_run_logs_each_step_once_and_a_cut_line_breaks_nothing(micro_cache, tmp_path,
                                                                          monkeypatch):
    from dive_fast.train import methods, metrics_log
    args = train_args(tmp_path, "--method", "flyp", "--steps", "6", "--checkpoint-every", "3")
    original = methods.FLYP.forward

    def killed_at_step_5(self, batch, step):
        if step == 4:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch, step)
    monkeypatch.setattr(methods.FLYP, "forward", killed_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.undo()
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 1.2')  # a line cut short by the kill
    metrics_log.plot_curves(metrics, tmp_path / "curves.png")  # no exception
    assert (tmp_path / "curves.png").is_file()
    train.main(args + ["--resume", "auto"])
    rows = [json.loads(l) for l in metrics.read_text().splitlines()]  # every line whole
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_a_plot_failure_never_fails_a_finished_run(micro_cache, tmp_path, monkeypatch, caplog):
    from dive_fast.train import metrics_log
    monkeypatch.setattr(metrics_log, "_plot", lambda *a: 1 / 0)
    report = train.main(train_args(tmp_path, "--method", "flyp", "--steps", "2"))
    assert "flyp" in report and (tmp_path / "report.json").is_file()
    assert any("could not plot" in r.getMessage() for r in caplog.records)


def test_evaluate_checks_its_arguments_first(tmp_path, not_loaded):
    with pytest.raises(FileNotFoundError, match="--checkpoint: checkpoint not found"):
        evaluate.main(["--checkpoint", str(tmp_path / "none.pt")])
    with pytest.raises(ValueError, match="--n-per-task must be .* >= 1, got 0"):
        evaluate.main(["--n-per-task", "0"])
