// The DiVE CUDA kernels (device code only). Compiled by nvcc for the extension
// (dive_cuda.cu) and, with DIVE_EMULATE, by the host compiler against the CPU model of
// tests/ops/cuda_emulation/cuda_emulation.h (on the include path of that test-only build,
// tests/ops/cuda_emulation/dive_emulated.cpp), which the tests run without a GPU.
//
// Forward, two launches:
// - dive_stats_kernel: K blocks, one full wave of the device (its SMs times the kernel's
//   blocks per SM: stats_parts in dive_cuda_plan.h), whatever the batch (the partials, and so
//   every result, are bitwise the same at every batch size and on every GPU of one kind;
//   kParts = 264 is the reference device's K); part k owns the row tiles k, k + K,
//   k + 2K, ... Each thread stages its own 16-byte chunks of the four inputs in shared
//   memory with cp.async, `stages` tiles deep, so the pipeline needs no barrier (a thread
//   reads only what it copied). Per row: the squared norms (one butterfly within the
//   row's lanes; rows wider than a warp add one barrier per tile, which also carries the
//   previous row's norms of u and v), then u, v from the same staged bytes (the only read
//   of the inputs), merged into the thread's per-column running means by Welford's update
//   (per row group; the groups are merged with Chan's formula in float64 at the end of the
//   part), with M2, PVL and the norms summed per row in float32 and across rows in float64.
//   dive_stats_rows_kernel: the portable fallback (rows not 16-byte aligned, D > 4096).
// - dive_finalize_kernel: one block per 32 columns. Each merges its columns over all K
//   parts in a fixed order, b first (sum n_k (mean_u + mean_v) / 2n), then the deviations
//   about b, loads and FMAs only (no division, barrier or call in the loop over parts);
//   writes its columns' candidate m_new and b and its partial sums, then a fence and one
//   acquire-release ticket; the last block to arrive sums the partials in index order,
//   writes the losses, info and (m kept where b is not finite) m_out, and resets the ticket.
// Backward, one launch: dive_backward_kernel holds each thread's chunks of the four rows in
// registers (one 16-byte read of each input, 16-byte stores of both gradients);
// dive_backward_rows_kernel is its portable fallback.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include "dive_common.h"
#include "dive_cuda_plan.h"

#ifdef DIVE_EMULATE
#include <atomic>

#include "cuda_emulation.h"
#define DIVE_DEV inline
#define DIVE_KERNEL(threads) inline void
#define DIVE_SHARED(type, name, count) \
  static char name##_tag;              \
  type* name = ::emu::block_shared<type>(&name##_tag, count)
#define DIVE_DYNAMIC_SHARED(name) unsigned char* name = ::emu::dynamic_shared()
#else
#include <cuda/atomic>
#define DIVE_DEV __device__ __forceinline__
#define DIVE_KERNEL(threads) __global__ void __launch_bounds__(threads)
#define DIVE_SHARED(type, name, count) __shared__ type name[count]
#define DIVE_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Loops over parts: several iterations' loads in flight at once.
#if defined(__CUDA_ARCH__)
#define DIVE_UNROLL_8 _Pragma("unroll 8")
#define DIVE_UNROLL_4 _Pragma("unroll 4")
#else
#define DIVE_UNROLL_8
#define DIVE_UNROLL_4
#endif

namespace dive_fast {
namespace kernels {

#ifdef DIVE_EMULATE
using emu::uint2;
using emu::uint4;
DIVE_DEV float bits_to_float(unsigned u) { return emu::uint_as_float(u); }
DIVE_DEV unsigned float_to_bits(float f) { return emu::float_as_uint(f); }
#else
DIVE_DEV float bits_to_float(unsigned u) { return __uint_as_float(u); }
DIVE_DEV unsigned float_to_bits(float f) { return __float_as_uint(f); }
#endif

constexpr float kNaN = __builtin_nanf("");

template <typename ft_t, typename pre_t>
constexpr int chunk_elems() {
  return 16 / (sizeof(ft_t) > sizeof(pre_t) ? sizeof(ft_t) : sizeof(pre_t));
}

// --- memory ------------------------------------------------------------------------------

// E values of type T at p (a 16- or 8-byte aligned chunk), as floats: one vector load.
template <typename T, int E>
DIVE_DEV void load_chunk(const T* p, float (&out)[E]) {
  constexpr int kBytes = E * int(sizeof(T));
  static_assert(kBytes == 16 || kBytes == 8, "chunks are 8 or 16 bytes");
  unsigned w[kBytes / 4];
  if constexpr (kBytes == 16) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x, w[1] = v.y;
  }
  if constexpr (sizeof(T) == 4) {
    DIVE_UNROLL
    for (int i = 0; i < E; ++i) out[i] = bits_to_float(w[i]);
  } else {
    DIVE_UNROLL
    for (int i = 0; i < E / 2; ++i) {
      out[2 * i] = static_cast<float>(T(static_cast<uint16_t>(w[i] & 0xffffu), T::from_bits()));
      out[2 * i + 1] = static_cast<float>(T(static_cast<uint16_t>(w[i] >> 16), T::from_bits()));
    }
  }
}

// E floats rounded to T (as static_cast does) and stored at p with one vector store.
template <typename T, int E>
DIVE_DEV void store_chunk(T* p, const float (&in)[E]) {
  constexpr int kBytes = E * int(sizeof(T));
  static_assert(kBytes == 16 || kBytes == 8, "chunks are 8 or 16 bytes");
  unsigned w[kBytes / 4];
  if constexpr (sizeof(T) == 4) {
    DIVE_UNROLL
    for (int i = 0; i < E; ++i) w[i] = float_to_bits(in[i]);
  } else {
    DIVE_UNROLL
    for (int i = 0; i < E / 2; ++i)
      w[i] = unsigned(T(in[2 * i]).x) | (unsigned(T(in[2 * i + 1]).x) << 16);
  }
  if constexpr (kBytes == 16) {
    *reinterpret_cast<uint4*>(p) = uint4{w[0], w[1], w[2], w[3]};
  } else {
    *reinterpret_cast<uint2*>(p) = uint2{w[0], w[1]};
  }
}

// Asynchronous global -> shared copy of one chunk (cp.async, sm_80 and later).
template <int kBytes>
DIVE_DEV void cp_async(void* smem, const void* gmem) {
#if defined(DIVE_EMULATE)
  emu::cp_async(smem, gmem, kBytes);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(gmem) : "memory");
  }
#else
  if constexpr (kBytes == 16) {
    *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
  } else {
    *reinterpret_cast<uint2*>(smem) = *reinterpret_cast<const uint2*>(gmem);
  }
#endif
}

