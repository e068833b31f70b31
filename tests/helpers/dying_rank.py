"""Under torchrun: ``dive_fast.train`` with the given arguments, where rank 1 dies (exit 3,
no clean-up) in its second step."""
import os
import sys

from dive_fast import train
from dive_fast.train import methods

original, calls = methods.FLYP.forward, [0]


def dies_in_step_2(self, batch, step):
    calls[0] += 1
    if os.environ.get("RANK") == "1" and calls[0] == 2:
        os._exit(3)
    return original(self, batch, step)


methods.FLYP.forward = dies_in_step_2
train.main(sys.argv[1:])
