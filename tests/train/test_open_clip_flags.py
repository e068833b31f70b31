"""open_clip_train's options as users bring them: each of docs/training.md's rows parsed by
both parsers (so the table cannot drift), and the meaning of the shared flags on dive-micro:
AdamW's defaults and weight-decay groups, TF32, the tower locks, --force-image-size,
SigLIP's loss, hf-hub names, --resume of bare weights, wandb and the run's log file."""
import argparse
import json
import re
import shlex
from pathlib import Path
from unittest import mock

import open_clip
import pytest
import torch
import torch.nn.functional as F
from helpers.runs import train_args, two_processes
from open_clip.loss import ClipLoss, SigLipLoss
from open_clip_train import params

from dive_fast import train
from dive_fast.train import cli, open_clip_flags
from dive_fast.train.build import build_run
from dive_fast.train.checkpoint import ResumeMismatch, load_checkpoint
from dive_fast.train.models import CONFIG_DIR, load_clip, tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def open_clip_parser() -> argparse.ArgumentParser:
    """The parser ``open_clip_train.params.parse_args`` builds (caught as it parses)."""
    caught = {}
    parse = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        caught["parser"] = self
        return parse(self, args, namespace)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch):
        params.parse_args([])
    return caught["parser"]


def table_rows() -> list[tuple[list[str], str]]:
    """(command line, what it does here) of each row of docs/training.md's open_clip table."""
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## open_clip_train's options here"):]
    section = section[:section.index("\n## ", 1)]
    rows = re.findall(r"^\| `(--[^`]+)` \| (.+) \|$", section, flags=re.M)
    return [(shlex.split(cmd), here) for cmd, here in rows]


def test_the_table_has_a_row_for_every_open_clip_option():
    options = {a.option_strings[0] for a in open_clip_parser()._actions
               if a.option_strings and a.dest != "help"}
    assert len(options) >= 90
    assert {argv[0] for argv, _ in table_rows()} == options


@pytest.mark.parametrize("argv, here", table_rows(), ids=lambda x: " ".join(x)
                         if isinstance(x, list) else "")
def test_each_row_means_the_same_or_is_refused_with_what_to_write(argv, here, capsys):
    theirs = params.parse_args(argv)  # the row is open_clip_train's own command line
    ours = cli.build_parser()
    if here.startswith("refused: "):
        with pytest.raises(SystemExit) as exit_:
            ours.parse_args(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2
        assert f"argument {argv[0]}: " in err and here.removeprefix("refused: ") in err
        return
    assert here.startswith("the same"), here
    parsed = ours.parse_args(argv)
    their_dest = open_clip_parser()._option_string_actions[argv[0]].dest
    our_dest = ours._option_string_actions[argv[0]].dest
    assert getattr(parsed, our_dest) == getattr(theirs, their_dest)


def test_refusals_name_the_flag_in_one_sentence():
    for flag in open_clip_flags.REFUSED:
        message = open_clip_flags.refusal(flag)
        assert message.startswith(f"open_clip_train's {flag} is not offered here: ")
        assert not re.search(r"\.( [A-Z]|$)", message), message  # no second sentence


@pytest.mark.parametrize("model", ["ViT-B-16", "RN50", "dive-micro", "convnext_base"])
def test_adam_defaults_are_open_clips(model):
    expected = params.get_default_params(model)
    assert open_clip_flags.adam_defaults(model) == {k: expected[k] for k in
                                                    ("beta1", "beta2", "eps")}


@pytest.mark.parametrize("cpus, local_ranks, workers", [(32, 1, 8), (16, 8, 2), (6, 4, 1),
                                                      (2, 4, 0)])
def test_workers_default_to_the_cpus_per_local_rank(monkeypatch, cpus, local_ranks, workers):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(cpus)),
                        raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_ranks))
    assert cli.default_workers() == workers


