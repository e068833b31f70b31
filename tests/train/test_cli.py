"""The command line as open_clip users type it, and the data it is allowed to use; every
argument checked, with a message naming it, before a model loads or anything is written."""
import json
from pathlib import Path

import pytest
import torch
from helpers.images import image_folder
from helpers.kill import run_killed_at_step
from helpers.runs import train_args

from dive_fast import train
from dive_fast.train import cli, evaluate, open_clip_flags
from dive_fast.train.checkpoint import load_checkpoint
from dive_fast.world.export import write_captions


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_epochs_set_the_steps_from_the_target_set(micro_cache, tmp_path):
    """One epoch: the 32 world samples in batches of 8, so 4 steps; 2.5 epochs round to 10."""
    args = train_args(tmp_path / "a", "--method", "flyp")
    args[args.index("--steps"):args.index("--steps") + 2] = ["--epochs", "1"]
    train.main(args)
    assert [r["step"] for r in _rows(tmp_path / "a") if "loss" in r] == [1, 2, 3, 4]
    parsed = cli.parse(["--epochs", "2.5", "--batch-size", "8", "--train-size", "32",
                        "--out", str(tmp_path / "b")])
    cli.check_args(parsed)
    assert parsed.steps == 10
    with pytest.raises(ValueError, match=r"give one of --steps \(3\) and --epochs \(1\)"):
        cli.check_args(cli.parse(["--steps", "3", "--epochs", "1", "--out", str(tmp_path / "c")]))


@pytest.mark.parametrize("precision", ["amp_bf16", "amp", "fp32"])
def test_precision_as_open_clip_names_it(micro_cache, tmp_path, precision):
    """amp_bf16 and amp (fp16, with loss scaling) autocast the towers; fp32 does not. The run
    trains (finite losses) and an fp16 run checkpoints its loss scale for a resume."""
    out = tmp_path / precision
    train.main(train_args(out, "--method", "dive", "--precision", precision))
    rows = [r for r in _rows(out) if "loss" in r]
    assert len(rows) == 4 and all(r["loss"] == r["loss"] for r in rows)
    final = load_checkpoint(sorted((out / "checkpoints").glob("step-*.pt"))[-1])
    assert final["precision"] == precision
    fp32 = tmp_path / "reference-fp32"
    if not fp32.exists():
        train.main(train_args(fp32, "--method", "dive", "--precision", "fp32"))
    first = [r for r in _rows(fp32) if "loss" in r][0]["clip"]
    # Autocast changes the first step's loss (the same weights and batch); fp32 does not.
    assert (rows[0]["clip"] == first) == (precision == "fp32"), (rows[0]["clip"], first)
    assert ("scaler" in final) == (precision == "amp")
    if precision == "amp":
        assert all(r["loss_scale"] > 0 for r in rows)


@pytest.mark.parametrize("precision, instead", [("bf16", "use amp_bf16"),
                                               ("pure_bf16", "use amp_bf16"),
                                               ("fp16", "use amp "), ("pure_fp16", "use amp ")])
def test_open_clips_weight_casting_precisions_are_refused_by_name(capsys, precision, instead):
    """open_clip's bf16 / fp16 cast the weights; here autocast (amp_bf16, amp) is offered."""
    with pytest.raises(SystemExit) as exit_:
        cli.parse(["--precision", precision])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --precision: {precision} is open_clip" in err
    assert instead in err


def test_the_old_amp_flag_is_an_alias():
    assert cli.parse(["--amp", "bf16"]).precision == "amp_bf16"
    assert cli.parse(["--amp", "fp32"]).precision == "fp32"


def test_open_clip_spellings_reach_the_same_settings():
    parsed = cli.parse(["--grad-clip-norm", "1.0", "--torchcompile", "--resume", "latest",
                        "--log-every-n-steps", "3", "--ema-momentum", "0.9"])
    assert (parsed.grad_clip, parsed.compile, parsed.log_every, parsed.ema_momentum) == \
        (1.0, True, 3, 0.9)


