"""Triton kernels for the DiVE regulariser (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Forward, two launches:
- ``_dive_stats_kernel``: ``num_parts`` programs, one full wave on the device (its SMs
  times the kernel's blocks per SM for the launch configuration): the partials, hence
  every result, are the same at every batch size on one kind of GPU; part k owns the row tiles
  k, k + K, k + 2K, ..., loaded by a loop Triton pipelines (``tl.range(num_stages=...)``:
  cp.async into a shared-memory ring). Per tile: the rows' squared norms, then u, v,
  merged elementwise into each row slot's running means by Welford's update, and the
  rows' M2 terms and norms of u and v; rows up to 512 values lie within a warp (those
  sums take no barrier), wider rows span warps (each sum a round through shared memory,
  two rounds a tile: the values are joined). The slots are merged once at the end of the
  part (b first, then the deviations about it). One read of the inputs; [K, 2, D] means
  and [K, NUM_SCALARS] scalars.
- ``_dive_finalize_kernel``: one program per ``FINALIZE["BLOCK_D"]`` columns, each merging
  its columns over all parts in fixed order (b, then the deviations about b), loads and
  FMAs only inside the loops over parts; its partial sums, then one acquire-release ticket;
  the last program to arrive sums the partials in program order and writes the losses, the
  info counts and m (kept where b is not finite), then resets the ticket, which the
  statistics kernel zeroed for this call.
Backward, one launch: one row block per program reads the four tiles once and writes both
gradients; the loss coefficients come from the upstream gradients inside the kernel.
``launch_config`` is the launchers' one choice of block sizes and warps (the
ahead-of-time compile check enumerates it).
"""
from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .dive_reference import INFO_SIZE, NUM_SCALARS, accumulation_dtype

# fp32 elements per [BLOCK_B, BLOCK_D] tile and per thread, and at most 8 warps: no
# configuration spills on sm_80 or sm_90 (`python -m tools.aot`,
# benchmarks/results/gpu_kernels.csv). Tried and dropped: 4096-element tiles at 8 warps
# (ptxas capped some at 128 registers and spilled, D <= 256), 16 warps (capped at 64,
# spills), rows of 8192 (32 warps, 64 registers: spills).
TILE_ELEMENTS = 2048
ELEMENTS_PER_THREAD = 8
MAX_DIM = 4096  # wider rows: the cuda backend (or the reference)
# The interpreter runs programs one after another: a few parts, the same code.
INTERPRETED_PARTS = 5
STAGES = 3  # tiles in flight per program (the loads' pipeline depth)
# The statistics' sums over tiles in float64 for tiles of at most this many rows (D >= 256:
# a row slot sees 1/8 or more of its part's rows, thousands at B' in millions). Wider
# tiles (16-128 rows, D <= 128) keep float32: a slot sees 1/16-1/128 of them, and float64
# took fp32 inputs to 164-168 registers on sm_90, one block an SM instead of two.
SUMS64_MAX_ROWS = 8
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _tile(ptr, rows, cols, mask, stride_r, stride_c, WIDE: tl.constexpr = False):
    """A tile of a strided [B, D] input as float32 (zeros off the edge): rows [BLOCK_B] by
    column indices [BLOCK_D] (2-D) or rows by [CHUNKS, 1, VEC] (3-D, see ``_columns``).
    WIDE: offsets in 64 bits (some row's offset reaches 2^31; 32-bit products would wrap)."""
    if WIDE:
        rows = rows.to(tl.int64)
    if len(cols.shape) == 1:
        offsets = rows[:, None] * stride_r + cols[None, :] * stride_c
    else:
        offsets = rows[None, :, None] * stride_r + cols * stride_c
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _columns(CHUNKS: tl.constexpr, VEC: tl.constexpr):
    """Column indices [CHUNKS, 1, VEC] of a [CHUNKS, BLOCK_B, VEC] tile: a row of
    CHUNKS * VEC columns, with the chunks outermost so that Triton's layout puts the warps
    along the rows (a row's sums stay within its warp) when BLOCK_B >= warps."""
    return tl.arange(0, CHUNKS)[:, None, None] * VEC + tl.arange(0, VEC)[None, None, :]


@triton.jit
def _rsum(x, ROWS_IN_WARP: tl.constexpr = True):
    """Row sums of a [CHUNKS, BLOCK_B, VEC] tile: [BLOCK_B]. Rows within a warp: the
    chunks (a thread's registers) first, then the lanes. Rows across warps (the warps split
    the chunks): the lanes first, so that one value a thread crosses the warps."""
    if ROWS_IN_WARP:
        return tl.sum(tl.sum(x, axis=0), axis=1)
    else:  # one chunk: [1, BLOCK_B, BLOCK_D, ...]
        s = tl.sum(x, axis=2)
        return tl.reshape(s, s.shape[1:])


