"""The start-up work of a run on however many ranks launched it (srun's variables, or none:
one process): the frozen cache of a reference set with unreadable rows, and the evaluation
(three world tasks, two WiSE-FT-like variants, RSA), on CPU with gloo. Batches of 4 and 8
give every rank several, and the last a short one. Writes to ``<out>``: ``cache/`` (the .npy
and its digest) and, from rank 0, ``report.json`` and the share each rank embedded."""
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from dive_fast.train import distributed
from dive_fast.train.data import WorldCaptions
from dive_fast.train.frozen import FrozenReference
from dive_fast.train.frozen import cache as frozen_cache
from dive_fast.train.models import frozen_copy, load_clip
from dive_fast.train.scoring import evaluate_variants, world_eval_sets, world_rsa_set
from dive_fast.train.weights import model_state
from dive_fast.train.wise_ft import WeightMix

CACHE_BATCH, EVAL_BATCH = 8, 4


class WithHoles(Dataset):
    """World captions of which every seventh cannot be read (its cache row stays zero)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return None if i % 7 == 3 else self.pairs[i]


torch.set_num_threads(1)
rank, world, _ = distributed.init_from_env("cpu")
out = Path(sys.argv[1])
torch.manual_seed(0)  # the same random weights on every rank
bundle = load_clip("dive-micro")
torch.manual_seed(1)
start = load_clip("dive-micro").model.eval()  # another model: RSA's start, WiSE-FT's other end
tf, size = bundle.preprocess_val, bundle.image_size
pairs = WithHoles(WorldCaptions("reference", 45, tf, 0, size))
frozen = FrozenReference(frozen_copy(bundle.model), "cpu")
built = frozen_cache.build(frozen, bundle.tokenizer, pairs, out / "cache" / "frozen-ref.npy",
                           batch_size=CACHE_BATCH, progress=False, rank=rank, world=world)
assert len(built) == len(pairs)
mix = WeightMix(bundle.model, model_state(start), model_state(bundle.model))
reports = evaluate_variants(
    bundle.model, bundle.tokenizer, world_eval_sets(tf, 13, 0, size),
    [(mix.setter(1.0), None), (mix.setter(0.5), None)], pre_model=start,
    rsa_set=world_rsa_set(tf, n=11, size=size), batch_size=EVAL_BATCH, progress=False,
    rank=rank, world=world)
share = distributed.batch_slice(len(pairs), CACHE_BATCH, rank, world)
shares = distributed.gather_in_rank_order([share.start, share.stop])
if rank == 0:
    (out / "report.json").write_text(json.dumps({"reports": reports, "cache_shares": shares}))
distributed.shutdown()