def test_momentum_is_not_the_ema_momentum(capsys):
    """open_clip's --momentum is an optimiser's: refused, naming DiVE's --ema-momentum."""
    with pytest.raises(SystemExit) as exit_:
        cli.parse(["--momentum", "0.5"])
    assert exit_.value.code == 2
    assert "argument --momentum: open_clip_train's --momentum is not offered here" in \
        capsys.readouterr().err
    assert "--ema-momentum" in open_clip_flags.refusal("--momentum")


def test_resume_latest_with_clipping_ends_where_an_unbroken_run_ends(micro_cache, tmp_path,
                                                                    monkeypatch):
    """Killed after its step-2 checkpoint and resumed with --resume latest, a clipped run ends
    where an unbroken one ends."""
    from dive_fast.train import methods
    args = ["--method", "flyp", "--grad-clip-norm", "0.5", "--keep", "5"]
    train.main(train_args(tmp_path / "whole", *args))
    run_killed_at_step(monkeypatch, methods.FLYP, 3, train_args(tmp_path / "broken", *args))
    train.main(train_args(tmp_path / "broken", *args, "--resume", "latest"))
    whole, resumed = (load_checkpoint(tmp_path / run / "checkpoints" / "step-00000004.pt")
                      for run in ("whole", "broken"))
    assert whole["grad_clip"] == 0.5
    assert any(r["grad_norm"] > 0.5 for r in _rows(tmp_path / "whole"))  # clipping acted
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=1e-5, atol=1e-6)


def test_torchcompile_trains_with_the_eager_losses(micro_cache, tmp_path):
    """--torchcompile: the first step's losses (the same weights and batch) equal eager's."""
    train.main(train_args(tmp_path / "eager", "--method", "dive", "--steps", "2"))
    train.main(train_args(tmp_path / "compiled", "--method", "dive", "--steps", "2",
                          "--torchcompile"))
    eager, compiled = (_rows(tmp_path / run)[0] for run in ("eager", "compiled"))
    for key in ("loss", "clip", "dive"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-5, abs=1e-6), key


def comma_csv(tmp_path, n: int = 24) -> Path:
    """World pairs as a comma-separated CSV with columns image, caption (absolute paths)."""
    from dive_fast.world.export import write_captions
    root = write_captions(tmp_path / "w", "reference", n, 0, 16, 100, formats=("csv",))
    rows = (root / "captions.csv").read_text().splitlines()[1:]
    with open(tmp_path / "pairs.csv", "w") as f:
        f.write("image,caption\n")
        for row in rows:
            path, caption = row.split("\t")
            f.write(f"{root / path},\"{caption}\"\n")
    return tmp_path / "pairs.csv"


def test_csv_keys_and_separator(micro_cache, tmp_path):
    """A comma-separated CSV with its own column names, read through the three flags; paths
    are read as written when they exist (here: absolute)."""
    comma_csv(tmp_path)
    out = tmp_path / "out"
    train.main(train_args(out, "--method", "dive", "--reference-csv", str(tmp_path / "pairs.csv"),
                          "--csv-separator", ",", "--csv-img-key", "image",
                          "--csv-caption-key", "caption", "--use-world", "target,eval,rsa"))
    assert "reference " + str(tmp_path / "pairs.csv") in (out / "table.md").read_text()
    with pytest.raises(ValueError,
                       match=r"--reference-csv: .*lacks column\(s\) \['filepath', 'title'\]"):
        train.main(train_args(tmp_path / "x", "--reference-csv", str(tmp_path / "pairs.csv"),
                              "--use-world", "target,eval"))


