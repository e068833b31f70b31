"""Accuracy checks shared by the tests, the benchmarks and the GPU check script.

The rule (flash-attention's): a backend's error against a float64 oracle may be at most
twice PyTorch's own error when the same formula runs eagerly in the input dtype, plus a
small dtype floor. Errors are relative to the oracle's largest magnitude.
"""
from __future__ import annotations

import torch

from .loss import dive_loss
from .ops.dive_reference import dive_loss_eager

# Error floor per input dtype, relative to the quantity's scale.
ERROR_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 1e-3,
               torch.bfloat16: 8e-3}
QUANTITIES = ("loss", "avl", "pvl", "m", "grad_img", "grad_txt")


def make_inputs(B: int, D: int, dtype=torch.float32, device="cpu", seed: int = 0,
                layout: str = "contiguous", spread: float = 1.0):
    """Four [B, D] embeddings: frozen ones random, fine-tuned ones a perturbation of them.

    layout: "contiguous"; "transposed" (column stride B); "strided" (every other row and
    column of a larger tensor).
    """
    g = torch.Generator().manual_seed(seed)
    pre = [torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(2)]
    ft = [p + spread * torch.randn(B, D, generator=g, dtype=torch.float64) for p in pre]
    out = []
    for x in (ft[0], pre[0], ft[1], pre[1]):
        x = x.to(device=device, dtype=dtype)
        if layout == "transposed":
            x = x.t().contiguous().t()
        elif layout == "strided":
            big = torch.zeros(2 * B, 2 * D, dtype=dtype, device=device)
            big[::2, ::2] = x
            x = big[::2, ::2]
        elif layout != "contiguous":
            raise ValueError(f"unknown layout {layout!r}")
        out.append(x)
    return out


def run_backend(backend: str, inputs, m, **options):
    """Loss parts, new m and input gradients (of the loss) from one backend."""
    a, t = (x.detach().requires_grad_(True) for x in (inputs[0], inputs[2]))
    out = dive_loss(a, inputs[1], t, inputs[3], m, backend=backend, **options)
    out.loss.backward()
    return dict(loss=out.loss, avl=out.avl, pvl=out.pvl, m=out.m, grad_img=a.grad, grad_txt=t.grad)


def run_eager(inputs, m, dtype, **options):
    """The spec's formula run by autograd in ``dtype`` (float64: the oracle)."""
    options = {k: v for k, v in options.items() if k not in ("check_values", "distributed")}
    xs = [x.detach().to(dtype) for x in inputs]
    a, t = (x.requires_grad_(True) for x in (xs[0], xs[2]))
    loss, l_avl, l_pvl, m_new = dive_loss_eager(a, xs[1], t, xs[3], m.to(dtype), **options)
    loss.backward()
    return dict(loss=loss, avl=l_avl, pvl=l_pvl, m=m_new, grad_img=a.grad, grad_txt=t.grad)


def relative_error(x, ref, min_scale: float = 0.0) -> float:
    if x is None or ref is None:
        return 0.0 if x is None and ref is None else float("inf")
    ref = ref.detach().double()
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, min_scale)
    err = (x.detach().double() - ref).abs().max().item() if ref.numel() else 0.0
    return err / scale if scale > 0 else err


def compare_with_oracle(backend: str, inputs, m, **options):
    """[(quantity, error, bound)] for one backend; ok when every error <= its bound."""
    dtype = inputs[0].dtype
    ours = run_backend(backend, inputs, m, **options)
    oracle = run_eager(inputs, m, torch.float64, **options)
    own = run_eager(inputs, m, dtype, **options) if dtype != torch.float64 else oracle
    # Gradients can vanish (D = 1: the normalisation Jacobian projects everything away);
    # measure them against their natural scale, the loss coefficient 2*lam/B, at least.
    grad_scale = 2 * options.get("lam", 1000.0) / inputs[0].shape[0]
    rows = []
    for q in QUANTITIES:
        floor = grad_scale if q.startswith("grad") else 0.0
        bound = 2 * relative_error(own[q], oracle[q], floor) + ERROR_FLOOR[dtype]
        rows.append((q, relative_error(ours[q], oracle[q], floor), bound))
    return rows


def failures(rows):
    return [(q, e, b) for q, e, b in rows if not e <= b]
