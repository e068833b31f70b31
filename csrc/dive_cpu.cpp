// DiVE regulariser on the CPU: row chunks in parallel, loops the compiler vectorises.
//
// Forward (dive_forward = dive_stats + dive_finalize in one call): each chunk (one per
// thread) reads its rows once: per row the four squared norms, then u and v, summed
// about a shift (see stats_chunk), giving per chunk the mean and M2 of u and v; the
// finalisation combines them exactly (finalize_host) into b, the new m and both losses.
// Backward (dive_backward): one pass per row: norms, gradient wrt the normalised vector,
// projection through the normalisation Jacobian, write.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <sys/mman.h>
#if defined(__SSE__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "dive_common.h"

// The two hot loops (stats_chunk, backward_rows) are compiled twice: for the build's
// portable baseline and for x86-64-v3 (AVX2, FMA: Intel since Haswell, AMD since Zen), the
// CPU choosing at load time (GCC function multi-versioning, resolved once by an ifunc). No
// AVX-512 clone: the loops are memory-bound and GCC's own tuning for AVX-512 parts keeps
// 256-bit vectors. A build for a named -march (DIVE_FAST_CPU_ARCH) sets DIVE_CPU_NO_CLONES:
// its code is already specific, and a v3 clone would win over it. Elsewhere (non-x86,
// Clang, no glibc ifunc) the baseline alone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) && \
    !defined(DIVE_CPU_NO_CLONES)
#define DIVE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define DIVE_CPU_CLONES
#endif

