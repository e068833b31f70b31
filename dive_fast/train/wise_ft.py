"""WiSE-FT (Wortsman et al., 2022): the weight-space mixes theta(a) = (1 - a) theta_0 +
a theta_1 of the pre-trained and the fine-tuned weights, the ``--wise-ft`` grid, and the
ID-vs-OOD plot of the mixes (effective robustness: how far the curve bends above the
line from the zero-shot to the fine-tuned point)."""
from __future__ import annotations

import logging
import math

import torch

from . import validate

log = logging.getLogger(__name__)


def parse_alphas(text: str, flag: str = "--wise-ft") -> list[float]:
    """'0.5', '0.25,0.5,0.75' or a grid START:STOP:STEP ('0:1:0.1', both ends included)."""
    text = text.strip()
    if not text:
        return []
    expected = (f"{flag} wants comma-separated numbers (0.5,1) or START:STOP:STEP (0:1:0.1), "
                f"got {text!r}")
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not (step > 0 and stop >= start) or not math.isfinite(stop - start):
                raise ValueError
            n = math.floor((stop - start) / step + 1e-9)  # never past STOP
            alphas = [round(start + i * step, 10) for i in range(n + 1)]
        else:
            alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ValueError(expected) from None
    for alpha in alphas:
        validate.number(flag, alpha, 0, 1)  # a mixing weight: 0 the start, 1 the fine-tuned
    return list(dict.fromkeys(alphas))


class WeightMix:
    """Writes theta(alpha) into ``model`` in place. lerp gives the ends exactly: alpha 0 is
    the pre-trained weights bit for bit, alpha 1 the fine-tuned ones. Integer tensors (none
    in a CLIP) keep the fine-tuned values."""

    def __init__(self, model: torch.nn.Module, pre_state: dict, ft_state: dict):
        self.targets = {k: t for k, t in model.state_dict().items() if t.is_floating_point()}
        missing = [k for k in self.targets if k not in pre_state or k not in ft_state]
        if missing:
            raise ValueError(f"WiSE-FT: weights {missing[:3]} missing from one of the two states")
        self.pre = {k: pre_state[k].to(t.device, t.dtype) for k, t in self.targets.items()}
        self.ft = {k: ft_state[k].to(t.device, t.dtype) for k, t in self.targets.items()}

    @torch.no_grad()
    def set(self, alpha: float) -> None:
        for k, t in self.targets.items():
            torch.lerp(self.pre[k], self.ft[k], alpha, out=t)

    def setter(self, alpha: float):
        return lambda: self.set(alpha)


def plot_id_ood(rows: list[dict], path) -> bool:
    """The mixes' OOD mean against their ID mean, each point labelled with its alpha;
    False (and a log line) when matplotlib is absent or no row has both means."""
    points = [(r["id_mean"], r["ood_mean"], r["alpha"]) for r in rows
              if r.get("id_mean") is not None and r.get("ood_mean") is not None]
    if not points:
        log.warning("no ID-vs-OOD plot: no mix has both ID and OOD sets evaluated")
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("no ID-vs-OOD plot: matplotlib is not installed (pip install matplotlib)")
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    points.sort(key=lambda p: p[2])
    x, y, _ = zip(*points)
    ax.plot([100 * v for v in x], [100 * v for v in y], "o-", label="mixes")
    ends = [points[0], points[-1]]  # the line a mix above it beats: effective robustness
    ax.plot([100 * e[0] for e in ends], [100 * e[1] for e in ends], "--", color="grey",
            label=f"alpha {ends[0][2]:g} to {ends[1][2]:g}")
    labels: dict = {}  # mixes at one point share a label ("0.5, 1")
    for xi, yi, a in points:
        labels.setdefault((xi, yi), []).append(f"{a:g}")
    for (xi, yi), names in labels.items():
        ax.annotate(", ".join(names), (100 * xi, 100 * yi), textcoords="offset points",
                    xytext=(4, 4))
    ax.legend(loc="best", fontsize="small")
    ax.set_xlabel("ID accuracy (%, mean)")
    ax.set_ylabel("OOD accuracy (%, mean)")
    ax.set_title("WiSE-FT: alpha 0 zero-shot, 1 fine-tuned")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
