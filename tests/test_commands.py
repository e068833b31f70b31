"""The project's commands end a user error in one line naming the argument or file, exit
code 2, no traceback, before any work where the check allows (argparse's own convention)."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
OP_BENCH = str(ROOT / "benchmarks" / "bench_dive_op.py")
STEP_BENCH = str(ROOT / "benchmarks" / "bench_step.py")
MEMORY_BENCH = str(ROOT / "benchmarks" / "bench_memory.py")
TABLES = str(ROOT / "benchmarks" / "tables.py")
TRAIN = ["-m", "dive_fast.train"]
EVALUATE = ["-m", "dive_fast.train.evaluate", "--model", "dive-micro"]
PRETRAIN = ["-m", "dive_fast.train.pretrain", "--model", "dive-micro"]
NO_GPU = "cuda:99"  # no such device here, with or without a GPU


def bad_files(tmp: Path) -> dict:
    """The files the cases name: checkpoints that are not this model's or do not read, a
    file where a folder belongs, a template that reaches into the class name."""
    good = tmp / "good.pt"
    torch.save({"state_dict": {"w": torch.ones(64)}}, good)
    data = good.read_bytes()
    files = {"other-model": good, "truncated": tmp / "truncated.pt", "empty": tmp / "empty.pt",
             "text": tmp / "text.pt", "code": tmp / "code.pt", "file": tmp / "file",
             "templates": tmp / "templates.txt", "folder": tmp}
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("not a checkpoint\n")
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, files["code"])
    files["file"].write_text("a file\n")
    files["templates"].write_text("a photo of a {.upper}.\n")
    return {k: str(v) for k, v in files.items()}


CASES = {  # id: (argv with {file} names, what the last line says)
    "train-wise-ft": (TRAIN + ["--wise-ft", "1.5,-0.5"], "--wise-ft must be"),
    "train-model": (TRAIN + ["--model", "ViT-Nope"], "--model ViT-Nope: unknown"),
    "train-device": (TRAIN + ["--device", NO_GPU], f"--device {NO_GPU}"),
    "train-templates": (TRAIN + ["--templates", "{templates}"], "{.upper}"),
    "train-non-utf8-name": (TRAIN + ["--train-folder", "{folder}/\udcff", "--out", "{folder}/o"],
                            "image folder not found"),
    "evaluate-other-model": (EVALUATE + ["--pretrained", "", "--checkpoint", "{other-model}"],
                             "does not fit this model"),
    "evaluate-truncated": (EVALUATE + ["--checkpoint", "{truncated}"], "truncated.pt is corrupt"),
    "evaluate-empty": (EVALUATE + ["--checkpoint", "{empty}"], "empty.pt is corrupt"),
    "evaluate-not-torch": (EVALUATE + ["--checkpoint", "{text}"], "text.pt is corrupt"),
    "evaluate-needs-code": (EVALUATE + ["--checkpoint", "{code}"], "need code to load"),
    "evaluate-model": (["-m", "dive_fast.train.evaluate", "--model", "ViT-Nope"],
                       "--model ViT-Nope: unknown"),
    "evaluate-pretrained": (EVALUATE + ["--pretrained", "{folder}/none.pt"],
                            "--pretrained: checkpoint not found"),
    "evaluate-out-under-a-file": (EVALUATE + ["--out", "{file}/report.json"], "--out"),
    "evaluate-rsa-alone": (EVALUATE + ["--rsa-csv", "{file}"], "give the fine-tuned --checkpoint"),
    "evaluate-templates": (EVALUATE + ["--templates", "{templates}"], "{.upper}"),
    "evaluate-download": (["-m", "dive_fast.train.evaluate", "--model", "RN50", "--pretrained",
                           "openai"], "downloading RN50's weights failed"),
    "pretrain-steps": (PRETRAIN + ["--steps", "0"], "--steps must be"),
    "pretrain-out-folder": (PRETRAIN + ["--out", "{folder}"], "is a folder"),
    "pretrain-model": (["-m", "dive_fast.train.pretrain", "--model", "ViT-Nope"], "ViT-Nope"),
    "pretrain-device": (PRETRAIN + ["--device", NO_GPU], f"--device {NO_GPU}"),
    "world-seed": (["-m", "dive_fast.world", "--out", "{folder}/w", "--seed", "-1"],
                   "--seed must be"),
    "info": (["-m", "dive_fast.info", "--foo"], "unrecognized arguments: --foo"),
    "op-impls": ([OP_BENCH, "--impls", "nonsense"], "--impls: unknown nonsense"),
    "op-dtypes": ([OP_BENCH, "--dtypes", "float8"], "--dtypes: float8"),
    "op-batches": ([OP_BENCH, "--batches", "0"], "--batches must be positive"),
    "op-repeats": ([OP_BENCH, "--repeats", "-3"], "--repeats must be positive"),
    "op-device": ([OP_BENCH, "--device", NO_GPU], "--device"),
    "step-batch": ([STEP_BENCH, "--batch", "0"], "--batch must be"),
    "step-model": ([STEP_BENCH, "--model", "ViT-Nope"], "--model ViT-Nope: unknown"),
    "step-device": ([STEP_BENCH, "--device", NO_GPU], f"--device {NO_GPU}"),
    "memory-steps": ([MEMORY_BENCH, "--steps", "0"], "--steps must be"),
    "memory-out-folder": ([MEMORY_BENCH, "--out", "{folder}"], "is a folder"),
    "tables-missing": ([TABLES, "{folder}/none.csv"], "none.csv: no such result CSV"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_argument_is_one_line_and_exit_2(case, tmp_path):
    argv, named = CASES[case]
    files = bad_files(tmp_path)
    argv = [_fill(a, files) for a in argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "DIVE_FAST_CACHE": str(tmp_path / "cache"),  # offline, nothing cached
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path, errors="backslashreplace")
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    assert proc.returncode == 2 and named in last and "Traceback" not in proc.stderr, \
        proc.stderr[-2000:]


def _fill(arg: str, files: dict) -> str:
    """``arg`` with each {name} of ``bad_files`` replaced by its path."""
    for name, path in files.items():
        arg = arg.replace("{" + name + "}", path)
    return arg
