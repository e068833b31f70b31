"""The CUDA kernels, run without a GPU: csrc/dive_cuda.cu's launchers and kernels compiled
against the CPU model of tests/ops/cuda_emulation/cuda_emulation.h (every CUDA thread a fiber,
barriers and shuffles as the hardware binds them, cp.async copies landing only at their
wait), checked against the float64 oracle, for bitwise determinism (pipeline depth, block
arrival order) and for the launch shape's promises (a fixed number of parts)."""
import itertools
import shutil
from pathlib import Path

import pytest
import torch
from helpers.parts import uneven_parts

from dive_fast.ops.dive_reference import finalize
from dive_fast.testing import ERROR_FLOOR, make_inputs, relative_error, run_eager

ROOT = Path(__file__).resolve().parents[2]
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"  # test-only, not shipped
H100_SHARED = 232448  # opt-in shared memory per block: three stages of 32 or 64 KB
PARTS = 264

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load
    # dive_emulated.cpp includes csrc/dive_cuda.cu, whose kernels include cuda_emulation.h
    return load(name="dive_fast_emulated", sources=[str(EMULATION / "dive_emulated.cpp")],
                extra_include_paths=[str(ROOT / "csrc"), str(EMULATION)],
                extra_cflags=["-O2", "-std=c++20"])


def emulated(emu, inputs, m, lam=1000.0, momentum=0.99, normalize=True,
             shared_limit=H100_SHARED):
    """Loss, parts, new m and both gradients (of the loss) from the emulated CUDA ops."""
    loss, avl, pvl, m_new, _, _ = emu.forward(*inputs, m, None, normalize, momentum, lam, lam,
                                              shared_limit)
    g = torch.ones(())
    grad_img, grad_txt = emu.backward(*inputs, m_new, g, None, None, lam, lam,
                                      2.0 / inputs[0].shape[0], normalize)
    return dict(loss=loss, avl=avl, pvl=pvl, m=m_new, grad_img=grad_img, grad_txt=grad_txt)


def assert_exact(emu, inputs, m, **options):
    """Every quantity within twice PyTorch's own error in the inputs' dtype (+ a floor)."""
    dtype = inputs[0].dtype
    ours = emulated(emu, inputs, m, **options)
    oracle = run_eager(inputs, m, torch.float64, **options)
    own = run_eager(inputs, m, dtype, **options)
    grad_scale = 2 * options.get("lam", 1000.0) / inputs[0].shape[0]
    bad = []
    for q, value in ours.items():
        floor = grad_scale if q.startswith("grad") else 0.0
        bound = 2 * relative_error(own[q], oracle[q], floor) + ERROR_FLOOR[dtype]
        err = relative_error(value, oracle[q], floor)
        if not err <= bound:
            bad.append((q, err, bound))
    assert not bad, bad


# (B', D, dtype of the fine-tuned, of the frozen inputs): rows within a warp and across 2,
# 4 and 8 warps, one row per tile (D = 4096, 4 chunks a thread), 2-byte and mixed chunks,
# B' = 1, ragged last tiles; D = 19 and 45 take the portable kernels.
SHAPES = [(1, 8, "float32", "float32"), (37, 64, "float32", "float32"),
          (70, 512, "float32", "float32"), (19, 1024, "float32", "float32"),
          (5, 4096, "float32", "float32"), (37, 512, "bfloat16", "bfloat16"),
          (9, 1024, "bfloat16", "bfloat16"), (33, 96, "float16", "float16"),
          (17, 24, "float32", "bfloat16"), (13, 40, "bfloat16", "float32"),
          (7, 19, "float32", "float32"), (23, 45, "bfloat16", "bfloat16")]


@pytest.mark.parametrize("B, D, ft, pre", SHAPES, ids=lambda v: str(v))
def test_exact_against_float64(emu, B, D, ft, pre):
    x = make_inputs(B, D, seed=B * 31 + D)
    x = [z.to(getattr(torch, ft if i % 2 == 0 else pre)) for i, z in enumerate(x)]
    m = 0.1 * torch.randn(D, generator=torch.Generator().manual_seed(1))
    assert_exact(emu, x, m)


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous(emu, layout):
    x = make_inputs(23, 48, layout=layout, seed=3)
    assert_exact(emu, x, 0.05 * torch.ones(48))


