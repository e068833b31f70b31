"""Accuracy checks shared by the tests, the benchmarks and the GPU check script.

The rule (flash-attention's): a backend's error against a float64 oracle may be at most
twice PyTorch's own error when the same formula runs eagerly in the input dtype, plus a
small dtype floor. Errors are relative to the oracle's largest magnitude.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class HostSyncCounter(TorchDispatchMode):
    """Counts the ops that copy a value to the host (a sync on a GPU): .item(), float(),
    bool(), int() of a tensor all dispatch aten::_local_scalar_dense."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


class LaunchCounter(TorchDispatchMode):
    """What a call issues: Triton kernel launches (``kernels``, by name) and PyTorch ops
    (``ops``), those inside dive_fast's own custom ops included, those a Triton launch
    issues itself (the interpreter's copies) not.

    ``kernel_ops()`` leaves out the ops that launch nothing on a GPU: allocations, views
    and dive_fast's Python custom ops themselves (what they issue is counted).
    """

    NO_KERNEL = ("aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty")

    def __init__(self):
        super().__init__()
        self.kernels: list[str] = []
        self.ops: list[str] = []
        self._in_launch = 0
        self._depth = 0  # the mode is entered again inside our custom ops
        self._patched = []

    def kernel_ops(self) -> list[str]:
        return [name for name, view in self.ops if not view and name not in self.NO_KERNEL
                and not name.startswith("dive_fast::")]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._in_launch:
            self.ops.append((func._schema.name, func.is_view))
        if func.namespace == "dive_fast":
            # Run our Python op's body with this mode pushed again, to see what it issues
            # (calling func itself would come straight back here).
            with self:
                return func.redispatch(torch._C.DispatchKeySet(
                    torch._C.DispatchKey.CompositeExplicitAutograd), *args, **kwargs)
        return func(*args, **kwargs)

    def __enter__(self):
        self._depth += 1
        if self._depth > 1:
            return super().__enter__()
        from .ops import dive_triton
        for name in ("_dive_stats_kernel", "_dive_finalize_kernel", "_dive_backward_kernel"):
            kernel = getattr(dive_triton, name)

            def run(*args, _kernel=kernel, _name=name, **kwargs):
                self.kernels.append(_name)
                self._in_launch += 1
                try:
                    return type(_kernel).run(_kernel, *args, **kwargs)
                finally:
                    self._in_launch -= 1
            kernel.run = run
            self._patched.append(kernel)
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for kernel in self._patched:
                del kernel.run
            self._patched.clear()
        return super().__exit__(*exc)
