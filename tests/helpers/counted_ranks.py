"""Under torchrun: one ``dive_fast.train`` run (the arguments after the output file) with
each rank's file-system look-ups counted (``fs_calls``); rank r writes {kind: [path, ...]}
to ``<output>.<r>.json``."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dive_fast import train  # noqa: E402
from helpers.fs_calls import counted  # noqa: E402

with counted() as calls:
    train.main(sys.argv[2:])
with open(f"{sys.argv[1]}.{os.environ['RANK']}.json", "w") as f:
    json.dump(calls.paths, f)
