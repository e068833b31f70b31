"""``--accum-freq K``: a step of K x --batch-size rows (open_clip's meaning), computed in K
micro-batches, is the step of the whole K x batch (every gradient, the logit scale's counted
once, one update of DiVE's m), the random state is replayed between the two forwards, and
gradient checkpointing changes no result; ``micro_batched_backward`` names a bad
argument."""
import contextlib

import pytest
import torch
from helpers.runs import train_args
from open_clip.transformer import PatchDropout

from dive_fast import accumulate, train
from dive_fast.train import cli
from dive_fast.train import step as train_step_module
from dive_fast.train.build import build_run
from dive_fast.train.models import load_clip, tiny_checkpoint

METHODS = ("flyp", "flyp+replay", "snd-like", "dive", "ft", "lp-ft")
# The attention key bias has an exactly-zero gradient (softmax is shift-invariant): float
# noise on it becomes an lr-sized Adam step, so its update is not compared (its gradient is).
ZERO_GRAD = ("in_proj_bias",)


def one_step(tmp_path, method, *extra, patch_dropout=0.0, seed=0):
    """(step values, gradients, state after the step) of one training step of ``method`` on
    the pre-trained dive-micro, built as ``dive_fast.train`` builds it."""
    out = tmp_path / f"{method}-{len(list(tmp_path.iterdir()))}"
    # --no-augment: the target images as the evaluation transform gives them, the same in
    # every call whatever the global random state
    args = cli.build_parser().parse_args(train_args(out, "--method", method, "--no-augment",
                                                    *extra))
    cli.check_args(args)
    pretrained = str(tiny_checkpoint("dive-micro"))
    bundle = load_clip("dive-micro", pretrained, "cpu")
    if patch_dropout:
        bundle.model.visual.patch_dropout = PatchDropout(patch_dropout)
    run = build_run(args, bundle=bundle)
    method_ = run.method
    # Mid-training weights: at the pre-trained ones the difference vectors f - f0 are zero
    # up to the rounding of one batch shape against another, and DiVE normalises them.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method_.model.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    batch = next(run.batches())
    method_.train()
    torch.manual_seed(seed)
    values = run.step(batch, args.lp_steps, run.opt, run.sched, run.guard)
    grads = {n: p.grad.clone() for n, p in method_.named_parameters() if p.grad is not None}
    state = {k: v.clone() for k, v in method_.state_dict().items()}
    return values, grads, state