def test_evaluate_reads_rsa_csvs_as_train_does(micro_cache, tmp_path, monkeypatch):
    """evaluate takes the same --csv-* flags, and checks the CSV before a model loads."""
    from dive_fast.train.checkpoint import atomic_save
    from dive_fast.train.models import load_clip, tiny_checkpoint
    pairs, read = comma_csv(tmp_path, n=8), []
    start = load_clip("dive-micro", str(tiny_checkpoint("dive-micro"))).model.state_dict()
    ckpt = str(atomic_save({"state_dict": start}, tmp_path / "c.pt"))
    heldout_pairs = evaluate.heldout_pairs
    monkeypatch.setattr(evaluate, "heldout_pairs",
                        lambda *a, **k: read.append(heldout_pairs(*a, **k)) or read[-1])
    evaluate.main(["--model", "dive-micro", "--n-per-task", "2", "--rsa-csv", str(pairs),
                   "--checkpoint", ckpt,
                   "--rsa-size", "6", "--csv-separator", ",", "--csv-img-key", "image",
                   "--csv-caption-key", "caption"])
    assert len(read[0]) == 6 and all(isinstance(caption, str) for _, caption in read[0])

    def too_late(*a, **k):
        raise AssertionError("the model was loaded before the bad CSV was found")
    monkeypatch.setattr(evaluate, "load_clip", too_late)
    with pytest.raises(ValueError, match=r"--rsa-csv: .*lacks column\(s\) \['filepath', 'title'\]"):
        evaluate.main(["--rsa-csv", str(pairs), "--checkpoint", ckpt])
    with pytest.raises(FileNotFoundError, match="--rsa-csv"):
        evaluate.main(["--rsa-csv", str(tmp_path / "none.csv"), "--checkpoint", ckpt])
    with pytest.raises(ValueError, match="--rsa-csv/--rsa-shards: .* give the fine-tuned "
                                         "--checkpoint"):
        evaluate.main(["--rsa-csv", str(pairs)])


def test_report_to_tensorboard_writes_event_files(micro_cache, tmp_path):
    pytest.importorskip("tensorboard", reason="--report-to tensorboard needs the package")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    train.main(train_args(out, "--method", "flyp", "--report-to", "tensorboard",
                          "--eval-every", "2"))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "eval/id_mean" in tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/id_mean")] == [2]  # step 4's is the report's


def test_eval_every_logs_evaluation_rows(micro_cache, tmp_path):
    out = tmp_path / "e"
    train.main(train_args(out, "--method", "ft", "--eval-every", "1"))
    evals = [r for r in _rows(out) if "eval/id_mean" in r]
    assert [r["step"] for r in evals] == [1, 2, 3]
    assert all(0 <= r["eval/shapes"] <= 1 for r in evals)


def test_real_data_never_falls_back_to_the_world(micro_cache, tmp_path):
    """A run that names one data set of its own must name the others it needs, or ask for
    the world's by name (--use-world); the table says where each set came from."""
    from dive_fast.world.export import write_task
    folder = write_task(tmp_path / "w", "shapes", "train", 40, 0, 16)
    with pytest.raises(ValueError, match=r"--method dive needs reference data: give "
                                         r"--reference-csv or --reference-shards"):
        train.main(train_args(tmp_path / "a", "--train-folder", str(folder)))
    with pytest.raises(ValueError, match=r"--method flyp needs eval data: give --task"):
        train.main(train_args(tmp_path / "a", "--method", "flyp", "--train-folder", str(folder)))
    with pytest.raises(ValueError, match=r"--method flyp needs target data: give --train-folder"):
        train.main(train_args(tmp_path / "a", "--method", "flyp", "--task", f"id:shapes:{folder}"))
    with pytest.raises(ValueError, match=r"--use-world: unknown part\(s\) \['refs'\]"):
        train.main(train_args(tmp_path / "a", "--use-world", "refs"))
    out = tmp_path / "b"
    train.main(train_args(out, "--method", "dive", "--train-folder", str(folder),
                          "--use-world", "reference,eval"))
    table = (out / "table.md").read_text()
    assert f"target {folder}; reference world; eval world; rsa none" in table
    assert "RSA: no held-out pairs" in table


