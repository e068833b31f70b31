// Shared by the CPU and CUDA DiVE kernels: statistics layout and dtype dispatch.
#pragma once

#include <ATen/ATen.h>

namespace dive_fast {

// Columns of the per-part statistics (must match dive_fast/ops/dive_reference.py).
constexpr int kCount = 0, kM2U = 1, kM2V = 2, kPvl = 3, kNormU = 4, kNormV = 5;
constexpr int kNonFinite = 6, kZeroNorm = 10, kNumScalars = 14;

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch_low_precision(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<at::Half>{}); break;
    case at::kBFloat16: f(Tag<at::BFloat16>{}); break;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t);
  }
}

// Calls f(Tag<ft_t>, Tag<pre_t>, Tag<acc_t>): fine-tuned and frozen inputs may differ in
// dtype; accumulation is float64 for float64 inputs (gradcheck), else float32.
template <typename F>
void dispatch_dtypes(at::ScalarType ft, at::ScalarType pre, bool allow_double, F&& f) {
  if (ft == at::kDouble || pre == at::kDouble) {
    TORCH_CHECK(allow_double, "float64 inputs are not supported by this backend");
    TORCH_CHECK(ft == pre, "float64 inputs must all be float64, got ", ft, " and ", pre);
    f(Tag<double>{}, Tag<double>{}, Tag<double>{});
    return;
  }
  dispatch_low_precision(ft, "img_ft", [&](auto ft_tag) {
    dispatch_low_precision(pre, "img_pre", [&](auto pre_tag) { f(ft_tag, pre_tag, Tag<float>{}); });
  });
}

// Columns must be unit-stride for the vectorised loops; any row stride is fine.
inline at::Tensor unit_column_stride(const at::Tensor& x) {
  return x.stride(1) == 1 ? x : x.contiguous();
}

inline void check_inputs(const at::Tensor& a, const at::Tensor& a0, const at::Tensor& t,
                         const at::Tensor& t0) {
  TORCH_CHECK(a.dim() == 2, "img_ft must be 2-D, got ", a.dim(), " dims");
  TORCH_CHECK(a.size(0) > 0, "empty batch");
  for (const auto* x : {&a0, &t, &t0}) {
    TORCH_CHECK(x->sizes() == a.sizes(), "the four inputs must share a [batch, dim] shape");
    TORCH_CHECK(x->device() == a.device(), "the four inputs must be on one device");
  }
  TORCH_CHECK(t.scalar_type() == a.scalar_type() && t0.scalar_type() == a0.scalar_type(),
              "txt_ft must share img_ft's dtype and txt_pre img_pre's");
}

// The four inputs after the shared checks, with unit column stride; [B, D].
struct RowInputs {
  at::Tensor a, a0, t, t0;
  int64_t B, D;
};

inline RowInputs prepare_inputs(const at::Tensor& img_ft, const at::Tensor& img_pre,
                                const at::Tensor& txt_ft, const at::Tensor& txt_pre) {
  check_inputs(img_ft, img_pre, txt_ft, txt_pre);
  return {unit_column_stride(img_ft), unit_column_stride(img_pre), unit_column_stride(txt_ft),
          unit_column_stride(txt_pre), img_ft.size(0), img_ft.size(1)};
}

}  // namespace dive_fast
