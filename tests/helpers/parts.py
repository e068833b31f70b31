"""Per-part statistics made by hand, for the finalisation tests of every backend (the
Triton and C++ finalisations, the emulated CUDA one)."""
import torch

from dive_fast.ops.dive_reference import reference_stats


def uneven_parts(K=37, D=300, spread=1.0):
    """K parts of 1 to 9 rows (reference statistics in float32) about a common centre c,
    their spread about it ``spread``; and an m near c."""
    g = torch.Generator().manual_seed(9)
    sizes = [1 + (5 * k) % 9 for k in range(K)]
    c = torch.randn(D, generator=g, dtype=torch.float64)
    parts = []
    for rows in sizes:
        pre = [torch.randn(rows, D, generator=g, dtype=torch.float64) for _ in range(2)]
        ft = [p + c + spread * torch.randn(rows, D, generator=g, dtype=torch.float64)
              for p in pre]
        parts.append(reference_stats(ft[0].float(), pre[0].float(), ft[1].float(),
                                     pre[1].float(), False))
    means, scalars = (torch.cat(x) for x in zip(*parts))
    m = (c + 1e-3 * torch.randn(D, generator=g, dtype=torch.float64)).float()
    return means, scalars, m