DIVE_DEV void cp_async_commit() {
#if defined(DIVE_EMULATE)
  emu::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most `pending` (0..2) of this thread's newest copy groups are in flight.
DIVE_DEV void cp_async_wait(int pending) {
#if defined(DIVE_EMULATE)
  emu::cp_async_wait(pending);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if (pending <= 0) {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  } else if (pending == 1) {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  } else {
    asm volatile("cp.async.wait_group 2;\n" ::: "memory");
  }
#endif
}

// A load that bypasses L1: the value another block wrote before its release.
template <typename T>
DIVE_DEV T load_cg(const T* p) {
#if defined(DIVE_EMULATE)
  return *p;
#else
  if constexpr (sizeof(T) == 2) {
    return T(__ldcg(reinterpret_cast<const unsigned short*>(p)), T::from_bits());
  } else {
    return __ldcg(p);
  }
#endif
}

DIVE_DEV void fence_gpu() {
#if defined(DIVE_EMULATE)
  std::atomic_thread_fence(std::memory_order_seq_cst);
#else
  __threadfence();
#endif
}

// The finalisation's arrival ticket: returns the count of blocks that arrived before.
DIVE_DEV unsigned ticket_arrive(unsigned* ticket) {
#if defined(DIVE_EMULATE)
  return std::atomic_ref<unsigned>(*ticket).fetch_add(1u, std::memory_order_acq_rel);
#else
  return cuda::atomic_ref<unsigned, cuda::thread_scope_device>(*ticket).fetch_add(
      1u, cuda::memory_order_acq_rel);
#endif
}

DIVE_DEV int log2_pow2(int x) {
#ifdef DIVE_EMULATE
  return __builtin_ctz(static_cast<unsigned>(x));
#else
  return __ffs(x) - 1;
#endif
}

// --- warp sums ---------------------------------------------------------------------------

template <int N, typename T>
DIVE_DEV void shfl_xor_add(T (&v)[N], int offset) {
#if defined(DIVE_EMULATE)
  T other[N];
  for (int i = 0; i < N; ++i) other[i] = v[i];
  emu::shfl_xor(other, N, offset);
  for (int i = 0; i < N; ++i) v[i] += other[i];
#else
  DIVE_UNROLL
  for (int i = 0; i < N; ++i) v[i] += __shfl_xor_sync(0xffffffffu, v[i], offset);
#endif
}

// Butterfly sums over aligned groups of `width` lanes (a power of two, at most 32): every
// lane of a group ends with the same bits (each step adds the same two values, in either
// order). Every lane of the warp must take part.
template <int N, typename T>
DIVE_DEV void group_sum(T (&v)[N], int width) {
  for (int offset = width >> 1; offset > 0; offset >>= 1) shfl_xor_add(v, offset);
}

// Sums over a row's `threads_per_row` threads (its lanes, or whole warps through
// `exchange`, [warps][N], with one barrier). Every thread of the block must take part.
template <int N>
DIVE_DEV void row_sum(float (&v)[N], int threads_per_row, float* exchange) {
  if (threads_per_row <= 32) {
    group_sum(v, threads_per_row);
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  group_sum(v, 32);
  if (lane == 0) {
    DIVE_UNROLL
    for (int i = 0; i < N; ++i) exchange[warp * N + i] = v[i];
  }
  __syncthreads();
  const int warps = threads_per_row >> 5;
  const int first = (threadIdx.x >> log2_pow2(threads_per_row)) * warps;
  DIVE_UNROLL
  for (int i = 0; i < N; ++i) v[i] = 0.f;
  for (int w = 0; w < warps; ++w) {
    DIVE_UNROLL
    for (int i = 0; i < N; ++i) v[i] += exchange[(first + w) * N + i];
  }
}

// --- statistics --------------------------------------------------------------------------

template <typename ft_t, typename pre_t>
struct RowPtrs {
  const ft_t* a;
  const pre_t* a0;
  const ft_t* t;
  const pre_t* t0;
  int64_t sa, sa0, st, st0;  // row strides, elements
};

struct StatsOutputs {
  float* means;    // [K, 2, D]
  float* scalars;  // [K, kNumScalars]
  unsigned* ticket;
};

// An overflowing squared norm gives NaN (not 1/inf = 0): the row then acts as a NaN row.
// rsqrtf (one MUFU instruction, within 2 ulp) as before: an IEEE 1/sqrt per row and
// thread would cost about as much as the row's arithmetic.
DIVE_DEV float inverse_norm(float ss, bool normalize) {
#ifdef DIVE_EMULATE
  const float r = 1.f / std::sqrt(ss);
#else
  const float r = rsqrtf(ss);
#endif
  return !(ss <= FLT_MAX) ? kNaN : normalize ? r : 1.f;
}

// 1/x correctly rounded, without the division routine's call (Welford's per-row weight).
DIVE_DEV float reciprocal(float x) {
#ifdef DIVE_EMULATE
  return 1.f / x;
#else
  return __frcp_rn(x);
#endif
}

template <typename ft_t, typename pre_t, int kChunks>
DIVE_KERNEL(kStatsThreads)
dive_stats_kernel(RowPtrs<ft_t, pre_t> in, int64_t B, int D, int threads_per_row, int stages,
                  bool normalize, StatsOutputs out) {
  constexpr int E = chunk_elems<ft_t, pre_t>();
  constexpr int kCols = kChunks * E;
  constexpr int kFt = E * int(sizeof(ft_t)), kPre = E * int(sizeof(pre_t));  // chunk bytes
  constexpr int kSlots = kStatsThreads * kChunks;  // chunks per input and stage
  constexpr int64_t kStageBytes = int64_t(kSlots) * (2 * kFt + 2 * kPre);
  constexpr int kWarps = kStatsThreads / 32;
  DIVE_DYNAMIC_SHARED(smem);
  // Rows wider than a warp: [tile parity][warp][4 squared norms, |u|^2 and |v|^2 of the
  // previous tile's row], double-buffered so that one barrier per tile suffices.
  DIVE_SHARED(float, exchange, 2 * kWarps * 8);
  DIVE_SHARED(double, totals, kWarps * 16);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tr = threads_per_row, rows = kStatsThreads / tr;
  const int tr_log2 = log2_pow2(tr);
  const int group = tid >> tr_log2, l = tid & (tr - 1);
  const int nchunks = D / E;
  const int64_t k = blockIdx.x, K = gridDim.x;
  const int64_t n_tiles = (B + rows - 1) / rows;
  const int64_t my_tiles = n_tiles > k ? (n_tiles - 1 - k) / K + 1 : 0;
  if (k == 0 && tid == 0) *out.ticket = 0u;  // this call's arrival counter for the finalisation

  // Tile j of this part into ring slot `slot`, as one copy group (empty past the part's end).
  auto issue = [&](int64_t j, int slot) {
    if (j < my_tiles) {
      const int64_t r = (k + j * K) * rows + group;
      if (r < B) {
        unsigned char* stage = smem + slot * kStageBytes;
        DIVE_UNROLL
        for (int c = 0; c < kChunks; ++c) {
          const int q = c * tr + l;
          if (q < nchunks) {
            const int at = c * kStatsThreads + tid;
            const int64_t col = int64_t(q) * E;
            cp_async<kFt>(stage + at * kFt, in.a + r * in.sa + col);
            cp_async<kPre>(stage + kSlots * kFt + at * kPre, in.a0 + r * in.sa0 + col);
            cp_async<kFt>(stage + kSlots * (kFt + kPre) + at * kFt, in.t + r * in.st + col);
            cp_async<kPre>(stage + kSlots * (2 * kFt + kPre) + at * kPre, in.t0 + r * in.st0 + col);
          }
        }
      }
    }
    cp_async_commit();
  };
  auto staged = [&](int slot, int c, float (&xa)[E], float (&xa0)[E], float (&xt)[E],
                    float (&xt0)[E]) {
    const unsigned char* stage = smem + slot * kStageBytes;
    const int at = c * kStatsThreads + tid;
    load_chunk<ft_t, E>(reinterpret_cast<const ft_t*>(stage + at * kFt), xa);
    load_chunk<pre_t, E>(reinterpret_cast<const pre_t*>(stage + kSlots * kFt + at * kPre), xa0);
    load_chunk<ft_t, E>(reinterpret_cast<const ft_t*>(stage + kSlots * (kFt + kPre) + at * kFt),
                        xt);
    load_chunk<pre_t, E>(
        reinterpret_cast<const pre_t*>(stage + kSlots * (2 * kFt + kPre) + at * kPre), xt0);
  };

  float mean_u[kCols], mean_v[kCols];  // this row group's running means of its columns
  DIVE_UNROLL
  for (int i = 0; i < kCols; ++i) mean_u[i] = mean_v[i] = 0.f;
  double m2_u = 0, m2_v = 0, pvl = 0, norm_u = 0, norm_v = 0;
  float bad[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int count = 0;
  float pending[2] = {0.f, 0.f};  // rows wider than a warp: the last row's |u|^2, |v|^2 (warp's)
  bool pending_valid = false;

  for (int s = 0; s < stages - 1; ++s) issue(s, s);
  int slot = 0;  // tile j's ring slot, j % stages (kept without a division)
  for (int64_t j = 0; j < my_tiles; ++j) {
    issue(j + stages - 1, slot == 0 ? stages - 1 : slot - 1);  // the slot read last tile
    cp_async_wait(stages - 1);  // tile j's copies (this thread's own) have landed
    const bool valid = (k + j * K) * rows + group < B;
    float ss[4] = {0.f, 0.f, 0.f, 0.f};
    if (valid) {
      DIVE_UNROLL
      for (int c = 0; c < kChunks; ++c) {
        if (c * tr + l < nchunks) {
          float xa[E], xa0[E], xt[E], xt0[E];
          staged(slot, c, xa, xa0, xt, xt0);
          DIVE_UNROLL
          for (int e = 0; e < E; ++e) {
            ss[0] += xa[e] * xa[e];
            ss[1] += xa0[e] * xa0[e];
            ss[2] += xt[e] * xt[e];
            ss[3] += xt0[e] * xt0[e];
          }
        }
      }
    }
    if (tr <= 32) {
      group_sum(ss, tr);
    } else {
      group_sum(ss, 32);
      float* slot = exchange + (j & 1) * kWarps * 8;
      if (lane == 0) {
        DIVE_UNROLL
        for (int i = 0; i < 4; ++i) slot[warp * 8 + i] = ss[i];
        slot[warp * 8 + 4] = pending[0];
        slot[warp * 8 + 5] = pending[1];
      }
      __syncthreads();
      const int warps = tr >> 5, first = group * warps;
      float sum[6] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int w = 0; w < warps; ++w) {
        DIVE_UNROLL
        for (int i = 0; i < 6; ++i) sum[i] += slot[(first + w) * 8 + i];
      }
      DIVE_UNROLL
      for (int i = 0; i < 4; ++i) ss[i] = sum[i];
      if (l == 0 && pending_valid) {
        norm_u += sqrtf(sum[4]);
        norm_v += sqrtf(sum[5]);
      }
    }
    float inv[4];
    DIVE_UNROLL
    for (int i = 0; i < 4; ++i) inv[i] = inverse_norm(ss[i], normalize);
    if (valid && l == 0) {
      DIVE_UNROLL
      for (int i = 0; i < 4; ++i) {
        bad[i] += !(ss[i] <= FLT_MAX);
        bad[4 + i] += ss[i] == 0.f;
      }
    }
    float norms[2] = {0.f, 0.f};  // |u|^2, |v|^2 of this row (this thread's columns)
    if (valid) {
      ++count;
      const float w = reciprocal(static_cast<float>(count));
      float row_m2u = 0.f, row_m2v = 0.f, row_pvl = 0.f;
      DIVE_UNROLL
      for (int c = 0; c < kChunks; ++c) {
        if (c * tr + l < nchunks) {
          float xa[E], xa0[E], xt[E], xt0[E];
          staged(slot, c, xa, xa0, xt, xt0);
          DIVE_UNROLL
          for (int e = 0; e < E; ++e) {
            const float u = xa[e] * inv[0] - xa0[e] * inv[1];
            const float v = xt[e] * inv[2] - xt0[e] * inv[3];
            float& mu = mean_u[c * E + e];
            float& mv = mean_v[c * E + e];
            const float du = u - mu, dv = v - mv;
            mu += du * w;
            mv += dv * w;
            row_m2u += du * (u - mu);
            row_m2v += dv * (v - mv);
            row_pvl += (u - v) * (u - v);
            norms[0] += u * u;
            norms[1] += v * v;
          }
        }
      }
      m2_u += row_m2u;
      m2_v += row_m2v;
      pvl += row_pvl;
    }
    if (tr <= 32) {
      group_sum(norms, tr);
      if (valid && l == 0) {
        norm_u += sqrtf(norms[0]);
        norm_v += sqrtf(norms[1]);
      }
    } else {
      group_sum(norms, 32);  // the other warps' halves arrive with the next tile's barrier
      pending[0] = norms[0];
      pending[1] = norms[1];
      pending_valid = valid;
    }
    slot = slot + 1 == stages ? 0 : slot + 1;
  }
  if (tr > 32 && my_tiles > 0) {  // the last row's norms
    float* slot = exchange + (my_tiles & 1) * kWarps * 8;
    if (lane == 0) {
      slot[warp * 8 + 4] = pending[0];
      slot[warp * 8 + 5] = pending[1];
    }
    __syncthreads();
    if (l == 0 && pending_valid) {
      const int warps = tr >> 5, first = group * warps;
      float sum[2] = {0.f, 0.f};
      for (int w = 0; w < warps; ++w) {
        sum[0] += slot[(first + w) * 8 + 4];
        sum[1] += slot[(first + w) * 8 + 5];
      }
      norm_u += sqrtf(sum[0]);
      norm_v += sqrtf(sum[1]);
    }
  }
  cp_async_wait(0);
  __syncthreads();  // the ring is free: every thread has consumed its last tile

  // The row groups' column means merged in group order (Chan, float64): the part's means
  // and the groups' squared deviations about them.
  const int padded = tr * kCols;
  float* col_means = reinterpret_cast<float*>(smem);  // [rows][2][padded]
  int* counts = reinterpret_cast<int*>(col_means + 2 * rows * padded);
  double* weights = reinterpret_cast<double*>(smem + ((8 * rows * padded + 4 * rows + 7) & ~7));
  DIVE_UNROLL
  for (int c = 0; c < kChunks; ++c) {
    DIVE_UNROLL
    for (int e = 0; e < E; ++e) {
      const int col = (c * tr + l) * E + e;
      col_means[(2 * group) * padded + col] = mean_u[c * E + e];
      col_means[(2 * group + 1) * padded + col] = mean_v[c * E + e];
    }
  }
  if (l == 0) counts[group] = count;
  __syncthreads();
  if (tid < rows) {  // group tid's weight n_g / (n_before + n_g) and n_before n_g / (...)
    int before = 0;
    for (int h = 0; h < tid; ++h) before += counts[h];
    const int n = counts[tid];
    const double w = n > 0 ? double(n) / double(before + n) : 0.0;
    weights[tid] = w;
    weights[rows + tid] = double(before) * w;
  }
  __syncthreads();
  double dev_u = 0, dev_v = 0;
  for (int col = tid; col < D; col += kStatsThreads) {
    double mu = 0, mv = 0;
    for (int h = 0; h < rows; ++h) {
      const double w = weights[h];
      if (w == 0.0) continue;
      const double cross = weights[rows + h];
      const double eu = double(col_means[(2 * h) * padded + col]) - mu;
      const double ev = double(col_means[(2 * h + 1) * padded + col]) - mv;
      dev_u += cross * eu * eu;
      dev_v += cross * ev * ev;
      mu += eu * w;
      mv += ev * w;
    }
    out.means[(2 * k) * D + col] = static_cast<float>(mu);
    out.means[(2 * k + 1) * D + col] = static_cast<float>(mv);
  }
  double v[14] = {l == 0 ? double(count) : 0.0, m2_u + dev_u, m2_v + dev_v, pvl, norm_u, norm_v};
  DIVE_UNROLL
  for (int i = 0; i < 8; ++i) v[6 + i] = bad[i];
  group_sum(v, 32);
  if (lane == 0) {
    DIVE_UNROLL
    for (int i = 0; i < 14; ++i) totals[warp * 16 + i] = v[i];
  }
  __syncthreads();
  if (tid == 0) {
    double s[14] = {};
    for (int w = 0; w < kWarps; ++w) {
      DIVE_UNROLL
      for (int i = 0; i < 14; ++i) s[i] += totals[w * 16 + i];
    }
    float* sc = out.scalars + k * kNumScalars;
    sc[kCount] = static_cast<float>(s[0]);
    sc[kM2U] = static_cast<float>(s[1]);
    sc[kM2V] = static_cast<float>(s[2]);
    sc[kPvl] = static_cast<float>(s[3]);
    sc[kNormU] = static_cast<float>(s[4]);
    sc[kNormV] = static_cast<float>(s[5]);
    DIVE_UNROLL
    for (int i = 0; i < 8; ++i) sc[kNonFinite + i] = static_cast<float>(s[6 + i]);
  }
}

// --- statistics, portable fallback -------------------------------------------------------

constexpr int kRowsWarps = 8;

DIVE_DEV float warp_sum(float v) {
  float x[1] = {v};
  group_sum(x, 32);
  return x[0];
}

// Deterministic block-wide sum (fixed order); every thread gets the result.
DIVE_DEV float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kRowsWarps; ++w) total += scratch[w];
  return total;
}

