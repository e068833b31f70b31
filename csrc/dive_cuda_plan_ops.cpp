// The CUDA kernels' launch shapes (dive_cuda_plan.h) as ops, for the ahead-of-time compile
// check (tools/aot.py), the GPU check and the tests: plain host arithmetic, so they need no
// GPU and no CUDA build, and are registered by every build of dive_fast._C.
#include <torch/library.h>

#include <vector>

#include "dive_cuda_plan.h"

namespace dive_fast {

TORCH_LIBRARY_FRAGMENT(dive_fast_C, lib) {
  lib.def("cuda_parts() -> int", [] { return int64_t(kParts); });
  lib.def("cuda_max_dim() -> int", [] { return kMaxDim; });
  lib.def("cuda_stats_plan(int dim, int elem_ft, int elem_pre, bool aligned, int shared_limit) "
          "-> int[]", [](int64_t D, int64_t ft, int64_t pre, bool aligned, int64_t limit) {
            const StatsPlan p = stats_plan(D, int(ft), int(pre), aligned, limit);
            return std::vector<int64_t>{p.fast, p.chunks, p.threads_per_row, p.rows_per_tile,
                                        p.stages, p.stage_bytes, p.shared_bytes, kParts,
                                        kStatsThreads};
          });
  lib.def("cuda_backward_plan(int batch, int dim, int elem_ft, int elem_pre, bool aligned) "
          "-> int[]", [](int64_t B, int64_t D, int64_t ft, int64_t pre, bool aligned) {
            const BackwardPlan p = backward_plan(B, D, int(ft), int(pre), aligned);
            return std::vector<int64_t>{p.fast, p.threads_per_row, p.rows_per_block, p.threads,
                                        p.blocks};
          });
  lib.def("cuda_finalize_plan(int dim) -> int[]", [](int64_t D) {
    return std::vector<int64_t>{finalize_blocks(D), kFinalizeThreads, workspace_doubles(D)};
  });
}

}  // namespace dive_fast
