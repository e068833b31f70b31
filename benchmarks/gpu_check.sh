#!/usr/bin/env bash
# The prepared GPU check (one command, a few minutes): build for the local GPU, check
# triton and cuda against the float64 oracle, time them. Wheels for packages the GPU
# image lacks (open_clip_torch, ftfy, wcwidth, webdataset, braceexpand) may be carried
# in .whl/ (see the device tool's README); they are installed into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" DIVE_FAST_BUILD_CUDA=1 MAX_JOBS=16
python3 setup.py -q build_ext --inplace
PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py
