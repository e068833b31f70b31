"""Under torchrun (two gloo processes): the live frozen tower as ``make_frozen_side`` makes it
under --fsdp, against a whole copy of the same weights. Writes rank r's figures to
``<out>/rank<r>.json``: the tower's bytes on this rank (sharded and whole) and whether its
embeddings equal the whole copy's, in float32 and under bf16 autocast."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dive_fast.train import cli
from dive_fast.train.frozen import FrozenReference, make_frozen_side
from dive_fast.train.memory import module_bytes
from dive_fast.train.models import frozen_copy, load_clip

dist.init_process_group("gloo")
rank, out = dist.get_rank(), Path(sys.argv[1])
torch.manual_seed(0)  # the same random weights on both ranks
bundle = load_clip("dive-micro")
torch.manual_seed(1 + rank)  # each rank its own reference batch
images = torch.randn(5, 3, bundle.image_size, bundle.image_size)
tokens = bundle.tokenizer([f"a small red cube number {i}" for i in range(5 + rank)])[:5]
found = {}
for precision, amp in (("fp32", None), ("amp_bf16", torch.bfloat16)):
    args = cli.parse(["--model", "dive-micro", "--method", "dive", "--fsdp", "--no-frozen-cache",
                      "--precision", precision, "--device", "cpu", "--out", str(out / precision)])
    frozen = make_frozen_side(args, bundle, None, (None, None), amp, out / precision, world=2)
    whole = FrozenReference(frozen_copy(bundle.model, amp), "cpu", amp)
    sharded_emb, whole_emb = frozen.embed(images, tokens), whole.embed(images, tokens)
    found[precision] = {
        "sharded_bytes": frozen.tower_bytes, "whole_bytes": whole.tower_bytes,
        "fp32_whole_bytes": module_bytes(frozen_copy(bundle.model)),
        "equal": all(torch.equal(a, b) for a, b in zip(sharded_emb, whole_emb))}
(out / f"rank{rank}.json").write_text(json.dumps(found))
dist.barrier()  # both ranks done with the group before either tears it down
dist.destroy_process_group()