namespace dive_fast {
namespace {

constexpr int64_t kRowBlock = 64;  // rows per unit of parallel work

template <typename acc_t>
struct ChunkStats {
  std::vector<acc_t> mean_u, mean_v;
  acc_t n = 0, m2_u = 0, m2_v = 0, pvl = 0, norm_u = 0, norm_v = 0;
  acc_t bad[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  explicit ChunkStats(int64_t D) : mean_u(D, 0), mean_v(D, 0) {}
};

template <typename T, typename acc_t>
inline acc_t sum_squares(const T* x, int64_t D) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) {
    const acc_t v = static_cast<acc_t>(x[d]);
    s += v * v;
  }
  return s;
}

template <typename acc_t>
inline acc_t inverse_norm(acc_t sumsq, bool normalize) {
  // A squared norm that overflows (finite values) gives NaN, not 1/inf = 0: the row then
  // acts as a NaN row (m kept, NaN loss) instead of silently vanishing.
  if (!(sumsq <= std::numeric_limits<acc_t>::max()))
    return std::numeric_limits<acc_t>::quiet_NaN();
  return normalize ? acc_t(1) / std::sqrt(sumsq) : acc_t(1);
}

template <typename acc_t>
inline void count_bad(acc_t* bad, const acc_t (&ss)[4]) {
  for (int k = 0; k < 4; ++k) {
    bad[k] += !(ss[k] <= std::numeric_limits<acc_t>::max());  // NaN or Inf
    bad[4 + k] += ss[k] == acc_t(0);
  }
}

// One chunk of rows in a single pass over memory. Per row: the four squared norms, then
// u and v, accumulated as sums of (u - c) and |u - c|^2 about a shift c = the chunk's
// first u (the shifted-data algorithm): with c a sample of the data, M2 = Q - |S|^2 / n
// does not cancel, unlike the unshifted |u|^2 - 2 m.u + |m|^2 form.
template <typename ft_t, typename pre_t, typename acc_t>
DIVE_CPU_CLONES
void stats_chunk(const at::Tensor& A, const at::Tensor& A0, const at::Tensor& T,
                 const at::Tensor& T0, int64_t r0, int64_t r1, bool normalize,
                 ChunkStats<acc_t>& st) {
  const int64_t D = A.size(1);
  const ft_t* a_base = A.data_ptr<ft_t>();
  const pre_t* a0_base = A0.data_ptr<pre_t>();
  const ft_t* t_base = T.data_ptr<ft_t>();
  const pre_t* t0_base = T0.data_ptr<pre_t>();
  // Sums of (u - c): per block of kRowBlock rows in acc_t, then into double (two-level,
  // so that the rounding error does not grow with the chunk's length).
  std::vector<acc_t> cu(D), cv(D), su(D, 0), sv(D, 0);
  std::vector<double> total_u(D, 0), total_v(D, 0);
  double qu = 0, qv = 0, pvl = 0, norm_u = 0, norm_v = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const ft_t* a = a_base + r * A.stride(0);
    const pre_t* a0 = a0_base + r * A0.stride(0);
    const ft_t* t = t_base + r * T.stride(0);
    const pre_t* t0 = t0_base + r * T0.stride(0);
    const acc_t ss[4] = {sum_squares<ft_t, acc_t>(a, D), sum_squares<pre_t, acc_t>(a0, D),
                         sum_squares<ft_t, acc_t>(t, D), sum_squares<pre_t, acc_t>(t0, D)};
    count_bad(st.bad, ss);
    const acc_t ia = inverse_norm(ss[0], normalize), ia0 = inverse_norm(ss[1], normalize);
    const acc_t it = inverse_norm(ss[2], normalize), it0 = inverse_norm(ss[3], normalize);
    if (r == r0) {
      for (int64_t d = 0; d < D; ++d) {
        cu[d] = static_cast<acc_t>(a[d]) * ia - static_cast<acc_t>(a0[d]) * ia0;
        cv[d] = static_cast<acc_t>(t[d]) * it - static_cast<acc_t>(t0[d]) * it0;
      }
    }
    acc_t pv = 0, nu = 0, nv = 0, du2 = 0, dv2 = 0;
    acc_t* __restrict__ su_p = su.data();
    acc_t* __restrict__ sv_p = sv.data();
    const acc_t* __restrict__ cu_p = cu.data();
    const acc_t* __restrict__ cv_p = cv.data();
#pragma omp simd reduction(+ : pv, nu, nv, du2, dv2)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t ud = static_cast<acc_t>(a[d]) * ia - static_cast<acc_t>(a0[d]) * ia0;
      const acc_t vd = static_cast<acc_t>(t[d]) * it - static_cast<acc_t>(t0[d]) * it0;
      const acc_t eu = ud - cu_p[d], ev = vd - cv_p[d];
      su_p[d] += eu;
      sv_p[d] += ev;
      du2 += eu * eu;
      dv2 += ev * ev;
      pv += (ud - vd) * (ud - vd);
      nu += ud * ud;
      nv += vd * vd;
    }
    qu += du2;
    qv += dv2;
    if ((r - r0) % kRowBlock == kRowBlock - 1 || r == r1 - 1) {
      for (int64_t d = 0; d < D; ++d) {
        total_u[d] += su[d];
        total_v[d] += sv[d];
        su[d] = sv[d] = 0;
      }
    }
    pvl += pv;
    norm_u += std::sqrt(nu);
    norm_v += std::sqrt(nv);
  }
  const int64_t n = r1 - r0;
  double shift_u = 0, shift_v = 0;
  for (int64_t d = 0; d < D; ++d) {
    const double mu = total_u[d] / n, mv = total_v[d] / n;
    shift_u += mu * mu;
    shift_v += mv * mv;
    st.mean_u[d] = static_cast<acc_t>(cu[d] + mu);
    st.mean_v[d] = static_cast<acc_t>(cv[d] + mv);
  }
  st.n = n;
  st.m2_u = static_cast<acc_t>(std::max(0.0, qu - n * shift_u));
  st.m2_v = static_cast<acc_t>(std::max(0.0, qv - n * shift_v));
  st.pvl = pvl;
  st.norm_u = norm_u;
  st.norm_v = norm_v;
}