def test_pretraining_keeps_the_exemptions_its_cached_weights_were_made_with():
    """Fine-tuning decays position embeddings as open_clip_train does; the tiny models'
    pre-training keeps its rule, so the cached weights stay what they were."""
    from dive_fast.train import optim
    model = load_clip("dive-micro").model
    pos = model.positional_embedding
    assert not optim.no_decay("positional_embedding", pos)
    assert optim.no_decay_before_2026_12("positional_embedding", pos)


def built(tmp_path, *extra, model="dive-micro"):
    args = cli.parse(train_args(tmp_path / "run", "--model", model, *extra))
    cli.check_args(args)
    return build_run(args)


def test_adamw_takes_betas_and_eps(micro_cache, tmp_path):
    opt = built(tmp_path / "a", "--beta1", "0.8", "--beta2", "0.95", "--eps", "1e-7").opt
    assert {(g["betas"], g["eps"]) for g in opt.param_groups} == {((0.8, 0.95), 1e-7)}
    opt = built(tmp_path / "b").opt  # unset: open_clip's for a model without "vit"
    assert {(g["betas"], g["eps"]) for g in opt.param_groups} == {((0.9, 0.999), 1e-8)}


def open_clip_exclude():
    """open_clip_train's own rule of which parameters get no weight decay (main.py)."""
    source = (Path(params.__file__).parent / "main.py").read_text()
    rule = re.search(r"exclude = (lambda n, p: .+)", source).group(1)
    return eval(rule)  # noqa: S307  (open_clip's source, installed)


def test_weight_decay_groups_are_open_clips(micro_cache, tmp_path):
    run = built(tmp_path, "--method", "dive", "--wd", "0.3")
    decay = {id(p): g["weight_decay"] for g in run.opt.param_groups for p in g["params"]}
    exclude = open_clip_exclude()
    named = [(n, p) for n, p in run.method.model.named_parameters() if p.requires_grad]
    assert len(decay) == len(named)
    for name, p in named:
        assert decay[id(p)] == (0.0 if exclude(name, p) else 0.3), name
    assert {0.0, 0.3} <= set(decay.values())


@pytest.fixture
def tf32_restored():
    state = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = state


def test_tf32_is_on_for_cuda_as_open_clip_sets_it_and_off_with_no_tf32(tf32_restored):
    cli.set_tf32(True, "cuda:0")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    cli.set_tf32(False, "cuda")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    cli.set_tf32(True, "cpu")  # no CUDA run: the process's settings are left alone
    assert not torch.backends.cuda.matmul.allow_tf32
    assert cli.parse([]).tf32 and not cli.parse(["--no-tf32"]).tf32


def test_locked_towers_are_open_clips_locks(micro_cache, tmp_path):
    run = built(tmp_path / "a", "--method", "flyp", "--lock-image",
                "--lock-image-unlocked-groups", "1")
    reference = load_clip("dive-micro", str(tiny_checkpoint("dive-micro"))).model
    reference.lock_image_tower(unlocked_groups=1)
    assert {n: p.requires_grad for n, p in run.model.named_parameters()} == \
        {n: p.requires_grad for n, p in reference.named_parameters()}
    frozen = [n for n, p in run.model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("visual.") for n in frozen)
    trained = {id(p) for g in run.opt.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in run.model.parameters() if not p.requires_grad}
    run = built(tmp_path / "b", "--method", "dive", "--lock-text",
                "--lock-text-freeze-layer-norm")
    text = [p for n, p in run.model.named_parameters() if n.startswith(("transformer.",
                                                                         "token_embedding"))]
    assert text and not any(p.requires_grad for p in text)
    assert all(p.requires_grad for p in run.model.visual.parameters())


def test_force_image_size_resizes_the_model_and_its_inputs(micro_cache, tmp_path):
    run = built(tmp_path, "--method", "flyp", "--force-image-size", "24")
    assert run.bundle.image_size == 24
    assert next(run.batches()).images.shape[-2:] == (24, 24)


