"""A run's --out and its checkpoints: a folder holds one run (a finished run's is refused, a
live run's is locked), resume checks every setting and the data's contents, checkpoints carry
a digest, and a full disk or a killed write loses nothing. dive-micro, a few seconds a case."""
import json
import subprocess
import sys
import time

import pytest
import torch
from helpers.full_disk import limited_run
from helpers.runs import train_args

from dive_fast import train
from dive_fast.train import build as train_build
from dive_fast.train import evaluate
from dive_fast.train.checkpoint import CorruptCheckpoint, atomic_save, load_checkpoint
from dive_fast.train.fileio import atomic_write
from dive_fast.world.export import write_task


def test_a_finished_runs_folder_is_refused_and_resume_checks_every_setting(micro_cache, tmp_path):
    out = tmp_path / "out"
    train.main(train_args(out, "--method", "flyp", "--steps", "2"))
    config = (out / "config.json").read_bytes()
    with pytest.raises(FileExistsError,
                       match=r"already holds a run .*step-00000002.pt.*--resume auto"):
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
    rows = [json.loads(text) for text in metrics.read_text().splitlines()]  # every line whole
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one(micro_cache, tmp_path):
    """The disk fills after the step-2 checkpoint: the step-4 one fails in one sentence,
    leaves no partial file, step 2 stays intact, and the run resumes once there is room."""
    out = tmp_path / "out"
    args = train_args(out, "--method", "flyp", "--steps", "4", "--checkpoint-every", "2",
                      "--keep", "3")
    proc = limited_run(args, 64 << 10, tmp_path, after_checkpoints=1)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and "DiskFull" in last, proc.stderr[-3000:]
    assert "could not write" in last and "step-00000004.pt" in last and \
        "the last good checkpoint is" in last and "step-00000002.pt" in last, last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002.pt"]
    load_checkpoint(out / "checkpoints" / "step-00000002.pt")  # intact
    train.main(args + ["--resume", "auto"])  # room again: the run resumes and ends
    assert load_checkpoint(out / "checkpoints" / "step-00000004.pt")["step"] == 4


def test_a_killed_writes_leftovers_are_removed_at_the_next_start(micro_cache, tmp_path):
    out = tmp_path / "out"
    args = train_args(out, "--method", "flyp", "--steps", "2")
    train.main(args)
    leftover = out / "checkpoints" / ".step-00000004.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    train.main([*args, "--resume", "auto"])
    assert not leftover.exists()


def test_a_resume_never_writes_into_another_finished_run(micro_cache, tmp_path):
    """--resume PATH --out DIR, DIR holding another run: refused before anything is written
    (--keep would otherwise prune that run's checkpoints); its own folder or a new one is
    fine."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    args = ("--method", "flyp", "--keep", "2")
    train.main(train_args(mine, *args))
    train.main(train_args(other, *args, "--seed", "1"))
    before = {p.relative_to(mine): p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    theirs = str(other / "checkpoints" / "step-00000002.pt")
    with pytest.raises(FileExistsError, match=r"holds another run .* --resume .*other"):
        train.main(train_args(mine, *args, "--seed", "1", "--resume", theirs))
    after = {p.relative_to(mine): p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    assert after == before
    train.main(train_args(tmp_path / "new", *args, "--seed", "1", "--resume", theirs))
    continued = json.loads((tmp_path / "new" / "config.json").read_text())
    assert continued["run_id"] == json.loads((other / "config.json").read_text())["run_id"]
    train.main(train_args(other, *args, "--seed", "1", "--resume", str(
        tmp_path / "new" / "checkpoints" / "step-00000004.pt")))  # the same run's folder


def test_out_inside_an_input_folder_is_refused(micro_cache, tmp_path, not_loaded):
    from helpers.images import image_folder
    data = image_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="--out .* inside the input folder of --train-folder"):
        train.main(train_args(data / "run", "--train-folder", str(data), "--use-world",
                              "reference,eval,rsa"))
    assert not (data / "run").exists()