@triton.jit
def _rsum4(x0, x1, x2, x3, ROWS_IN_WARP: tl.constexpr):
    """Four row sums by one reduction: joined, their partial sums cross the warps in one
    round through shared memory (a reduction of several operands takes a round, and a
    barrier, per operand)."""
    s01, s23 = tl.split(_rsum(tl.join(tl.join(x0, x1), tl.join(x2, x3)), ROWS_IN_WARP))
    r0, r1 = tl.split(s01)
    r2, r3 = tl.split(s23)
    return r0, r1, r2, r3


@triton.jit
def _rsum2(x0, x1, ROWS_IN_WARP: tl.constexpr):
    return tl.split(_rsum(tl.join(x0, x1), ROWS_IN_WARP))


@triton.jit
def _inverse_norm(sumsq, rmask, NORMALIZE: tl.constexpr, CHECK: tl.constexpr = True):
    """1/|x| (1 without normalisation); 0 off the edge (those rows then vanish)."""
    if NORMALIZE:
        # Padding rows divide by 1, not 0; a real zero-norm row still gives inf (reported).
        # sqrt_rn, not tl.sqrt: that is sqrt.approx.ftz.f32, which flushes a subnormal squared
        # norm (|x| < 1.1e-19) to 0, hence 1/0 and a NaN row that no count reports.
        inv = 1.0 / tl.sqrt_rn(tl.where(rmask, sumsq, 1.0))
    else:
        inv = tl.full(sumsq.shape, 1.0, tl.float32)
    if CHECK:  # an overflowing squared norm gives NaN (not 1/inf = 0): a NaN row
        inv = tl.where(sumsq < float("inf"), inv, float("nan"))
    return tl.where(rmask, inv, 0.0)


@triton.jit
def _sums(x, SUMS64: tl.constexpr):
    """A per-row term as the sums over tiles hold it: float64 with SUMS64, else float32."""
    if SUMS64:
        return x.to(tl.float64)
    else:
        return x


@triton.jit
def _flag(condition, rmask):
    return tl.where(rmask & condition, 1.0, 0.0)


