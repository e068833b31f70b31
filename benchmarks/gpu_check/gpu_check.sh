#!/usr/bin/env bash
# The prepared GPU check (one command, at most 5 minutes on a GPU): build the CUDA kernels
# for this GPU's architecture, check triton and cuda against the float64 oracle, count launches,
# time the op and the training step, measure the step's memory. CSVs go to $OUT or benchmarks/results/local/.
#
#   bash benchmarks/gpu_check/gpu_check.sh            # on a CUDA machine
#   bash benchmarks/gpu_check/gpu_check.sh --dry-run  # here: every stage on the CPU, Triton
#                                    # interpreted, the CUDA parts skipped (CI runs it)
#
# Packages the GPU machine lacks (open_clip_torch, ftfy, wcwidth, webdataset, braceexpand,
# ...) may be carried as wheels in the ignored folder .whl/ (see the README); they are
# installed into /tmp/site, without network, before anything runs.
set -euo pipefail
cd "$(dirname "$0")/../.."  # the repository root
DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    *) echo "usage: bash benchmarks/gpu_check/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
PYTHON="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: CUDA build skipped (no GPU here); the installed dive_fast is used"
  exec "$PYTHON" benchmarks/gpu_check/gpu_check.py --dry-run
fi
# The extension for this GPU's own architecture only, in place (what `pip install -e .`
# would build): an A100 gets 8.0, an H100/H200 9.0, a B200 10.0.
ARCH="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}" DIVE_FAST_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"
echo "build: CUDA kernels for sm ${TORCH_CUDA_ARCH_LIST}"
"$PYTHON" setup.py -q build_ext --inplace
echo "build: done at ${SECONDS} s"
# Nothing is installed on a bare GPU machine: import the package from this tree.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The 5-minute budget, build included: the stages get what is left, in the order that
# loses the least to a cut (the kernels and the op first, the memory benchmark last); a
# stage whose expected time (gpu_check.py's EXPECTED_S) no longer fits is skipped and said.
LEFT=$((300 - SECONDS))
[ "$LEFT" -lt 60 ] && LEFT=60
exec timeout --signal=INT "$((LEFT + 30))" \
  "$PYTHON" benchmarks/gpu_check/gpu_check.py --budget "$LEFT"