template <typename T>
DIVE_DEV float ld(const T* p) {
  return static_cast<float>(*p);
}

// The four rows' squared norms (warp-reduced: every lane gets them) and inverse norms.
template <typename ft_t, typename pre_t>
DIVE_DEV void row_norms(const ft_t* a, const pre_t* a0, const ft_t* t, const pre_t* t0, int D,
                        int lane, bool normalize, float (&ss)[4], float (&inv)[4]) {
  ss[0] = ss[1] = ss[2] = ss[3] = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float x0 = ld(a + d), x1 = ld(a0 + d), x2 = ld(t + d), x3 = ld(t0 + d);
    ss[0] += x0 * x0;
    ss[1] += x1 * x1;
    ss[2] += x2 * x2;
    ss[3] += x3 * x3;
  }
  group_sum(ss, 32);
  DIVE_UNROLL
  for (int k = 0; k < 4; ++k) inv[k] = inverse_norm(ss[k], normalize);
}

// One part per block over row blocks blk = part, part + K, ...: one warp per row computes
// the norms and writes u, v to shared memory; threads over columns then take the block's
// column means and M2 about them and merge them into the part's running means (Chan).
template <typename ft_t, typename pre_t>
DIVE_KERNEL(kStatsThreads)
dive_stats_rows_kernel(RowPtrs<ft_t, pre_t> in, int64_t B, int D, int rows_per_block,
                       bool normalize, StatsOutputs out) {
  DIVE_DYNAMIC_SHARED(smem_raw);
  float* ubuf = reinterpret_cast<float*>(smem_raw);  // [rows_per_block, D]
  float* vbuf = ubuf + rows_per_block * D;           // [rows_per_block, D]
  float* mean_u = vbuf + rows_per_block * D;         // [D]
  float* mean_v = mean_u + D;                        // [D]
  DIVE_SHARED(float, scratch, kRowsWarps);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (blockIdx.x == 0 && threadIdx.x == 0) *out.ticket = 0u;
  for (int d = threadIdx.x; d < D; d += kStatsThreads) mean_u[d] = mean_v[d] = 0.f;

  float m2_u = 0.f, m2_v = 0.f, pvl = 0.f, norm_u = 0.f, norm_v = 0.f;
  float bad[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float n_run = 0.f;
  const int64_t num_blocks = (B + rows_per_block - 1) / rows_per_block;
  for (int64_t blk = blockIdx.x; blk < num_blocks; blk += gridDim.x) {
    const int64_t first = blk * rows_per_block;
    const int rows = B - first < rows_per_block ? static_cast<int>(B - first) : rows_per_block;
    __syncthreads();  // the previous block's buffers are consumed
    for (int i = warp; i < rows; i += kRowsWarps) {
      const int64_t r = first + i;
      const ft_t* a = in.a + r * in.sa;
      const pre_t* a0 = in.a0 + r * in.sa0;
      const ft_t* t = in.t + r * in.st;
      const pre_t* t0 = in.t0 + r * in.st0;
      float ss[4], inv[4];
      row_norms(a, a0, t, t0, D, lane, normalize, ss, inv);
      if (lane == 0) {
        DIVE_UNROLL
        for (int q = 0; q < 4; ++q) {
          bad[q] += !(ss[q] <= FLT_MAX);
          bad[4 + q] += ss[q] == 0.f;
        }
      }
      float sums[3] = {0.f, 0.f, 0.f};  // PVL, |u|^2, |v|^2
      for (int d = lane; d < D; d += 32) {
        const float ud = ld(a + d) * inv[0] - ld(a0 + d) * inv[1];
        const float vd = ld(t + d) * inv[2] - ld(t0 + d) * inv[3];
        ubuf[i * D + d] = ud;
        vbuf[i * D + d] = vd;
        sums[0] += (ud - vd) * (ud - vd);
        sums[1] += ud * ud;
        sums[2] += vd * vd;
      }
      group_sum(sums, 32);
      if (lane == 0) {
        pvl += sums[0];
        norm_u += sqrtf(sums[1]);
        norm_v += sqrtf(sums[2]);
      }
    }
    __syncthreads();
    const float total = n_run + rows, w = rows / total, cross = n_run * w, inv_rows = 1.f / rows;
    for (int d = threadIdx.x; d < D; d += kStatsThreads) {
      float su = 0.f, sv = 0.f;
      for (int i = 0; i < rows; ++i) {
        su += ubuf[i * D + d];
        sv += vbuf[i * D + d];
      }
      const float bu = su * inv_rows, bv = sv * inv_rows;
      for (int i = 0; i < rows; ++i) {
        const float du = ubuf[i * D + d] - bu, dv = vbuf[i * D + d] - bv;
        m2_u += du * du;
        m2_v += dv * dv;
      }
      const float eu = bu - mean_u[d], ev = bv - mean_v[d];
      m2_u += cross * eu * eu;
      m2_v += cross * ev * ev;
      mean_u[d] += eu * w;
      mean_v[d] += ev * w;
    }
    n_run = total;
  }
  __syncthreads();
  float* o = out.means + static_cast<int64_t>(blockIdx.x) * 2 * D;
  for (int d = threadIdx.x; d < D; d += kStatsThreads) {
    o[d] = mean_u[d];
    o[D + d] = mean_v[d];
  }
  float* sc = out.scalars + static_cast<int64_t>(blockIdx.x) * kNumScalars;
  const float sums[5] = {block_sum(m2_u, scratch), block_sum(m2_v, scratch),
                         block_sum(pvl, scratch), block_sum(norm_u, scratch),
                         block_sum(norm_v, scratch)};
  float bads[8];
  DIVE_UNROLL
  for (int q = 0; q < 8; ++q) bads[q] = block_sum(bad[q], scratch);
  if (threadIdx.x == 0) {
    sc[kCount] = n_run;
    sc[kM2U] = sums[0];
    sc[kM2V] = sums[1];
    sc[kPvl] = sums[2];
    sc[kNormU] = sums[3];
    sc[kNormV] = sums[4];
    DIVE_UNROLL
    for (int q = 0; q < 8; ++q) sc[kNonFinite + q] = bads[q];
  }
}

// --- finalisation ------------------------------------------------------------------------

template <typename m_t>
struct FinalizeArgs {
  const float* means;    // [K, 2, D]
  const float* scalars;  // [K, kNumScalars]
  int K, D;
  const m_t* m;
  const float* b_global;  // the batch mean over ranks, or null: the parts' own
  double momentum, rate;  // rate = 1 - momentum, formed in float64 on the host
  double lam_avl, lam_pvl;
  m_t* m_new;
  m_t* m_out;  // null, or the caller's buffer (may be m itself)
  float* b_out;
  float* loss;
  float* avl;
  float* pvl;
  float* info;
  double* partials;  // [blocks][4]: dev, off (m updated), off (m kept), non-finite b
  unsigned* ticket;  // zeroed by the statistics kernel
};

template <typename m_t>
DIVE_KERNEL(kFinalizeThreads)
dive_finalize_kernel(FinalizeArgs<m_t> p) {
  constexpr int kWarps = kFinalizeThreads / 32;
  static_assert(kFinalizeColumns == 32, "one lane per column");
  DIVE_SHARED(double, sums, kWarps * 32);
  DIVE_SHARED(double, counts, kWarps);
  DIVE_SHARED(double, b_local, 32);
  DIVE_SHARED(double, scalar_sums, 16);
  DIVE_SHARED(double, totals, 4);
  DIVE_SHARED(int, is_last, 1);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int D = p.D, K = p.K;
  const int col = blockIdx.x * kFinalizeColumns + lane;
  const bool in_range = col < D;
  const int c = in_range ? col : D - 1;  // loads stay in bounds; such lanes count for nothing

  // b: sum_k n_k (mean_u + mean_v) / (2 sum_k n_k), warps over parts, lanes over columns.
  double acc = 0, n = 0;
  DIVE_UNROLL_8
  for (int k = warp; k < K; k += kWarps) {
    const double nk = p.scalars[k * kNumScalars + kCount];
    acc += nk * (double(p.means[(2 * k) * D + c]) + double(p.means[(2 * k + 1) * D + c]));
    n += nk;
  }
  sums[warp * 32 + lane] = acc;
  if (lane == 0) counts[warp] = n;
  __syncthreads();
  if (warp == 0) {
    double s = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      s += sums[w * 32 + lane];
      total += counts[w];
    }
    b_local[lane] = s / (2 * total);
  }
  __syncthreads();
  // dev: sum_k n_k (|mean_u - b|^2 + |mean_v - b|^2), the same parts again.
  const double b = b_local[lane];
  double dev = 0;
  DIVE_UNROLL_8
  for (int k = warp; k < K; k += kWarps) {
    const double nk = p.scalars[k * kNumScalars + kCount];
    const double du = double(p.means[(2 * k) * D + c]) - b;
    const double dv = double(p.means[(2 * k + 1) * D + c]) - b;
    dev += nk * (du * du + dv * dv);
  }
  sums[warp * 32 + lane] = dev;  // warp 0 read pass 1's sums before the last barrier
  __syncthreads();
  if (warp == 0) {
    double d = 0;
    for (int w = 0; w < kWarps; ++w) d += sums[w * 32 + lane];
    // This column's candidate m_new (final unless some column of b is not finite).
    const float bg = p.b_global != nullptr ? p.b_global[c] : static_cast<float>(b);
    const float old = static_cast<float>(p.m[c]);
    const m_t updated = static_cast<m_t>(static_cast<float>(p.momentum * old + p.rate * bg));
    const double e_upd = b - double(static_cast<float>(updated)), e_kept = b - double(old);
    double part[4] = {in_range ? d : 0.0, in_range ? e_upd * e_upd : 0.0,
                      in_range ? e_kept * e_kept : 0.0,
                      in_range && !(fabsf(bg) <= FLT_MAX) ? 1.0 : 0.0};
    if (in_range) {
      p.m_new[col] = updated;
      p.b_out[col] = bg;
    }
    group_sum(part, 32);
    if (lane == 0) {
      DIVE_UNROLL
      for (int i = 0; i < 4; ++i) p.partials[blockIdx.x * 4 + i] = part[i];
    }
    fence_gpu();  // this thread's writes, before the ticket
  }
  __syncthreads();
  if (tid == 0) is_last[0] = ticket_arrive(p.ticket) == gridDim.x - 1;
  __syncthreads();
  if (!is_last[0]) return;

  // The last block: every other block's writes are visible (their fences, the ticket's
  // acquire-release); sums in a fixed order, whatever the order of arrival.
  fence_gpu();
  for (int j = warp; j < kNumScalars; j += kWarps) {  // the scalar columns over the parts
    double s[1] = {0};
    DIVE_UNROLL_4
    for (int k = lane; k < K; k += 32) s[0] += p.scalars[k * kNumScalars + j];
    group_sum(s, 32);
    if (lane == 0) scalar_sums[j] = s[0];
  }
  if (warp == kWarps - 1) {  // the blocks' partials, in block order per lane
    double t[4] = {0, 0, 0, 0};
    DIVE_UNROLL_4
    for (int blk = lane; blk < static_cast<int>(gridDim.x); blk += 32) {
      DIVE_UNROLL
      for (int i = 0; i < 4; ++i) t[i] += load_cg(p.partials + blk * 4 + i);
    }
    group_sum(t, 32);
    if (lane == 0) {
      DIVE_UNROLL
      for (int i = 0; i < 4; ++i) totals[i] = t[i];
    }
  }
  __syncthreads();
  const bool finite = totals[3] == 0.0;
  for (int d = tid; d < D; d += kFinalizeThreads) {
    const m_t value = finite ? load_cg(p.m_new + d) : p.m[d];
    if (!finite) p.m_new[d] = value;
    if (p.m_out != nullptr) p.m_out[d] = value;  // after every block's read of m
  }
  if (tid == 0) {
    const double total = scalar_sums[kCount];
    const double off = finite ? totals[1] : totals[2];
    const double m2 = scalar_sums[kM2U] + scalar_sums[kM2V];
    const double avl = (m2 + totals[0] + 2 * total * off) / total;
    const double pvl = scalar_sums[kPvl] / total;
    *p.loss = static_cast<float>(p.lam_avl * avl + p.lam_pvl * pvl);
    *p.avl = static_cast<float>(avl);
    *p.pvl = static_cast<float>(pvl);
    p.info[0] = static_cast<float>(scalar_sums[kNormU] / total);
    p.info[1] = static_cast<float>(scalar_sums[kNormV] / total);
    DIVE_UNROLL
    for (int j = 0; j < 8; ++j) p.info[2 + j] = static_cast<float>(scalar_sums[kNonFinite + j]);
    *p.ticket = 0u;  // ready for a replay of the same buffers (a CUDA graph)
  }
}