std::tuple<at::Tensor, at::Tensor> stats_cpu(const at::Tensor& img_ft, const at::Tensor& img_pre,
                                             const at::Tensor& txt_ft, const at::Tensor& txt_pre,
                                             bool normalize) {
  const auto [A, A0, T, T0, B, D] = prepare_inputs(img_ft, img_pre, txt_ft, txt_pre);
  const int64_t blocks = (B + kRowBlock - 1) / kRowBlock;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
  const auto acc_type = A.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto means = at::empty({parts, 2, D}, A.options().dtype(acc_type));
  auto scalars = at::zeros({parts, kNumScalars}, A.options().dtype(acc_type));
  dispatch_dtypes<true>(A.scalar_type(), A0.scalar_type(), [&](auto ft_tag, auto pre_tag, auto acc_tag) {
    using ft_t = typename decltype(ft_tag)::type;
    using pre_t = typename decltype(pre_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t r0 = std::min(B, (blocks * p / parts) * kRowBlock);
        const int64_t r1 = std::min(B, (blocks * (p + 1) / parts) * kRowBlock);
        ChunkStats<acc_t> st(D);
        stats_chunk<ft_t, pre_t, acc_t>(A, A0, T, T0, r0, r1, normalize, st);
        acc_t* mp = means.data_ptr<acc_t>() + p * 2 * D;
        std::copy(st.mean_u.begin(), st.mean_u.end(), mp);
        std::copy(st.mean_v.begin(), st.mean_v.end(), mp + D);
        acc_t* sp = scalars.data_ptr<acc_t>() + p * kNumScalars;
        sp[kCount] = st.n;
        sp[kM2U] = st.m2_u;
        sp[kM2V] = st.m2_v;
        sp[kPvl] = st.pvl;
        sp[kNormU] = st.norm_u;
        sp[kNormV] = st.norm_v;
        for (int k = 0; k < 8; ++k) sp[kNonFinite + k] = st.bad[k];
      }
    });
  });
  return {means, scalars};
}

// The op: the statistics and an empty workspace (the GPU finalisations' ticket lives there).
std::tuple<at::Tensor, at::Tensor, at::Tensor> dive_stats_cpu(const at::Tensor& img_ft,
                                                              const at::Tensor& img_pre,
                                                              const at::Tensor& txt_ft,
                                                              const at::Tensor& txt_pre,
                                                              bool normalize) {
  auto [means, scalars] = stats_cpu(img_ft, img_pre, txt_ft, txt_pre, normalize);
  return {means, scalars, at::empty({0}, means.options())};
}

// The finalisation: the mathematics of dive_fast.ops.dive.finalize (the reference), in the
// form the CUDA and Triton finalisation kernels share, in float64. Per column, the parts'
// u and v means weighted by their row counts give this process's batch mean b_local, then
// dev = sum_k n_k |mean_k - b_local|^2 (a second pass, about b_local). Then m_new =
// momentum m + (1 - momentum) b, with b = b_local or the mean over ranks when given, and m
// kept when b is not finite; AVL = (sum M2 + dev + 2n |b_local - m_new|^2) / n, every term
// non-negative (no cancellation when all difference vectors are nearly equal).
template <typename acc_t>
void finalize_host(const acc_t* means, const acc_t* scalars, int64_t K, int64_t D,
                   const acc_t* m, const acc_t* b_global, double momentum, double lam_avl,
                   double lam_pvl, acc_t* m_new, acc_t* m_out, acc_t* b_out, acc_t* loss,
                   acc_t* avl, acc_t* pvl, acc_t* info) {
  double sums[kNumScalars] = {};
  for (int64_t k = 0; k < K; ++k) {
    for (int j = 0; j < kNumScalars; ++j) sums[j] += scalars[k * kNumScalars + j];
  }
  const double total = sums[kCount];
  std::vector<double> b_local(D, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    const double n = scalars[k * kNumScalars + kCount];
    const acc_t* mu = means + 2 * k * D;
    const acc_t* mv = mu + D;
    for (int64_t d = 0; d < D; ++d) b_local[d] += n * (double(mu[d]) + double(mv[d]));
  }
  for (int64_t d = 0; d < D; ++d) b_local[d] /= 2 * total;
  double dev = 0, bad = 0;
  for (int64_t k = 0; k < K; ++k) {
    const double n = scalars[k * kNumScalars + kCount];
    const acc_t* mu = means + 2 * k * D;
    const acc_t* mv = mu + D;
    double part = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double du = mu[d] - b_local[d], dv = mv[d] - b_local[d];
      part += du * du + dv * dv;
    }
    dev += n * part;
  }
  for (int64_t d = 0; d < D; ++d) {
    const double b = b_global ? double(b_global[d]) : b_local[d];
    b_out[d] = static_cast<acc_t>(b);
    bad += !(std::abs(b) <= std::numeric_limits<acc_t>::max());
  }
  double off = 0;
  for (int64_t d = 0; d < D; ++d) {
    const double b = b_global ? double(b_global[d]) : b_local[d], old = m[d];
    const acc_t updated = static_cast<acc_t>(bad == 0 ? momentum * old + (1 - momentum) * b : old);
    m_new[d] = updated;
    if (m_out != nullptr) m_out[d] = updated;  // m[d] is read: m_out may be m
    const double e = b_local[d] - double(updated);
    off += e * e;
  }
  const double l_avl = (sums[kM2U] + sums[kM2V] + dev + 2 * total * off) / total;
  const double l_pvl = sums[kPvl] / total;
  *loss = static_cast<acc_t>(lam_avl * l_avl + lam_pvl * l_pvl);
  *avl = static_cast<acc_t>(l_avl);
  *pvl = static_cast<acc_t>(l_pvl);
  info[0] = static_cast<acc_t>(sums[kNormU] / total);
  info[1] = static_cast<acc_t>(sums[kNormV] / total);
  for (int j = 0; j < 8; ++j) info[2 + j] = static_cast<acc_t>(sums[kNonFinite + j]);
}

