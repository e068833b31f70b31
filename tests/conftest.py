"""The suite's environment (Triton's interpreter, two threads) and its shared fixtures; the
shared helpers are in tests/helpers/."""
import os

# Triton kernels run on CPU tensors through the interpreter; must be set before import.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


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


@pytest.fixture
def not_loaded(monkeypatch):
    """Model loading fails the test: what is checked must be checked before it."""
    from dive_fast.train import build, evaluate

    def too_late(*a, **k):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(build, "load_clip", too_late)
    monkeypatch.setattr(evaluate, "load_clip", too_late)