// --- backward ----------------------------------------------------------------------------

// The backward's loss coefficients: c_avl = k_loss_avl * loss + k_avl * avl, c_pvl likewise,
// from the upstream gradients on the device; a missing one points at a present one with
// weight 0.
struct GradTerms {
  const float *loss, *avl, *pvl;
  float k_loss_avl, k_loss_pvl, k_avl, k_pvl;
};

template <typename ft_t, typename pre_t>
DIVE_KERNEL(kBackwardMaxThreads)
dive_backward_kernel(RowPtrs<ft_t, pre_t> in, int64_t B, int D, int threads_per_row,
                     const float* m, GradTerms g, bool normalize, ft_t* GA, ft_t* GT) {
  constexpr int E = chunk_elems<ft_t, pre_t>(), C = kBackwardChunks;
  constexpr int kWarps = kBackwardMaxThreads / 32;
  DIVE_SHARED(float, exchange_norms, kWarps * 4);
  DIVE_SHARED(float, exchange_dots, kWarps * 2);
  const int tid = threadIdx.x, tr = threads_per_row, tr_log2 = log2_pow2(tr);
  const int rows = blockDim.x >> tr_log2, l = tid & (tr - 1);
  const int64_t r = int64_t(blockIdx.x) * rows + (tid >> tr_log2);
  const bool valid = r < B;
  const int nchunks = D / E;
  float xa[C][E], xa0[C][E], xt[C][E], xt0[C][E], mc[C][E];
  float ss[4] = {0.f, 0.f, 0.f, 0.f};
  DIVE_UNROLL
  for (int c = 0; c < C; ++c) {
    const int q = c * tr + l;
    const int64_t col = int64_t(q) * E;
    if (valid && q < nchunks) {
      load_chunk<ft_t, E>(in.a + r * in.sa + col, xa[c]);
      load_chunk<pre_t, E>(in.a0 + r * in.sa0 + col, xa0[c]);
      load_chunk<ft_t, E>(in.t + r * in.st + col, xt[c]);
      load_chunk<pre_t, E>(in.t0 + r * in.st0 + col, xt0[c]);
      DIVE_UNROLL
      for (int h = 0; h < E; h += 4) {
        float four[4];
        load_chunk<float, 4>(m + col + h, four);
        DIVE_UNROLL
        for (int e = 0; e < 4; ++e) mc[c][h + e] = four[e];
      }
    } else {
      DIVE_UNROLL
      for (int e = 0; e < E; ++e) xa[c][e] = xa0[c][e] = xt[c][e] = xt0[c][e] = mc[c][e] = 0.f;
    }
    DIVE_UNROLL
    for (int e = 0; e < E; ++e) {
      ss[0] += xa[c][e] * xa[c][e];
      ss[1] += xa0[c][e] * xa0[c][e];
      ss[2] += xt[c][e] * xt[c][e];
      ss[3] += xt0[c][e] * xt0[c][e];
    }
  }
  row_sum(ss, tr, exchange_norms);
  float inv[4];
  DIVE_UNROLL
  for (int i = 0; i < 4; ++i) inv[i] = inverse_norm(ss[i], normalize);
  const float g_loss = *g.loss;
  const float c_avl = g.k_loss_avl * g_loss + g.k_avl * *g.avl;
  const float c_pvl = g.k_loss_pvl * g_loss + g.k_pvl * *g.pvl;
  // dL/du, dL/dv per column; through e_hat = e/|e|: dL/de = (g - e_hat (e_hat . g)) / |e|.
  float dots[2] = {0.f, 0.f};
  if (normalize) {
    DIVE_UNROLL
    for (int c = 0; c < C; ++c) {
      DIVE_UNROLL
      for (int e = 0; e < E; ++e) {
        const float ah = xa[c][e] * inv[0], th = xt[c][e] * inv[2];
        const float u = ah - xa0[c][e] * inv[1], v = th - xt0[c][e] * inv[3];
        dots[0] += ah * (c_avl * (u - mc[c][e]) + c_pvl * (u - v));
        dots[1] += th * (c_avl * (v - mc[c][e]) - c_pvl * (u - v));
      }
    }
    row_sum(dots, tr, exchange_dots);
    dots[0] *= inv[0];
    dots[1] *= inv[2];
  }
  DIVE_UNROLL
  for (int c = 0; c < C; ++c) {
    const int q = c * tr + l;
    if (valid && q < nchunks) {
      float ga[E], gt[E];
      DIVE_UNROLL
      for (int e = 0; e < E; ++e) {
        const float u = xa[c][e] * inv[0] - xa0[c][e] * inv[1];
        const float v = xt[c][e] * inv[2] - xt0[c][e] * inv[3];
        const float gu = c_avl * (u - mc[c][e]) + c_pvl * (u - v);
        const float gv = c_avl * (v - mc[c][e]) - c_pvl * (u - v);
        ga[e] = (gu - xa[c][e] * dots[0]) * inv[0];
        gt[e] = (gv - xt[c][e] * dots[1]) * inv[2];
      }
      store_chunk<ft_t, E>(GA + r * D + int64_t(q) * E, ga);
      store_chunk<ft_t, E>(GT + r * D + int64_t(q) * E, gt);
    }
  }
}

