"""What one DiVELoss call issues on the GPU path: two Triton kernels forward, one backward,
and no other PyTorch op that launches a kernel (counted under the interpreter by
``LaunchCounter``: Triton launches, plus every aten op through a TorchDispatchMode)."""
import pytest
import torch
from helpers.backends import backend_params

from dive_fast import DiVELoss, dive_loss
from dive_fast.testing import LaunchCounter, make_inputs

FORWARD = ["_dive_stats_kernel", "_dive_finalize_kernel"]


def _inputs(D=40):
    x = make_inputs(19, D, seed=3)
    return [x[0].clone().requires_grad_(True), x[1], x[2].clone().requires_grad_(True), x[3]]


def _backward(outputs, x):
    """Gradients of the given outputs with the seeds made beforehand (not counted)."""
    seeds = [torch.ones_like(o) for o in outputs]
    with LaunchCounter() as counter:
        torch.autograd.grad(outputs, (x[0], x[2]), seeds)
    return counter


@pytest.mark.parametrize("backend", backend_params(("triton",)))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_module_forward_two_kernels_backward_one(backend, training):
    x = _inputs()
    loss_fn = DiVELoss(40, momentum=0.9, backend=backend, check_values=False).train(training)
    with LaunchCounter() as counter:
        loss = loss_fn(*x)
    assert counter.kernels == FORWARD and counter.kernel_ops() == [], counter.ops
    counter = _backward([loss], x)
    assert counter.kernels == ["_dive_backward_kernel"] and counter.kernel_ops() == [], counter.ops


@pytest.mark.parametrize("backend", backend_params(("triton",)))
def test_parts_and_functional_form_keep_the_count(backend):
    """Backpropagating through the loss and its parts, m kept by the caller."""
    x, m = _inputs(24), torch.zeros(24)
    with LaunchCounter() as counter:
        out = dive_loss(*x, m, lam=3.0, avl=False, backend=backend, check_values=False)
    assert counter.kernels == FORWARD and counter.kernel_ops() == [], counter.ops
    counter = _backward([out.loss, out.avl, out.pvl], x)
    assert counter.kernels == ["_dive_backward_kernel"] and counter.kernel_ops() == [], counter.ops


@pytest.mark.parametrize("backend", backend_params(("cpu",)))
def test_cpu_one_compiled_call_each_way(backend):
    """The CPU backend: statistics and finalisation in one C++ op, the backward in another."""
    x = _inputs()
    loss_fn = DiVELoss(40, backend=backend, check_values=False)
    with LaunchCounter() as counter:
        loss = loss_fn(*x)
    assert counter.kernel_ops() == ["dive_fast_C::dive_forward"], counter.ops
    counter = _backward([loss], x)
    assert counter.kernel_ops() == ["dive_fast_C::dive_backward"], counter.ops


def test_counter_sees_pytorch_ops():
    """The counter is not blind: the reference backend's ops show up."""
    x = _inputs()
    with LaunchCounter() as counter:
        DiVELoss(40, backend="torch", check_values=False)(*x)
    assert len(counter.kernel_ops()) > 20 and counter.kernels == []
