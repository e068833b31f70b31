"""DiVELoss contract: registration, torch.compile, state, dispatch and bad input."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.backends import backend_params

from dive_fast import DiVELoss, dive_loss
from dive_fast.ops import backends, extension
from dive_fast.ops.dive import dive_backward, dive_forward
from dive_fast.testing import HostSyncCounter, make_inputs

ALL = backend_params()


@pytest.mark.parametrize("backend", ALL)
def test_opcheck(backend):
    x = make_inputs(6, 10, seed=0)
    m = 0.1 * torch.randn(10, generator=torch.Generator().manual_seed(0))
    options = (0.9, True, 10.0, 10.0, False, backend)  # momentum, normalize, lam_avl, lam_pvl
    torch.library.opcheck(dive_forward, (*x, m, None, *options))  # functional
    torch.library.opcheck(dive_forward, (*x, m, torch.zeros(10), *options))  # m_out given
    torch.library.opcheck(dive_forward, (*x, None, m.clone(), *options))  # m_out in place
    g = torch.tensor(0.5)
    for grads in ((g, g, g), (g, None, None), (None, g, None)):
        torch.library.opcheck(dive_backward, (*x, m, *grads, 10.0, 3.0, 0.25, True, backend))


@pytest.mark.parametrize("backend", ALL)
def test_buffer_updated_in_place_and_saved_m_kept(backend):
    """The op writes the new m into DiVELoss's buffer itself; a second forward before the
    first backward leaves the first backward's m (saved separately) intact."""
    loss_fn = DiVELoss(8, lam=5.0, momentum=0.5, backend=backend)
    buffer, ptr = loss_fn.m, loss_fn.m.data_ptr()
    x1, x2 = make_inputs(6, 8, seed=1), make_inputs(6, 8, seed=2)
    a1, a2 = x1[0].clone().requires_grad_(True), x2[0].clone().requires_grad_(True)
    out1 = dive_loss(a1, *x1[1:], torch.zeros(8), lam=5.0, momentum=0.5, backend=backend)
    l1 = loss_fn(a1, *x1[1:])
    assert loss_fn.m is buffer and loss_fn.m.data_ptr() == ptr
    torch.testing.assert_close(loss_fn.m, out1.m)
    loss_fn(a2, *x2[1:])  # moves m on before l1's backward
    assert not torch.equal(loss_fn.m, out1.m)
    l1.backward()
    want = torch.autograd.grad(out1.loss, a1)[0]
    torch.testing.assert_close(a1.grad, want)


