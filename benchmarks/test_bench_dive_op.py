"""pytest-benchmark suite for the DiVE op (not part of the test run; speed is data here):

    python -m pytest benchmarks/test_bench_dive_op.py --benchmark-columns=median,iqr
"""
import pytest
import torch

from dive_fast import dive_loss
from dive_fast.ops import backends
from dive_fast.ops.dive_reference import dive_loss_eager
from dive_fast.testing import make_inputs

SHAPES = [(512, 512), (4096, 768), (32768, 512)]
IMPLS = ["eager", "torch", "cpu"]


def _fwd_bwd(impl, x, m):
    a, t = (x[i].detach().requires_grad_(True) for i in (0, 2))
    if impl == "eager":
        loss = dive_loss_eager(a, x[1], t, x[3], m)[0]
    else:
        loss = dive_loss(a, x[1], t, x[3], m, backend=impl, check_values=False).loss
    torch.autograd.grad(loss, (a, t))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}xD{s[1]}")
def test_dive_fwd_bwd(benchmark, impl, shape):
    if impl != "eager" and backends.unavailable_reason(impl, "cpu"):
        pytest.skip(backends.unavailable_reason(impl, "cpu"))
    x = make_inputs(*shape, seed=0)
    m = torch.zeros(shape[1])
    benchmark.extra_info.update(B=shape[0], D=shape[1], impl=impl, dtype="float32")
    benchmark(_fwd_bwd, impl, x, m)
