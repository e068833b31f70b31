"""``python model_config_run.py CONFIG_DIR ARGS...``: ``dive_fast.train`` with the open_clip
model configs of CONFIG_DIR added (a test's own models, in processes torchrun starts)."""
import sys

import open_clip

from dive_fast import train

open_clip.add_model_config(sys.argv[1])
train.main(sys.argv[2:])