@pytest.fixture(scope="module")
def siglip_config_dir(tmp_path_factory):
    """dive-micro with SigLIP's logit bias, as open_clip's SigLIP configs give it (a name
    without "siglip", which would make open_clip pick the T5 tokenizer of SigLIP)."""
    folder = tmp_path_factory.mktemp("configs")
    config = json.loads((CONFIG_DIR / "dive-micro.json").read_text())
    (folder / "dive-micro-sigmoid.json").write_text(json.dumps({**config, "init_logit_bias": -10}))
    open_clip.add_model_config(folder)
    return folder


@pytest.fixture(scope="module")
def siglip_micro(siglip_config_dir):
    return "dive-micro-sigmoid"


def test_siglip_models_train_with_siglips_loss_and_bias(micro_cache, tmp_path, siglip_micro):
    run = built(tmp_path, "--method", "flyp", "--pretrained", "", model=siglip_micro)
    method, batch = run.method, next(run.batches())
    assert isinstance(method.clip_loss, SigLipLoss)
    images, tokens = method.inputs(batch, 0)
    imgs, txts = method.encode(images, tokens)
    img, txt = F.normalize(imgs[0].float(), dim=-1), F.normalize(txts[0].float(), dim=-1)
    scale, bias = method.model.logit_scale.exp(), method.model.logit_bias
    loss = method.objective(batch, 0, imgs, txts, None)["clip"]
    torch.testing.assert_close(loss, SigLipLoss()(img, txt, scale, bias))
    assert not torch.allclose(loss, ClipLoss()(img, txt, scale))  # not the softmax loss
    method.train()
    run.step(batch, 0, run.opt, run.sched, run.guard)
    assert method.model.logit_bias.grad is not None and method.model.logit_bias.grad.abs() > 0
    no_decay = [p for g in run.opt.param_groups if g["weight_decay"] == 0 for p in g["params"]]
    assert any(p is method.model.logit_bias for p in no_decay)


def test_siglip_on_two_processes_equals_one_process(micro_cache, tmp_path, siglip_micro,
                                                    siglip_config_dir):
    """SigLipLoss across ranks (its neighbour exchange of text features, under DDP's gradient
    average) trains as one process on the global batch: the same update within the 2% the
    other two-process tests allow (float sums in another order), the same logit bias."""
    from safetensors.torch import load_file

    common = ["--model", siglip_micro, "--pretrained", "", "--method", "flyp", "--steps", "3",
              "--lr", "1e-3", "--no-augment", "--workers", "0", "--no-progress", "--wise-ft", "",
              "--eval-per-task", "4", "--train-size", "32", "--checkpoint-every", "3"]
    train.main([*common, "--batch-size", "8", "--out", str(tmp_path / "one")])
    two_processes(str(Path(__file__).parents[1] / "helpers" / "model_config_run.py"),
                  str(siglip_config_dir), *common, "--batch-size", "4", "--out",
                  str(tmp_path / "two"))
    start = load_file(tmp_path / "one" / "start-weights.safetensors")
    assert torch.equal(start["logit_bias"],
                       load_file(tmp_path / "two" / "start-weights.safetensors")["logit_bias"])
    one, two = (load_checkpoint(sorted((tmp_path / n / "checkpoints").glob("step-*.pt"))[-1])
                ["state_dict"] for n in ("one", "two"))
    moved = [k for k in start if start[k].is_floating_point() and not torch.equal(one[k], start[k])
             and not k.endswith("in_proj_bias")]
    d1 = torch.cat([(one[k] - start[k]).flatten() for k in moved])
    d2 = torch.cat([(two[k] - start[k]).flatten() for k in moved])
    assert "logit_bias" in moved and ((d1 - d2).norm() / d1.norm()).item() < 0.02
    torch.testing.assert_close(two["logit_bias"], one["logit_bias"], rtol=1e-4, atol=1e-6)


