// DiVE regulariser on CUDA GPUs: the launchers of the kernels in dive_cuda_kernels.cuh
// (what each does, and why, is written there) and their registration as the CUDA
// implementations of the dive_fast_C ops. Launch shapes come from dive_cuda_plan.h; the
// device's shared-memory limit and each kernel's attribute are set up once per process.
// tests/ops/cuda_emulation/dive_emulated.cpp compiles this file with DIVE_EMULATE: the same
// launchers, on CPU tensors, with the kernels run by the CPU model of cuda_emulation.h.
#ifndef DIVE_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>
#endif

#include <array>
#include <atomic>
#include <vector>

#include "dive_common.h"
#include "dive_cuda_kernels.cuh"
#include "dive_cuda_plan.h"

namespace dive_fast {

#ifdef DIVE_EMULATE
namespace emulated {
// The emulated device: an H100/H200's shared memory, and the order blocks run in (empty:
// 0, 1, ...), which a test sets to permute the finalisation's arrivals.
inline int64_t& emulated_shared_limit() {
  static int64_t bytes = 232448;
  return bytes;
}
inline std::vector<unsigned>& block_order() {
  static std::vector<unsigned> order;
  return order;
}
using Stream = int;
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline Stream current_stream() { return 0; }
inline int64_t shared_limit(int) { return emulated_shared_limit(); }
// As cudaFuncSetAttribute refuses more than the device's opt-in shared memory.
template <auto kernel>
void allow_shared(int, int64_t bytes) {
  TORCH_CHECK(bytes + kStaticSharedReserve <= emulated_shared_limit(), "a launch plan asks for ",
              bytes, " bytes of shared memory per block, beyond the device's ",
              emulated_shared_limit());
}
// An H100/H200's 132 SMs, two statistics blocks on each: the 264 parts of before.
inline int sm_count(int) { return 132; }
template <auto kernel>
int blocks_per_sm(int, int, int64_t) { return 2; }
void check_cuda_inputs(const at::Tensor& a) {
  TORCH_CHECK(a.dim() == 2 && a.size(1) <= kMaxDim, "dim <= ", kMaxDim, ", got ", a.sizes());
}
#define DIVE_LAUNCH(kernel, grid, threads, smem, stream, ...)                  \
  ::emu::launch(static_cast<unsigned>(grid), static_cast<unsigned>(threads), smem, \
                block_order().size() == static_cast<size_t>(grid) ? block_order()  \
                                                                   : std::vector<unsigned>{}, \
                [&] { kernel(__VA_ARGS__); })
#define DIVE_LAUNCH_CHECK()
#else
namespace {
using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
#define DIVE_LAUNCH(kernel, grid, threads, smem, stream, ...) \
  kernel<<<grid, threads, smem, stream>>>(__VA_ARGS__)
#define DIVE_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

constexpr int kMaxDevices = 64;

// The device's opt-in shared memory per block, queried once per device.
int64_t shared_limit(int device) {
  static std::array<std::atomic<int64_t>, kMaxDevices> limits{};
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "device index ", device, " out of range");
  int64_t value = limits[device].load(std::memory_order_relaxed);
  if (value == 0) {
    int bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    value = bytes;
    limits[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Lets `kernel` take `bytes` of dynamic shared memory (beyond the default 48 KiB): the
// attribute is per kernel instance and device, set when a launch first needs more than
// it allows (the fast statistics kernel's need is fixed per device, the portable one's
// grows with D). The attribute plus the kernel's static shared memory must stay within
// the device's opt-in limit: the plans keep kStaticSharedReserve for it.
template <auto kernel>
void allow_shared(int device, int64_t bytes) {
  static std::array<std::atomic<int64_t>, kMaxDevices> allowed{};
  if (bytes <= 48 * 1024 || bytes <= allowed[device].load(std::memory_order_relaxed)) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  allowed[device].store(bytes, std::memory_order_relaxed);
}

// The device's SMs, queried once per device.
int sm_count(int device) {
  static std::array<std::atomic<int>, kMaxDevices> counts{};
  int value = counts[device].load(std::memory_order_relaxed);
  if (value == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

// Blocks of `kernel` resident on one SM at once (registers, threads, shared memory), per
// kernel instance, device and dynamic shared memory (the plan's, fixed per device and D).
template <auto kernel>
int blocks_per_sm(int device, int threads, int64_t shared_bytes) {
  static std::array<std::atomic<int64_t>, kMaxDevices> cached{};  // shared bytes << 8 | blocks
  const int64_t hit = cached[device].load(std::memory_order_relaxed);
  if (hit != 0 && (hit >> 8) == shared_bytes) return static_cast<int>(hit & 0xff);
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads,
                                                               static_cast<size_t>(shared_bytes)));
  blocks = std::clamp(blocks, 1, 32);
  cached[device].store((shared_bytes << 8) | blocks, std::memory_order_relaxed);
  return blocks;
}

void check_cuda_inputs(const at::Tensor& a) {
  TORCH_CHECK(a.is_cuda(), "the cuda backend takes CUDA tensors");
  TORCH_CHECK(a.dim() == 2 && a.size(1) <= kMaxDim, "the cuda backend supports dim <= ", kMaxDim,
              ", got ", a.sizes());
}
#endif

using namespace kernels;

// Every tensor an op reads or writes on the inputs' device: `name` says which is not.
void check_device(const at::Tensor& x, const char* name, const at::Device& device) {
  TORCH_CHECK(x.device() == device, name, " must be on the inputs' device ", device, ", got ",
              x.device());
}
void check_device(const std::optional<at::Tensor>& x, const char* name,
                  const at::Device& device) {
  if (x && x->defined()) check_device(*x, name, device);
}

// Whether every row of x starts on a chunk boundary (16 bytes of the wider dtype).
bool rows_aligned(const at::Tensor& x, int chunk) {
  const int64_t bytes = int64_t(chunk) * x.element_size();
  return reinterpret_cast<uintptr_t>(x.data_ptr()) % bytes == 0 &&
         (x.size(0) == 1 || (x.stride(0) * x.element_size()) % bytes == 0);
}

bool all_aligned(const RowInputs& x, int chunk) {
  return rows_aligned(x.a, chunk) && rows_aligned(x.a0, chunk) && rows_aligned(x.t, chunk) &&
         rows_aligned(x.t0, chunk);
}

template <typename ft_t, typename pre_t>
RowPtrs<ft_t, pre_t> row_pointers(const RowInputs& x) {
  return {x.a.data_ptr<ft_t>(), x.a0.data_ptr<pre_t>(), x.t.data_ptr<ft_t>(),
          x.t0.data_ptr<pre_t>(), x.a.stride(0), x.a0.stride(0), x.t.stride(0), x.t0.stride(0)};
}

// A statistics kernel instance and whether it is the fast one (its arguments differ).
template <auto k, bool kFast>
struct StatsKernel {
  static constexpr auto value = k;
  static constexpr bool fast = kFast;
};

// The statistics kernel for the inputs: `f(StatsKernel tag, plan, row pointers)` with the
// instance the plan selects. Refuses a plan beyond the device's shared memory.
template <typename F>
void with_stats_kernel(const RowInputs& x, F&& f) {
  const int device = x.a.get_device();
  dispatch_dtypes<false>(x.a.scalar_type(), x.a0.scalar_type(), [&](auto ft_tag, auto pre_tag, auto) {
    using ft_t = typename decltype(ft_tag)::type;
    using pre_t = typename decltype(pre_tag)::type;
    constexpr int E = chunk_elems<ft_t, pre_t>();
    const int64_t limit = shared_limit(device);
    const StatsPlan plan = stats_plan(x.D, sizeof(ft_t), sizeof(pre_t), all_aligned(x, E), limit);
    TORCH_CHECK(plan.fits, "the cuda backend's statistics at dim ", x.D, " need ",
                rows_kernel_shared(x.D, 1) + kStaticSharedReserve,
                " bytes of shared memory per block; this GPU allows ", limit,
                ": use backend='torch' (or 'triton' for dim <= 4096)");
    const auto in = row_pointers<ft_t, pre_t>(x);
    if (!plan.fast) {
      f(StatsKernel<dive_stats_rows_kernel<ft_t, pre_t>, false>{}, plan, in);
    } else if (plan.chunks == 2) {
      f(StatsKernel<dive_stats_kernel<ft_t, pre_t, 2>, true>{}, plan, in);
    } else if constexpr (E == 4) {  // 4 chunks: only 4-element chunks reach D = 4096
      f(StatsKernel<dive_stats_kernel<ft_t, pre_t, 4>, true>{}, plan, in);
    } else {
      TORCH_CHECK(false, "no statistics kernel for ", plan.chunks, " chunks per thread");
    }
  });
}

// Parts of the statistics on the inputs' device: one full wave of the kernel the plan
// selects (stats_parts), the same for every batch on one kind of device.
int64_t num_parts(const RowInputs& x) {
  const int device = x.a.get_device();
  int64_t parts = 0;
  with_stats_kernel(x, [&](auto tag, const StatsPlan& plan, const auto&) {
    constexpr auto kernel = decltype(tag)::value;
    parts = stats_parts(sm_count(device),
                        blocks_per_sm<kernel>(device, kStatsThreads, plan.shared_bytes));
  });
  return parts;
}

// The statistics into caller-provided buffers: means [parts, 2, D], scalars
// [parts, kNumScalars] (parts: num_parts's), the ticket zeroed for the finalisation.
void launch_stats(const RowInputs& x, bool normalize, int64_t parts, float* means,
                  float* scalars, unsigned* ticket, Stream stream) {
  const int device = x.a.get_device();
  const int D = static_cast<int>(x.D);
  const StatsOutputs out{means, scalars, ticket};
  with_stats_kernel(x, [&](auto tag, const StatsPlan& plan, const auto& in) {
    constexpr auto kernel = decltype(tag)::value;
    allow_shared<kernel>(device, plan.shared_bytes);
    if constexpr (decltype(tag)::fast) {
      DIVE_LAUNCH(kernel, parts, kStatsThreads, plan.shared_bytes, stream, in, x.B, D,
                  plan.threads_per_row, plan.stages, normalize, out);
    } else {
      DIVE_LAUNCH(kernel, parts, kStatsThreads, plan.shared_bytes, stream, in, x.B, D,
                  plan.rows_per_tile, normalize, out);
    }
    DIVE_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dive_stats_cuda(const at::Tensor& img_ft,
                                                               const at::Tensor& img_pre,
                                                               const at::Tensor& txt_ft,
                                                               const at::Tensor& txt_pre,
                                                               bool normalize) {
  check_cuda_inputs(img_ft);
  const DeviceGuard guard(img_ft.device());
  const RowInputs x = prepare_inputs(img_ft, img_pre, txt_ft, txt_pre);
  const auto f32 = x.a.options().dtype(at::kFloat);
  const int64_t parts = num_parts(x);
  auto means = at::empty({parts, 2, x.D}, f32);
  auto scalars = at::empty({parts, kNumScalars}, f32);
  auto workspace = at::empty({workspace_doubles(x.D)}, f32.dtype(at::kDouble));
  launch_stats(x, normalize, parts, means.data_ptr<float>(), scalars.data_ptr<float>(),
               reinterpret_cast<unsigned*>(workspace.data_ptr<double>()), current_stream());
  return {means, scalars, workspace};
}

// The finalisation of partials (from the statistics or from elsewhere), m_out updated.
// `workspace`: the statistics' (its ticket zeroed by them); without one a zeroed one is
// made here (one more launch: partials that did not come from dive_stats).
ForwardOutputs finalize(const float* means, const float* scalars, int64_t K, int64_t D,
                        double* workspace, const at::Tensor& m,
                        const std::optional<at::Tensor>& m_out, const float* b_global,
                        double momentum, double lam_avl, double lam_pvl, Stream stream) {
  TORCH_CHECK(!m_out || m_out->scalar_type() == m.scalar_type(), "m_out must have m's dtype");
  TORCH_CHECK(!m_out || m_out->is_contiguous(), "m_out must be contiguous");
  if (m.scalar_type() == at::kDouble) {
    // A float64 m (accepted by the other backends): updated in float32, as the partials
    // are, then written back in float64 (the CPU backend does the same).
    auto out = finalize(means, scalars, K, D, workspace, m.to(at::kFloat), std::nullopt,
                        b_global, momentum, lam_avl, lam_pvl, stream);
    std::get<3>(out) = std::get<3>(out).to(at::kDouble);
    if (m_out) m_out->copy_(std::get<3>(out));
    return out;
  }
  const at::Tensor m_c = m.contiguous();
  const auto f32 = m.options().dtype(at::kFloat);
  ForwardOutputs out{at::empty({}, f32), at::empty({}, f32),  at::empty({}, f32),
                     at::empty_like(m_c), at::empty({D}, f32), at::empty({kInfoSize}, f32)};
  auto& [loss, avl, pvl, m_new, b_out, info] = out;
  dispatch_low_precision(m.scalar_type(), "m", [&](auto m_tag) {
    using m_t = typename decltype(m_tag)::type;
    const FinalizeArgs<m_t> args{means, scalars, static_cast<int>(K), static_cast<int>(D),
                                 m_c.data_ptr<m_t>(), b_global, momentum, 1.0 - momentum,
                                 lam_avl, lam_pvl, m_new.data_ptr<m_t>(),
                                 m_out ? m_out->data_ptr<m_t>() : nullptr, b_out.data_ptr<float>(),
                                 loss.data_ptr<float>(), avl.data_ptr<float>(),
                                 pvl.data_ptr<float>(), info.data_ptr<float>(), workspace + 2,
                                 reinterpret_cast<unsigned*>(workspace)};
    constexpr auto kernel = dive_finalize_kernel<m_t>;
    DIVE_LAUNCH(kernel, finalize_blocks(D), kFinalizeThreads, 0, stream, args);
    DIVE_LAUNCH_CHECK();
  });
  return out;
}

ForwardOutputs dive_finalize_cuda(const at::Tensor& means, const at::Tensor& scalars,
                                  const std::optional<at::Tensor>& workspace, const at::Tensor& m,
                                  const std::optional<at::Tensor>& m_out,
                                  const std::optional<at::Tensor>& b, double momentum,
                                  double lam_avl, double lam_pvl) {
  check_finalize_inputs(means, scalars, m, m_out, b);
  TORCH_CHECK(means.scalar_type() == at::kFloat, "the cuda finalisation takes float32 partials");
  for (const auto& [x, name] : {std::pair{&scalars, "scalars"}, std::pair{&m, "m"}}) {
    check_device(*x, name, means.device());
  }
  check_device(m_out, "m_out", means.device());
  check_device(b, "b", means.device());
  const DeviceGuard guard(means.device());
  const int64_t D = means.size(2), need = workspace_doubles(D);
  at::Tensor ws;
  if (workspace && workspace->defined() && workspace->numel() >= need &&
      workspace->scalar_type() == at::kDouble && workspace->device() == means.device()) {
    ws = *workspace;
  } else {
    ws = at::zeros({need}, means.options().dtype(at::kDouble));
  }
  return finalize(means.data_ptr<float>(), scalars.data_ptr<float>(), means.size(0), D,
                  ws.data_ptr<double>(), m, m_out, b ? b->data_ptr<float>() : nullptr, momentum,
                  lam_avl, lam_pvl, current_stream());
}

// The single-process forward: two launches, one buffer for everything between them.
ForwardOutputs dive_forward_cuda(const at::Tensor& img_ft, const at::Tensor& img_pre,
                                 const at::Tensor& txt_ft, const at::Tensor& txt_pre,
                                 const at::Tensor& m, const std::optional<at::Tensor>& m_out,
                                 bool normalize, double momentum, double lam_avl, double lam_pvl) {
  check_cuda_inputs(img_ft);
  const DeviceGuard guard(img_ft.device());
  const RowInputs x = prepare_inputs(img_ft, img_pre, txt_ft, txt_pre);
  TORCH_CHECK(m.dim() == 1 && m.numel() == x.D, "m must have ", x.D, " elements, got ", m.sizes());
  check_device(m, "m", img_ft.device());
  check_device(m_out, "m_out", img_ft.device());
  // [workspace (float64) | means | scalars]: the partials stay on the device.
  const int64_t ws = workspace_doubles(x.D), parts = num_parts(x);
  auto buffer = at::empty({ws + (parts * (2 * x.D + kNumScalars) + 1) / 2},
                          x.a.options().dtype(at::kDouble));
  double* base = buffer.data_ptr<double>();
  float* means = reinterpret_cast<float*>(base + ws);
  float* scalars = means + parts * 2 * x.D;
  const auto stream = current_stream();
  launch_stats(x, normalize, parts, means, scalars, reinterpret_cast<unsigned*>(base), stream);
  return finalize(means, scalars, parts, x.D, base, m, m_out, nullptr, momentum, lam_avl,
                  lam_pvl, stream);
}

std::tuple<at::Tensor, at::Tensor> dive_backward_cuda(
    const at::Tensor& img_ft, const at::Tensor& img_pre, const at::Tensor& txt_ft,
    const at::Tensor& txt_pre, const at::Tensor& m, const std::optional<at::Tensor>& g_loss,
    const std::optional<at::Tensor>& g_avl, const std::optional<at::Tensor>& g_pvl,
    double lam_avl, double lam_pvl, double scale, bool normalize) {
  check_cuda_inputs(img_ft);
  const DeviceGuard guard(img_ft.device());
  const RowInputs x = prepare_inputs(img_ft, img_pre, txt_ft, txt_pre);
  TORCH_CHECK(m.numel() == x.D, "m must have ", x.D, " elements, got ", m.numel());
  check_device(m, "m", img_ft.device());
  check_device(g_loss, "the gradient of the loss", img_ft.device());
  check_device(g_avl, "the gradient of avl", img_ft.device());
  check_device(g_pvl, "the gradient of pvl", img_ft.device());
  at::Tensor m32 = m.to(at::kFloat).contiguous();  // no copy for a float32 buffer
  if (reinterpret_cast<uintptr_t>(m32.data_ptr()) % 16 != 0) m32 = m32.clone();  // 16-byte loads
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
  auto GA = at::empty({x.B, x.D}, x.a.options());
  auto GT = at::empty({x.B, x.D}, x.t.options());
  const auto stream = current_stream();
  const int D = static_cast<int>(x.D);
  dispatch_dtypes<false>(x.a.scalar_type(), x.a0.scalar_type(), [&](auto ft_tag, auto pre_tag, auto) {
    using ft_t = typename decltype(ft_tag)::type;
    using pre_t = typename decltype(pre_tag)::type;
    constexpr int E = chunk_elems<ft_t, pre_t>();
    const BackwardPlan plan =
        backward_plan(x.B, x.D, sizeof(ft_t), sizeof(pre_t), all_aligned(x, E));
    const auto in = row_pointers<ft_t, pre_t>(x);
    if (plan.fast) {
      constexpr auto kernel = dive_backward_kernel<ft_t, pre_t>;
      DIVE_LAUNCH(kernel, plan.blocks, plan.threads, 0, stream, in, x.B, D, plan.threads_per_row,
                  m32.data_ptr<float>(), g, normalize, GA.data_ptr<ft_t>(), GT.data_ptr<ft_t>());
    } else {
      constexpr auto kernel = dive_backward_rows_kernel<ft_t, pre_t>;
      DIVE_LAUNCH(kernel, plan.blocks, plan.threads, 0, stream, in, x.B, D, m32.data_ptr<float>(),
                  g, normalize, GA.data_ptr<ft_t>(), GT.data_ptr<ft_t>());
    }
    DIVE_LAUNCH_CHECK();
  });
  return {GA, GT};
}

#ifdef DIVE_EMULATE
}  // namespace emulated
#else
}  // namespace

TORCH_LIBRARY_IMPL(dive_fast_C, CUDA, lib) {
  lib.impl("dive_stats", &dive_stats_cuda);
  lib.impl("dive_finalize", &dive_finalize_cuda);
  lib.impl("dive_forward", &dive_forward_cuda);
  lib.impl("dive_backward", &dive_backward_cuda);
}
#endif

}  // namespace dive_fast