// The portable backward: one warp per row, strided loads (the row re-read from L1/L2).
template <typename ft_t, typename pre_t>
DIVE_KERNEL(kStatsThreads)
dive_backward_rows_kernel(RowPtrs<ft_t, pre_t> in, int64_t B, int D, const float* m,
                          GradTerms g, bool normalize, ft_t* GA, ft_t* GT) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsWarps + (threadIdx.x >> 5);
  if (r >= B) return;  // whole warps: their shuffles are all inside the warp
  const float g_loss = *g.loss;
  const float c_avl = g.k_loss_avl * g_loss + g.k_avl * *g.avl;
  const float c_pvl = g.k_loss_pvl * g_loss + g.k_pvl * *g.pvl;
  const ft_t* a = in.a + r * in.sa;
  const pre_t* a0 = in.a0 + r * in.sa0;
  const ft_t* t = in.t + r * in.st;
  const pre_t* t0 = in.t0 + r * in.st0;
  float ss[4], inv[4];
  row_norms(a, a0, t, t0, D, lane, normalize, ss, inv);
  float dots[2] = {0.f, 0.f};
  if (normalize) {
    for (int d = lane; d < D; d += 32) {
      const float ah = ld(a + d) * inv[0], th = ld(t + d) * inv[2];
      const float ud = ah - ld(a0 + d) * inv[1], vd = th - ld(t0 + d) * inv[3];
      dots[0] += ah * (c_avl * (ud - m[d]) + c_pvl * (ud - vd));
      dots[1] += th * (c_avl * (vd - m[d]) - c_pvl * (ud - vd));
    }
    group_sum(dots, 32);
    dots[0] *= inv[0];
    dots[1] *= inv[2];
  }
  ft_t* ga = GA + r * D;
  ft_t* gt = GT + r * D;
  for (int d = lane; d < D; d += 32) {
    const float x = ld(a + d), y = ld(t + d);
    const float ud = x * inv[0] - ld(a0 + d) * inv[1], vd = y * inv[2] - ld(t0 + d) * inv[3];
    const float gu = c_avl * (ud - m[d]) + c_pvl * (ud - vd);
    const float gv = c_avl * (vd - m[d]) - c_pvl * (ud - vd);
    ga[d] = static_cast<ft_t>((gu - x * dots[0]) * inv[0]);
    gt[d] = static_cast<ft_t>((gv - y * dots[1]) * inv[2]);
  }
}

}  // namespace kernels
}  // namespace dive_fast
