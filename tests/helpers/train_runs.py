"""Under torchrun: runs ``dive_fast.train`` once per argument list in a JSON file, in order,
in one process group (so that one pair of processes serves many runs). After destroying the
group, no gloo thread may be left: one alive into interpreter shutdown can abort the process."""
import json
import os
import sys
import time

import torch.distributed as dist

from dive_fast import train


def gloo_threads() -> list[str]:
    names = [open(f"/proc/self/task/{t}/comm").read().strip()
             for t in os.listdir("/proc/self/task")]
    return [n for n in names if "gloo" in n]


dist.init_process_group("gloo")
for args in json.loads(open(sys.argv[1]).read()):
    train.main(args)
# Whoever creates a group destroys it, after its peers are done with it: a rank that tears
# down while the other still talks to it keeps its gloo threads until the other hangs up.
dist.barrier()
dist.destroy_process_group()
deadline = time.monotonic() + 10  # the threads join as the group's last owner lets go
while gloo_threads() and time.monotonic() < deadline:
    time.sleep(0.1)
if gloo_threads():
    sys.exit(f"gloo threads still running 10 s after destroy_process_group: {gloo_threads()}")
