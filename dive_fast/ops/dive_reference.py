"""Plain-PyTorch DiVE regulariser: the readable oracle and the fallback backend.

Every backend produces the same *statistics* of the difference vectors, so that the
EMA update and the losses (``finalize`` below) are computed once, in one place:

- ``means``   [K, 2, D]: mean of u (index 0) and of v (index 1) over the rows of part k;
- ``scalars`` [K, NUM_SCALARS]: see the column constants below.

A backend may split the rows into any number K of parts. The AVL sum is recombined
exactly as sum_k (M2_k + n_k * |mean_k - m|^2), a sum of non-negative terms, so it
stays accurate when all difference vectors are nearly equal (where the expanded
|u|^2 - 2 m.u + |m|^2 form cancels catastrophically in fp32).
"""
from __future__ import annotations

import torch

# Columns of the ``scalars`` statistics tensor.
COUNT, M2_U, M2_V, PVL_SUM, NORM_U_SUM, NORM_V_SUM = range(6)
NONFINITE = 6  # 6..9: rows with a NaN/Inf (or overflowing) squared norm, per input
ZERO_NORM = 10  # 10..13: rows of zero norm, per input
NUM_SCALARS = 14
INFO_SIZE = 10  # the ops' info output: mean |u|, mean |v|, 4 non-finite, 4 zero-norm row counts
INPUT_NAMES = ("img_ft", "img_pre", "txt_ft", "txt_pre")


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 inputs accumulate in float64 (gradcheck); everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _normalized(x: torch.Tensor, acc: torch.dtype, normalize: bool):
    x = x.to(acc)
    sumsq = (x * x).sum(1)
    # An overflowing squared norm (finite values, inf sum) must not scale its row to 0:
    # a NaN scale makes it a NaN row, which keeps m and gives a NaN loss.
    scale = sumsq.rsqrt() if normalize else torch.ones_like(sumsq)
    return x * torch.where(torch.isfinite(sumsq), scale, torch.nan)[:, None], sumsq


def reference_stats(img_ft, img_pre, txt_ft, txt_pre, normalize: bool):
    acc = accumulation_dtype(img_ft)
    (a, sa), (a0, sa0), (t, st), (t0, st0) = (
        _normalized(x, acc, normalize) for x in (img_ft, img_pre, txt_ft, txt_pre))
    u, v = a - a0, t - t0
    mean_u, mean_v = u.mean(0), v.mean(0)
    scalars = torch.zeros(1, NUM_SCALARS, dtype=acc, device=u.device)
    scalars[0, COUNT] = u.shape[0]
    scalars[0, M2_U] = ((u - mean_u) ** 2).sum()
    scalars[0, M2_V] = ((v - mean_v) ** 2).sum()
    scalars[0, PVL_SUM] = ((u - v) ** 2).sum()
    scalars[0, NORM_U_SUM] = u.norm(dim=1).sum()
    scalars[0, NORM_V_SUM] = v.norm(dim=1).sum()
    for i, s in enumerate((sa, sa0, st, st0)):
        scalars[0, NONFINITE + i] = (~torch.isfinite(s)).sum()
        scalars[0, ZERO_NORM + i] = (s == 0).sum()
    return torch.stack((mean_u, mean_v))[None], scalars