def test_functional_m_out():
    x = make_inputs(5, 8, seed=3)
    m, m_out = torch.zeros(8), torch.full((8,), 7.0)
    out = dive_loss(*x, m, momentum=0.5, m_out=m_out)
    assert torch.equal(m_out, out.m) and torch.equal(m, torch.zeros(8))
    with pytest.raises(ValueError, match="m_out must match m"):
        dive_loss(*x, m, m_out=torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("backend", backend_params(("torch", "cpu")))
def test_compiled_equals_eager(backend):
    """A compiled step that calls DiVELoss: no graph break, the same loss, m and grads."""
    torch._dynamo.reset()
    proj = torch.nn.Linear(12, 8)
    x = make_inputs(10, 12, seed=1)
    pre = [torch.randn(10, 8), torch.randn(10, 8)]

    def step(loss_fn, proj):
        img, txt = proj(x[0]), proj(x[2])
        return loss_fn(img, pre[0], txt, pre[1])

    results = []
    for compiled in (False, True):
        loss_fn = DiVELoss(8, lam=5.0, momentum=0.5, backend=backend)
        p = torch.nn.Linear(12, 8)
        p.load_state_dict(proj.state_dict())
        fn = torch.compile(step, fullgraph=True) if compiled else step
        losses = [fn(loss_fn, p) for _ in range(2)]
        losses[-1].backward()
        results.append((torch.stack(losses).detach(), loss_fn.m.clone(), p.weight.grad.clone()))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip(tmp_path):
    loss_fn = DiVELoss(8, momentum=0.5)
    loss_fn(*make_inputs(4, 8, seed=3))
    assert loss_fn.m.abs().sum() > 0
    torch.save(loss_fn.state_dict(), tmp_path / "dive.pt")
    other = DiVELoss(8, momentum=0.5)
    other.load_state_dict(torch.load(tmp_path / "dive.pt", weights_only=True))
    assert torch.equal(other.m, loss_fn.m) and other.m.dtype == torch.float32


def test_return_parts():
    loss_fn = DiVELoss(8)
    x = make_inputs(5, 8, seed=4)
    loss, parts = loss_fn(*x, return_parts=True)
    assert set(parts) == {"avl", "pvl", "b", "mean_norm_u", "mean_norm_v"}
    assert loss.item() == pytest.approx(1000.0 * (parts["avl"] + parts["pvl"]).item(), rel=1e-5)
    u = torch.nn.functional.normalize(x[0]) - torch.nn.functional.normalize(x[1])
    assert parts["mean_norm_u"].item() == pytest.approx(u.norm(dim=1).mean().item(), rel=1e-5)
    assert all(not p.requires_grad for p in parts.values())


def test_momentum_zero_is_batch_mean():
    x = make_inputs(6, 4, seed=5)
    loss_fn = DiVELoss(4, momentum=0.0)
    _, parts = loss_fn(*x, return_parts=True)
    torch.testing.assert_close(loss_fn.m, parts["b"])


# --- bad input -------------------------------------------------------------------------

def _x(B=4, D=8, **kw):
    return make_inputs(B, D, seed=0, **kw)


@pytest.mark.parametrize("mutate, match", [
    (lambda x: [x[0][:, :4], *x[1:]], "img_ft has dim 4 but DiVELoss"),
    (lambda x: [x[0], x[1][:3], *x[2:]], "img_pre has shape"),
    (lambda x: [x[0], x[1], x[2], x[3][None]], "txt_pre must be 2-D"),
    (lambda x: [x[0].long(), *x[1:]], "img_ft must be float32"),
    (lambda x: [x[0], x[1], x[2].to(torch.complex64), x[3]], "txt_ft must be float32"),
    (lambda x: [z[:0] for z in x], "empty batch"),
    (lambda x: [x[0], x[1].to("meta"), *x[2:]], "img_pre is on meta"),
    (lambda x: [x[0], x[1], x[2].half(), x[3]], "txt_ft must share img_ft's dtype"),
])
def test_bad_inputs_name_the_argument(mutate, match):
    with pytest.raises((ValueError, TypeError), match=match):
        DiVELoss(8)(*mutate(_x()))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("index, name", [(0, "img_ft"), (3, "txt_pre")])
def test_non_finite_inputs_raise_and_keep_m(backend, index, name):
    loss_fn = DiVELoss(8, momentum=0.5, backend=backend)
    loss_fn(*_x())
    m_before = loss_fn.m.clone()
    x = _x()
    x[index][2, 3] = float("nan")
    with pytest.raises(ValueError, match=f"{name} has 1 row"):
        loss_fn(*x)
    assert torch.equal(loss_fn.m, m_before)
    # Without the check (no host sync): the loss is NaN and m is still protected.
    loss_fn.check_values = False
    assert torch.isnan(loss_fn(*x))
    assert torch.equal(loss_fn.m, m_before)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e20), (torch.float32, 1e30),
                                          (torch.bfloat16, 1e30)])
def test_overflowing_rows_are_like_nan_rows(backend, normalize, dtype, scale):
    """A finite row whose squared norm overflows the fp32 accumulator: NaN loss, m kept,
    other rows' gradients finite (that row's NaN when normalising); with the check, an
    error that says overflow."""
    loss_fn = DiVELoss(8, momentum=0.5, normalize=normalize, backend=backend,
                       check_values=False)
    loss_fn(*_x(dtype=dtype))
    m_before = loss_fn.m.clone()
    x = _x(dtype=dtype)
    x[0][2] = x[0][2].float().mul(scale / x[0][2].float().norm()).to(dtype)
    assert torch.isfinite(x[0]).all()
    a = x[0].clone().requires_grad_(True)
    loss = loss_fn(a, *x[1:])
    assert torch.isnan(loss) and torch.equal(loss_fn.m, m_before)
    loss.backward()
    assert torch.isfinite(a.grad[[0, 1, 3]]).all()
    assert torch.isnan(a.grad[2]).all() or not normalize
    loss_fn.check_values = True
    with pytest.raises(ValueError, match="img_ft has 1 row.*overflow"):
        loss_fn(*x)
    assert torch.equal(loss_fn.m, m_before)


@pytest.mark.parametrize("backend", ALL)
def test_zero_norm_rows(backend):
    x = _x()
    x[1][0] = 0.0
    with pytest.raises(ValueError, match="img_pre has 1 row.*zero norm"):
        DiVELoss(8, backend=backend)(*x)
    DiVELoss(8, normalize=False, backend=backend)(*x)  # fine without normalisation


