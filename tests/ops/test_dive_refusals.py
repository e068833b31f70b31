"""The API refuses what it cannot do: each case ends in one sentence naming the
argument, before anything is written, instead of a wrong result or an internal error."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.backends import backend_params

from dive_fast import DiVELoss, dive_loss
from dive_fast.ops import backends
from dive_fast.testing import HostSyncCounter, LaunchCounter, make_inputs

ALL = backend_params()
D = 8


def _x(B=4, dtype=torch.float32):
    return make_inputs(B, D, seed=0, dtype=dtype)


# --- m_out sharing memory with an input or with m ----------------------------------------

@pytest.mark.parametrize("index, name", [(0, "img_ft"), (1, "img_pre"), (2, "txt_ft"),
                                         (3, "txt_pre")])
@pytest.mark.parametrize("view", ["row", "tail", "column"])
def test_m_out_overlapping_an_input_is_refused(index, name, view):
    """The forward writes m_out before the backward reads the inputs again: an m_out inside
    an input would overwrite it (wrong gradients, no error). Refused before the op runs."""
    x = _x(B=D)
    a = x[0].clone().requires_grad_(True)
    x[0] = a
    target = x[index].detach()
    m_out = {"row": lambda: target[1],
             "tail": lambda: target.reshape(-1)[-D:],  # the last row, through a flat view
             "column": lambda: target[:, 3]}[view]()  # strided: every D-th element
    before = target.clone()
    with pytest.raises(ValueError, match=f"m_out shares memory with {name}"):
        dive_loss(*x, torch.zeros(D), m_out=m_out)
    assert torch.equal(target, before)


def test_m_out_overlap_found_across_storages_that_alias():
    """Two tensors made from one numpy buffer have storages of their own but share memory."""
    buffer = np.random.default_rng(0).standard_normal(5 * D).astype(np.float32)
    x = _x()
    img_pre = torch.from_numpy(buffer[:4 * D]).view(4, D)
    m_out = torch.from_numpy(buffer[3 * D + D // 2:4 * D + D // 2])  # half in img_pre
    assert m_out.untyped_storage().data_ptr() != img_pre.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="m_out shares memory with img_pre"):
        dive_loss(x[0], img_pre, *x[2:], torch.zeros(D), m_out=m_out)


def test_m_out_overlapping_m_without_being_m_is_refused():
    x = _x()
    block = torch.zeros(2 * D)
    with pytest.raises(ValueError, match="m_out shares memory with m: pass m_out=m itself"):
        dive_loss(*x, block[:D], m_out=block[D // 2:D // 2 + D])
    with pytest.raises(ValueError, match="m_out shares memory with m"):
        dive_loss(*x, block[:D], m_out=block[:D].view(D))  # a view of m, not m itself


def test_m_out_sharing_a_storage_without_overlap_is_accepted():
    """m_out itself (DiVELoss's in-place update), or beside m or an input in one storage."""
    x = _x()
    m = torch.zeros(D)
    out = dive_loss(*x, m, momentum=0.5, m_out=m)
    assert torch.equal(m, out.m)
    block = torch.zeros(2, D)
    out = dive_loss(*x, block[0], momentum=0.5, m_out=block[1])
    assert torch.equal(block[1], out.m) and torch.equal(block[0], torch.zeros(D))
    big = torch.zeros(5, D)
    big[:4] = x[1]
    out = dive_loss(x[0], big[:4], *x[2:], torch.zeros(D), momentum=0.5, m_out=big[4])
    assert torch.equal(big[4], out.m) and torch.equal(big[:4], x[1])


def test_m_and_m_out_must_be_tensors():
    with pytest.raises(TypeError, match="m must be a torch.Tensor, got list"):
        dive_loss(*_x(), [0.0] * D)
    with pytest.raises(TypeError, match="m_out must be a torch.Tensor or None, got list"):
        dive_loss(*_x(), torch.zeros(D), m_out=[0.0] * D)


# --- the order of the four inputs ---------------------------------------------------------

@pytest.mark.parametrize("api", ["module", "function"])
def test_swapped_trainable_and_frozen_inputs_are_refused(api):
    """(img_pre, img_ft, ...) in place of (img_ft, img_pre, ...): the frozen tensor needs no
    gradient and the trainable one does; taken as given, the image tower would learn nothing.
    The refusal names both arguments; the right order (and eval without grads) passes."""
    x = [torch.randn(4, 8) for _ in range(4)]
    ft = [t.clone().requires_grad_(True) for t in (x[0], x[2])]
    call = (DiVELoss(8) if api == "module" else
            lambda *a: dive_loss(*a, torch.zeros(8)).loss)
    with pytest.raises(ValueError, match="img_pre requires grad but img_ft does not: the "
                                         "arguments look swapped"):
        call(x[1], ft[0], ft[1], x[3])
    with pytest.raises(ValueError, match="txt_pre requires grad but txt_ft does not"):
        call(ft[0], x[1], x[3], ft[1])
    call(ft[0], x[1], ft[1], x[3]).backward()
    assert ft[0].grad is not None and ft[1].grad is not None
    call(x[0], x[1], x[2], x[3])  # nothing requires grad (evaluation): nothing to check


# --- a NaN/Inf m --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_load_state_dict_refuses_non_finite_m(bad):
    source = DiVELoss(D)
    source.m[2] = bad
    target = DiVELoss(D, momentum=0.5)
    target(*_x())
    kept = target.m.clone()
    with pytest.raises(ValueError, match=r"state_dict\['m'\] has 1 NaN or Inf value"):
        target.load_state_dict(source.state_dict())
    assert torch.equal(target.m, kept)
    # Inside a model the key is named in full.
    model = torch.nn.ModuleDict({"dive": DiVELoss(D)})
    with pytest.raises(ValueError, match=r"state_dict\['dive.m'\]"):
        model.load_state_dict({"dive.m": source.m.clone()})
    source.m[2] = 0.5
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.m, source.m)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("options", [{}, {"update": False}, {"avl": False}, {"momentum": 0.0},
                                     {"in_place": True}], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dive_loss_refuses_non_finite_m_when_checking(backend, options, bad):
    options = dict(options)
    in_place = options.pop("in_place", False)
    m = torch.zeros(D)
    m[5] = bad
    with pytest.raises(ValueError, match="m has 1 NaN or Inf value"):
        dive_loss(*_x(), m, backend=backend, m_out=m if in_place else None, **options)


@pytest.mark.parametrize("backend", ALL)
def test_non_finite_m_without_the_check_costs_no_sync(backend):
    """check_values=False reads nothing on the host: a NaN m gives a NaN loss, unrefused."""
    x = _x()
    m = torch.full((D,), float("nan"))
    dive_loss(*x, m, backend=backend, check_values=False)  # validated and cached
    with HostSyncCounter() as recorder:
        out = dive_loss(*x, m, backend=backend, check_values=False)
    assert recorder.syncs == 0 and torch.isnan(out.loss)


def test_m_check_rides_on_the_value_check_read():
    """With the check, m is judged from the call's avl, read with info (on a GPU in one
    transfer): a finite call never inspects m itself, a NaN/Inf m is refused, and an
    input's NaN is still named as such when m is finite (its batch leaves m as it was)."""
    x = _x()
    dive_loss(*x, torch.zeros(D))
    with LaunchCounter() as recorder:
        dive_loss(*x, torch.zeros(D))
    ops = [name for name, _ in recorder.ops]
    assert "aten::isfinite" not in ops and ops.count("aten::_local_scalar_dense") <= 1
    with pytest.raises(ValueError, match="m has 2 NaN or Inf value"):
        dive_loss(*x, torch.tensor([float("nan"), float("inf"), *[0.0] * (D - 2)]))
    x[2][1, 1] = float("nan")
    with pytest.raises(ValueError, match="txt_ft has 1 row"):
        dive_loss(*x, torch.zeros(D))


# --- lam, momentum, dim, backend ---------------------------------------------------------

BAD_LAM = [("1000", TypeError, "real number"), (True, TypeError, "real number"),
           (torch.tensor(1.0), TypeError, "real number"), (None, TypeError, "real number"),
           (1e39, ValueError, "float32"), (1e300, ValueError, "float32"),
           (10 ** 400, ValueError, "float32"), (float("inf"), ValueError, "float32"),
           (float("nan"), ValueError, "finite"), (-1, ValueError, ">= 0")]


@pytest.mark.parametrize("lam, error, why", BAD_LAM, ids=lambda v: repr(v)[:12])
def test_lam_must_be_a_real_that_float32_holds(lam, error, why):
    with pytest.raises(error, match=f"lam must .*{why}"):
        DiVELoss(D, lam=lam)
    with pytest.raises(error, match=f"lam must .*{why}"):
        dive_loss(*_x(), torch.zeros(D), lam=lam)


@pytest.mark.parametrize("momentum", ["0.5", True, float("nan"), 1.5, -0.1, None])
def test_momentum_must_be_a_real_in_0_1(momentum):
    with pytest.raises((TypeError, ValueError), match="momentum must"):
        DiVELoss(D, momentum=momentum)
    with pytest.raises((TypeError, ValueError), match="momentum must"):
        dive_loss(*_x(), torch.zeros(D), momentum=momentum)


def test_a_cached_call_does_not_let_a_look_alike_option_through():
    """The validated configuration is cached per key: "1000" and True must not find the
    entries of 1000.0 and 1."""
    x = _x()
    dive_loss(*x, torch.zeros(D), lam=1000.0, momentum=1)
    with pytest.raises(TypeError, match="lam must be a real number"):
        dive_loss(*x, torch.zeros(D), lam="1000", momentum=1)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        dive_loss(*x, torch.zeros(D), lam=1000.0, momentum=True)
    loss_fn = DiVELoss(D, lam=1, momentum=1)
    loss_fn(*x)
    loss_fn.lam = True
    with pytest.raises(TypeError, match="lam must be a real number"):
        loss_fn(*x)


@pytest.mark.parametrize("dim, error", [(2.5, TypeError), (True, TypeError), ("8", TypeError),
                                        (None, TypeError), (0, ValueError), (-3, ValueError)])
def test_dim_must_be_a_positive_int(dim, error):
    with pytest.raises(error, match="dim must be a positive int"):
        DiVELoss(dim)


def test_numpy_numbers_are_real_numbers():
    loss_fn = DiVELoss(np.int64(D), lam=np.float64(10.0), momentum=np.float32(0.5))
    assert loss_fn.dim == D and isinstance(loss_fn.dim, int)
    assert torch.isfinite(loss_fn(*_x()))


def test_unknown_backend_refused_at_construction():
    with pytest.raises(ValueError, match="unknown backend 'nope': expected one of torch, cpu, "
                                         "triton, cuda"):
        DiVELoss(D, backend="nope")
    with pytest.raises(TypeError, match="backend must be a str or None, got int"):
        DiVELoss(D, backend=3)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        dive_loss(*_x(), torch.zeros(D), backend="nope")
    DiVELoss(D, backend="reference")  # the torch backend's earlier name
    DiVELoss(D, backend="auto")


def test_known_backend_decided_per_call():
    """A backend that cannot run on these inputs is accepted when the module is built (it
    may move to a GPU later) and refused, naming why, when called."""
    loss_fn = DiVELoss(D, backend="cuda")
    with pytest.raises(RuntimeError, match="'cuda' cannot run here: the cuda backend takes"):
        loss_fn(*_x())


def test_bad_backend_variable_is_named(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    DiVELoss(D)  # the variable is read per call, not when building
    with pytest.raises(RuntimeError, match=r"unknown backend 'nope'.*\(set by \$DIVE_FAST_BACKEND"):
        DiVELoss(D)(*_x())


def _info(value):
    env = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    if value is not None:
        env[backends.ENV_VAR] = value
    return subprocess.run([sys.executable, "-m", "dive_fast.info"], capture_output=True,
                          text=True, check=True, env=env).stdout


def test_info_shows_the_backend_override():
    assert "$DIVE_FAST_BACKEND: not set" in _info(None)
    out = _info("nope")
    assert "$DIVE_FAST_BACKEND='nope': unknown backend" in out and "will raise" in out
    out = _info("torch")
    assert "$DIVE_FAST_BACKEND='torch': overrides the default" in out
    assert "    cpu inputs: usable" in out
    out = _info("cuda")
    assert "    cpu inputs: cannot run here (the cuda backend takes CUDA tensors" in out


# --- meta tensors, torch.func, torch.compile ---------------------------------------------

@pytest.mark.parametrize("check_values", [True, False])
def test_meta_tensors_are_refused(check_values):
    meta = [x.to("meta") for x in _x()]
    loss_fn = DiVELoss(D, check_values=check_values).to("meta")
    with pytest.raises(ValueError, match="meta tensors .*cannot run on the meta device"):
        loss_fn(*meta)
    with pytest.raises(ValueError, match="meta tensors"):
        dive_loss(*meta, torch.zeros(D, device="meta"), check_values=check_values)
    with pytest.raises(ValueError, match="meta tensors"):  # not "move the loss to meta"
        DiVELoss(D, check_values=check_values)(*meta)


def _functional(x, m):
    return lambda a: dive_loss(a, *x[1:], m).loss


def _module(x, loss_fn):
    return lambda a: loss_fn(a, *x[1:])


@pytest.mark.parametrize("transform", [
    lambda f, a: torch.func.grad(f)(a),
    lambda f, a: torch.func.vmap(f)(a.expand(3, *a.shape)),
    lambda f, a: torch.func.jacrev(f)(a),
    lambda f, a: torch.func.jvp(f, (a,), (torch.ones_like(a),)),
    lambda f, a: __import__("functorch").grad(f)(a),
], ids=["grad", "vmap", "jacrev", "jvp", "functorch.grad"])
def test_functorch_transforms_are_refused(transform):
    x = _x()
    m = torch.zeros(D)
    with pytest.raises(RuntimeError, match="DiVE does not support functorch transforms"):
        transform(_functional(x, m), x[0])
    loss_fn = DiVELoss(D)
    with pytest.raises(RuntimeError, match="DiVE does not support functorch transforms"):
        transform(_module(x, loss_fn), x[0])
    assert torch.equal(loss_fn.m, torch.zeros(D)) and torch.equal(m, torch.zeros(D))


def test_compiled_dive_loss_with_m_out_equals_eager():
    """The per-call checks (m_out overlap, the functorch guard) stay out of a compiled
    graph: the functional form with m_out=m compiles without a graph break."""
    x = _x(B=6)

    def step(a, m):
        return dive_loss(2 * a, *x[1:], m, m_out=m, momentum=0.5).loss

    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        m, a = torch.zeros(D), x[0].clone().requires_grad_(True)
        fn = torch.compile(step, fullgraph=True) if compiled else step
        fn(a, m)
        loss = fn(a, m)
        loss.backward()
        results.append((loss.detach(), m, a.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


# --- rows too small to normalise ----------------------------------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype, tiny", [(torch.float32, 1e-41), (torch.float32, 1e-25),
                                         (torch.bfloat16, 1e-30)])
def test_subnormal_rows_are_not_called_zero(backend, dtype, tiny):
    """Rows whose squared norm underflows the fp32 accumulator are counted with the zero
    rows by the kernels; the message tells them apart (it looks at the input again)."""
    x = _x(dtype=dtype)
    x[1][0] = tiny
    assert (x[1][0] != 0).all()
    with pytest.raises(ValueError, match=r"img_pre has 1 row\(s\) whose norm is too small to "
                                         r"normalise \(subnormal") as info:
        DiVELoss(D, backend=backend)(*x)
    assert "zero norm" not in str(info.value)
    x[1][1] = 0.0
    with pytest.raises(ValueError, match=r"img_pre has 1 row\(s\) of zero norm and 1 row\(s\) "
                                         "whose norm is too small"):
        dive_loss(*x, torch.zeros(D), backend=backend)
    x[1][0] = 0.0
    with pytest.raises(ValueError, match=r"img_pre has 2 row\(s\) of zero norm, which"):
        dive_loss(*x, torch.zeros(D), backend=backend)
