import os

# Triton kernels run on CPU tensors through the interpreter; must be set before import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dive_fast import backends  # noqa: E402

torch.set_num_threads(2)


def backend_params(names=("reference", "cpu", "triton")):
    """One pytest param per backend; a backend that cannot run here is skipped with why."""
    params = []
    for name in names:
        why = backends.unavailable_reason(name, "cpu")
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params