def test_non_tensor_input_is_a_type_error():
    x = _x()
    with pytest.raises(TypeError, match="img_ft must be a torch.Tensor, got ndarray"):
        DiVELoss(8)(x[0].numpy(), *x[1:])
    with pytest.raises(TypeError, match="txt_pre must be a torch.Tensor, got list"):
        DiVELoss(8)(*x[:3], x[3].tolist())


def test_dtype_casts_keep_m_float32():
    loss_fn = DiVELoss(8, momentum=0.5)
    for cast in (lambda f: f.to(torch.bfloat16), lambda f: f.half(), lambda f: f.double(),
                 lambda f: f.to("cpu", torch.float16)):
        assert cast(loss_fn) is loss_fn and loss_fn.m.dtype == torch.float32
    assert loss_fn.to("meta").m.device.type == "meta"  # device moves still apply
    loss_fn = DiVELoss(8, momentum=0.5).bfloat16()
    loss_fn(*_x())
    other = DiVELoss(8).half()
    other.load_state_dict(loss_fn.state_dict())
    assert other.m.dtype == torch.float32 and torch.equal(other.m, loss_fn.m)


def test_constructor_checks():
    with pytest.raises(ValueError, match="momentum"):
        DiVELoss(8, momentum=1.5)
    with pytest.raises(ValueError, match="dim"):
        DiVELoss(0)
    for lam in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="lam"):
            DiVELoss(8, lam=lam)
        with pytest.raises(ValueError, match="lam"):
            dive_loss(*_x(), torch.zeros(8), lam=lam)


# --- dispatch --------------------------------------------------------------------------

def test_forcing_an_unusable_backend_names_why(monkeypatch):
    with pytest.raises(RuntimeError, match="'cuda' cannot run here: the cuda backend takes CUDA"):
        dive_loss(*_x(), torch.zeros(8), backend="cuda")
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(RuntimeError, match="unknown backend 'nope'"):
        dive_loss(*_x(), torch.zeros(8))


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select("cpu", torch.float32, 8) == "torch"
    monkeypatch.delenv(backends.ENV_VAR)
    expected = "cpu" if backends.unavailable_reason("cpu", "cpu") is None else "torch"
    assert backends.select("cpu", torch.float32, 8) == expected


def test_auto_selection_falls_back_past_every_gpu_kernels_width(monkeypatch):
    """Rows wider than the cuda kernels take (8192) and the Triton kernels (4096): the
    automatic choice for CUDA inputs is the torch backend (with its one warning), never a
    backend that then refuses the call."""
    from dive_fast.ops import extension
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(extension, "load", lambda: (True, ""))
    monkeypatch.setattr(extension, "has_kernel", lambda key: True)
    monkeypatch.setattr(extension, "cuda_max_dim", lambda: 8192)
    assert backends.unavailable_reason("cuda", "cuda", torch.float32, 8192) is None
    assert "at most 8192" in backends.unavailable_reason("cuda", "cuda", torch.float32, 8193)
    with pytest.warns(RuntimeWarning, match="using the torch backend"):
        backends._warned.clear()
        assert backends.select("cuda", torch.float32, 8193) == "torch"
    with pytest.raises(RuntimeError, match="at most 8192 values, got dim 9000"):
        backends.select("cuda", torch.float32, 9000, "cuda")


def test_info_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "dive_fast.info"], capture_output=True,
                         text=True, check=True).stdout
    for name in backends.BACKENDS:
        assert f"  {name}" in out
    assert "torch:" in out and "triton:" in out


def test_import_without_extension_falls_back():
    """With dive_fast._C unimportable, import works and the reference serves, with a warning."""
    code = ("import sys, warnings; sys.modules['dive_fast._C'] = None\n"
            "import torch, dive_fast\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    x = [torch.randn(3, 4) for _ in range(4)]\n"
            "    dive_fast.DiVELoss(4)(*x)\n"
            "print('WARN', [str(i.message) for i in w])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", backends.ENV_VAR)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout
    assert "using the torch backend" in out and "dive_fast._C is not importable" in out


