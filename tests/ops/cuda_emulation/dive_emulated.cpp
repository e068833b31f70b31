// The CUDA launchers and kernels of csrc/dive_cuda.cu, compiled for the CPU model of
// cuda_emulation.h (beside this file): a test-only module (tests/ops/test_cuda_emulated.py
// builds it with torch.utils.cpp_extension.load, csrc/ and this folder on the include path)
// whose functions take CPU tensors and run the very kernels the GPU runs, thread by thread.
// Not part of the installed extension.
#define DIVE_EMULATE 1

#include <torch/extension.h>

#include "dive_cuda.cu"

namespace {

using namespace dive_fast::emulated;

// Runs f with the blocks of every launch in `order` (empty: 0, 1, ...) and the device's
// shared memory per block set to `shared_limit` (the pipeline's depth depends on it).
template <typename F>
auto with_device(const std::vector<int64_t>& order, int64_t shared_limit, F&& f) {
  block_order().assign(order.begin(), order.end());
  emulated_shared_limit() = shared_limit;
  auto result = f();
  block_order().clear();
  return result;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stats", [](const at::Tensor& a, const at::Tensor& a0, const at::Tensor& t,
                    const at::Tensor& t0, bool normalize, int64_t shared_limit) {
    return with_device({}, shared_limit, [&] { return dive_stats_cuda(a, a0, t, t0, normalize); });
  });
  m.def("finalize", [](const at::Tensor& means, const at::Tensor& scalars,
                       std::optional<at::Tensor> workspace, const at::Tensor& mm,
                       std::optional<at::Tensor> m_out, std::optional<at::Tensor> b,
                       double momentum, double lam_avl, double lam_pvl,
                       std::vector<int64_t> order) {
    return with_device(order, emulated_shared_limit(), [&] {
      return dive_finalize_cuda(means, scalars, workspace, mm, m_out, b, momentum, lam_avl,
                                lam_pvl);
    });
  });
  m.def("forward", [](const at::Tensor& a, const at::Tensor& a0, const at::Tensor& t,
                      const at::Tensor& t0, const at::Tensor& mm, std::optional<at::Tensor> m_out,
                      bool normalize, double momentum, double lam_avl, double lam_pvl,
                      int64_t shared_limit) {
    return with_device({}, shared_limit, [&] {
      return dive_forward_cuda(a, a0, t, t0, mm, m_out, normalize, momentum, lam_avl, lam_pvl);
    });
  });
  // The launch plan's choices, as the launchers make them (dive_cuda_plan.h).
  m.def("stats_plan", [](int64_t D, int64_t ft, int64_t pre, bool aligned, int64_t limit) {
    const auto p = dive_fast::stats_plan(D, int(ft), int(pre), aligned, limit);
    return std::make_tuple(p.fast, p.rows_per_tile, p.stages, p.shared_bytes, p.fits);
  });
  m.def("stats_parts", &dive_fast::stats_parts);
  m.def("waves", &dive_fast::waves);
  m.def("backward", [](const at::Tensor& a, const at::Tensor& a0, const at::Tensor& t,
                       const at::Tensor& t0, const at::Tensor& mm, std::optional<at::Tensor> g_loss,
                       std::optional<at::Tensor> g_avl, std::optional<at::Tensor> g_pvl,
                       double lam_avl, double lam_pvl, double scale, bool normalize) {
    return dive_backward_cuda(a, a0, t, t0, mm, g_loss, g_avl, g_pvl, lam_avl, lam_pvl, scale,
                              normalize);
  });
}
