"""A training run killed mid-way, for the resume tests."""
import pytest

from dive_fast import train


def run_killed_at_step(monkeypatch, method_cls, step: int, argv: list[str]) -> None:
    """``train.main(argv)`` with ``method_cls.forward`` raising KeyboardInterrupt (a kill)
    at its ``step``-th call; the method is restored afterwards."""
    calls, original = [0], method_cls.forward

    def killed(self, batch, i):
        calls[0] += 1
        if calls[0] == step:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch, i)

    monkeypatch.setattr(method_cls, "forward", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    monkeypatch.setattr(method_cls, "forward", original)
