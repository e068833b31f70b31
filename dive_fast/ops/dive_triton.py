"""Triton kernels for the DiVE regulariser (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Forward, two launches: ``_dive_stats_kernel``, a persistent grid; each program walks row
blocks, loads the four [BLOCK_B, D] tiles once, normalises, forms u and v, and keeps a
running (count, mean, M2) of u and v merged block by block with Chan's update, plus the
PVL and norm sums: one read of the inputs, [K, 2, D] partials. Then
``_dive_finalize_kernel``, one program: the partials' batch mean b, the EMA update of m
(kept when b is not finite), both losses and the info counts (the same mathematics as
``dive.finalize``, the reference's).
Backward, one launch: one row block per program reads the four tiles and writes both
gradients; the loss coefficients come from the upstream gradients inside the kernel.
``launch_config`` is the launchers' one choice of block sizes and warps (the
ahead-of-time compile check enumerates it).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .dive_reference import INFO_SIZE, NUM_SCALARS, accumulation_dtype

# fp32 elements per [BLOCK_B, BLOCK_D] tile and per thread, and at most 8 warps: no
# configuration spills on sm_80 or sm_90 (`python -m dive_fast.ops.aot`,
# benchmarks/results/gpu_kernels.csv). Tried and dropped: 4096-element tiles at 8 warps
# (ptxas capped some at 128 registers and spilled, D <= 256), 16 warps (capped at 64,
# spills), rows of 8192 (32 warps, 64 registers: spills).
TILE_ELEMENTS = 2048
ELEMENTS_PER_THREAD = 8
MAX_DIM = 4096  # wider rows: the cuda backend (or the reference)


@triton.jit
def _tile(ptr, rows, cols, mask, stride_r, stride_c):
    """A [BLOCK_B, BLOCK_D] tile of a strided [B, D] input, as float32 (zeros off the edge)."""
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _row_scale(x, rmask, NORMALIZE: tl.constexpr, CHECK: tl.constexpr = True):
    sumsq = tl.sum(x * x, axis=1)
    if NORMALIZE:
        # Padding rows divide by 1, not 0; a real zero-norm row still gives inf (reported).
        inv = 1.0 / tl.sqrt(tl.where(rmask, sumsq, 1.0))
    else:
        inv = 1.0
    if CHECK:  # an overflowing squared norm gives NaN (not 1/inf = 0): a NaN row
        inv = tl.where(sumsq < float("inf"), inv, float("nan"))
    inv = tl.where(rmask, inv, 0.0)
    return sumsq, inv


@triton.jit
def _count(flag, rmask):
    return tl.sum(tl.where(rmask & flag, 1.0, 0.0), axis=0)


@triton.jit
def _dive_stats_kernel(
    A, A0, T, T0, MEANS, SCAL, B, D,
    s_a0, s_a1, s_p0, s_p1, s_t0, s_t1, s_q0, s_q1,
    NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SCAL: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    zero = tl.sum(tl.zeros([BLOCK_D], dtype=tl.float32), axis=0)
    n_run = zero
    m2_u = zero
    m2_v = zero
    pvl = zero
    norm_u = zero
    norm_v = zero
    bad = tl.zeros([8], dtype=tl.float32)
    idx8 = tl.arange(0, 8)
    mean_u = tl.zeros([BLOCK_D], dtype=tl.float32)
    mean_v = tl.zeros([BLOCK_D], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(B, BLOCK_B), nprog):
        rows = blk * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = rows < B
        mask = rmask[:, None] & cmask[None, :]
        a = _tile(A, rows, cols, mask, s_a0, s_a1)
        a0 = _tile(A0, rows, cols, mask, s_p0, s_p1)
        t = _tile(T, rows, cols, mask, s_t0, s_t1)
        t0 = _tile(T0, rows, cols, mask, s_q0, s_q1)
        ss_a, inv_a = _row_scale(a, rmask, NORMALIZE)
        ss_a0, inv_a0 = _row_scale(a0, rmask, NORMALIZE)
        ss_t, inv_t = _row_scale(t, rmask, NORMALIZE)
        ss_t0, inv_t0 = _row_scale(t0, rmask, NORMALIZE)
        u = a * inv_a[:, None] - a0 * inv_a0[:, None]
        v = t * inv_t[:, None] - t0 * inv_t0[:, None]
        nb = tl.sum(tl.where(rmask, 1.0, 0.0), axis=0)
        bu = tl.sum(u, axis=0) / nb
        bv = tl.sum(v, axis=0) / nb
        du = tl.where(mask, u - bu[None, :], 0.0)
        dv = tl.where(mask, v - bv[None, :], 0.0)
        duv = u - v
        pvl += tl.sum(tl.sum(duv * duv, axis=1), axis=0)
        norm_u += tl.sum(tl.sqrt(tl.sum(u * u, axis=1)), axis=0)
        norm_v += tl.sum(tl.sqrt(tl.sum(v * v, axis=1)), axis=0)
        # Chan et al.: merge (nb, bu, M2_block) into the running (n_run, mean_u, m2_u).
        tot = n_run + nb
        w = nb / tot
        cross = n_run * w
        eu = bu - mean_u
        ev = bv - mean_v
        m2_u += tl.sum(tl.sum(du * du, axis=1), axis=0) + cross * tl.sum(eu * eu, axis=0)
        m2_v += tl.sum(tl.sum(dv * dv, axis=1), axis=0) + cross * tl.sum(ev * ev, axis=0)
        mean_u += eu * w
        mean_v += ev * w
        n_run = tot
        # sumsq <= FLT_MAX is False for NaN and Inf.
        bad += tl.where(idx8 == 0, _count(~(ss_a <= 3.4028234663852886e38), rmask), 0.0)
        bad += tl.where(idx8 == 1, _count(~(ss_a0 <= 3.4028234663852886e38), rmask), 0.0)
        bad += tl.where(idx8 == 2, _count(~(ss_t <= 3.4028234663852886e38), rmask), 0.0)
        bad += tl.where(idx8 == 3, _count(~(ss_t0 <= 3.4028234663852886e38), rmask), 0.0)
        bad += tl.where(idx8 == 4, _count(ss_a == 0.0, rmask), 0.0)
        bad += tl.where(idx8 == 5, _count(ss_a0 == 0.0, rmask), 0.0)
        bad += tl.where(idx8 == 6, _count(ss_t == 0.0, rmask), 0.0)
        bad += tl.where(idx8 == 7, _count(ss_t0 == 0.0, rmask), 0.0)
    out = MEANS + pid * 2 * D
    tl.store(out + cols, mean_u, mask=cmask)
    tl.store(out + D + cols, mean_v, mask=cmask)
    scal = SCAL + pid * NUM_SCAL
    tl.store(scal + 0, n_run)
    tl.store(scal + 1, m2_u)
    tl.store(scal + 2, m2_v)
    tl.store(scal + 3, pvl)
    tl.store(scal + 4, norm_u)
    tl.store(scal + 5, norm_v)
    tl.store(scal + 6 + idx8, bad)


@triton.jit
def _parts_tile(MEANS, SCAL, kk, cols, K, D, NUM_SCAL: tl.constexpr):
    """Parts kk's row counts [BLOCK_K] and u, v means [BLOCK_K, BLOCK_D]; zeros off the
    edge (count 0: no weight)."""
    kmask = kk < K
    mask = kmask[:, None] & (cols < D)[None, :]
    part = MEANS + kk[:, None] * 2 * D + cols[None, :]
    return (tl.load(SCAL + kk * NUM_SCAL, mask=kmask, other=0.0),
            tl.load(part, mask=mask, other=0.0), tl.load(part + D, mask=mask, other=0.0))


@triton.jit
def _dive_finalize_kernel(
    MEANS, SCAL, M, B_GLOBAL, M_NEW, M_OUT, B_OUT, LOSS, AVL, PVL, INFO, K, D,
    momentum, rate, lam_avl, lam_pvl,
    HAS_B: tl.constexpr, HAS_M_OUT: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_SCAL: tl.constexpr,
):
    """One program. b: the parts' weighted mean of u and v (B_GLOBAL instead when given:
    the mean over ranks); m_new = momentum m + rate b (rate = 1 - momentum, formed in
    float64 on the host: 1 - fp32(0.99) is off by 1e-6), or m where b is not
    finite; AVL = (sum M2 + sum_k n_k |mean_k - m_new|^2) / n, the second sum taken as
    dev + 2n |b_local - m_new|^2 with dev the parts' squared deviations about their own
    weighted mean b_local: every term non-negative, no cancellation.

    b_local and dev take two passes over the parts, each accumulating a [BLOCK_K, BLOCK_D]
    tile elementwise and reducing it once at the end: no reduction (and no barrier) inside
    the loop over parts, whose loads are then independent of each other. (The first H200
    run's forward was 5-25x the HBM floor; a running merge reduced across warps twice per
    tile of parts, with the tile's loads waiting behind it.)"""
    ks = tl.arange(0, BLOCK_K)
    cols0 = tl.arange(0, BLOCK_D)
    sc = tl.arange(0, 16)
    sums = tl.zeros([16], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        smask = (kk < K)[:, None] & (sc < NUM_SCAL)[None, :]
        sums += tl.sum(tl.load(SCAL + kk[:, None] * NUM_SCAL + sc[None, :], mask=smask,
                               other=0.0), axis=0)
    total = tl.sum(tl.where(sc == 0, sums, 0.0), axis=0)
    dev = total * 0.0
    bad = total * 0.0
    # Pass 1, per column block: b_local (the parts' u and v means, each weighing its row
    # count), then dev, their squared deviations about it.
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        cmask = cols < D
        acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            n, u, v = _parts_tile(MEANS, SCAL, k0 + ks, cols, K, D, NUM_SCAL)
            acc += n[:, None] * (u + v)
        mean = tl.sum(acc, axis=0) / (2.0 * total)
        acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            n, u, v = _parts_tile(MEANS, SCAL, k0 + ks, cols, K, D, NUM_SCAL)
            du = u - mean[None, :]
            dv = v - mean[None, :]
            acc += n[:, None] * (du * du + dv * dv)  # off the edges: count 0, or u = v = b = 0
        dev += tl.sum(tl.sum(acc, axis=0), axis=0)
        tl.store(B_OUT + cols, mean, mask=cmask)
        if HAS_B:
            mean = tl.load(B_GLOBAL + cols, mask=cmask, other=0.0)
        bad += _count(~(tl.abs(mean) <= 3.4028234663852886e38), cmask)
    tl.debug_barrier()  # pass 2 reads the b_local stored above
    finite = bad == 0.0
    # Pass 2: the EMA update and sum_d |b_local - m_new|^2.
    off = total * 0.0
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + cols0
        cmask = cols < D
        b_local = tl.load(B_OUT + cols, mask=cmask, other=0.0)
        if HAS_B:
            b = tl.load(B_GLOBAL + cols, mask=cmask, other=0.0)
        else:
            b = b_local
        m_old = tl.load(M + cols, mask=cmask, other=0.0).to(tl.float32)
        m_new = tl.where(finite, momentum * m_old + rate * b, m_old)
        tl.store(M_NEW + cols, m_new.to(M_NEW.dtype.element_ty), mask=cmask)
        e = tl.where(cmask, b_local - m_new, 0.0)
        off += tl.sum(e * e, axis=0)
    if HAS_M_OUT:
        # Pass 3: the caller's buffer, which may be M itself: written only once every
        # read of M is done.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + cols0
            cmask = cols < D
            tl.store(M_OUT + cols, tl.load(M_NEW + cols, mask=cmask), mask=cmask)
    m2 = tl.sum(tl.where((sc == 1) | (sc == 2), sums, 0.0), axis=0)
    avl = (m2 + dev + 2.0 * total * off) / total
    pvl = tl.sum(tl.where(sc == 3, sums, 0.0), axis=0) / total
    tl.store(LOSS, lam_avl * avl + lam_pvl * pvl)
    tl.store(AVL, avl)
    tl.store(PVL, pvl)
    # info: mean |u|, mean |v| (columns 4, 5 over n), then the eight row counts (6..13).
    tl.store(INFO + sc - 4, tl.where(sc < 6, sums / total, sums), mask=(sc >= 4) & (sc < NUM_SCAL))


@triton.jit
def _dive_backward_kernel(
    A, A0, T, T0, M, G_LOSS, G_AVL, G_PVL, GA, GT, B, D,
    s_a0, s_a1, s_p0, s_p1, s_t0, s_t1, s_q0, s_q1,
    k_loss_avl, k_loss_pvl, k_avl, k_pvl,
    NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < B
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    a = _tile(A, rows, cols, mask, s_a0, s_a1)
    a0 = _tile(A0, rows, cols, mask, s_p0, s_p1)
    t = _tile(T, rows, cols, mask, s_t0, s_t1)
    t0 = _tile(T0, rows, cols, mask, s_q0, s_q1)
    m = tl.load(M + cols, mask=cmask, other=0.0).to(tl.float32)
    g_loss = tl.load(G_LOSS).to(tl.float32)
    c_avl = k_loss_avl * g_loss + k_avl * tl.load(G_AVL).to(tl.float32)
    c_pvl = k_loss_pvl * g_loss + k_pvl * tl.load(G_PVL).to(tl.float32)
    # Overflow turns into NaN only when normalising: without, the forward's NaN loss has
    # flagged the row already and the four extra row sums would halve occupancy.
    _, inv_a = _row_scale(a, rmask, NORMALIZE, NORMALIZE)
    _, inv_a0 = _row_scale(a0, rmask, NORMALIZE, NORMALIZE)
    _, inv_t = _row_scale(t, rmask, NORMALIZE, NORMALIZE)
    _, inv_t0 = _row_scale(t0, rmask, NORMALIZE, NORMALIZE)
    ah = a * inv_a[:, None]
    th = t * inv_t[:, None]
    u = ah - a0 * inv_a0[:, None]
    v = th - t0 * inv_t0[:, None]
    gu = c_avl * (u - m[None, :]) + c_pvl * (u - v)
    gv = c_avl * (v - m[None, :]) - c_pvl * (u - v)
    if NORMALIZE:
        gu = (gu - ah * tl.sum(ah * gu, axis=1)[:, None]) * inv_a[:, None]
        gv = (gv - th * tl.sum(th * gv, axis=1)[:, None]) * inv_t[:, None]
    offs = rows[:, None] * D + cols[None, :]
    tl.store(GA + offs, gu.to(GA.dtype.element_ty), mask=mask)
    tl.store(GT + offs, gv.to(GT.dtype.element_ty), mask=mask)


class LaunchConfig(NamedTuple):
    block_b: int  # rows per tile
    block_d: int  # columns per tile: the whole row, padded to a power of two
    num_warps: int


def launch_config(D: int) -> LaunchConfig:
    """Block sizes and warps of the statistics and backward kernels for rows of D values."""
    block_d = max(MIN_BLOCK_D, triton.next_power_of_2(D))
    block_b = max(1, min(64, TILE_ELEMENTS // block_d))
    warps = block_b * block_d // (32 * ELEMENTS_PER_THREAD)
    return LaunchConfig(block_b, block_d, max(4, min(8, warps)))


# The finalisation's tile over [parts, columns] and its warps.
FINALIZE = dict(BLOCK_K=16, BLOCK_D=256, num_warps=8)
# D buckets the launchers can choose: MIN_BLOCK_D .. MAX_DIM, powers of two.
MIN_BLOCK_D = 16


def _strides(*xs):
    return [s for x in xs for s in x.stride()]


def _num_programs(device: torch.device, num_blocks: int) -> int:
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another
        cap = 4
    return max(1, min(num_blocks, cap))


def triton_stats(img_ft, img_pre, txt_ft, txt_pre, normalize: bool):
    B, D = img_ft.shape
    cfg = launch_config(D)
    grid = _num_programs(img_ft.device, triton.cdiv(B, cfg.block_b))
    acc = accumulation_dtype(img_ft)
    means = torch.empty(grid, 2, D, dtype=acc, device=img_ft.device)
    scalars = torch.empty(grid, NUM_SCALARS, dtype=acc, device=img_ft.device)
    _dive_stats_kernel[(grid,)](
        img_ft, img_pre, txt_ft, txt_pre, means, scalars, B, D,
        *_strides(img_ft, img_pre, txt_ft, txt_pre),
        NORMALIZE=normalize, BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d, NUM_SCAL=NUM_SCALARS,
        num_warps=cfg.num_warps)
    return means, scalars


def triton_finalize(means, scalars, m, m_out, b, momentum: float, lam_avl: float,
                    lam_pvl: float):
    """(loss, avl, pvl, m_new, b, info) from the partials in one launch; ``b`` given: the
    batch mean to update m with (averaged over ranks), else the partials' own.
    ``m_out``, when given, receives m_new too (it may be m itself)."""
    K, _, D = means.shape
    new = functools.partial(torch.empty, dtype=means.dtype, device=means.device)
    loss, avl, pvl, info = new(()), new(()), new(()), new(INFO_SIZE)
    m_new, b_local = torch.empty_like(m), new(D)
    _dive_finalize_kernel[(1,)](
        means, scalars, m, b_local if b is None else b, m_new,
        m_new if m_out is None else m_out, b_local, loss, avl, pvl, info, K, D,
        momentum, 1.0 - momentum, lam_avl, lam_pvl, HAS_B=b is not None,
        HAS_M_OUT=m_out is not None, NUM_SCAL=NUM_SCALARS, **FINALIZE)
    return loss, avl, pvl, m_new, b_local if b is None else b, info


def triton_forward(img_ft, img_pre, txt_ft, txt_pre, m, m_out, normalize: bool,
                   momentum: float, lam_avl: float, lam_pvl: float):
    """The single-process forward: two launches."""
    means, scalars = triton_stats(img_ft, img_pre, txt_ft, txt_pre, normalize)
    return triton_finalize(means, scalars, m, m_out, None, momentum, lam_avl, lam_pvl)


def triton_backward(img_ft, img_pre, txt_ft, txt_pre, m, g_loss, g_avl, g_pvl, lam_avl: float,
                    lam_pvl: float, scale: float, normalize: bool):
    """Both gradients in one launch, dL/du = c_avl (u - m) + c_pvl (u - v) with
    c_avl = scale (lam_avl g_loss + g_avl), c_pvl likewise; a missing upstream gradient
    (None) counts as zero: another one's pointer stands in with weight 0."""
    present = next(g for g in (g_loss, g_avl, g_pvl) if g is not None)

    def term(g, weight):
        return (present, 0.0) if g is None else (g, weight * scale)

    (gl, k_la), (_, k_lp) = term(g_loss, lam_avl), term(g_loss, lam_pvl)
    (ga, k_a), (gp, k_p) = term(g_avl, 1.0), term(g_pvl, 1.0)
    B, D = img_ft.shape
    cfg = launch_config(D)
    grad_img = torch.empty(B, D, dtype=img_ft.dtype, device=img_ft.device)
    grad_txt = torch.empty(B, D, dtype=txt_ft.dtype, device=txt_ft.device)
    _dive_backward_kernel[(triton.cdiv(B, cfg.block_b),)](
        img_ft, img_pre, txt_ft, txt_pre, m, gl, ga, gp, grad_img, grad_txt, B, D,
        *_strides(img_ft, img_pre, txt_ft, txt_pre), k_la, k_lp, k_a, k_p,
        NORMALIZE=normalize, BLOCK_B=cfg.block_b, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps)
    return grad_img, grad_txt