def in_micro_batches(k: int, batch: int = 8) -> tuple[str, ...]:
    """The flags of train_args' step of ``batch`` rows computed in ``k`` micro-batches."""
    return ("--batch-size", str(batch // k), "--accum-freq", str(k))


def assert_same(a: dict, b: dict, rtol=1e-4, skip=()):
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(skip):
            continue
        scale = b[k].float().norm().item()
        err = (a[k].float() - b[k].float()).norm().item()
        assert err <= rtol * scale + 1e-7, f"{k}: |diff| {err:.3g} against |ref| {scale:.3g}"


@pytest.mark.parametrize("method", METHODS)
def test_micro_batched_step_equals_the_full_batch_step(micro_cache, tmp_path, method):
    full_values, full_grads, full_state = one_step(tmp_path, method)
    assert full_grads, "the step must train something"
    for k in (2, 4):
        values, grads, state = one_step(tmp_path, method, *in_micro_batches(k))
        assert_same(grads, full_grads)  # the logit scale's among them: counted once
        assert_same(state, full_state, skip=ZERO_GRAD)  # weights, DiVE's m (one update)
        torch.testing.assert_close(values["loss"], full_values["loss"], rtol=1e-5, atol=1e-6)
    if method.startswith("dive"):
        assert not torch.equal(full_state["dive.m"], torch.zeros_like(full_state["dive.m"]))


def test_streamed_frozen_embeddings_in_micro_batches(micro_cache, tmp_path):
    """Without the embedding cache the frozen model runs in the same micro-batches."""
    _, full_grads, full_state = one_step(tmp_path, "dive", "--no-frozen-cache")
    _, grads, state = one_step(tmp_path, "dive", "--no-frozen-cache", *in_micro_batches(4))
    assert_same(grads, full_grads)
    assert_same(state, full_state, skip=ZERO_GRAD)


def test_random_state_is_replayed_between_the_two_forwards(micro_cache, tmp_path, monkeypatch):
    """With patch dropout (random per forward), the micro-batched gradient is the gradient of
    the objective at the features the first forward computed: the same dropout masks. The
    reference draws the masks micro-batch by micro-batch, with gradient, in one graph."""
    from dive_fast.train import methods

    def reference_step(method, batch, step, k, gradient_sync=None, loss_scale=None):
        images, tokens = method.inputs(batch, step)
        pending = method.reference(batch, chunks=k)
        parts = [method.encode(accumulate.micro(images, k, j), accumulate.micro(tokens, k, j))
                 for j in range(k)]
        imgs = [torch.cat([p[0][i] for p in parts]) for i in range(len(images))]
        txts = [torch.cat([p[1][i] for p in parts]) for i in range(len(tokens))]
        losses = method.objective(batch, step, imgs, txts, pending())
        sum(losses.values()).backward()
        return losses

    _, grads, state = one_step(tmp_path, "dive", *in_micro_batches(2), patch_dropout=0.5)
    with monkeypatch.context() as m:
        m.setattr(train_step_module, "forward_backward", reference_step)
        _, ref_grads, ref_state = one_step(tmp_path, "dive", *in_micro_batches(2),
                                           patch_dropout=0.5)
    assert_same(grads, ref_grads)
    assert_same(state, ref_state, skip=ZERO_GRAD)
    # The test can fail: without the replay the second forward draws other masks.
    monkeypatch.setattr(accumulate, "replayed", lambda *a: contextlib.nullcontext())
    _, unreplayed, _ = one_step(tmp_path, "dive", *in_micro_batches(2), patch_dropout=0.5)
    with pytest.raises(AssertionError):
        assert_same(unreplayed, ref_grads)
    assert methods.DiVE.avl  # (the method under test is full DiVE)


@pytest.mark.parametrize("k", [1, 4])
def test_gradient_checkpointing_changes_no_result(micro_cache, tmp_path, k):
    _, full_grads, full_state = one_step(tmp_path, "dive")
    _, grads, state = one_step(tmp_path, "dive", "--grad-checkpointing", *in_micro_batches(k))
    assert_same(grads, full_grads)
    assert_same(state, full_state, skip=ZERO_GRAD)


def test_accum_freq_multiplies_the_batch_as_in_open_clip(micro_cache, tmp_path):
    """A step holds --accum-freq x --batch-size target rows and as many reference pairs (per
    rank), an epoch counts such steps, and the update is that whole batch's."""
    args = cli.parse(train_args(tmp_path / "a", "--batch-size", "3", "--accum-freq", "4"))
    cli.check_args(args)
    run = build_run(args)
    batch = next(run.batches())
    assert (len(batch.images), len(batch.ref_images)) == (12, 12)
    parsed = cli.parse(["--epochs", "1", "--batch-size", "4", "--accum-freq", "2",
                        "--train-size", "32", "--out", str(tmp_path / "b")])
    cli.check_args(parsed)
    assert parsed.steps == 4  # 32 samples in steps of 2 x 4
    # Micro-batches as large as a whole step: no longer refused.
    cli.check_args(cli.parse(train_args(tmp_path / "c", "--accum-freq", "9")))
    with pytest.raises(ValueError, match="--accum-freq must be a finite number >= 1, got 0"):
        train.main(train_args(tmp_path / "y", "--accum-freq", "0"))


def _final(out):
    from dive_fast.train.checkpoint import load_checkpoint
    return load_checkpoint(sorted((out / "checkpoints").glob("step-*.pt"))[-1])


def assert_same_run(a, b):
    assert_same(a["state_dict"], b["state_dict"], skip=ZERO_GRAD)
    assert_same(a["method_state"], b["method_state"])


def test_training_with_augmentation_equals_the_full_batch_run(micro_cache, tmp_path):
    """Three steps as users run them, augmentation on (drawn in the loader from the global
    random state, which the micro-batched step must leave as one forward would)."""
    train.main(train_args(tmp_path / "full", "--method", "dive", "--steps", "3"))
    train.main(train_args(tmp_path / "k2", "--method", "dive", "--steps", "3",
                          *in_micro_batches(2)))
    assert_same_run(_final(tmp_path / "k2"), _final(tmp_path / "full"))


def test_resume_with_micro_batches(micro_cache, tmp_path):
    args = ["--method", "dive", "--accum-freq", "2", "--checkpoint-every", "2", "--keep", "4"]
    train.main(train_args(tmp_path / "whole", *args))
    train.main(train_args(tmp_path / "resumed", *args, "--resume",
                          str(tmp_path / "whole/checkpoints/step-00000002.pt")))
    whole, resumed = _final(tmp_path / "whole"), _final(tmp_path / "resumed")
    assert resumed["step"] == whole["step"] == 4
    for k, v in whole["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed["method_state"]["dive.m"], whole["method_state"]["dive.m"])


def test_micro_batched_backward_for_diveloss_users():
    """The recipe outside the training loop: any row-wise encoders, DiVELoss (one update
    of m) plus a contrastive term, K micro-batches: the full-batch gradients."""
    from dive_fast import DiVELoss, micro_batched_backward

    def setup():
        torch.manual_seed(0)
        towers = torch.nn.ModuleList([
            torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
            for _ in range(2)])
        return towers, DiVELoss(16, lam=10.0)

    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(12, 12, generator=g), torch.randn(12, 12, generator=g)
    img0, txt0 = (torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=-1)
                  for _ in range(2))

    def objective(dive):
        def loss(fs):
            logits = torch.nn.functional.normalize(fs[0], dim=-1) @ \
                torch.nn.functional.normalize(fs[1], dim=-1).T
            return dive(fs[0], img0, fs[1], txt0) + torch.nn.functional.cross_entropy(
                10 * logits, torch.arange(len(logits)))
        return loss

    towers, dive = setup()
    full = objective(dive)([towers[0](x), towers[1](t)])
    full.backward()
    full_grads = [p.grad.clone() for p in towers.parameters()]
    towers, dive_k = setup()
    out = micro_batched_backward(lambda xs: [towers[0](xs[0]), towers[1](xs[1])], [x, t],
                                 objective(dive_k), k=5)  # 12 rows: micro-batches of 3 and 2
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
    for a, b in zip((p.grad for p in towers.parameters()), full_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dive_k.m, dive.m)  # one update of m, not five


@pytest.mark.parametrize("method,extra", [("dive", ()), ("dive", ("--accum-freq", "2")),
                                          ("flyp", ("--grad-checkpointing",))])
def test_compiled_towers_give_the_eager_losses_and_gradients(micro_cache, tmp_path, method, extra):
    """--compile (each residual block compiled in place, the frozen copy too) changes no
    loss, gradient or state beyond rounding: also micro-batched and checkpointed."""
    values, grads, state = one_step(tmp_path, method, *extra)
    c_values, c_grads, c_state = one_step(tmp_path, method, *extra, "--compile")
    assert_same(c_grads, grads)
    assert_same(c_state, state, skip=ZERO_GRAD)
    for key in values:
        torch.testing.assert_close(c_values[key].float(), values[key].float(), rtol=1e-5,
                                   atol=1e-6)


def test_micro_batches_refuse_an_encoder_that_mixes_rows():
    """A batch-norm layer in training mode makes a row's features depend on the batch:
    micro-batches would give another gradient (and update its running statistics 2k times
    a step). Given the encoder's modules, it is refused by name; in eval mode (frozen
    statistics) and with k = 1 (the whole batch at once) it is exact and accepted."""
    from dive_fast import micro_batched_backward
    torch.manual_seed(0)
    tower = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    x = torch.randn(8, 4)

    def run(k):
        tower.zero_grad()
        micro_batched_backward(lambda xs: [tower(xs[0])], [x], lambda fs: (fs[0] ** 3).sum(),
                               k, modules=tower)
        return tower[0].weight.grad.clone()

    with pytest.raises(ValueError, match=r"modules: 1 \(BatchNorm1d\) mix\(es\) the rows"):
        run(4)
    whole = run(1)
    tower.zero_grad()
    micro_batched_backward(lambda xs: [tower(xs[0])], [x], lambda fs: (fs[0] ** 3).sum(), 4)
    assert not torch.allclose(tower[0].weight.grad, whole, rtol=0.05)  # what it guards
    tower.eval()
    torch.testing.assert_close(run(4), run(1))


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
        micro_batched_backward(lambda xs: [lin(xs[0])], [torch.randn(0, 3)],
                               lambda fs: fs[0].sum(), 1)
    with pytest.raises(ValueError, match="inputs must be a non-empty list of tensors"):
        micro_batched_backward(lambda xs: [lin(xs[0])], [], lambda fs: fs[0].sum(), 1)
    with pytest.raises(ValueError,
                       match=r"inputs: an empty batch \(0 rows; rows per tensor: \[4, 0\]"):
        micro_batched_backward(lambda xs: [lin(xs[0])], [torch.randn(4, 3), torch.randn(0, 3)],
                               lambda fs: fs[0].sum(), 2)
    with pytest.raises(TypeError,
                       match=r"encode must return a list or tuple of tensors, got Tensor"):
        micro_batched_backward(lambda xs: lin(xs[0]), [torch.randn(4, 3)], lambda fs: fs.sum(), 2)
