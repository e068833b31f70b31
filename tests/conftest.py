import os

# Triton kernels run on CPU tensors through the interpreter; must be set before import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dive_fast.ops import backends  # noqa: E402

torch.set_num_threads(2)


def backend_params(names=("torch", "cpu", "triton")):
    """One pytest param per backend; a backend that cannot run here is skipped with why."""
    params = []
    for name in names:
        why = backends.unavailable_reason(name, "cpu")
        marks = [pytest.mark.skip(reason=f"{name}: {why}")] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(scope="session")
def micro_cache(tmp_path_factory):
    """A throw-away cache holding a briefly pre-trained dive-micro (the real code path)."""
    from dive_fast.train.models import CACHE_ENV, tiny_checkpoint
    from dive_fast.train.pretrain import pretrain

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(cache)
    pretrain("dive-micro", steps=5, batch_size=16, workers=0, progress=False, eval_per_task=10,
             out=tiny_checkpoint("dive-micro"))
    yield cache
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


def train_args(out, *extra):
    """A few seconds of training on the world with the micro model."""
    return ["--model", "dive-micro", "--out", str(out), "--steps", "4", "--batch-size", "8",
            "--train-size", "32", "--ref-size", "32", "--eval-per-task", "10", "--workers", "0",
            "--no-progress", "--wise-ft", "", "--checkpoint-every", "2", "--log-every", "1",
            "--lr", "1e-3", *extra]