def test_cuda_sources_compiled_into_extension():
    """The build compiles and links csrc/dive_cuda.cu whenever a CUDA toolkit is present."""
    if os.environ.get("DIVE_FAST_BUILD_CUDA") == "0":
        pytest.skip("DIVE_FAST_BUILD_CUDA=0: CUDA kernels deliberately not built")
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        pytest.skip("no CUDA toolkit (nvcc) on this machine: CUDA sources cannot be compiled")
    assert extension.load()[0], extension.load()[1]
    assert extension.has_kernel("CUDA"), "dive_fast._C was built without its CUDA kernels"


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_cpu_backward_recycles_gradient_blocks(backend):
    """Large gradients reuse freed blocks (no fresh pages per step) and stay exact."""
    extension.release_cpu_gradient_cache()
    x = make_inputs(1024, 300, seed=1)  # 1.2 MB per gradient: above the cache's minimum
    m, g = torch.randn(300), torch.tensor(0.7)
    args = (m, g, None, None, 1.0, 1.0, 1.0, True)
    want = dive_backward(*x, *args, "torch")
    first = dive_backward(*make_inputs(1024, 300, seed=2), *args, backend)
    pointers = {g.data_ptr() for g in first}
    del first
    assert extension.cpu_gradient_cache_bytes() > 0
    # The recycled blocks still hold the other inputs' gradients: all must be overwritten.
    again = dive_backward(*x, *args, backend)
    assert {g.data_ptr() for g in again} == pointers
    for got, ref in zip(again, want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    del again
    extension.release_cpu_gradient_cache()
    assert extension.cpu_gradient_cache_bytes() == 0


# --- host cost: no synchronisation, one config per key -----------------------------------

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_host_sync_without_value_check(backend, training):
    """check_values=False: forward and backward never read a value on the host, so the
    step can be captured in a CUDA graph (here: the dispatch-level check on the CPU)."""
    x = make_inputs(11, 16, seed=2)
    a, t = x[0].clone().requires_grad_(True), x[2].clone().requires_grad_(True)
    loss_fn = DiVELoss(16, backend=backend, check_values=False).train(training)
    loss_fn(a, x[1], t, x[3])  # the first call validates and chooses the backend
    with HostSyncCounter() as recorder:
        loss, parts = loss_fn(a, x[1], t, x[3], return_parts=True)
        (loss + parts["avl"]).backward()
        loss_fn(a, x[1], t, x[3]).backward()
    assert recorder.syncs == 0
    with HostSyncCounter() as recorder:
        float(loss_fn(a, x[1], t, x[3]).detach())
    assert recorder.syncs == 1  # the recorder sees a sync when there is one


def test_config_reused_and_renewed_when_an_option_changes():
    """The checks run once per key; changing an option or a shape takes the checks again."""
    from dive_fast import loss as loss_module
    loss_fn = DiVELoss(8, backend="torch", check_values=False)
    loss_fn(*_x())
    configs = len(loss_module._CONFIGS)
    loss_fn(*_x())
    assert len(loss_module._CONFIGS) == configs
    loss_fn.lam = -1.0
    with pytest.raises(ValueError, match="lam"):
        loss_fn(*_x())
    loss_fn.lam = 3.0
    loss_fn(*_x())
    assert len(loss_module._CONFIGS) == configs + 1
    with pytest.raises(ValueError, match="img_pre has shape"):
        loss_fn(_x()[0], _x(B=3)[1], *_x()[2:])


@pytest.mark.parametrize("backend", ALL)
def test_second_derivative_raises(backend):
    """The kernels have no derivatives: create_graph=True gives first-order gradients (the
    usual ones), and differentiating them again raises, saying so: not 'does not require
    grad', and not, in a sum with other terms, a second derivative that silently treats
    DiVE's gradient as a constant."""
    x = _x()
    a = x[0].clone().requires_grad_(True)
    loss_fn = DiVELoss(8, backend=backend).eval()
    (g,) = torch.autograd.grad(loss_fn(a, *x[1:]), a, create_graph=True)
    torch.testing.assert_close(g, torch.autograd.grad(loss_fn(a, *x[1:]), a)[0])
    unsupported = "second derivatives of DiVE are not supported"
    with pytest.raises(RuntimeError, match=unsupported):
        g.sum().backward()
    with pytest.raises(RuntimeError, match=unsupported):
        torch.autograd.grad(g.sum(), a)
    loss_fn(a, *x[1:]).backward(create_graph=True)
    with pytest.raises(RuntimeError, match=unsupported):
        a.grad.sum().backward()
    # A gradient penalty over a loss that includes DiVE among other terms.
    w = torch.ones(8, requires_grad=True)
    (gw,) = torch.autograd.grad(loss_fn(x[0] * w, *x[1:]) + (w ** 3).sum(), w,
                                create_graph=True)
    with pytest.raises(RuntimeError, match=unsupported):
        torch.autograd.grad(gw.sum(), w)
