"""The DiVE backends as pytest parameters, each skipped with the reason it cannot run here."""
import pytest

from dive_fast.ops import backends


def backend_params(names=("torch", "cpu", "triton")):
    """One pytest param per backend; a backend that cannot run here is skipped with why."""
    params = []
    for name in names:
        why = backends.unavailable_reason(name, "cpu")
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params