def batch_mean(means: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
    """b: the mean of u and v over all rows, from per-part statistics."""
    n = scalars[:, COUNT]
    return (n[:, None, None] * means).sum((0, 1)) / (2 * n.sum())


def finalize(means: torch.Tensor, scalars: torch.Tensor, m: torch.Tensor, momentum: float,
             b: torch.Tensor | None = None):
    """(avl, pvl, m_new, b, info) from per-part statistics: the mathematics every backend's
    finalisation follows.

    ``b``: the batch mean to update m with (averaged over ranks), else the parts' own.
    ``momentum`` 1 leaves m as it is (no update).
    """
    n = scalars[:, COUNT]
    total = n.sum()
    if b is None:
        b = batch_mean(means, scalars)
    m_old = m.to(means.dtype)
    m_new = momentum * m_old + (1 - momentum) * b
    # A non-finite batch must not poison the EMA: keep the old m (no host sync).
    m_new = torch.where(torch.isfinite(b).all(), m_new, m_old)
    offset = ((means - m_new) ** 2).sum(2)  # [K, 2]
    avl = (scalars[:, M2_U].sum() + scalars[:, M2_V].sum() + (n[:, None] * offset).sum()) / total
    pvl = scalars[:, PVL_SUM].sum() / total
    sums = scalars.sum(0)
    info = torch.cat((sums[NORM_U_SUM:NORM_V_SUM + 1] / total,
                      sums[NONFINITE:NONFINITE + 4], sums[ZERO_NORM:ZERO_NORM + 4]))
    return avl, pvl, m_new, b, info


# The torch backend's kernels, with the signatures every backend's kernels share
# (``dive.Kernels``).

def reference_stats_op(img_ft, img_pre, txt_ft, txt_pre, normalize: bool):
    """(means, scalars, workspace): one part, no workspace."""
    return (*reference_stats(img_ft, img_pre, txt_ft, txt_pre, normalize), None)


def reference_finalize(means, scalars, workspace, m, m_out, b, momentum: float,
                       lam_avl: float, lam_pvl: float):
    """(loss, avl, pvl, m_new, b, info); ``m_out``, when given, receives m_new."""
    avl, pvl, m_new, b, info = finalize(means, scalars, m, momentum, b)
    m_new = m_new.to(m.dtype)
    if m_out is not None:
        m_out.copy_(m_new)
    return lam_avl * avl + lam_pvl * pvl, avl, pvl, m_new, b, info


def reference_forward(img_ft, img_pre, txt_ft, txt_pre, m, m_out, normalize: bool,
                      momentum: float, lam_avl: float, lam_pvl: float):
    means, scalars = reference_stats(img_ft, img_pre, txt_ft, txt_pre, normalize)
    return reference_finalize(means, scalars, None, m, m_out, None, momentum, lam_avl, lam_pvl)


def loss_coefficients(g_loss, g_avl, g_pvl, lam_avl: float, lam_pvl: float, scale: float):
    """(c_avl, c_pvl) = scale * (lam_avl g_loss + g_avl, lam_pvl g_loss + g_pvl), the upstream
    gradients of (loss, avl, pvl) folded into the two coefficients; None counts as zero."""
    def term(g, weight):
        return 0.0 if g is None else g * (weight * scale)
    return (term(g_loss, lam_avl) + term(g_avl, 1.0), term(g_loss, lam_pvl) + term(g_pvl, 1.0))


def reference_backward(img_ft, img_pre, txt_ft, txt_pre, m, g_loss, g_avl, g_pvl,
                       lam_avl: float, lam_pvl: float, scale: float, normalize: bool):
    """Input gradients with m held constant.

    dL/du = c_avl (u - m) + c_pvl (u - v),  dL/dv = c_avl (v - m) - c_pvl (u - v),
    (c_avl, c_pvl from ``loss_coefficients``), then through e_hat = e/|e|:
    dL/de = (g - e_hat (e_hat . g)) / |e|.
    """
    c_avl, c_pvl = loss_coefficients(g_loss, g_avl, g_pvl, lam_avl, lam_pvl, scale)
    acc = accumulation_dtype(img_ft)
    (a, sa), (a0, _), (t, st), (t0, _) = (
        _normalized(x, acc, normalize) for x in (img_ft, img_pre, txt_ft, txt_pre))
    u, v = a - a0, t - t0
    m = m.to(acc)
    gu = c_avl * (u - m) + c_pvl * (u - v)
    gv = c_avl * (v - m) - c_pvl * (u - v)
    if normalize:
        gu = (gu - a * (a * gu).sum(1, keepdim=True)) * sa.rsqrt()[:, None]
        gv = (gv - t * (t * gv).sum(1, keepdim=True)) * st.rsqrt()[:, None]
    return gu.to(img_ft.dtype), gv.to(txt_ft.dtype)


def dive_loss_eager(img_ft, img_pre, txt_ft, txt_pre, m, *, lam=1000.0, momentum=0.99,
                    update=True, normalize=True, avl=True, pvl=True):
    """Direct transcription of the spec, run by autograd in the inputs' own dtype: the
    'eager PyTorch' baseline of the benchmarks. Returns (loss, avl, pvl, m_new)."""
    x = [img_ft, img_pre, txt_ft, txt_pre]
    if normalize:
        x = [z / z.norm(dim=1, keepdim=True) for z in x]
    u, v = x[0] - x[1], x[2] - x[3]
    m = m.to(u.dtype)
    if update:
        m = momentum * m + (1 - momentum) * torch.cat((u, v)).mean(0).detach()
    l_avl = (((u - m) ** 2).sum(1) + ((v - m) ** 2).sum(1)).mean()
    l_pvl = ((u - v) ** 2).sum(1).mean()
    return lam * (float(avl) * l_avl + float(pvl) * l_pvl), l_avl, l_pvl, m


def dive_loss_float64(img_ft, img_pre, txt_ft, txt_pre, m, **options):
    """The float64 oracle of tests and benchmarks (differentiable by autograd)."""
    return dive_loss_eager(*(z.double() for z in (img_ft, img_pre, txt_ft, txt_pre, m)), **options)