ForwardOutputs finalize_cpu(const at::Tensor& means, const at::Tensor& scalars,
                            const at::Tensor& m, const std::optional<at::Tensor>& m_out,
                                 const std::optional<at::Tensor>& b, double momentum,
                                 double lam_avl, double lam_pvl) {
  check_finalize_inputs(means, scalars, m, m_out, b);
  const auto acc_type = means.scalar_type();
  const at::Tensor m_acc = m.to(acc_type).contiguous();  // no copy for a float32 buffer
  auto out = empty_forward_outputs(means, m_acc);
  auto& [loss, avl, pvl, m_new, b_out, info] = out;
  // m_out is written in the loop when it can be; else copied once after.
  const bool direct = m_out && m_out->scalar_type() == acc_type && m_out->is_contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc_type, "dive_finalize", [&] {
    finalize_host<scalar_t>(
        means.data_ptr<scalar_t>(), scalars.data_ptr<scalar_t>(), means.size(0), means.size(2),
        m_acc.data_ptr<scalar_t>(), b ? b->data_ptr<scalar_t>() : nullptr, momentum, lam_avl,
        lam_pvl, m_new.data_ptr<scalar_t>(), direct ? m_out->data_ptr<scalar_t>() : nullptr,
        b_out.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), avl.data_ptr<scalar_t>(),
        pvl.data_ptr<scalar_t>(), info.data_ptr<scalar_t>());
  });
  if (m_new.scalar_type() != m.scalar_type()) m_new = m_new.to(m.scalar_type());
  if (m_out && !direct) m_out->copy_(m_new);
  return out;
}

ForwardOutputs dive_finalize_cpu(const at::Tensor& means, const at::Tensor& scalars,
                                 const std::optional<at::Tensor>& /*workspace: GPU only*/,
                                 const at::Tensor& m, const std::optional<at::Tensor>& m_out,
                                 const std::optional<at::Tensor>& b, double momentum,
                                 double lam_avl, double lam_pvl) {
  return finalize_cpu(means, scalars, m, m_out, b, momentum, lam_avl, lam_pvl);
}

// The forward in one call: statistics, then their finalisation.
ForwardOutputs dive_forward_cpu(const at::Tensor& img_ft, const at::Tensor& img_pre,
                                const at::Tensor& txt_ft, const at::Tensor& txt_pre,
                                const at::Tensor& m, const std::optional<at::Tensor>& m_out,
                                bool normalize, double momentum, double lam_avl, double lam_pvl) {
  const auto [means, scalars] = stats_cpu(img_ft, img_pre, txt_ft, txt_pre, normalize);
  return finalize_cpu(means, scalars, m, m_out, std::nullopt, momentum, lam_avl, lam_pvl);
}

// Gradient outputs are large (B' x D) and die within the step; fresh ones cost the OS
// zeroing and faulting in every page on first write (glibc maps and unmaps blocks this
// big each time), a third of the backward at memory speed. Their blocks are recycled
// instead: a tensor's deleter returns its block here, and the next request of the same
// size takes it back. At most kCacheBytes stay cached; blocks are 2 MiB aligned with a
// transparent-huge-page hint, so even a first touch faults 512 times less.
class GradientBlockCache {
 public:
  static GradientBlockCache& instance() {
    static auto* cache = new GradientBlockCache();  // never destroyed: deleters may run at exit
    return *cache;
  }

