"""``--precision`` (open_clip's names) as the autocast dtype of training and evaluation
alike; its own module because both the run builder and the evaluation command read it."""
from __future__ import annotations

import torch

PRECISIONS = {  # --precision (open_clip's names) -> the autocast dtype (None: float32)
    "auto": "auto", "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16,
    "amp": torch.float16, "amp_fp16": torch.float16, "fp32": None}
# open_clip's "bf16" (and "pure_bf16") cast the weights themselves: not offered under that name.


def autocast_dtype(precision: str, device: str):
    """--precision as an autocast dtype (None: float32); auto is bf16 on GPUs only."""
    dtype = PRECISIONS[precision]
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else None
    return dtype


def autocast(device, dtype):
    """The run's autocast (``dtype`` None: float32), around every forward of an evaluation,
    as open_clip's zero-shot evaluation runs under its --precision."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)
