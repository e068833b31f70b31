// DiVE regulariser on CUDA GPUs; same statistics layout and algorithm as dive_cpu.cpp.
//
// dive_stats: a persistent grid; each CTA walks blocks of `rows` rows. One warp per row
// computes the four norms and writes u, v into shared memory (the only global read of
// the inputs); then threads over columns take the block mean and M2 about it and merge
// them into the CTA's running mean (Chan's update), kept in shared memory. One part per
// CTA.
// dive_finalize: one CTA, threads over columns, the same mathematics as finalize_host in
// dive_cpu.cpp (and the Triton finalisation): the parts' means merged per column into b,
// the EMA update, both losses and the info counts. dive_forward = the two launches.
// dive_backward: one warp per row, one pass over global memory (the row is re-read from
// L1/L2 for the final write); the loss coefficients are formed from the upstream
// gradients on the device (no host sync, no extra launch).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cfloat>

#include "dive_common.h"

namespace dive_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBufferElements = 4096;  // rows * D per shared buffer (u and v each)
constexpr int kMaxDim = 8192;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Deterministic CTA-wide sum (fixed order); every thread gets the result.
__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// The backward's loss coefficients: c_avl = k_loss_avl * loss + k_avl * avl, c_pvl likewise,
// from the upstream gradients on the device; a missing one points at a present one with
// weight 0.
struct GradTerms {
  const float *loss, *avl, *pvl;
  float k_loss_avl, k_loss_pvl, k_avl, k_pvl;
};

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
  return static_cast<float>(*p);
}

// The four rows' squared norms (warp-reduced: every lane gets them) and inverse norms.
template <typename ft_t, typename pre_t>
__device__ __forceinline__ void row_norms(const ft_t* a, const pre_t* a0, const ft_t* t,
                                          const pre_t* t0, int D, int lane, bool normalize,
                                          float (&ss)[4], float (&inv)[4]) {
  ss[0] = ss[1] = ss[2] = ss[3] = 0.f;
  for (int d = lane; d < D; d += 32) {
    const float x0 = ld(a + d), x1 = ld(a0 + d), x2 = ld(t + d), x3 = ld(t0 + d);
    ss[0] += x0 * x0; ss[1] += x1 * x1; ss[2] += x2 * x2; ss[3] += x3 * x3;
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    ss[k] = warp_sum(ss[k]);
    // An overflowing squared norm gives NaN, not rsqrtf's 0: the row acts as a NaN row.
    inv[k] = !(ss[k] <= FLT_MAX) ? __int_as_float(0x7fffffff) : normalize ? rsqrtf(ss[k]) : 1.f;
  }
}

