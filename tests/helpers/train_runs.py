"""Under torchrun: runs ``dive_fast.train`` once per argument list in a JSON file, in order,
in one process group (so that one pair of processes serves many runs)."""
import json
import sys

import torch.distributed as dist

from dive_fast import train

dist.init_process_group("gloo")
for args in json.loads(open(sys.argv[1]).read()):
    train.main(args)
dist.destroy_process_group()
