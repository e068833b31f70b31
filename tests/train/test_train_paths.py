"""What a user with their own data runs: the world written to disk (image folders, an
open_clip CSV, webdataset shards, held-out pairs for RSA), trained on one process and on
two (torchrun, gloo), and two processes equal to one process on the global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.runs import train_args, two_processes

from dive_fast import train
from dive_fast.train.checkpoint import load_checkpoint

HELPER = Path(__file__).parents[1] / "helpers" / "train_runs.py"
USER_METHODS = ("dive", "flyp+replay", "ft")
DDP_METHODS = ("ft", "lp-ft", "flyp", "flyp+replay", "snd-like", "dive")
# Two processes in other layouts, on both data paths, against one process on the global batch:
# micro-batched steps (no DDP: gradients averaged once), FSDP2, and all of it combined.
LAYOUTS = {"two-accum2": ("flyp", "flyp+replay", "snd-like", "dive"),
           "two-fsdp": ("flyp", "dive", "ft"),
           "two-fsdp-accum2-ckpt": ("dive",),
           # Compiled towers under DDP and FSDP2 with FLYP: at the pre-trained weights DiVE's
           # gradient is rounding noise (u = v = 0), which Adam's first step turns into full
           # steps of either sign, so other kernels (compiled ones) make a three-step DiVE
           # comparison chaotic; DiVE compiled is compared mid-training in test_accumulate.
           "two-compile": ("flyp",), "two-fsdp-compile": ("flyp",)}
# (--accum-freq 2 with half the per-rank batch: the same step of 4 rows a rank)
LAYOUT_ARGS = {"two": [], "two-accum2": ["--batch-size", "2", "--accum-freq", "2"],
               "two-fsdp": ["--fsdp"],
               "two-fsdp-accum2-ckpt": ["--fsdp", "--batch-size", "2", "--accum-freq", "2",
                                        "--grad-checkpointing"],
               "two-compile": ["--compile"], "two-fsdp-compile": ["--fsdp", "--compile"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("user-data")
    subprocess.run([sys.executable, "-m", "dive_fast.world", "--out", str(out), "--tasks",
                    "shapes,shapes-sketch,colour", "--splits", "train,test", "--n", "48",
                    "--pairs", "48", "--shard-size", "6", "--rsa-pairs", "16"],
                   check=True, capture_output=True)
    return out


def user_args(out, world, method, refs, batch=8, steps=3):
    tasks = world / "tasks"
    args = ["--model", "dive-micro", "--method", method, "--out", str(out), "--steps", str(steps),
            "--batch-size", str(batch), "--lr", "1e-3", "--no-augment", "--workers", "0",
            "--no-progress", "--wise-ft", "", "--checkpoint-every", str(steps), "--log-every", "1",
            "--train-folder", str(tasks / "shapes" / "train"),
            "--task", f"id:shapes:{tasks / 'shapes' / 'test'}",
            "--task", f"ood:sketch:{tasks / 'shapes-sketch' / 'test'}",
            "--task", f"zeroshot:colour:{tasks / 'colour' / 'test'}"]
    ref = world / "reference"
    rsa = world / "rsa-heldout"
    if refs == "csv":
        args += ["--reference-csv", str(ref / "captions.csv"),
                 "--rsa-csv", str(rsa / "captions.csv")]
    elif refs == "shards":
        args += ["--reference-shards", str(ref / "shards" / "*.tar"),
                 "--rsa-shards", str(rsa / "shards" / "rsa-heldout-{000000..000002}.tar")]
    return args


def torchrun(runs, tmp_path):
    """Every argument list in ``runs`` through the helper, in one process group."""
    spec = tmp_path / f"runs-{len(list(tmp_path.glob('runs-*')))}.json"
    spec.write_text(json.dumps(runs))
    two_processes(str(HELPER), str(spec))


def final(out):
    return load_checkpoint(sorted((out / "checkpoints").glob("step-*.pt"))[-1])


def check_user_report(out, method):
    report = json.loads((out / "report.json").read_text())
    row = report[method]
    assert set(row["id"]) == {"shapes"} and set(row["ood"]) == {"sketch"}
    assert set(row["zeroshot"]) == {"colour"}
    assert set(row["rsa"]) == {"image", "text", "joint"}  # from the held-out pairs
    assert row["skipped_train_samples"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.parametrize("refs", ["csv", "shards"])
def test_user_data_trains_on_one_and_two_processes(micro_cache, world, tmp_path, refs):
    for method in USER_METHODS:
        train.main(user_args(tmp_path / "one" / method, world, method, refs))
        check_user_report(tmp_path / "one" / method, method)
    sharded = user_args(tmp_path / "two" / "dive-sharded", world, "dive", refs, batch=2) + \
        ["--fsdp", "--accum-freq", "2", "--grad-checkpointing"]
    torchrun([user_args(tmp_path / "two" / m, world, m, refs, batch=4) for m in USER_METHODS] +
             [sharded], tmp_path)
    for method in USER_METHODS:
        check_user_report(tmp_path / "two" / method, method)
        assert not list((tmp_path / "two" / method).glob("cache/*")) or refs == "csv"
    check_user_report(tmp_path / "two" / "dive-sharded", "dive")


def test_torchrun_runs_the_cli_on_user_data(micro_cache, world, tmp_path):
    """The README's command as a user types it: torchrun starts ``-m dive_fast.train``, which
    owns the process group (and destroys it) on a sharded run; both processes exit cleanly."""
    out = tmp_path / "cli"
    two_processes("-m", "dive_fast.train", *user_args(out, world, "dive", "csv", batch=4),
                  "--fsdp", timeout=600)
    check_user_report(out, "dive")


@pytest.fixture(scope="module")
def ddp_runs(micro_cache, world, tmp_path_factory):
    """Each method on the world and on the CSV path: one process at batch 8, and two
    processes at batch 4 each (one torchrun serves all the two-process runs)."""
    root = tmp_path_factory.mktemp("ddp")
    common = ["--eval-per-task", "4", "--ref-size", "32", "--train-size", "32"]
    runs = {}
    for data in ("world", "csv"):
        for method in DDP_METHODS:
            layouts = [n for n in LAYOUTS if method in LAYOUTS[n]]
            for n, batch in (("one", 8), ("two", 4), *((n, 4) for n in layouts)):
                out = root / data / method / n
                if data == "world":
                    args = ["--model", "dive-micro", "--method", method, "--out", str(out),
                            "--steps", "3", "--batch-size", str(batch), "--lr", "1e-3",
                            "--no-augment", "--workers", "0", "--no-progress", "--wise-ft", "",
                            "--checkpoint-every", "3", "--log-every", "1", *common]
                else:
                    args = user_args(out, world, method, "csv", batch=batch)
                # DiVE's first-step gradient is rounding noise (u = v = 0 at the pre-trained
                # weights), so the caption lengths of a rank's batch against the global one
                # (text truncation) would make the comparison chaotic; FLYP and the others
                # keep it on, and test_text_truncation tests its exactness.
                notrunc = ["--no-text-truncation"] if method == "dive" else []
                runs[data, method, n] = (out, args + LAYOUT_ARGS.get(n, []) + notrunc)
    for (data, method, n), (out, args) in runs.items():
        if n == "one":
            train.main(args)
    # FSDP resume: from the step-2 checkpoint of a 4-step run, into another folder.
    fsdp_whole = [*runs["world", "dive", "two-fsdp"][1], "--steps", "4", "--checkpoint-every",
                  "2", "--keep", "4"]
    fsdp_whole[fsdp_whole.index("--out") + 1] = str(root / "fsdp-whole")
    resumed = [*fsdp_whole, "--resume", str(root / "fsdp-whole/checkpoints/step-00000002.pt")]
    resumed[resumed.index("--out") + 1] = str(root / "fsdp-resumed")
    torchrun([args for (_, _, n), (_, args) in runs.items() if n != "one"] +
             [fsdp_whole, resumed], root)
    runs["fsdp-resume"] = (root / "fsdp-whole", root / "fsdp-resumed")
    return runs


def relative_gap(one, two, pre, keys):
    d1 = torch.cat([(one[k] - pre[k]).flatten() for k in keys])
    d2 = torch.cat([(two[k] - pre[k]).flatten() for k in keys])
    assert d1.norm() > 0
    return ((d1 - d2).norm() / d1.norm()).item()


TWO_PROCESS_RUNS = [(n, d, m) for d in ("world", "csv") for n, methods in
                    (("two", DDP_METHODS), *LAYOUTS.items()) for m in methods]


@pytest.mark.parametrize("layout,data,method", TWO_PROCESS_RUNS)
def test_two_processes_equal_one_process_on_the_global_batch(ddp_runs, layout, data, method):
    from dive_fast.train.heads import zeroshot_head
    from dive_fast.train.models import load_clip, tiny_checkpoint
    from dive_fast.world import TASKS
    one, two = (final(ddp_runs[data, method, n][0]) for n in ("one", layout))
    bundle = load_clip("dive-micro", str(tiny_checkpoint("dive-micro")))
    pre = bundle.model.state_dict()
    # The update (fine-tuned minus pre-trained weights) as a whole, within 2% (float sums
    # in another order perturb near-zero gradients, which Adam can turn into lr-sized
    # steps; the attention key bias has an exactly-zero gradient: left out).
    keys = [k for k in pre if pre[k].is_floating_point() and not k.endswith("in_proj_bias")
            and not torch.equal(one["state_dict"][k], pre[k])]
    assert relative_gap(one["state_dict"], two["state_dict"], pre, keys) < 0.02
    torch.testing.assert_close(two["state_dict"]["logit_scale"], one["state_dict"]["logit_scale"],
                               rtol=1e-5, atol=1e-6)
    state1, state2 = one["method_state"], two["method_state"]
    assert set(state1) == set(state2)
    if method in ("ft", "lp-ft"):  # the head is inside DDP: one head, trained on the global batch
        shapes = TASKS["shapes"]
        start = {"head.weight": zeroshot_head(bundle.model, bundle.tokenizer, shapes.classnames,
                                              shapes.templates)}
        assert relative_gap(state1, state2, start, ["head.weight"]) < 0.02
    if method == "dive":
        torch.testing.assert_close(state2["dive.m"], state1["dive.m"], rtol=1e-4, atol=1e-6)
        assert state1["dive.m"].abs().sum() > 0
    rows = [[json.loads(line) for line in
             (ddp_runs[data, method, n][0] / "metrics.jsonl").read_text().splitlines()]
            for n in ("one", layout)]
    for r1, r2 in zip(*rows):  # the contrastive loss gathers features: the global loss
        for k in ("clip", "replay"):
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=1e-4)


def test_fsdp_checkpoint_loads_into_a_plain_model_and_resumes(ddp_runs):
    from dive_fast.train.models import load_clip
    whole_dir, resumed_dir = ddp_runs["fsdp-resume"]
    whole, resumed = final(whole_dir), final(resumed_dir)
    assert resumed["step"] == whole["step"] == 4
    plain = load_clip("dive-micro", "").model
    plain.load_state_dict(whole["state_dict"])  # full, unsharded tensors: loads anywhere
    assert all(not hasattr(v, "placements") for v in whole["state_dict"].values())
    for k, v in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed["method_state"]["dive.m"], whole["method_state"]["dive.m"])
    step2 = load_checkpoint(whole_dir / "checkpoints" / "step-00000002.pt")
    assert not torch.equal(step2["state_dict"]["logit_scale"], whole["state_dict"]["logit_scale"]) \
        or any(not torch.equal(step2["state_dict"][k], v) for k, v in whole["state_dict"].items())


def test_two_nodes_of_one_process_equal_one_process(ddp_runs, tmp_path):
    """The documented multi-node command, as two nodes of one process each on this machine
    (c10d rendezvous on localhost, gloo): the same update as one process on the global batch."""
    import socket

    from dive_fast.train.models import load_clip, tiny_checkpoint
    out_one, args_one = ddp_runs["world", "flyp", "one"]
    args = list(args_one)
    args[args.index("--out") + 1] = str(tmp_path / "nodes")
    args[args.index("--batch-size") + 1] = "4"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
           "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id",
           "two-nodes", "-m", "dive_fast.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), \
        outputs[0][1][-3000:] + outputs[1][1][-3000:]
    pre = load_clip("dive-micro", str(tiny_checkpoint("dive-micro"))).model.state_dict()
    one, two = final(out_one), final(tmp_path / "nodes")
    keys = [k for k in pre if pre[k].is_floating_point() and not k.endswith("in_proj_bias")
            and not torch.equal(one["state_dict"][k], pre[k])]
    assert two["world_size"] == 2
    assert relative_gap(one["state_dict"], two["state_dict"], pre, keys) < 0.02


def test_a_rank_that_dies_ends_the_run_naming_it(micro_cache, tmp_path):
    """Rank 1 exits in its second step: the other does not hang; torchrun ends the run within
    seconds and names the rank and its exit code."""
    import time
    args = train_args(tmp_path / "out", "--method", "flyp", "--steps", "6")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
                           str(Path(__file__).parents[1] / "helpers" / "dying_rank.py"), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank      : 1" in proc.stderr and "exitcode  : 3" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 90, f"took {elapsed:.0f} s"  # start-up and the model included