template <typename ft_t, typename pre_t>
__global__ void __launch_bounds__(kThreads) dive_stats_kernel(
    const ft_t* __restrict__ A, const pre_t* __restrict__ A0, const ft_t* __restrict__ T,
    const pre_t* __restrict__ T0, int64_t sA, int64_t sA0, int64_t sT, int64_t sT0, int64_t B,
    int D, int rows_per_block, bool normalize, float* __restrict__ means,
    float* __restrict__ scalars) {
  extern __shared__ float smem[];
  float* ubuf = smem;                                // [rows_per_block, D]
  float* vbuf = ubuf + rows_per_block * D;           // [rows_per_block, D]
  float* mean_u = vbuf + rows_per_block * D;         // [D]
  float* mean_v = mean_u + D;                        // [D]
  __shared__ float scratch[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int d = threadIdx.x; d < D; d += kThreads) mean_u[d] = mean_v[d] = 0.f;

  // Per-thread partial sums, reduced across the CTA at the end.
  float m2_u = 0.f, m2_v = 0.f, pvl = 0.f, norm_u = 0.f, norm_v = 0.f;
  float bad[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  float n_run = 0.f;
  const int64_t num_blocks = (B + rows_per_block - 1) / rows_per_block;
  for (int64_t blk = blockIdx.x; blk < num_blocks; blk += gridDim.x) {
    const int64_t first = blk * rows_per_block;
    const int rows = B - first < rows_per_block ? static_cast<int>(B - first) : rows_per_block;
    __syncthreads();  // the previous block's buffers are consumed
    for (int i = warp; i < rows; i += kWarps) {
      const int64_t r = first + i;
      const ft_t* a = A + r * sA;
      const pre_t* a0 = A0 + r * sA0;
      const ft_t* t = T + r * sT;
      const pre_t* t0 = T0 + r * sT0;
      float ss[4], inv[4];
      row_norms(a, a0, t, t0, D, lane, normalize, ss, inv);
      if (lane == 0) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          bad[k] += !(ss[k] <= FLT_MAX);
          bad[4 + k] += ss[k] == 0.f;
        }
      }
      const float ia = inv[0], ia0 = inv[1], it = inv[2], it0 = inv[3];
      float pv = 0.f, nu = 0.f, nv = 0.f;
      for (int d = lane; d < D; d += 32) {
        const float ud = ld(a + d) * ia - ld(a0 + d) * ia0;
        const float vd = ld(t + d) * it - ld(t0 + d) * it0;
        ubuf[i * D + d] = ud;
        vbuf[i * D + d] = vd;
        pv += (ud - vd) * (ud - vd);
        nu += ud * ud;
        nv += vd * vd;
      }
      pv = warp_sum(pv);
      nu = warp_sum(nu);
      nv = warp_sum(nv);
      if (lane == 0) {
        pvl += pv;
        norm_u += sqrtf(nu);
        norm_v += sqrtf(nv);
      }
    }
    __syncthreads();
    const float total = n_run + rows, w = rows / total, cross = n_run * w, inv_rows = 1.f / rows;
    for (int d = threadIdx.x; d < D; d += kThreads) {
      float su = 0.f, sv = 0.f;
      for (int i = 0; i < rows; ++i) { su += ubuf[i * D + d]; sv += vbuf[i * D + d]; }
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
  float* out = means + static_cast<int64_t>(blockIdx.x) * 2 * D;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    out[d] = mean_u[d];
    out[D + d] = mean_v[d];
  }
  float* sc = scalars + static_cast<int64_t>(blockIdx.x) * kNumScalars;
  const float sums[5] = {block_sum(m2_u, scratch), block_sum(m2_v, scratch),
                         block_sum(pvl, scratch), block_sum(norm_u, scratch),
                         block_sum(norm_v, scratch)};
  float bads[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) bads[k] = block_sum(bad[k], scratch);
  if (threadIdx.x == 0) {
    sc[kCount] = n_run;
    sc[kM2U] = sums[0];
    sc[kM2V] = sums[1];
    sc[kPvl] = sums[2];
    sc[kNormU] = sums[3];
    sc[kNormV] = sums[4];
#pragma unroll
    for (int k = 0; k < 8; ++k) sc[kNonFinite + k] = bads[k];
  }
}