@triton.jit
def _dive_stats_kernel(
    A, A0, T, T0, MEANS, SCAL, TICKET, B, D,
    s_a0, s_a1, s_p0, s_p1, s_t0, s_t1, s_q0, s_q1,
    NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr, CHUNKS: tl.constexpr, VEC: tl.constexpr,
    ROWS_IN_WARP: tl.constexpr, NUM_STAGES: tl.constexpr, NUM_SCAL: tl.constexpr,
    WIDE: tl.constexpr = False, SUMS64: tl.constexpr = True,
):
    """Tiles of [CHUNKS, BLOCK_B, VEC]. ROWS_IN_WARP (a warp holds whole rows): every row
    sum is a warp's, taken per tile (no barrier). Otherwise rows span warps and row sums
    go through shared memory, joined into two reductions a tile: the four squared norms,
    then |u|^2, |v|^2 and the M2 terms; PVL terms stay elementwise until the end."""
    pid = tl.program_id(0)
    K = tl.num_programs(0)
    if pid == 0:
        tl.store(TICKET, 0)  # this call's arrival counter for the finalisation
    cols = _columns(CHUNKS, VEC)
    cmask = cols < D
    slots = tl.arange(0, BLOCK_B)
    n_tiles = tl.cdiv(B, BLOCK_B)
    my_tiles = tl.cdiv(tl.maximum(n_tiles - pid, 0), K)
    zero = tl.zeros([CHUNKS, BLOCK_B, VEC], dtype=tl.float32)
    zero_row = _rsum(zero, ROWS_IN_WARP)  # per-row values in the layout row sums come in
    zero_row64 = _sums(zero_row, SUMS64)
    # Per row slot and column: running means (Welford), and across warps the PVL terms.
    # Per row slot: rows seen, sums of M2 and PVL terms and of |u|, |v|, and the
    # non-finite and zero-norm row counts. SUMS64: the sums over tiles in float64 (a few
    # adds a row): in float32 a slot's sum drifts once it holds thousands of rows (B' in
    # millions), each new row's term below half an ulp of the sum. Counts are exact in
    # float32.
    mean_u = zero
    mean_v = zero
    pv = _sums(zero, SUMS64)
    m2u_rows = zero_row64
    m2v_rows = zero_row64
    pv_rows = zero_row64
    count = zero_row
    norm_u = zero_row64
    norm_v = zero_row64
    nf_a = zero_row
    nf_a0 = zero_row
    nf_t = zero_row
    nf_t0 = zero_row
    z_a = zero_row
    z_a0 = zero_row
    z_t = zero_row
    z_t0 = zero_row
    for j in tl.range(0, my_tiles, num_stages=NUM_STAGES):
        rows = (pid + j * K) * BLOCK_B + slots
        rmask = rows < B
        mask = rmask[None, :, None] & cmask
        a = _tile(A, rows, cols, mask, s_a0, s_a1, WIDE)
        a0 = _tile(A0, rows, cols, mask, s_p0, s_p1, WIDE)
        t = _tile(T, rows, cols, mask, s_t0, s_t1, WIDE)
        t0 = _tile(T0, rows, cols, mask, s_q0, s_q1, WIDE)
        if ROWS_IN_WARP:
            ss_a = _rsum(a * a)
            ss_a0 = _rsum(a0 * a0)
            ss_t = _rsum(t * t)
            ss_t0 = _rsum(t0 * t0)
        else:
            ss_a, ss_a0, ss_t, ss_t0 = _rsum4(a * a, a0 * a0, t * t, t0 * t0, ROWS_IN_WARP)
        # sumsq <= FLT_MAX is False for NaN and Inf.
        nf_a += _flag(~(ss_a <= FLT_MAX), rmask)
        nf_a0 += _flag(~(ss_a0 <= FLT_MAX), rmask)
        nf_t += _flag(~(ss_t <= FLT_MAX), rmask)
        nf_t0 += _flag(~(ss_t0 <= FLT_MAX), rmask)
        z_a += _flag(ss_a == 0.0, rmask)
        z_a0 += _flag(ss_a0 == 0.0, rmask)
        z_t += _flag(ss_t == 0.0, rmask)
        z_t0 += _flag(ss_t0 == 0.0, rmask)
        u = (a * _inverse_norm(ss_a, rmask, NORMALIZE)[None, :, None]
             - a0 * _inverse_norm(ss_a0, rmask, NORMALIZE)[None, :, None])
        v = (t * _inverse_norm(ss_t, rmask, NORMALIZE)[None, :, None]
             - t0 * _inverse_norm(ss_t0, rmask, NORMALIZE)[None, :, None])
        valid = tl.where(rmask, 1.0, 0.0)
        count += valid
        w = (valid / tl.maximum(count, 1.0))[None, :, None]  # 1/n for a row, 0 off the edge
        du = u - mean_u
        dv = v - mean_v
        mean_u += du * w
        mean_v += dv * w
        # Zero off the edges: u = v = 0 there, and the M2 terms masked.
        m2u = tl.where(mask, du * (u - mean_u), 0.0)
        m2v = tl.where(mask, dv * (v - mean_v), 0.0)
        if ROWS_IN_WARP:
            nu = _rsum(u * u)
            nv = _rsum(v * v)
            m2u_rows += _sums(_rsum(m2u), SUMS64)
            m2v_rows += _sums(_rsum(m2v), SUMS64)
            pv_rows += _sums(_rsum((u - v) * (u - v)), SUMS64)
        else:
            nu, nv, m2u_row, m2v_row = _rsum4(u * u, v * v, m2u, m2v, ROWS_IN_WARP)
            m2u_rows += _sums(m2u_row, SUMS64)
            m2v_rows += _sums(m2v_row, SUMS64)
            pv += _sums((u - v) * (u - v), SUMS64)
        norm_u += _sums(tl.where(rmask, tl.sqrt_rn(nu), 0.0), SUMS64)
        norm_v += _sums(tl.where(rmask, tl.sqrt_rn(nv), 0.0), SUMS64)
    if not ROWS_IN_WARP:
        pv_rows = _rsum(pv, ROWS_IN_WARP)
    # The row slots merged: the part's means (sum n_s mean_s / n), then the slots' squared
    # deviations about them.
    n = tl.sum(count, axis=0)
    weight = count[None, :, None]
    part_u = tl.sum(weight * mean_u, axis=1) / tl.maximum(n, 1.0)  # [CHUNKS, VEC]
    part_v = tl.sum(weight * mean_v, axis=1) / tl.maximum(n, 1.0)
    eu = mean_u - part_u[:, None, :]
    ev = mean_v - part_v[:, None, :]
    dev_u = tl.sum(_rsum(weight * eu * eu, ROWS_IN_WARP), axis=0)
    dev_v = tl.sum(_rsum(weight * ev * ev, ROWS_IN_WARP), axis=0)
    cols2 = tl.arange(0, CHUNKS)[:, None] * VEC + tl.arange(0, VEC)[None, :]
    out = MEANS + pid * 2 * D
    tl.store(out + cols2, part_u, mask=cols2 < D)
    tl.store(out + D + cols2, part_v, mask=cols2 < D)
    scal = SCAL + pid * NUM_SCAL
    tl.store(scal + 0, n)
    tl.store(scal + 1, tl.sum(m2u_rows, axis=0) + _sums(dev_u, SUMS64))
    tl.store(scal + 2, tl.sum(m2v_rows, axis=0) + _sums(dev_v, SUMS64))
    tl.store(scal + 3, tl.sum(pv_rows, axis=0))
    tl.store(scal + 4, tl.sum(norm_u, axis=0))
    tl.store(scal + 5, tl.sum(norm_v, axis=0))
    tl.store(scal + 6, tl.sum(nf_a, axis=0))
    tl.store(scal + 7, tl.sum(nf_a0, axis=0))
    tl.store(scal + 8, tl.sum(nf_t, axis=0))
    tl.store(scal + 9, tl.sum(nf_t0, axis=0))
    tl.store(scal + 10, tl.sum(z_a, axis=0))
    tl.store(scal + 11, tl.sum(z_a0, axis=0))
    tl.store(scal + 12, tl.sum(z_t, axis=0))
    tl.store(scal + 13, tl.sum(z_t0, axis=0))