def test_a_locked_tower_stays_as_loaded_under_fsdp_on_two_processes(micro_cache, tmp_path):
    """--lock-image with FSDP2 (which shards locked and trainable parameters together): after
    training, the locked image groups equal the loaded weights; the unlocked last group (the
    projection) and the text tower moved."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    two_processes("-m", "dive_fast.train", *train_args(out, "--method", "flyp", "--steps", "2",
                                                      "--batch-size", "4", "--fsdp",
                                                      "--lock-image",
                                                      "--lock-image-unlocked-groups", "1"))
    state = load_checkpoint(sorted((out / "checkpoints").glob("step-*.pt"))[-1])["state_dict"]
    start = load_file(tiny_checkpoint("dive-micro"))
    moved = {k for k in state if not torch.equal(state[k], start[k])}
    assert {k for k in moved if k.startswith("visual.")} == {"visual.proj"}
    assert "text_projection" in moved


def test_hf_hub_names_load_through_open_clip(micro_cache, tmp_path, monkeypatch):
    """``hf-hub:org/repo``: open_clip's own resolution of config and weights, the hub's
    download patched to a local folder."""
    hub = tmp_path / "hub"
    hub.mkdir()
    config = json.loads((CONFIG_DIR / "dive-micro.json").read_text())
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": config,
                                                           "preprocess_cfg": {}}))
    weights = tiny_checkpoint("dive-micro")
    (hub / "open_clip_model.safetensors").write_bytes(weights.read_bytes())
    asked = []

    def download(repo_id, filename, revision=None, cache_dir=None):
        asked.append((repo_id, filename))
        if not (hub / filename).is_file():
            raise FileNotFoundError(filename)
        return str(hub / filename)
    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", download)
    run = built(tmp_path, "--method", "flyp", model="hf-hub:someone/dive-micro")
    assert ("someone/dive-micro", "open_clip_config.json") in asked
    assert ("someone/dive-micro", "open_clip_model.safetensors") in asked
    expected = load_clip("dive-micro", str(weights)).model.state_dict()
    for key, value in run.model.state_dict().items():
        torch.testing.assert_close(value, expected[key])


@pytest.mark.parametrize("layout", ["bare", "open_clip epoch"])
def test_resume_of_model_weights_says_pretrained(micro_cache, tmp_path, layout):
    state = load_clip("dive-micro", str(tiny_checkpoint("dive-micro"))).model.state_dict()
    path = tmp_path / "epoch_1.pt"
    torch.save(state if layout == "bare" else {"epoch": 1, "name": "x", "state_dict": state},
               path)
    with pytest.raises(ResumeMismatch, match=f"use --pretrained {path}"):
        train.main(train_args(tmp_path / "run", "--resume", str(path)))
    # ... which loads them (open_clip reads both layouts)
    loaded = load_clip("dive-micro", str(path)).model.state_dict()
    torch.testing.assert_close(loaded, state)


def test_report_to_wandb_without_the_package_is_refused(tmp_path, monkeypatch, not_loaded):
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)
    with pytest.raises(ValueError, match=r"--report-to wandb: the wandb package is not "
                                         r"installed \(pip install wandb\)"):
        train.main(train_args(tmp_path, "--report-to", "wandb"))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_wandb_offline_keeps_its_run_across_resume_and_the_log(micro_cache, tmp_path,
                                                               monkeypatch, tf32_restored):
    """--report-to wandb (offline), a resume continuing the same wandb run; out.log and
    data_time / per-GPU rows as open_clip writes them."""
    import wandb  # noqa: F401  (in the test extra: missing is a failure, not a skip)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train.main(train_args(out, "--method", "flyp", "--report-to", "wandb", "--debug"))
    run_id = (out / "wandb-id.txt").read_text().strip()
    train.main(train_args(out, "--method", "flyp", "--report-to", "wandb", "--resume",
                          str(out / "checkpoints" / "step-00000002.pt")))
    runs = sorted((out / "wandb" / "wandb").glob("offline-run-*")) or \
        sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    log = (out / "out.log").read_text()
    assert log.count("python -m dive_fast.train") == 2 and "DEBUG" in log
    rows = [r for r in _rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["data_time"] >= 0 and r["samples_per_s_per_gpu"] == r["samples_per_s"]
               for r in rows)