def test_the_miniature_uses_the_world_for_everything(tmp_path):
    parsed = cli.parse(["--out", str(tmp_path)])
    cli.resolve_world_parts(parsed)
    assert parsed.world_parts == ["eval", "reference", "rsa", "target"]


def test_fp16_loss_scaling_skips_an_overflowing_step_without_stopping(micro_cache, tmp_path,
                                                                      monkeypatch):
    """Under --precision amp an overflow in the scaled gradients is routine: the step is
    skipped and the scale halves, and --on-nonfinite stop (the default) does not end the run."""
    scales, init, update = [], torch.amp.GradScaler.__init__, torch.amp.GradScaler.update

    def huge_initial_scale(self, device="cuda", **kwargs):
        init(self, device, init_scale=2.0 ** 126)  # scaled fp16 gradients overflow at once

    def recorded_update(self, *args, **kwargs):
        scales.append(float(self.get_scale()))
        return update(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", huge_initial_scale)
    monkeypatch.setattr(torch.amp.GradScaler, "update", recorded_update)
    out = tmp_path / "s"
    train.main(train_args(out, "--method", "flyp", "--precision", "amp"))
    assert scales[:2] == [2.0 ** 126, 2.0 ** 125] and len(scales) == 4
    assert [r["skipped_steps"] for r in _rows(out) if "loss" in r] == [0, 0, 0, 0]


def test_run_errors_are_one_line_from_the_command(micro_cache, tmp_path):
    """A resume that cannot be (another lr) ends `python -m dive_fast.train` with one line."""
    import subprocess
    import sys
    args = train_args(tmp_path / "out", "--method", "flyp", "--steps", "2")
    train.main(args)
    proc = subprocess.run([sys.executable, "-m", "dive_fast.train", *args, "--lr", "0.5",
                           "--resume", "latest"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "python -m dive_fast.train: error: cannot resume from ")
    again = subprocess.run([sys.executable, "-m", "dive_fast.train", *args],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a run" in again.stderr.splitlines()[-1]


def test_progress_bars_redraw_rarely_into_a_log_file():
    """Written to a file (a log, CI's pipe), a bar redraws at most every half minute, so
    a run's log keeps a few lines where tqdm's pace (10 a second) piles up hundreds of KB;
    the same loop through plain tqdm shows that the check can tell them apart."""
    import io
    import time

    from tqdm import tqdm

    from dive_fast._cli.progress import progress_bar

    def redraws(make_bar):
        log = io.StringIO()
        bar = make_bar(range(30), file=log, desc="train")
        for i in bar:
            time.sleep(0.01)
            bar.set_postfix(loss=i, refresh=False)
        bar.close()
        return log.getvalue().count("\r")

    assert redraws(progress_bar) <= 2  # the first draw and the last
    assert redraws(tqdm) > 2


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


def test_wise_ft_is_parsed_before_anything_runs(tmp_path, not_loaded):
    with pytest.raises(ValueError, match=r"--wise-ft wants comma-separated numbers .* or "
                                         r"START:STOP:STEP .*, got 'abc'"):
        train.main(train_args(tmp_path, "--wise-ft", "abc"))
    with pytest.raises(ValueError, match="--wise-ft must be a finite number >= 0 and <= 1, "
                                         "got nan"):
        train.main(train_args(tmp_path, "--wise-ft", "0.5,nan"))
    with pytest.raises(ValueError, match="--wise-ft must be .* <= 1, got 1.5"):
        train.main(train_args(tmp_path, "--wise-ft", "1.5,-0.5"))
    assert not (tmp_path / "config.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_named(tmp_path, not_loaded):
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        train.main(train_args(tmp_path, "--device", "cuda"))
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        evaluate.main(["--device", "cuda"])


@pytest.mark.parametrize("bad, message", [
    (["--checkpoint-every", "0"], "--checkpoint-every must be a finite number >= 1, got 0"),
    (["--steps", "-5"], "--steps must be a finite number >= 0, got -5"),
    (["--ref-batch-size", "0"], "--ref-batch-size must be .* >= 1, got 0"),
    (["--lam", "-1"], "--lam must be a finite number >= 0, got -1"),
    (["--lam", "nan"], "--lam must be a finite number >= 0, got nan"),
    (["--ema-momentum", "1.5"], "--ema-momentum must be .* <= 1, got 1.5"),
    (["--beta2", "1"], "--beta2 must be .* < 1, got 1.0"),
    (["--eps", "0"], "--eps must be a finite number > 0, got 0.0"),
    (["--force-image-size", "32", "32", "32"], "--force-image-size wants H or H W"),
    (["--lock-text-unlocked-layers", "1"], "--lock-text-unlocked-layers applies to a locked "
                                           "tower: add --lock-text"),
    (["--lock-text"], "--lock-text: dive-micro's own text tower .* add "
                      "--lock-text-freeze-layer-norm"),
    (["--siglip"], "--siglip: dive-micro has no logit bias"),
    (["--report-to", "wandb,csv"], "--report-to wandb,csv: unknown csv"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lp-steps", "9"], "--lp-steps must be .* <= 4, got 9"),
    (["--keep", "0"], "--keep must be .* >= 1, got 0"),
    (["--device", "gpu"], "--device wants a torch device"),
])
def test_invalid_values_are_refused_before_any_work(tmp_path, not_loaded, bad, message):
    with pytest.raises(ValueError, match=message):
        train.main(train_args(tmp_path, *bad))


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


def _bad(tmp_path):
    """(arguments, the message they must give) for cases checked before any model loads."""
    imgs = image_folder(tmp_path / "imgs")
    missing_csv = tmp_path / "missing.csv"
    missing_csv.write_text("filepath\ttitle\n"
                           + "".join(f"nowhere/{i}.png\tcap\n" for i in range(4)))
    two_rows = tmp_path / "two.csv"
    two_rows.write_text("filepath\ttitle\n" + "".join(
        f"{imgs / 'cat' / f'{i}.png'}\tcap {i}\n" for i in range(2)))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "0.tar").write_bytes(b"")
    one = image_folder(tmp_path / "one", classes=("only",))
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
        (["--reference-shards", f"{world_refs}/shards/*.tar", "--train-data-upsampling-factors",
          "1", "--use-world", "target,eval"],
         r"^--reference-upsampling-factors 1: .* needs --dataset-resampled \(as in open_clip"),
        (["--reference-shards", f"{world_refs}/shards/*.tar", "--dataset-resampled",
          "--reference-upsampling-factors", "1::2", "--use-world", "target,eval"],
         r"'1::2': 2 factor\(s\) for 1 '::'-separated shard source\(s\)"),
        (["--dataset-resampled", "--use-world", "target,eval"],
         r"--dataset-resampled: draws webdataset shards with replacement; give --reference-shards"),
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


def test_ctrl_c_ends_in_one_line_naming_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from dive_fast.train import cli

    def interrupted(args, *rest):
        (Path(args.out) / "checkpoints").mkdir(parents=True)
        (Path(args.out) / "checkpoints" / "step-00000002.pt").write_bytes(b"")
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "run_owned", interrupted)
    with pytest.raises(SystemExit) as ended:
        cli.cli(["--model", "dive-micro", "--pretrained", "", "--out", str(tmp_path / "out"),
                 "--steps", "4", "--no-progress"])
    said = capsys.readouterr().err.strip().splitlines()
    assert ended.value.code == 130 and len(said) == 1, said
    assert said[0].endswith(f"interrupted; the last checkpoint is {tmp_path / 'out'}/checkpoints"
                            "/step-00000002.pt (the same command with --resume auto continues)")
