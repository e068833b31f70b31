"""Triton kernels for the DiVE regulariser (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Forward: a persistent grid; each program walks row blocks, loads the four [BLOCK_B, D]
tiles once, normalises, forms u and v, and keeps a running (count, mean, M2) of u and v
merged block by block with Chan's update, plus the PVL and norm sums. One read of the
inputs in all; the [K, 2, D] partials go to ``dive.finalize``.
Backward: one pass, one row block per program: reads the four tiles, writes two grads.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dive_reference import NUM_SCALARS, accumulation_dtype

# fp32 elements per [BLOCK_B, BLOCK_D] tile: bounds registers per program.
TILE_ELEMENTS = 4096
MAX_DIM = 16384


@triton.jit
def _tile(ptr, rows, cols, mask, stride_r, stride_c):
    """A [BLOCK_B, BLOCK_D] tile of a strided [B, D] input, as float32 (zeros off the edge)."""
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _row_scale(x, rmask, NORMALIZE: tl.constexpr):
    sumsq = tl.sum(x * x, axis=1)
    if NORMALIZE:
        # Padding rows divide by 1, not 0; a real zero-norm row still gives inf (reported).
        inv = tl.where(rmask, 1.0 / tl.sqrt(tl.where(rmask, sumsq, 1.0)), 0.0)
    else:
        inv = tl.where(rmask, 1.0, 0.0)
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
def _dive_backward_kernel(
    A, A0, T, T0, M, C_AVL, C_PVL, GA, GT, B, D,
    s_a0, s_a1, s_p0, s_p1, s_t0, s_t1, s_q0, s_q1,
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
    c_avl = tl.load(C_AVL).to(tl.float32)
    c_pvl = tl.load(C_PVL).to(tl.float32)
    _, inv_a = _row_scale(a, rmask, NORMALIZE)
    _, inv_a0 = _row_scale(a0, rmask, NORMALIZE)
    _, inv_t = _row_scale(t, rmask, NORMALIZE)
    _, inv_t0 = _row_scale(t0, rmask, NORMALIZE)
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


def _blocks(D: int):
    block_d = triton.next_power_of_2(D)
    return max(1, min(64, TILE_ELEMENTS // block_d)), block_d


def _strides(*xs):
    return [s for x in xs for s in x.stride()]


def _num_warps(block_b: int, block_d: int) -> int:
    return 8 if block_b * block_d >= 4096 else 4


def _num_programs(device: torch.device, num_blocks: int) -> int:
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another
        cap = 4
    return max(1, min(num_blocks, cap))


def triton_stats(img_ft, img_pre, txt_ft, txt_pre, normalize: bool):
    B, D = img_ft.shape
    block_b, block_d = _blocks(D)
    grid = _num_programs(img_ft.device, triton.cdiv(B, block_b))
    acc = accumulation_dtype(img_ft)
    means = torch.empty(grid, 2, D, dtype=acc, device=img_ft.device)
    scalars = torch.empty(grid, NUM_SCALARS, dtype=acc, device=img_ft.device)
    _dive_stats_kernel[(grid,)](
        img_ft, img_pre, txt_ft, txt_pre, means, scalars, B, D,
        *_strides(img_ft, img_pre, txt_ft, txt_pre),
        NORMALIZE=normalize, BLOCK_B=block_b, BLOCK_D=block_d, NUM_SCAL=NUM_SCALARS,
        num_warps=_num_warps(block_b, block_d))
    return means, scalars


def triton_backward(img_ft, img_pre, txt_ft, txt_pre, m, c_avl, c_pvl, normalize: bool):
    B, D = img_ft.shape
    block_b, block_d = _blocks(D)
    grad_img = torch.empty(B, D, dtype=img_ft.dtype, device=img_ft.device)
    grad_txt = torch.empty(B, D, dtype=txt_ft.dtype, device=txt_ft.device)
    _dive_backward_kernel[(triton.cdiv(B, block_b),)](
        img_ft, img_pre, txt_ft, txt_pre, m, c_avl, c_pvl, grad_img, grad_txt, B, D,
        *_strides(img_ft, img_pre, txt_ft, txt_pre),
        NORMALIZE=normalize, BLOCK_B=block_b, BLOCK_D=block_d,
        num_warps=_num_warps(block_b, block_d))
    return grad_img, grad_txt