def test_row_stride_aligned_view_takes_fast_path_exactly(emu):
    """Rows of a wider tensor (stride 72, 16-byte aligned): the fast kernels, exact."""
    x = [z[:, :64] for z in make_inputs(29, 72, seed=4)]
    assert not x[0].is_contiguous()
    assert_exact(emu, x, torch.zeros(64))


@pytest.mark.parametrize("options", [dict(normalize=False), dict(momentum=0.0),
                                     dict(lam=1.0, momentum=0.5)], ids=str)
def test_options(emu, options):
    x = make_inputs(29, 40, seed=11)
    assert_exact(emu, x, 0.1 * torch.randn(40, generator=torch.Generator().manual_seed(2)),
                 **options)


def test_nearly_equal_difference_vectors(emu):
    """u_j, v_j ~ c, m ~ c: AVL tiny against |c|^2, kept by Welford and Chan (no expanded
    |u|^2 - 2 m.u + |m|^2)."""
    B, D, eps = 300, 64, 1e-4
    g = torch.Generator().manual_seed(0)
    c = torch.randn(D, generator=g, dtype=torch.float64)
    pre = [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(2)]
    ft = [p + c + eps * torch.randn(B, D, generator=g, dtype=torch.float64) for p in pre]
    x = [ft[0].float(), pre[0].float(), ft[1].float(), pre[1].float()]
    ours = emulated(emu, x, c.float(), normalize=False)
    oracle = run_eager(x, c.float(), torch.float64, normalize=False)
    for q in ("avl", "pvl"):
        assert relative_error(ours[q], oracle[q]) < 2e-2, q


def test_bitwise_the_same_at_every_pipeline_depth(emu):
    """One, two or three staged tiles (the device's shared memory decides): the same bits."""
    x = make_inputs(300, 512, seed=5)
    m = torch.zeros(512)
    runs = [emulated(emu, x, m, shared_limit=limit) for limit in (40000, 70000, H100_SHARED)]
    for other in runs[1:]:
        for q in runs[0]:
            assert torch.equal(other[q], runs[0][q]), q


def test_parts_fixed_whatever_the_batch(emu):
    for B in (1, 600):
        means, scalars, workspace = emu.stats(*make_inputs(B, 32, seed=B), True, H100_SHARED)
        assert means.shape == (PARTS, 2, 32) and scalars.shape == (PARTS, 14)
        assert scalars[:, 0].sum().item() == B
        assert workspace.view(torch.int32)[0].item() == 0  # the ticket, zeroed for the finalisation


@pytest.mark.parametrize("spread", [1.0, 1e-4], ids=["spread", "nearly-equal"])
def test_finalisation_of_many_uneven_parts(emu, spread):
    """37 parts of 1 to 9 rows, D = 300 (10 blocks of columns, the last one partial), no
    workspace (a zeroed ticket made here): against the float64 finalisation."""
    means, scalars, m = uneven_parts(spread=spread)
    loss, avl, pvl, m_new, b, info = emu.finalize(means, scalars, None, m, None, None, 0.99,
                                                  1000.0, 1000.0, [])
    avl64, pvl64, m64, b64, info64 = finalize(means.double(), scalars.double(), m.double(), 0.99)
    for name, got, want in (("avl", avl, avl64), ("pvl", pvl, pvl64), ("m_new", m_new, m64),
                            ("b", b, b64), ("info", info, info64),
                            ("loss", loss, 1000.0 * (avl64 + pvl64))):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7, msg=name)


