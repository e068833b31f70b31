// Shared by the CPU and CUDA DiVE ops: statistics layout, input checks and dtype dispatch.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace dive_fast {

// Columns of the per-part statistics (must match dive_fast/ops/dive_reference.py).
constexpr int kCount = 0, kM2U = 1, kM2V = 2, kPvl = 3, kNormU = 4, kNormV = 5;
constexpr int kNonFinite = 6, kZeroNorm = 10, kNumScalars = 14;
constexpr int kInfoSize = 10;  // mean |u|, mean |v|, 4 non-finite, 4 zero-norm row counts

// Unroll a loop of constant trip count in device code (host compilers unroll such loops
// at -O3 on their own, and some warn on the CUDA pragma).
#ifdef __CUDA_ARCH__
#define DIVE_UNROLL _Pragma("unroll")
#else
#define DIVE_UNROLL
#endif

// The forward's outputs, (loss, avl, pvl, m_new, b, info), as the ops return them.
using ForwardOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor>;

// Empty outputs of a finalisation: scalars, b and info in the partials' dtype, m_new in m's.
inline ForwardOutputs empty_forward_outputs(const at::Tensor& means, const at::Tensor& m) {
  const auto opts = means.options();
  return {at::empty({}, opts), at::empty({}, opts), at::empty({}, opts), at::empty_like(m),
          at::empty({means.size(2)}, opts), at::empty({kInfoSize}, opts)};
}

inline void check_finalize_inputs(const at::Tensor& means, const at::Tensor& scalars,
                                  const at::Tensor& m, const std::optional<at::Tensor>& m_out,
                                  const std::optional<at::Tensor>& b) {
  TORCH_CHECK(means.dim() == 3 && means.size(1) == 2 && means.is_contiguous(),
              "means must be a contiguous [K, 2, D] tensor");
  TORCH_CHECK(scalars.dim() == 2 && scalars.size(0) == means.size(0) &&
                  scalars.size(1) == kNumScalars && scalars.is_contiguous(),
              "scalars must be a contiguous [K, ", kNumScalars, "] tensor");
  TORCH_CHECK(scalars.scalar_type() == means.scalar_type(), "means and scalars differ in dtype");
  const int64_t D = means.size(2);
  TORCH_CHECK(m.numel() == D && m.dim() == 1, "m must have ", D, " elements, got ", m.sizes());
  TORCH_CHECK(!m_out || (m_out->sizes() == m.sizes() && m_out->device() == m.device()),
              "m_out must have m's shape and device");
  TORCH_CHECK(!b || (b->numel() == D && b->scalar_type() == means.scalar_type() &&
                     b->is_contiguous()),
              "b must be a contiguous vector of ", D, " values in the partials' dtype");
}

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
// dtype; accumulation is float64 for float64 inputs (gradcheck), else float32. Without
// kAllowDouble no float64 instance is compiled (the CUDA kernels).
template <bool kAllowDouble, typename F>
void dispatch_dtypes(at::ScalarType ft, at::ScalarType pre, F&& f) {
  if (ft == at::kDouble || pre == at::kDouble) {
    TORCH_CHECK(kAllowDouble, "float64 inputs are not supported by this backend");
    TORCH_CHECK(ft == pre, "float64 inputs must all be float64, got ", ft, " and ", pre);
    if constexpr (kAllowDouble) f(Tag<double>{}, Tag<double>{}, Tag<double>{});
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
