"""The benchmarks' activation meter counts exactly what autograd saves for backward."""
import sys

import pytest
import torch

from dive_fast.train.memory import SavedTensorMeter


def test_meter_counts_saved_activations_once_and_releases_them():
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    x = torch.randn(32, 64)
    with SavedTensorMeter(exclude=[model]) as meter:
        y = model(x)
        # Saved: the input of each linear layer (for its weight's gradient) and GELU's
        # input; GELU's input is the first linear's output, the second linear's input is
        # GELU's output. Weights are parameters: left out.
        assert meter.bytes == 4 * (32 * 64 + 32 * 256 + 32 * 256)
        y.sum().backward()
    assert meter.bytes == 0
    assert meter.peak == 4 * (32 * 64 + 32 * 256 + 32 * 256)


def test_meter_counts_a_shared_storage_once_and_weights_when_not_excluded():
    w = torch.randn(16, 16, requires_grad=True)
    x = torch.randn(8, 16, requires_grad=True)
    with SavedTensorMeter() as meter:  # nothing excluded: the weight's storage counts
        (x @ w).sum().backward()
    assert meter.peak == 4 * (8 * 16 + 16 * 16)
    a = torch.randn(8, 16, requires_grad=True)
    with SavedTensorMeter(exclude=[]) as meter:
        b = a * 2
        (b * b).sum().backward()  # b saved twice (both operands): one storage
    assert meter.peak == 4 * 8 * 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM: /proc")
def test_save_weights_writes_safetensors_bytes_without_a_copy_in_memory(tmp_path):
    """final.safetensors, start-weights.safetensors and best.safetensors: the bytes of
    safetensors' save (every dtype order, a scalar, an empty and a transposed tensor),
    written tensor by tensor: the process's peak grows by far less than the weights (save
    built the file in memory, 2x the weights at its peak: ViT-B-32's final.safetensors
    added 1.1 GiB to a FLYP run's peak)."""
    import subprocess

    from safetensors.torch import save

    from dive_fast.train.weights import save_weights
    state = {"z": torch.zeros(3, dtype=torch.int8), "b": torch.randn(3, 2),
             "a": torch.randn(5).half(), "c": torch.arange(6), "y": torch.ones(2, dtype=torch.bool),
             "x": torch.randn(2, dtype=torch.bfloat16), "s": torch.tensor(3.0),
             "e": torch.zeros(0, 4), "d": torch.randn(3, dtype=torch.float64),
             "t": torch.randn(4, 4).t()}
    for one in ({}, state):
        save_weights(one, tmp_path / "w.safetensors")
        assert (tmp_path / "w.safetensors").read_bytes() == \
            save({k: v.contiguous() for k, v in one.items()})
    code = f"""
import torch
from dive_fast.train.weights import save_weights
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
state = {{f"w{{i}}": torch.randn(1024, 1024) for i in range(64)}}  # 256 MiB
before = hwm()
save_weights(state, {str(tmp_path / "big.safetensors")!r})
print((hwm() - before) / 1024)
"""
    grown = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    assert grown < 64, f"saving 256 MiB of weights raised the peak by {grown:.0f} MiB"