@triton.jit
def _parts_tile(MEANS, SCAL, kk, cols, K, D, NUM_SCAL: tl.constexpr):
    """Parts kk's row counts [BLOCK_K] and u, v means [BLOCK_K, BLOCK_D], in float64; zeros
    off the edge (count 0: no weight)."""
    kmask = kk < K
    mask = kmask[:, None] & (cols < D)[None, :]
    part = MEANS + kk[:, None] * 2 * D + cols[None, :]
    return (tl.load(SCAL + kk * NUM_SCAL, mask=kmask, other=0.0).to(tl.float64),
            tl.load(part, mask=mask, other=0.0).to(tl.float64),
            tl.load(part + D, mask=mask, other=0.0).to(tl.float64))


@triton.jit
def _pick(vector, index, i):
    return tl.sum(tl.where(index == i, vector, 0.0), axis=0)


@triton.jit
def _dive_finalize_kernel(
    MEANS, SCAL, M, B_GLOBAL, M_NEW, M_OUT, B_OUT, LOSS, AVL, PVL, INFO, TICKET, K, D,
    momentum, rate, lam_avl, lam_pvl,
    HAS_B: tl.constexpr, HAS_M_OUT: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, NUM_SCAL: tl.constexpr,
):
    """Columns pid * BLOCK_D + [0, BLOCK_D). b: the parts' weighted mean of u and v
    (B_GLOBAL instead when given, the mean over ranks); m_new = momentum m + rate b (rate =
    1 - momentum, formed in float64 on the host: 1 - fp32(0.99) is off by 1e-6), or m where
    any column of b is not finite; AVL = (sum M2 + sum_k n_k |mean_k - m_new|^2) / n, the
    second sum taken as dev + 2n |b_local - m_new|^2 with dev the parts' squared deviations
    about their own weighted mean b_local: every term non-negative, no cancellation.

    Each loop over parts accumulates a [BLOCK_K, BLOCK_D] tile elementwise and reduces it
    once after the loop: no reduction, barrier or division inside it. The program's partial
    sums (dev, |b_local - m_new|^2 with m updated and with m kept, non-finite columns of b)
    go to the workspace after the ticket (TICKET: int32 words, the partials float64 from
    word 2); the last program to take the ticket adds them up in program order."""
    PARTIALS = (TICKET + 2).to(tl.pointer_type(tl.float64), bitcast=True)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    ks = tl.arange(0, BLOCK_K)
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float64)
    counts = tl.zeros([BLOCK_K], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        n, u, v = _parts_tile(MEANS, SCAL, k0 + ks, cols, K, D, NUM_SCAL)
        acc += n[:, None] * (u + v)
        counts += n
    total = tl.sum(counts, axis=0)
    b_local = tl.sum(acc, axis=0) / (2.0 * total)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float64)
    for k0 in range(0, K, BLOCK_K):
        n, u, v = _parts_tile(MEANS, SCAL, k0 + ks, cols, K, D, NUM_SCAL)
        du = u - b_local[None, :]
        dv = v - b_local[None, :]
        acc += n[:, None] * (du * du + dv * dv)  # off the edges: count 0, or u = v = b = 0
    dev = tl.sum(tl.sum(acc, axis=0), axis=0)
    if HAS_B:
        b = tl.load(B_GLOBAL + cols, mask=cmask, other=0.0)
    else:
        b = b_local.to(tl.float32)
    m_old = tl.load(M + cols, mask=cmask, other=0.0).to(tl.float32)
    m_upd = (momentum * m_old + rate * b).to(M_NEW.dtype.element_ty)
    e_upd = tl.where(cmask, b_local - m_upd.to(tl.float32).to(tl.float64), 0.0)
    e_kept = tl.where(cmask, b_local - m_old.to(tl.float64), 0.0)
    bad = tl.where(cmask & ~(tl.abs(b) <= FLT_MAX), 1.0, 0.0).to(tl.float64)
    tl.store(M_NEW + cols, m_upd, mask=cmask)  # final unless some column of b is not finite
    tl.store(B_OUT + cols, b, mask=cmask)
    i4 = tl.arange(0, 4)
    partial = tl.where(i4 == 0, dev, tl.where(i4 == 1, tl.sum(e_upd * e_upd, axis=0),
                       tl.where(i4 == 2, tl.sum(e_kept * e_kept, axis=0), tl.sum(bad, axis=0))))
    tl.store(PARTIALS + pid * 4 + i4, partial)
    tl.debug_barrier()  # every thread's stores precede the ticket's release
    if tl.atomic_add(TICKET, 1, sem="acq_rel") == nprog - 1:
        # The last program: every other program's writes are visible; sums in program order.
        sc = tl.arange(0, 16)
        sums = tl.zeros([BLOCK_K, 16], dtype=tl.float64)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            smask = (kk < K)[:, None] & (sc < NUM_SCAL)[None, :]
            sums += tl.load(SCAL + kk[:, None] * NUM_SCAL + sc[None, :], mask=smask,
                            other=0.0).to(tl.float64)
        scalars = tl.sum(sums, axis=0)
        ps = tl.arange(0, BLOCK_P)
        parts = tl.zeros([BLOCK_P, 4], dtype=tl.float64)
        for p0 in range(0, nprog, BLOCK_P):
            pp = p0 + ps
            parts += tl.load(PARTIALS + pp[:, None] * 4 + i4[None, :],
                             mask=(pp < nprog)[:, None], other=0.0, cache_modifier=".cg")
        totals = tl.sum(parts, axis=0)
        finite = _pick(totals, i4, 3) == 0.0
        cols0 = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            c = d0 + cols0
            c_mask = c < D
            kept = tl.load(M + c, mask=c_mask)
            value = tl.where(finite, tl.load(M_NEW + c, mask=c_mask, cache_modifier=".cg"), kept)
            tl.store(M_NEW + c, value, mask=c_mask)
            if HAS_M_OUT:  # after every program's read of M (M_OUT may be M)
                tl.store(M_OUT + c, value, mask=c_mask)
        total = _pick(scalars, sc, 0)
        off = tl.where(finite, _pick(totals, i4, 1), _pick(totals, i4, 2))
        avl = (_pick(scalars, sc, 1) + _pick(scalars, sc, 2) + _pick(totals, i4, 0)
               + 2.0 * total * off) / total
        pvl = _pick(scalars, sc, 3) / total
        tl.store(LOSS, (lam_avl * avl + lam_pvl * pvl).to(tl.float32))
        tl.store(AVL, avl.to(tl.float32))
        tl.store(PVL, pvl.to(tl.float32))
        # info: mean |u|, mean |v| (columns 4, 5 over n), then the eight row counts (6..13).
        tl.store(INFO + sc - 4, tl.where(sc < 6, scalars / total, scalars).to(tl.float32),
                 mask=(sc >= 4) & (sc < NUM_SCAL))
        tl.store(TICKET, 0)  # ready for a replay of the same buffers (a CUDA graph)


