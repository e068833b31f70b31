"""The benchmarks' activation meter counts exactly what autograd saves for backward."""
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