  at::Tensor empty(at::IntArrayRef size, const at::TensorOptions& options) {
    const size_t bytes = c10::multiply_integers(size) * c10::elementSize(
        c10::typeMetaToScalarType(options.dtype()));
    if (bytes < kMinBytes) return at::empty(size, options);
    const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
    void* block = take(rounded);
    if (block == nullptr) {
      block = std::aligned_alloc(kHuge, rounded);
      TORCH_CHECK(block != nullptr, "dive_fast: out of memory allocating ", rounded, " bytes");
#ifdef MADV_HUGEPAGE
      madvise(block, rounded, MADV_HUGEPAGE);  // a hint; ignored where THP is off
#endif
    }
    return at::from_blob(block, size, [rounded](void* p) { instance().give_back(p, rounded); },
                         options);
  }

  void release_all() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, block] : free_) std::free(block);
    free_.clear();
    cached_ = 0;
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_;
  }

 private:
  static constexpr size_t kHuge = size_t(2) << 20;
  static constexpr size_t kMinBytes = size_t(1) << 20;  // below this malloc reuses memory itself
  static constexpr size_t kCacheBytes = size_t(1) << 30;

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* block = it->second;
    free_.erase(it);
    cached_ -= bytes;
    return block;
  }

  void give_back(void* block, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_ + bytes <= kCacheBytes) {
        free_.emplace(bytes, block);
        cached_ += bytes;
        return;
      }
    }
    std::free(block);
  }

  std::mutex mutex_;
  std::unordered_multimap<size_t, void*> free_;
  size_t cached_ = 0;
};

// The backward's loss coefficients, (c_avl, c_pvl) = scale * (lam_avl g_loss + g_avl,
// lam_pvl g_loss + g_pvl), read on the host; a missing upstream gradient counts as zero.
std::pair<double, double> loss_coefficients(const std::optional<at::Tensor>& g_loss,
                                                   const std::optional<at::Tensor>& g_avl,
                                                   const std::optional<at::Tensor>& g_pvl,
                                                   double lam_avl, double lam_pvl, double scale) {
  const auto value = [](const std::optional<at::Tensor>& g) {
    return g ? g->item().toDouble() : 0.0;
  };
  const double g = value(g_loss);
  return {scale * (lam_avl * g + value(g_avl)), scale * (lam_pvl * g + value(g_pvl))};
}

// Gradient rows go to memory that nothing reads soon: float32 rows are written with
// non-temporal stores, which skip the read-for-ownership of every destination line.
template <typename ft_t, typename acc_t>
inline void store_streaming(ft_t* dst, const acc_t* src, int64_t D) {
  int64_t d = 0;
#if defined(__SSE__)
  if constexpr (std::is_same_v<ft_t, float> && std::is_same_v<acc_t, float>) {
    for (; d < D && (reinterpret_cast<uintptr_t>(dst + d) & 15); ++d) dst[d] = src[d];
    for (; d + 4 <= D; d += 4) _mm_stream_ps(dst + d, _mm_loadu_ps(src + d));
  }
#endif
  for (; d < D; ++d) dst[d] = static_cast<ft_t>(src[d]);
}

