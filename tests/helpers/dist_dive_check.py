"""Run under torchrun (gloo): each rank gets half of one global batch; writes its m and loss."""
import json
import sys

import torch.distributed as dist

from dive_fast import DiVELoss
from dive_fast.testing import make_inputs

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
backend = sys.argv[2]
loss_fn = DiVELoss(16, lam=10.0, momentum=0.5, backend=backend)
out = []
for step in range(3):
    x = make_inputs(8 * world, 16, seed=step)  # the same global batch on every rank
    local = [z[rank * 8:(rank + 1) * 8] for z in x]
    loss = loss_fn(*local)
    out.append({"loss": loss.item(), "m": loss_fn.m.tolist()})
with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