// One CTA. Pass 1: per column (one thread per column, strided), the parts' u and v means
// merged one by one with Chan's update into b_local and the deviation sum dev; pass 2
// (each thread its own columns again): m_new, written to m_new and m_out (which may be m:
// m[d] is read only by the thread that writes it), and sum_d |b_local - m_new|^2.
template <typename m_t>
__global__ void __launch_bounds__(kThreads) dive_finalize_kernel(
    const float* __restrict__ means, const float* __restrict__ scalars, int K, int D,
    const m_t* m, const float* __restrict__ b_global, float momentum, float rate, float lam_avl,
    float lam_pvl, m_t* __restrict__ m_new, m_t* m_out, float* __restrict__ b_out,
    float* __restrict__ loss, float* __restrict__ avl_out, float* __restrict__ pvl_out,
    float* __restrict__ info) {
  __shared__ float scratch[kWarps];
  __shared__ float sums[kNumScalars];
  // The scalar columns summed over the parts: one warp per column, lanes over parts.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int j = warp; j < kNumScalars; j += kWarps) {
    float s = 0.f;
    for (int k = lane; k < K; k += 32) s += scalars[k * kNumScalars + j];
    s = warp_sum(s);
    if (lane == 0) sums[j] = s;
  }
  __syncthreads();
  const float total = sums[kCount];
  float dev = 0.f, bad = 0.f;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    const float mean = merge_parts<float>(means, scalars, K, D, d, dev);
    b_out[d] = mean;
    bad += !(fabsf(b_global != nullptr ? b_global[d] : mean) <= FLT_MAX);
  }
  dev = block_sum(dev, scratch);
  const bool finite = block_sum(bad, scratch) == 0.f;
  float off = 0.f;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    const float b_local = b_out[d], b = b_global != nullptr ? b_global[d] : b_local;
    const float old = static_cast<float>(m[d]);
    const m_t updated = static_cast<m_t>(finite ? momentum * old + rate * b : old);
    m_new[d] = updated;
    if (m_out != nullptr) m_out[d] = updated;
    const float e = b_local - static_cast<float>(updated);
    off += e * e;
  }
  off = block_sum(off, scratch);
  if (threadIdx.x == 0) {
    const float avl = (sums[kM2U] + sums[kM2V] + dev + 2.f * total * off) / total;
    const float pvl = sums[kPvl] / total;
    *loss = lam_avl * avl + lam_pvl * pvl;
    *avl_out = avl;
    *pvl_out = pvl;
    info[0] = sums[kNormU] / total;
    info[1] = sums[kNormV] / total;
#pragma unroll
    for (int j = 0; j < 8; ++j) info[2 + j] = sums[kNonFinite + j];
  }
}

template <typename ft_t, typename pre_t>
__global__ void __launch_bounds__(kThreads) dive_backward_kernel(
    const ft_t* __restrict__ A, const pre_t* __restrict__ A0, const ft_t* __restrict__ T,
    const pre_t* __restrict__ T0, int64_t sA, int64_t sA0, int64_t sT, int64_t sT0, int64_t B,
    int D, const float* __restrict__ m, GradTerms g, bool normalize, ft_t* __restrict__ GA,
    ft_t* __restrict__ GT) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (r >= B) return;
  const float g_loss = *g.loss;
  const float c_avl = g.k_loss_avl * g_loss + g.k_avl * *g.avl;
  const float c_pvl = g.k_loss_pvl * g_loss + g.k_pvl * *g.pvl;
  const ft_t* a = A + r * sA;
  const pre_t* a0 = A0 + r * sA0;
  const ft_t* t = T + r * sT;
  const pre_t* t0 = T0 + r * sT0;
  float ss[4], inv[4];
  row_norms(a, a0, t, t0, D, lane, normalize, ss, inv);
  const float ia = inv[0], ia0 = inv[1], it = inv[2], it0 = inv[3];
  float dot_a = 0.f, dot_t = 0.f;
  if (normalize) {
    for (int d = lane; d < D; d += 32) {
      const float ah = ld(a + d) * ia, th = ld(t + d) * it;
      const float ud = ah - ld(a0 + d) * ia0, vd = th - ld(t0 + d) * it0;
      dot_a += ah * (c_avl * (ud - m[d]) + c_pvl * (ud - vd));
      dot_t += th * (c_avl * (vd - m[d]) - c_pvl * (ud - vd));
    }
    dot_a = warp_sum(dot_a) * ia;
    dot_t = warp_sum(dot_t) * it;
  }
  ft_t* ga = GA + r * D;
  ft_t* gt = GT + r * D;
  for (int d = lane; d < D; d += 32) {
    const float x = ld(a + d), y = ld(t + d);
    const float ud = x * ia - ld(a0 + d) * ia0, vd = y * it - ld(t0 + d) * it0;
    const float gu = c_avl * (ud - m[d]) + c_pvl * (ud - vd);
    const float gv = c_avl * (vd - m[d]) - c_pvl * (ud - vd);
    ga[d] = static_cast<ft_t>((gu - x * dot_a) * ia);
    gt[d] = static_cast<ft_t>((gv - y * dot_t) * it);
  }
}

