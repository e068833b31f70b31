"""Under torchrun: runs ``dive_fast.train`` once per argument list in a JSON file, in order,
in one process group (so that one pair of processes serves many runs). After destroying the
group, no gloo thread may be left: one alive into interpreter shutdown can abort the process."""
import json
import os
import sys

import torch.distributed as dist

from dive_fast import train

dist.init_process_group("gloo")
for args in json.loads(open(sys.argv[1]).read()):
    train.main(args)
dist.destroy_process_group()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
left = [t for t in threads if "gloo" in t]
if left:
    sys.exit(f"gloo threads still running after destroy_process_group: {left}")
