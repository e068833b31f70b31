// The schema of the dive_fast_C ops, one for every backend: the C++ CPU kernels
// (dive_cpu.cpp) and the CUDA kernels (dive_cuda.cu) register implementations of these
// names, and dive_fast/ops/ calls them through torch.ops.dive_fast_C. Other files add
// their own helper ops with TORCH_LIBRARY_FRAGMENT (the CPU gradient cache in dive_cpu.cpp,
// the CUDA launch plans in dive_cuda_plan_ops.cpp).
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(dive_fast_C, lib) {
  // The statistics (per-part means and scalars), the finalisation of such statistics
  // (b given: the mean over ranks), and the two in one call; m_out receives m_new too.
  // dive_stats returns (means, scalars, workspace); the workspace (empty on the CPU) goes to
  // dive_finalize with them: on a GPU it holds the finalisation's ticket, zeroed by the
  // statistics kernel, and its partial sums.
  lib.def("dive_stats(Tensor img_ft, Tensor img_pre, Tensor txt_ft, Tensor txt_pre, "
          "bool normalize) -> (Tensor, Tensor, Tensor)");
  lib.def("dive_finalize(Tensor means, Tensor scalars, Tensor? workspace, Tensor m, "
          "Tensor(a!)? m_out, Tensor? b, float momentum, float lam_avl, float lam_pvl) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  lib.def("dive_forward(Tensor img_ft, Tensor img_pre, Tensor txt_ft, Tensor txt_pre, Tensor m, "
          "Tensor(a!)? m_out, bool normalize, float momentum, float lam_avl, float lam_pvl) "
          "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  lib.def("dive_backward(Tensor img_ft, Tensor img_pre, Tensor txt_ft, Tensor txt_pre, "
          "Tensor m, Tensor? g_loss, Tensor? g_avl, Tensor? g_pvl, float lam_avl, "
          "float lam_pvl, float scale, bool normalize) -> (Tensor, Tensor)");
}

// Importing dive_fast._C registers the ops of every file; the module itself exports nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {}