@triton.jit
def _dive_backward_kernel(
    A, A0, T, T0, M, G_LOSS, G_AVL, G_PVL, GA, GT, B, D,
    s_a0, s_a1, s_p0, s_p1, s_t0, s_t1, s_q0, s_q1,
    k_loss_avl, k_loss_pvl, k_avl, k_pvl,
    NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr, CHUNKS: tl.constexpr, VEC: tl.constexpr,
    ROWS_IN_WARP: tl.constexpr, WIDE: tl.constexpr = False,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = _columns(CHUNKS, VEC)
    rmask = rows < B
    cmask = cols < D
    mask = rmask[None, :, None] & cmask
    a = _tile(A, rows, cols, mask, s_a0, s_a1, WIDE)
    a0 = _tile(A0, rows, cols, mask, s_p0, s_p1, WIDE)
    t = _tile(T, rows, cols, mask, s_t0, s_t1, WIDE)
    t0 = _tile(T0, rows, cols, mask, s_q0, s_q1, WIDE)
    # m at every row (L1 hits): loaded in the tiles' own layout, no conversion of the tiles.
    m = tl.load(M + cols + 0 * rows[None, :, None], mask=mask, other=0.0).to(tl.float32)
    g_loss = tl.load(G_LOSS).to(tl.float32)
    c_avl = k_loss_avl * g_loss + k_avl * tl.load(G_AVL).to(tl.float32)
    c_pvl = k_loss_pvl * g_loss + k_pvl * tl.load(G_PVL).to(tl.float32)
    # The norms only when normalising (one reduction for the four), where overflow turns
    # into NaN; without, the forward's NaN loss has flagged such a row already.
    if NORMALIZE:
        ss_a, ss_a0, ss_t, ss_t0 = _rsum4(a * a, a0 * a0, t * t, t0 * t0, ROWS_IN_WARP)
        inv_a = _inverse_norm(ss_a, rmask, NORMALIZE)[None, :, None]
        inv_a0 = _inverse_norm(ss_a0, rmask, NORMALIZE)[None, :, None]
        inv_t = _inverse_norm(ss_t, rmask, NORMALIZE)[None, :, None]
        inv_t0 = _inverse_norm(ss_t0, rmask, NORMALIZE)[None, :, None]
    else:
        inv_a = tl.where(rmask, 1.0, 0.0)[None, :, None]
        inv_a0 = inv_a
        inv_t = inv_a
        inv_t0 = inv_a
    ah = a * inv_a
    th = t * inv_t
    u = ah - a0 * inv_a0
    v = th - t0 * inv_t0
    gu = c_avl * (u - m) + c_pvl * (u - v)
    gv = c_avl * (v - m) - c_pvl * (u - v)
    if NORMALIZE:  # through e_hat = e/|e|: dL/de = (g - e_hat (e_hat . g)) / |e|
        dot_a, dot_t = _rsum2(ah * gu, th * gv, ROWS_IN_WARP)
        gu = (gu - ah * dot_a[None, :, None]) * inv_a
        gv = (gv - th * dot_t[None, :, None]) * inv_t
    if WIDE:  # B x D reaches 2^31: 64-bit offsets (32-bit ones would store elsewhere)
        offs = rows.to(tl.int64)[None, :, None] * D + cols
    else:
        offs = rows[None, :, None] * D + cols
    tl.store(GA + offs, gu.to(GA.dtype.element_ty), mask=mask)
    tl.store(GT + offs, gv.to(GT.dtype.element_ty), mask=mask)


class LaunchConfig(NamedTuple):
    block_b: int  # rows per tile
    block_d: int  # columns per tile: the whole row, padded to a power of two
    chunks: int  # the tile is [chunks, block_b, vec], chunks * vec = block_d
    vec: int
    rows_in_warp: bool  # a warp holds whole rows (block_b >= warps): row sums in-warp
    num_warps: int


ROWS_IN_WARP_MAX_DIM = 512  # wider rows in one warp: too many registers a thread


def launch_config(D: int, elem_size: int = 4, widest: int | None = None) -> LaunchConfig:
    """Tile shape and warps of the statistics and backward kernels for rows of D values;
    ``elem_size``, ``widest``: the narrowest and widest input dtypes' bytes. Rows within a
    warp: a warp's 16-byte loads of the narrowest dtype span ``vec`` columns, so that every
    input's load has the layout of the arithmetic. Rows across warps: 16 bytes a thread of
    the widest dtype (more, in registers, spills on sm_80)."""
    widest = widest or elem_size
    block_d = max(MIN_BLOCK_D, triton.next_power_of_2(D))
    warps = 8
    if block_d <= ROWS_IN_WARP_MAX_DIM:
        vec = min(32 * 16 // elem_size, block_d)
        return LaunchConfig(max(warps, TILE_ELEMENTS // block_d), block_d, block_d // vec, vec,
                            True, warps)
    # Rows across warps: one row a tile (a row sum is then one value a thread, one round
    # of shared memory for four of them), 16 bytes a thread and load where the warps allow.
    warps = max(4, min(16, block_d * widest // (32 * 16)))
    return LaunchConfig(1, block_d, 1, block_d, False, warps)


def _config(img_ft, img_pre) -> LaunchConfig:
    sizes = (img_ft.element_size(), img_pre.element_size())
    return launch_config(img_ft.shape[1], min(sizes), max(sizes))


# The finalisation's tile over [parts, columns] (parts a loop), its programs' partials
# per step of the last program's sum, and warps; num_stages=1: no software pipelining (its
# waits would put barriers inside the loops over parts).
FINALIZE = dict(BLOCK_K=128, BLOCK_D=32, BLOCK_P=64, num_warps=8, num_stages=1)
# D buckets the launchers can choose: MIN_BLOCK_D .. MAX_DIM, powers of two.
MIN_BLOCK_D = 16


def _strides(*xs):
    return [s for x in xs for s in x.stride()]


INT32_LIMIT = 2**31


def _wide(B: int, D: int, strides) -> bool:
    """Whether an element of the [B, D] views (``strides``: ``_strides``'s) may lie 2^31 or
    more elements past its start: the kernels then take 64-bit offsets (32-bit products
    would wrap, reading before the tensor and storing into others); the common case keeps
    the cheaper 32-bit math. A bound (the largest strides), cheap on the call path."""
    return ((B - 1) * max(map(abs, strides[0::2])) + (D - 1) * max(map(abs, strides[1::2]))
            >= INT32_LIMIT)


def _on_device(x: torch.Tensor):
    """The inputs' device made current for a launch: Triton launches on the current device
    and its current stream, which need not be the inputs' (``--device cuda:1`` with device
    0 current: an illegal address, or with peer access a race with the stream that wrote
    them). A no-op context (no driver call) unless another device is current."""
    device = x.device
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# Blocks of the statistics kernel an SM holds at once, per launch configuration (rows of
# up to block_d values, warps): the least that the ahead-of-time compile finds over dtypes,
# normalisation, 64-bit offsets and sm_80/sm_90 (registers bind; `python -m
# tools.aot`); tests/ops/test_gpu_kernels.py holds every compiled configuration to it.
STATS_BLOCKS_PER_SM = {(16, 8): 2, (32, 8): 2, (64, 8): 2, (128, 8): 2, (256, 8): 2,
                       (512, 8): 1, (1024, 4): 4, (1024, 8): 3, (2048, 8): 2, (2048, 16): 1,
                       (4096, 16): 1}


def stats_parts(sm_count: int, blocks_per_sm: int) -> int:
    """Parts of the statistics: one full wave, ``blocks_per_sm`` blocks on each of
    ``sm_count`` SMs (a tail wave leaves SMs idle while its blocks run: 1.2-1.5x on the
    statistics pass). As csrc/dive_cuda_plan.h's stats_parts."""
    return max(1, sm_count) * min(max(1, blocks_per_sm), 32)


def waves(parts: int, sm_count: int, blocks_per_sm: int) -> int:
    """Waves of ``parts`` blocks on ``sm_count`` SMs holding ``blocks_per_sm`` each."""
    return -(-parts // (max(1, sm_count) * max(1, blocks_per_sm)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_parts(device: torch.device, cfg: LaunchConfig) -> int:
    """Programs of the statistics kernel: on a GPU one full wave of the configuration, the
    same for every batch on one kind of device (so is every result)."""
    if device.type != "cuda":
        return INTERPRETED_PARTS
    index = torch.cuda.current_device() if device.index is None else device.index
    return stats_parts(_sm_count(index), STATS_BLOCKS_PER_SM[cfg.block_d, cfg.num_warps])


def finalize_programs(D: int) -> int:
    return triton.cdiv(D, FINALIZE["BLOCK_D"])


def new_workspace(D: int, device) -> torch.Tensor:
    """The finalisation's int32 words: the ticket (word 0), then 4 float64 partial sums per
    finalisation program (from word 2)."""
    return torch.empty(2 + 8 * finalize_programs(D), dtype=torch.int32, device=device)


def triton_stats(img_ft, img_pre, txt_ft, txt_pre, normalize: bool):
    """(means, scalars, workspace): the statistics of ``num_parts`` parts, and the
    workspace (its ticket zeroed by the kernel) for ``triton_finalize``."""
    B, D = img_ft.shape
    cfg = _config(img_ft, img_pre)
    parts = num_parts(img_ft.device, cfg)
    acc = accumulation_dtype(img_ft)
    means = torch.empty(parts, 2, D, dtype=acc, device=img_ft.device)
    scalars = torch.empty(parts, NUM_SCALARS, dtype=acc, device=img_ft.device)
    workspace = new_workspace(D, img_ft.device)
    strides = _strides(img_ft, img_pre, txt_ft, txt_pre)
    with _on_device(img_ft):
        _dive_stats_kernel[(parts,)](
            img_ft, img_pre, txt_ft, txt_pre, means, scalars, workspace, B, D, *strides,
            NORMALIZE=normalize, BLOCK_B=cfg.block_b, CHUNKS=cfg.chunks, VEC=cfg.vec,
            ROWS_IN_WARP=cfg.rows_in_warp, NUM_STAGES=STAGES, NUM_SCAL=NUM_SCALARS,
            WIDE=_wide(B, D, strides), SUMS64=cfg.block_b <= SUMS64_MAX_ROWS,
            num_warps=cfg.num_warps)
    return means, scalars, workspace


def triton_finalize(means, scalars, workspace, m, m_out, b, momentum: float, lam_avl: float,
                    lam_pvl: float):
    """(loss, avl, pvl, m_new, b, info) from the partials in one launch; ``workspace``: the
    statistics' (None: partials from elsewhere, a zeroed one is made); ``b`` given: the
    batch mean to update m with (averaged over ranks), else the partials' own. ``m_out``,
    when given, receives m_new too (it may be m itself). The kernel reads and writes m
    contiguously: a strided ``m`` is read from a contiguous copy, a strided ``m_out``
    written by a copy after the launch (rare: a module's buffer is contiguous)."""
    K, _, D = means.shape
    if workspace is None:
        workspace = new_workspace(D, means.device).zero_()
    new = functools.partial(torch.empty, dtype=means.dtype, device=means.device)
    loss, avl, pvl, info = new(()), new(()), new(()), new(INFO_SIZE)
    m_in = m if m.is_contiguous() else m.contiguous()
    m_new, b_out = torch.empty_like(m_in), new(D)
    strided_out = m_out is not None and not m_out.is_contiguous()
    fin = dict(FINALIZE)
    with _on_device(means):
        _dive_finalize_kernel[(finalize_programs(D),)](
            means, scalars, m_in, b_out if b is None else b, m_new,
            m_new if m_out is None or strided_out else m_out, b_out, loss, avl, pvl, info,
            workspace, K, D, momentum, 1.0 - momentum, lam_avl, lam_pvl, HAS_B=b is not None,
            HAS_M_OUT=m_out is not None and not strided_out, NUM_SCAL=NUM_SCALARS, **fin)
    if strided_out:
        m_out.copy_(m_new)
    return loss, avl, pvl, m_new, b_out, info


def triton_forward(img_ft, img_pre, txt_ft, txt_pre, m, m_out, normalize: bool,
                   momentum: float, lam_avl: float, lam_pvl: float):
    """The single-process forward: two launches."""
    means, scalars, workspace = triton_stats(img_ft, img_pre, txt_ft, txt_pre, normalize)
    return triton_finalize(means, scalars, workspace, m, m_out, None, momentum, lam_avl,
                           lam_pvl)


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
    cfg = _config(img_ft, img_pre)
    grad_img = torch.empty(B, D, dtype=img_ft.dtype, device=img_ft.device)
    grad_txt = torch.empty(B, D, dtype=txt_ft.dtype, device=txt_ft.device)
    strides = _strides(img_ft, img_pre, txt_ft, txt_pre)
    m = m if m.is_contiguous() else m.contiguous()  # the kernel reads m contiguously
    with _on_device(img_ft):
        _dive_backward_kernel[(triton.cdiv(B, cfg.block_b),)](
            img_ft, img_pre, txt_ft, txt_pre, m, gl, ga, gp, grad_img, grad_txt, B, D,
            *strides, k_la, k_lp, k_a, k_p, NORMALIZE=normalize, BLOCK_B=cfg.block_b,
            CHUNKS=cfg.chunks, VEC=cfg.vec, ROWS_IN_WARP=cfg.rows_in_warp,
            WIDE=_wide(B, D, strides) or B * D >= INT32_LIMIT, num_warps=cfg.num_warps)
    return grad_img, grad_txt