// The statistics kernel's launch shape: rows per block and dynamic shared memory (u and v
// buffers of rows x D, the running means of D), as a function of D alone.
int stats_rows_per_block(int64_t D) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(16, kBufferElements / D)));
}

int64_t stats_shared_bytes(int64_t D) {
  return static_cast<int64_t>(sizeof(float)) * (2 * stats_rows_per_block(D) * D + 2 * D);
}

void check_cuda_inputs(const at::Tensor& a, const at::Tensor& a0, const at::Tensor& t,
                       const at::Tensor& t0) {
  TORCH_CHECK(a.is_cuda(), "the cuda backend takes CUDA tensors");
  TORCH_CHECK(a.size(1) <= kMaxDim, "the cuda backend supports dim <= ", kMaxDim, ", got ",
              a.size(1));
}

std::tuple<at::Tensor, at::Tensor> dive_stats_cuda(const at::Tensor& img_ft,
                                                   const at::Tensor& img_pre,
                                                   const at::Tensor& txt_ft,
                                                   const at::Tensor& txt_pre, bool normalize) {
  check_cuda_inputs(img_ft, img_pre, txt_ft, txt_pre);
  const c10::cuda::CUDAGuard guard(img_ft.device());
  const auto [A, A0, T, T0, B, D64] = prepare_inputs(img_ft, img_pre, txt_ft, txt_pre);
  const int D = static_cast<int>(D64);
  const int rows = stats_rows_per_block(D);
  const int64_t num_blocks = (B + rows - 1) / rows;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, img_ft.get_device()));
  const int grid = static_cast<int>(std::min<int64_t>(num_blocks, 2 * sms));
  const size_t smem = static_cast<size_t>(stats_shared_bytes(D));
  auto means = at::empty({grid, 2, D}, A.options().dtype(at::kFloat));
  auto scalars = at::empty({grid, kNumScalars}, A.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtypes<false>(A.scalar_type(), A0.scalar_type(), [&](auto ft_tag, auto pre_tag, auto) {
    using ft_t = typename decltype(ft_tag)::type;
    using pre_t = typename decltype(pre_tag)::type;
    auto kernel = dive_stats_kernel<ft_t, pre_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    kernel<<<grid, kThreads, smem, stream>>>(
        A.data_ptr<ft_t>(), A0.data_ptr<pre_t>(), T.data_ptr<ft_t>(), T0.data_ptr<pre_t>(),
        A.stride(0), A0.stride(0), T.stride(0), T0.stride(0), B, D, rows, normalize,
        means.data_ptr<float>(), scalars.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {means, scalars};
}

ForwardOutputs dive_finalize_cuda(const at::Tensor& means, const at::Tensor& scalars,
                                  const at::Tensor& m, const std::optional<at::Tensor>& m_out,
                                  const std::optional<at::Tensor>& b, double momentum,
                                  double lam_avl, double lam_pvl) {
  check_finalize_inputs(means, scalars, m, m_out, b);
  TORCH_CHECK(means.scalar_type() == at::kFloat, "the cuda finalisation takes float32 partials");
  TORCH_CHECK(!m_out || m_out->scalar_type() == m.scalar_type(), "m_out must have m's dtype");
  const c10::cuda::CUDAGuard guard(means.device());
  const at::Tensor m_c = m.contiguous();
  auto out = empty_forward_outputs(means, m_c);
  auto& [loss, avl, pvl, m_new, b_out, info] = out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_low_precision(m.scalar_type(), "m", [&](auto m_tag) {
    using m_t = typename decltype(m_tag)::type;
    dive_finalize_kernel<m_t><<<1, kThreads, 0, stream>>>(
        means.data_ptr<float>(), scalars.data_ptr<float>(), static_cast<int>(means.size(0)),
        static_cast<int>(means.size(2)), m_c.data_ptr<m_t>(),
        b ? b->data_ptr<float>() : nullptr, static_cast<float>(momentum),
        static_cast<float>(1.0 - momentum), static_cast<float>(lam_avl),
        static_cast<float>(lam_pvl), m_new.data_ptr<m_t>(),
        m_out ? m_out->data_ptr<m_t>() : nullptr, b_out.data_ptr<float>(),
        loss.data_ptr<float>(), avl.data_ptr<float>(), pvl.data_ptr<float>(),
        info.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> dive_backward_cuda(
    const at::Tensor& img_ft, const at::Tensor& img_pre, const at::Tensor& txt_ft,
    const at::Tensor& txt_pre, const at::Tensor& m, const std::optional<at::Tensor>& g_loss,
    const std::optional<at::Tensor>& g_avl, const std::optional<at::Tensor>& g_pvl,
    double lam_avl, double lam_pvl, double scale, bool normalize) {
  check_cuda_inputs(img_ft, img_pre, txt_ft, txt_pre);
  const c10::cuda::CUDAGuard guard(img_ft.device());
  const auto [A, A0, T, T0, B, D64] = prepare_inputs(img_ft, img_pre, txt_ft, txt_pre);
  const int D = static_cast<int>(D64);
  TORCH_CHECK(m.numel() == D, "m must have ", D, " elements, got ", m.numel());
  const auto m32 = m.to(at::kFloat).contiguous();  // no copy for a float32 buffer
  const at::Tensor* present = g_loss ? &*g_loss : g_avl ? &*g_avl : &*g_pvl;
  TORCH_CHECK(present->scalar_type() == at::kFloat, "upstream gradients must be float32");
  const auto term = [&](const std::optional<at::Tensor>& g, double weight) {
    return std::make_pair((g ? *g : *present).data_ptr<float>(),
                          g ? static_cast<float>(weight * scale) : 0.f);
  };
  const auto [g_l, k_la] = term(g_loss, lam_avl);
  const auto [g_a, k_a] = term(g_avl, 1.0);
  const auto [g_p, k_p] = term(g_pvl, 1.0);
  const GradTerms g{g_l, g_a, g_p, k_la, term(g_loss, lam_pvl).second, k_a, k_p};
  auto GA = at::empty({B, D}, A.options());
  auto GT = at::empty({B, D}, T.options());
  const int64_t grid = (B + kWarps - 1) / kWarps;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtypes<false>(A.scalar_type(), A0.scalar_type(), [&](auto ft_tag, auto pre_tag, auto) {
    using ft_t = typename decltype(ft_tag)::type;
    using pre_t = typename decltype(pre_tag)::type;
    dive_backward_kernel<ft_t, pre_t><<<grid, kThreads, 0, stream>>>(
        A.data_ptr<ft_t>(), A0.data_ptr<pre_t>(), T.data_ptr<ft_t>(), T0.data_ptr<pre_t>(),
        A.stride(0), A0.stride(0), T.stride(0), T0.stride(0), B, D, m32.data_ptr<float>(), g,
        normalize, GA.data_ptr<ft_t>(), GT.data_ptr<ft_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {GA, GT};
}

}  // namespace

// Host-side launch facts for the ahead-of-time resource check (dive_fast.ops.aot).
TORCH_LIBRARY_FRAGMENT(dive_fast_C, lib) {
  lib.def("cuda_stats_shared_bytes(int dim) -> int", &stats_shared_bytes);
  lib.def("cuda_max_dim() -> int", [] { return int64_t(kMaxDim); });
}

TORCH_LIBRARY_IMPL(dive_fast_C, CUDA, lib) {
  lib.impl("dive_stats", &dive_stats_cuda);
  lib.impl("dive_finalize", &dive_finalize_cuda);
  lib.impl("dive_forward", &fused_forward<dive_stats_cuda, dive_finalize_cuda>);
  lib.impl("dive_backward", &dive_backward_cuda);
}

}  // namespace dive_fast