def test_every_arrival_order_gives_the_same_bits(emu):
    """The last block to take the ticket sums the partials in block order: any order of
    arrival, the same bits (every order of 4 blocks; reversed and shuffled orders of 10)."""
    means, scalars, m = uneven_parts(K=11, D=100)  # 4 blocks of 32 columns
    orders = [list(p) for p in itertools.permutations(range(4))]
    results = [emu.finalize(means, scalars, None, m, None, None, 0.9, 10.0, 3.0, o) for o in orders]
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert torch.equal(got, want)
    means, scalars, m = uneven_parts(K=11, D=300)  # 10 blocks
    g = torch.Generator().manual_seed(0)
    orders = [[], list(range(9, -1, -1))]
    orders += [torch.randperm(10, generator=g).tolist() for _ in range(4)]
    results = [emu.finalize(means, scalars, None, m, None, None, 0.9, 10.0, 3.0, o) for o in orders]
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            assert torch.equal(got, want)


def test_non_finite_batch_keeps_m_and_resets_ticket(emu):
    """A NaN row: m kept (in m_out, which is m itself), NaN loss; the ticket back at 0."""
    x = make_inputs(40, 96, seed=2)
    x[0][3, 5] = float("nan")
    m = torch.randn(96)
    before = m.clone()
    means, scalars, workspace = emu.stats(*x, True, H100_SHARED)
    loss, _, _, m_new, _, info = emu.finalize(means, scalars, workspace, m, m, None, 0.9, 1.0,
                                              1.0, [])
    assert torch.isnan(loss) and torch.equal(m, before) and torch.equal(m_new, before)
    assert info[2].item() == 1  # one non-finite row of img_ft
    assert workspace.view(torch.int32)[0].item() == 0


def test_m_out_in_place_and_low_precision_m(emu):
    x = make_inputs(21, 64, seed=6)
    m = (0.1 * torch.randn(64)).bfloat16()
    want = emu.forward(*x, m.clone(), None, True, 0.9, 1.0, 1.0, H100_SHARED)
    buffer = m.clone()
    got = emu.forward(*x, buffer, buffer, True, 0.9, 1.0, 1.0, H100_SHARED)
    assert torch.equal(buffer, want[3]) and torch.equal(got[3], want[3])
    assert got[3].dtype == torch.bfloat16


# Opt-in shared memory per block: a 99 KiB part (L4, L40S, RTX: sm_86/89), an A100, an
# H100/H200, and a 64 KiB part (sm_75).
SHARED_LIMITS = (101376, 166912, H100_SHARED, 65536)
RESERVE = 4096  # kStaticSharedReserve: the kernels' static arrays


@pytest.mark.parametrize("limit", SHARED_LIMITS)
def test_stats_plan_fits_the_device_shared_memory(emu, limit):
    """Every plan the launcher may choose fits the device's shared memory with the static
    arrays' reserve, or says it does not fit (and the launcher refuses); on a 99 KiB part
    every dim up to 6000 fits."""
    for D, (ft, pre), aligned in itertools.product(
            (8, 512, 1024, 2048, 4096, 6000, 6300, 8192), ((4, 4), (2, 2), (4, 2)),
            (True, False)):
        _, rows, stages, shared, fits = emu.stats_plan(D, ft, pre, aligned, limit)
        assert not fits or shared + RESERVE <= limit, (D, ft, pre, aligned, shared)
        assert rows >= 1 and stages >= 1
        if D <= (6000 if limit >= 101376 else 3000):
            assert fits, (D, ft, pre, aligned, limit)


def test_stats_beyond_the_shared_memory_refused_clearly_and_fitting_dims_exact(emu):
    """D = 8192 on a 99 KiB part needs 132 KiB: refused, naming the dim and the limit (the
    launch would fail, or worse); D = 6000 fits one row a tile, exactly."""
    x = make_inputs(3, 8192, seed=1)
    with pytest.raises(RuntimeError, match="dim 8192 need .* shared memory .* allows 101376"):
        emu.forward(*x, torch.zeros(8192), None, True, 0.99, 1.0, 1.0, 101376)
    x = make_inputs(3, 6000, seed=2)
    ours = emulated(emu, x, torch.zeros(6000), shared_limit=101376)
    oracle = run_eager(x, torch.zeros(6000), torch.float64)
    for q in ours:
        assert relative_error(ours[q], oracle[q], 1e-3 if q.startswith("grad") else 0.0) < 1e-4
    # A 64 KiB part: the fast kernel's one stage of D = 4096 float32 (64 KiB) does not fit;
    # at D = 2048 one stage does, and gives an H100's bits.
    with pytest.raises(RuntimeError, match="dim 4096 need"):
        emu.forward(*make_inputs(3, 4096), torch.zeros(4096), None, True, 0.99, 1.0, 1.0, 65536)
    x = make_inputs(9, 2048, seed=3)
    small, large = (emulated(emu, x, torch.zeros(2048), shared_limit=s) for s in (65536,
                                                                                  H100_SHARED))
    assert all(torch.equal(small[q], large[q]) for q in small)


