// Launch shapes of the DiVE CUDA kernels, as functions of the problem alone (and, for the
// pipeline depth, of the device's shared memory): host code shared by the CUDA launchers
// (dive_cuda.cu), the CPU emulation of the kernels (tests/ops/cuda_emulation/) and the
// ahead-of-time checks (tools/aot.py reads them through the ops of dive_cuda_plan_ops.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

namespace dive_fast {

// Parts of the statistics on the reference device (an H100/H200: 132 SMs, two blocks of
// the statistics kernel on each), which the CPU emulation and the ahead-of-time checks
// use. On a GPU the launchers take stats_parts (below): one full wave on that device.
constexpr int kParts = 264;
constexpr int kStatsThreads = 256;
constexpr int kFinalizeThreads = 512;  // 16 warps share a block's parts: short load chains
constexpr int kFinalizeColumns = 32;  // columns of m (and of the partials) per finalisation block
constexpr int kMaxStages = 3;
// Shared memory per block left to the kernels' static arrays (under 2 KiB) out of the
// device's opt-in limit when the ring's depth is chosen.
constexpr int64_t kStaticSharedReserve = 4096;
constexpr int64_t kMaxDim = 8192;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// A 16-byte chunk of the wider of the two input dtypes: its element count.
inline int chunk_elements(int elem_ft, int elem_pre) { return 16 / std::max(elem_ft, elem_pre); }

// The statistics kernel's shape. Fast path (16-byte aligned rows, D a multiple of the
// chunk, at most 4 chunks per thread): each thread owns `chunks` chunks of one row per
// tile, a row is `threads_per_row` threads (a power of two: within a warp up to 32), a tile
// is `rows_per_tile` rows, and `stages` tiles are staged in shared memory by cp.async.
// Otherwise the portable kernel (dive_stats_rows_kernel), one part per block all the same.
// Both within the device's opt-in shared memory per block (`shared_limit`, less
// kStaticSharedReserve): the fast kernel when one stage and its merge fit, else the
// portable one with as many rows a tile as fit; `fits` false when not even one row does
// (the launcher refuses: 16 bytes a column, D > ~6000 on the 99 KiB parts: L4, L40S, RTX).
struct StatsPlan {
  bool fast;
  int chunks, threads_per_row, rows_per_tile, stages;
  int64_t stage_bytes, shared_bytes;
  bool fits;
};

// The portable kernel's shared memory: u and v rows of a tile, then the part's two means.
inline int64_t rows_kernel_shared(int64_t D, int64_t rows) { return 4 * (2 * rows * D + 2 * D); }

inline StatsPlan stats_plan(int64_t D, int elem_ft, int elem_pre, bool aligned,
                            int64_t shared_limit) {
  const int E = chunk_elements(elem_ft, elem_pre);
  const int64_t nchunks = ceil_div(D, E);
  const int max_chunks = E == 4 ? 4 : 2;  // the instances compiled (dive_cuda.cu)
  const int64_t available = shared_limit - kStaticSharedReserve;
  StatsPlan p{};
  p.fast = aligned && D % E == 0 && nchunks <= int64_t(kStatsThreads) * max_chunks;
  if (p.fast) {
    p.chunks = nchunks <= 2 * kStatsThreads ? 2 : 4;
    p.threads_per_row = next_pow2(ceil_div(nchunks, p.chunks));
    p.rows_per_tile = kStatsThreads / p.threads_per_row;
    p.stage_bytes = int64_t(kStatsThreads) * p.chunks * E * (2 * elem_ft + 2 * elem_pre);
    p.stages = static_cast<int>(std::clamp<int64_t>(
        (shared_limit - kStaticSharedReserve) / p.stage_bytes, 1, kMaxStages));
    // At the end of a part the ring holds each row group's column means and the groups'
    // counts and merge weights.
    const int64_t padded = int64_t(p.threads_per_row) * p.chunks * E;
    const int64_t merge = p.rows_per_tile * (2 * padded * 4 + 4 + 2 * 8) + 16;
    p.shared_bytes = std::max(p.stages * p.stage_bytes, merge);
    p.fast = p.shared_bytes <= available;  // else one stage does not fit: the portable kernel
  }
  if (!p.fast) {
    // Rows a tile: up to 16 and 4096 values, no more than fit beside the means.
    const int64_t fit = (available / 4 - 2 * D) / (2 * D);
    p = StatsPlan{};
    p.rows_per_tile = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>({16, 4096 / D, fit})));
    p.threads_per_row = 32;
    p.stages = 1;
    p.shared_bytes = rows_kernel_shared(D, p.rows_per_tile);
  }
  p.fits = p.shared_bytes <= available;
  return p;
}

// The statistics' parts on a device: one full wave of the kernel, `blocks_per_sm` blocks
// on each of `sm_count` SMs (a tail wave would leave SMs idle while the last blocks run:
// 1.2-1.5x on the statistics pass). The partials, hence every result, depend on this K
// alone: the same on every device of one kind, and at every batch size.
inline int stats_parts(int sm_count, int blocks_per_sm) {
  return std::max(1, sm_count) * std::clamp(blocks_per_sm, 1, 32);
}

// Waves of `parts` blocks on `sm_count` SMs taking `blocks_per_sm` each (the kernel table's
// column per GPU).
inline int64_t waves(int64_t parts, int sm_count, int blocks_per_sm) {
  return ceil_div(parts, int64_t(std::max(1, sm_count)) * std::max(1, blocks_per_sm));
}

// The backward's shape. Fast path: each thread holds 2 chunks of each input's row in
// registers (one read of each input, 16-byte loads and stores), `threads_per_row` threads
// per row (up to 512), `rows_per_block` rows per block. Otherwise one warp per row.
struct BackwardPlan {
  bool fast;
  int threads_per_row, rows_per_block, threads;
  int64_t blocks;
};

constexpr int kBackwardChunks = 2;
constexpr int kBackwardMaxThreads = 512;

inline BackwardPlan backward_plan(int64_t B, int64_t D, int elem_ft, int elem_pre, bool aligned) {
  const int E = chunk_elements(elem_ft, elem_pre);
  const int64_t nchunks = ceil_div(D, E);
  BackwardPlan p{};
  p.fast = aligned && D % E == 0 && nchunks <= int64_t(kBackwardChunks) * kBackwardMaxThreads;
  if (p.fast) {
    p.threads_per_row = next_pow2(ceil_div(nchunks, kBackwardChunks));
    p.rows_per_block = std::max(1, 256 / p.threads_per_row);
    p.threads = p.rows_per_block * p.threads_per_row;
  } else {
    p.threads_per_row = 32;
    p.rows_per_block = 8;
    p.threads = 256;
  }
  p.blocks = ceil_div(B, p.rows_per_block);
  return p;
}

inline int finalize_blocks(int64_t D) { return static_cast<int>(ceil_div(D, kFinalizeColumns)); }

// The workspace a forward hands from the statistics to the finalisation: the arrival
// ticket (zeroed by the statistics kernel) and 4 partial sums per finalisation block.
inline int64_t workspace_doubles(int64_t D) { return 2 + 4 * int64_t(finalize_blocks(D)); }

}  // namespace dive_fast
