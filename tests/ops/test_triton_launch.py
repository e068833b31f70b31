"""The Triton launchers' GPU-path guarantees that the CPU can show: each launch
runs under the inputs' device; 64-bit offsets where a view's B' x row stride reaches 2^31
(a large stride over a small allocation, under the interpreter); strided m and m_out; no
flushing square root in the compiled kernels (PTX for sm_90, no GPU needed); statistics
summed across tiles without float32 drift."""
import contextlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from dive_fast.ops.dive_reference import NORM_U_SUM, PVL_SUM, dive_loss_float64
from dive_fast.testing import make_inputs

triton = pytest.importorskip("triton", reason="triton is not installed")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the interpreter runs these launches on CPU tensors", allow_module_level=True)

from dive_fast.ops import dive_triton  # noqa: E402

# The checkout: the child process imports its tools/ (not installed).
ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("_dive_stats_kernel", "_dive_finalize_kernel", "_dive_backward_kernel")


def _forward_backward(x, m, m_out=None):
    """One forward (statistics, finalisation) and one backward through the launchers."""
    out = dive_triton.triton_forward(*x, m, m_out, True, 0.9, 1000.0, 1000.0)
    one = torch.ones(())
    grads = dive_triton.triton_backward(*x, out[3], one, None, None, 1000.0, 1000.0,
                                        2.0 / x[0].shape[0], True)
    return out, grads


def test_every_launch_runs_under_the_inputs_device(monkeypatch):
    """Each of the three launches happens inside the launcher's device guard, entered for
    the tensors it launches on (Triton launches on the current device and its stream)."""
    entered, launches = [], []

    def guard(x):
        @contextlib.contextmanager
        def scope():
            entered.append(x.device)
            try:
                yield
            finally:
                entered.pop()
        return scope()

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.__name__, list(entered)))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(dive_triton, "_on_device", guard, raising=False)
    for name in KERNELS:
        monkeypatch.setattr(dive_triton, name, Recorder(getattr(dive_triton, name)))
    x = make_inputs(12, 24, seed=1)
    _forward_backward(x, torch.zeros(24))
    assert [name for name, _ in launches] == list(KERNELS)
    assert all(devices == [x[0].device] for _, devices in launches), launches


def test_device_guard_enters_the_inputs_device_only_when_needed(monkeypatch):
    """cuda:1 inputs with device 0 current: the guard makes cuda:1 current (whose current
    stream Triton then takes); inputs on the current device or the CPU: no driver call."""
    made = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: made.append(d) or contextlib.nullcontext())
    on = lambda device: types.SimpleNamespace(device=torch.device(device))  # noqa: E731
    with dive_triton._on_device(on("cuda:1")):
        pass
    assert made == [torch.device("cuda:1")]
    for device in ("cuda:0", "cpu"):
        with dive_triton._on_device(on(device)):
            pass
    assert made == [torch.device("cuda:1")]


def test_offsets_past_2_31_elements_do_not_wrap():
    """A bf16 view of 3 rows with row stride 2^30 (row 2 at element 2^31) over 8 GiB of
    address space, of which a few pages are touched. A 32-bit offset wraps row 2 to 2^32
    elements (8 GiB) earlier, where a NaN is planted: the statistics and the gradients
    must equal those of a contiguous copy."""
    B, D, stride = 3, 16, 2**30
    base = 2**31  # the view's start: a wrapped read of row 2 lands on element 0
    storage = torch.empty(base + (B - 1) * stride + D, dtype=torch.bfloat16)
    storage[:D] = float("nan")
    view = storage.as_strided((B, D), (stride, 1), base)
    x = list(make_inputs(B, D, dtype=torch.bfloat16, seed=5))
    view.copy_(x[0])
    m = torch.zeros(D)
    (loss, *_, info), grads = _forward_backward([view, *x[1:]], m)
    (ref, *_, ref_info), ref_grads = _forward_backward(x, m)
    assert info[2:].sum().item() == 0, "a wrapped read: non-finite rows"
    assert torch.equal(loss, ref) and torch.equal(info, ref_info)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_wide_offsets_only_when_needed():
    x = make_inputs(4, 16)
    assert not dive_triton._wide(4, 16, dive_triton._strides(*x))
    assert dive_triton._wide(2, 16, [2**31, 1])
    assert dive_triton._wide(3, 16, [2**30, 1] + [16, 1] * 3)  # the view above