def test_float64_m_accepted(emu):
    """A float64 m (which the other backends accept): the float32 m's results, m_new and
    m_out in float64."""
    x = make_inputs(21, 40, seed=6)
    m = 0.1 * torch.randn(40, generator=torch.Generator().manual_seed(3))
    want = emu.forward(*x, m, None, True, 0.9, 10.0, 10.0, H100_SHARED)
    m_out = torch.zeros(40, dtype=torch.float64)
    got = emu.forward(*x, m.double(), m_out, True, 0.9, 10.0, 10.0, H100_SHARED)
    assert all(torch.equal(g, w) for g, w in zip(got[:3], want[:3]))
    assert got[3].dtype == torch.float64 and torch.equal(got[3], want[3].double())
    assert torch.equal(m_out, want[3].double())
    grads = emu.backward(*x, m.double(), torch.ones(()), None, None, 10.0, 10.0, 0.1, True)
    want_grads = emu.backward(*x, m, torch.ones(()), None, None, 10.0, 10.0, 0.1, True)
    assert all(torch.equal(g, w) for g, w in zip(grads, want_grads))


@pytest.mark.parametrize("argument", ["m", "m_out", "gradient"])
def test_tensors_on_another_device_refused_naming_the_argument(emu, argument):
    """m, m_out and the upstream gradients on another device than the inputs (the meta
    device stands in for another GPU): a clear error naming the argument, not a kernel
    reading another device's address."""
    x = make_inputs(5, 16)
    other = lambda t: t.to("meta")  # noqa: E731
    m, m_out, g = torch.zeros(16), torch.zeros(16), torch.ones(())
    if argument == "gradient":
        with pytest.raises(RuntimeError, match="gradient of the loss must be on the inputs'"):
            emu.backward(*x, m, other(g), None, None, 1.0, 1.0, 0.4, True)
        return
    if argument == "m":
        m = other(m)
    else:
        m_out = other(m_out)
    with pytest.raises(RuntimeError, match=f"{argument} must be on the inputs' device"):
        emu.forward(*x, m, m_out, True, 0.99, 1.0, 1.0, H100_SHARED)


# Parts and waves by hand: (SMs, blocks per SM) -> parts; (parts, SMs, blocks per SM) ->
# waves. A100 108 SMs, H100 SXM 132, H100 PCIe 114, H200 132, L40S 142.
PARTS_BY_HAND = [(108, 2, 216), (132, 2, 264), (114, 2, 228), (142, 1, 142), (132, 3, 396),
                 (114, 1, 114), (0, 2, 2), (132, 0, 132)]
WAVES_BY_HAND = [(264, 108, 2, 2), (264, 108, 1, 3), (264, 114, 2, 2), (264, 132, 2, 1),
                 (264, 142, 2, 1), (216, 108, 2, 1), (228, 114, 2, 1), (1, 132, 2, 1)]


def test_parts_one_full_wave(emu):
    """The CUDA plan's parts (one wave: SMs x blocks per SM) and waves against a table
    written by hand; 264 parts took 2 waves on an A100 at 2 blocks an SM (3 at 1) and
    left a 36-block tail on an H100 PCIe."""
    for sms, blocks, parts in PARTS_BY_HAND:
        assert emu.stats_parts(sms, blocks) == parts, (sms, blocks)
    for parts, sms, blocks, waves in WAVES_BY_HAND:
        assert emu.waves(parts, sms, blocks) == waves, (parts, sms, blocks)