template <typename ft_t, typename pre_t, typename acc_t>
DIVE_CPU_CLONES
void backward_rows(const at::Tensor& A, const at::Tensor& A0, const at::Tensor& T,
                   const at::Tensor& T0, const acc_t* m, acc_t c_avl, acc_t c_pvl,
                   bool normalize, at::Tensor& GA, at::Tensor& GT, int64_t r0, int64_t r1) {
  const int64_t D = A.size(1);
  std::vector<acc_t> gu(D), gv(D);
  for (int64_t r = r0; r < r1; ++r) {
    const ft_t* a = A.data_ptr<ft_t>() + r * A.stride(0);
    const pre_t* a0 = A0.data_ptr<pre_t>() + r * A0.stride(0);
    const ft_t* t = T.data_ptr<ft_t>() + r * T.stride(0);
    const pre_t* t0 = T0.data_ptr<pre_t>() + r * T0.stride(0);
    ft_t* ga = GA.data_ptr<ft_t>() + r * D;
    ft_t* gt = GT.data_ptr<ft_t>() + r * D;
    const acc_t ia = inverse_norm(sum_squares<ft_t, acc_t>(a, D), normalize);
    const acc_t ia0 = inverse_norm(sum_squares<pre_t, acc_t>(a0, D), normalize);
    const acc_t it = inverse_norm(sum_squares<ft_t, acc_t>(t, D), normalize);
    const acc_t it0 = inverse_norm(sum_squares<pre_t, acc_t>(t0, D), normalize);
    acc_t dot_a = 0, dot_t = 0;
#pragma omp simd reduction(+ : dot_a, dot_t)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t ah = static_cast<acc_t>(a[d]) * ia, th = static_cast<acc_t>(t[d]) * it;
      const acc_t ud = ah - static_cast<acc_t>(a0[d]) * ia0;
      const acc_t vd = th - static_cast<acc_t>(t0[d]) * it0;
      const acc_t g_u = c_avl * (ud - m[d]) + c_pvl * (ud - vd);
      const acc_t g_v = c_avl * (vd - m[d]) - c_pvl * (ud - vd);
      gu[d] = g_u;
      gv[d] = g_v;
      dot_a += ah * g_u;
      dot_t += th * g_v;
    }
    if (!normalize) dot_a = dot_t = 0;
    // dL/de = (g - e_hat (e_hat . g)) / |e|; ia = it = 1 without normalisation.
    const acc_t pa = dot_a * ia, pt = dot_t * it;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) {
      gu[d] = (gu[d] - static_cast<acc_t>(a[d]) * pa) * ia;
      gv[d] = (gv[d] - static_cast<acc_t>(t[d]) * pt) * it;
    }
    store_streaming(ga, gu.data(), D);
    store_streaming(gt, gv.data(), D);
  }
#if defined(__SSE__)
  _mm_sfence();  // order the streaming stores before the kernel returns
#endif
}

std::tuple<at::Tensor, at::Tensor> dive_backward_cpu(
    const at::Tensor& img_ft, const at::Tensor& img_pre, const at::Tensor& txt_ft,
    const at::Tensor& txt_pre, const at::Tensor& m, const std::optional<at::Tensor>& g_loss,
    const std::optional<at::Tensor>& g_avl, const std::optional<at::Tensor>& g_pvl,
    double lam_avl, double lam_pvl, double scale, bool normalize) {
  const auto [A, A0, T, T0, B, D] = prepare_inputs(img_ft, img_pre, txt_ft, txt_pre);
  TORCH_CHECK(m.numel() == D, "m must have ", D, " elements, got ", m.numel());
  auto& cache = GradientBlockCache::instance();
  auto GA = cache.empty({B, D}, A.options());
  auto GT = cache.empty({B, D}, T.options());
  dispatch_dtypes<true>(A.scalar_type(), A0.scalar_type(), [&](auto ft_tag, auto pre_tag, auto acc_tag) {
    using ft_t = typename decltype(ft_tag)::type;
    using pre_t = typename decltype(pre_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    const at::Tensor m_acc = m.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const auto [c_avl, c_pvl] = loss_coefficients(g_loss, g_avl, g_pvl, lam_avl, lam_pvl, scale);
    const acc_t ca = static_cast<acc_t>(c_avl), cp = static_cast<acc_t>(c_pvl);
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
    at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) {
      backward_rows<ft_t, pre_t, acc_t>(A, A0, T, T0, m_acc.data_ptr<acc_t>(), ca, cp, normalize,
                                        GA, GT, r0, r1);
    });
  });
  return {GA, GT};
}

}  // namespace

// The CPU backward's cache of gradient blocks: bytes held, and a way to free them. The
// dive_* ops' schema is in dive_schema.cpp.
TORCH_LIBRARY_FRAGMENT(dive_fast_C, lib) {
  lib.def("cpu_cached_bytes() -> int",
          [] { return int64_t(GradientBlockCache::instance().cached_bytes()); });
  lib.def("cpu_release_cached() -> ()", [] { GradientBlockCache::instance().release_all(); });
}

TORCH_LIBRARY_IMPL(dive_fast_C, CPU, lib) {
  lib.impl("dive_stats", &dive_stats_cpu);
  lib.impl("dive_finalize", &dive_finalize_cpu);
  lib.impl("dive_forward", &dive_forward_cpu);
  lib.impl("dive_backward", &dive_backward_cpu);
}

}  // namespace dive_fast