def test_strided_m_and_m_out():
    """m and m_out every other element of larger buffers: the float64 oracle's loss and
    m_new, and the neighbours of m_out untouched."""
    D = 24
    x = make_inputs(10, D, seed=7)
    m_buf = torch.randn(2 * D, generator=torch.Generator().manual_seed(1))
    m = m_buf[::2]
    out_buf = torch.full((2 * D,), 7.0)
    m_out = out_buf[1::2]
    (loss, _, _, m_new, _, _), grads = _forward_backward(x, m, m_out)
    ref, _, _, ref_m = dive_loss_float64(*x, m, lam=1000.0, momentum=0.9)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(m_out.double(), ref_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_new, m_out)
    assert torch.equal(out_buf[0::2], torch.full((D,), 7.0)), "m_out wrote its neighbours"
    (_, contiguous_grads) = _forward_backward(x, m.contiguous(), m_out.clone())
    assert all(torch.equal(g, r) for g, r in zip(grads, contiguous_grads))


def test_no_flushing_square_root_in_the_kernels():
    """``tl.sqrt`` compiles to sqrt.approx.ftz.f32, which flushes a subnormal squared norm
    (a row with |x| < 1.1e-19) to zero: a NaN row no count reports (the interpreter's exact
    sqrt hides it). The statistics and backward kernels, compiled to PTX for sm_90 in a
    process without the interpreter, must hold no approximate square root."""
    code = ("from tools import aot\n"
            "for k in ('_dive_stats_kernel', '_dive_backward_kernel'):\n"
            "    for D in (512, 1024):\n"
            "        ptx = aot.triton_ptx(k, D)\n"
            "        assert 'sqrt.' in ptx, (k, D)\n"
            "        assert 'sqrt.approx' not in ptx, (k, D)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_sums_over_tiles_do_not_drift(monkeypatch):
    """Each row slot of a part sums its rows' PVL terms, |u| and M2 terms over its tiles.
    Crafted (one part, 60 tiles of 8 rows, D = 256): one row a slot with |u - v|^2 = 1,
    then rows of 5.5e-8 each, under half an ulp of a float32 sum of 1, hence all lost in
    float32 (a relative 3e-6 here; B' in millions loses more); in float64 they count."""
    monkeypatch.setattr(dive_triton, "INTERPRETED_PARTS", 1)
    D, tiles = 256, 60
    cfg = dive_triton.launch_config(D)
    B = cfg.block_b * tiles
    a = torch.zeros(B, D)
    a[:, 0] = 5.5e-8 ** 0.5
    a[:cfg.block_b, 0] = 1.0  # each slot's first row
    zero = torch.zeros(B, D)
    _, scalars, _ = dive_triton.triton_stats(a, zero, zero, zero, False)
    want = (a.double() ** 2).sum()
    got = scalars[:, PVL_SUM].double().sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    norms = scalars[:, NORM_U_SUM].double().sum()
    assert norms.item() == pytest.approx(a.double().norm(dim=1).sum().item(), rel=1e-6)


# (SMs, blocks per SM) -> parts, and (parts, SMs, blocks per SM) -> waves, by hand: A100
# 108 SMs, H100 SXM and H200 132, H100 PCIe 114, L40S 142.
PARTS_BY_HAND = [(108, 2, 216), (132, 2, 264), (114, 2, 228), (142, 1, 142), (132, 3, 396),
                 (114, 1, 114), (0, 2, 2), (132, 0, 132)]
WAVES_BY_HAND = [(264, 108, 2, 2), (264, 108, 1, 3), (264, 114, 2, 2), (264, 132, 2, 1),
                 (264, 142, 2, 1), (216, 108, 2, 1), (228, 114, 2, 1), (1, 132, 2, 1)]


def test_parts_one_full_wave_per_device(monkeypatch):
    """K = SMs x the configuration's blocks per SM: one wave, where the fixed 264 took two
    on an A100 and left a 36-block tail on an H100 PCIe."""
    for sms, blocks, parts in PARTS_BY_HAND:
        assert dive_triton.stats_parts(sms, blocks) == parts, (sms, blocks)
    for parts, sms, blocks, n in WAVES_BY_HAND:
        assert dive_triton.waves(parts, sms, blocks) == n, (parts, sms, blocks)
    for sms in (108, 114, 132, 142):
        monkeypatch.setattr(dive_triton, "_sm_count", lambda index, sms=sms: sms)
        for D in (16, 512, 1024, 4096):
            for size in (4, 2):
                cfg = dive_triton.launch_config(D, size)
                blocks = dive_triton.STATS_BLOCKS_PER_SM[cfg.block_d, cfg.num_warps]
                parts = dive_triton.num_parts(torch.device("cuda", 1), cfg)
                assert dive_triton.waves(parts, sms, blocks) == 1 and parts % sms == 0
