"""The step's work, counted (FLOPs as torch's FlopCounterMode sees one step run: the same in
every run, unlike timings): what fast DiVE adds to FLYP(B+B')."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from bench_step import build_parser, step_flops, variant_cli  # noqa: E402
from common import user_run  # noqa: E402


@pytest.fixture(scope="module")
def flops(tmp_path_factory):
    """GFLOP of one dive-micro step per variant (random weights, B = B' = 8)."""
    tmp = tmp_path_factory.mktemp("work")
    args = build_parser().parse_args(["--model", "dive-micro", "--batch", "8", "--workers", "0",
                                      "--ref-size", "32", "--data", "synthetic"])

    def count(variant):
        run = user_run(variant_cli(args, variant, tmp / variant), "synthetic", None)
        stream = run.batches()

        def one_step(i):
            batch = next(stream)
            run.step(batch, i, run.opt, run.sched, run.guard)
            return 0.0, 0.0, batch.samples
        return step_flops(one_step, 0)[0] / 1e9
    return {v: count(v) for v in ("flyp-B+B'", "flyp-B+B'-notrunc", "dive-fast",
                                  "dive-fast-notrunc", "dive-seq")}


def test_fast_dive_does_flyps_work_at_equal_text_lengths(flops):
    """Cached frozen embeddings and the fused loss: no tower work beyond FLYP(B+B')'s."""
    assert flops["dive-fast-notrunc"] == pytest.approx(flops["flyp-B+B'-notrunc"], rel=0.02)


def test_the_cache_removes_the_frozen_forward(flops):
    """Without the cache the frozen towers run on the B' reference pairs every step."""
    assert flops["dive-seq"] > 1.1 * flops["dive-fast"]


def test_attention_is_counted_on_the_cpu():
    """The CPU's attention kernel has no formula in torch: bench_step supplies it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    with FlopCounterMode(display=False) as plain:
        attention(x, x, x, need_weights=False)[0].sum().backward()
    counted = step_flops(lambda i: (0.0, 0.0, attention(x, x, x, need_weights=False)[0]
                                    .sum().backward() or 3), 0)[0]
    matmul = 2 * (3 * 2) * 5 * 5 * 8  # one [5 x 8] @ [8 x 5] product per batch row and head
    # forward: QK^T and PV; backward (torch's formula): QK^T again, then dV, dP, dQ, dK
    assert counted - plain.get_total_flops() == 2 * matmul + 5 * matmul


def test_truncation_removes_text_work(flops):
    assert flops["flyp-B+B'"] < 0.9 * flops["flyp-B+B'-notrunc"]
    assert flops["dive-fast"] < 0.9 * flops["dive-fast-notrunc"]
