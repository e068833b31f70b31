"""dive_fast: fused kernels and a lean training loop for DiVE robust fine-tuning of CLIP."""
from .accumulate import micro_batched_backward
from .loss import DiVELoss, dive_loss
from .ops.dive import DiVEOutput

__all__ = ["DiVELoss", "dive_loss", "DiVEOutput", "micro_batched_backward"]
__version__ = "0.1.0"
