// Hidden-state alignment A(H_s, H_t) between student block outputs and teacher layer outputs
// (spec-distillation.md §3): policies ratio (default), average, block_wise and cosine, each over
// non-padding positions and divided by sqrt(N), N = L_s * (real positions) * d; value and dA/dH_s.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "distilx/core/error.hpp"
#include "distilx/loss/detail/align_ops.hpp"
#include "distilx/ops/elementwise.hpp"
#include "distilx/tensor/tensor.hpp"

namespace distilx {

enum class AlignmentPolicy {
  none,        // no alignment term
  ratio,       // L_t layers in L_s contiguous groups (last takes the remainder); Frobenius per block, mean
  average,     // mean of all student blocks vs. mean of all teacher layers; one Frobenius norm
  block_wise,  // L_s == L_t; Frobenius norm per (block, batch item), mean
  cosine,      // 1 - cos per (block, position), mean; teacher side grouped as in ratio
};

inline const char* to_string(AlignmentPolicy p) {
  switch (p) {
    case AlignmentPolicy::none: return "none";
    case AlignmentPolicy::ratio: return "ratio";
    case AlignmentPolicy::average: return "average";
    case AlignmentPolicy::block_wise: return "block_wise";
    case AlignmentPolicy::cosine: return "cosine";
  }
  return "?";
}

/// Parses "none" | "ratio" | "average" | "block_wise" | "cosine".
inline AlignmentPolicy parse_alignment_policy(const std::string& s) {
  for (AlignmentPolicy p : {AlignmentPolicy::none, AlignmentPolicy::ratio, AlignmentPolicy::average,
                            AlignmentPolicy::block_wise, AlignmentPolicy::cosine})
    if (s == to_string(p)) return p;
  throw config_error(
      detail::concat("unknown alignment policy '", s, "' (expected none, ratio, average, block_wise or cosine)"));
}

template <class T>
struct AlignmentInputs {
  std::vector<const T*> H_s;           // L_s x [M, d]   student block outputs (before the final norm)
  std::vector<const T*> H_t;           // L_t x [M, d_t] teacher hidden states, HF order without the embedding entry
  const std::uint8_t* mask = nullptr;  // [M] 1 = real token; null: all real
  index_t M = 0, d = 0, d_t = 0;
  index_t batch = 1;                   // B with M = B * T: block_wise takes one norm per batch item
};

struct AlignmentResult {
  double value = 0;       // A, already divided by sqrt(N)
  index_t positions = 0;  // real positions
  double n_elements = 0;  // N = L_s * positions * d
};

template <class T, class Backend = cpu>
class AlignmentLoss {
 public:
  explicit AlignmentLoss(AlignmentPolicy policy = AlignmentPolicy::ratio) : policy_(policy) {}

  AlignmentPolicy policy() const { return policy_; }

  /// Set-up validation: throws config_error naming both numbers for layer counts or widths the
  /// policy cannot pair (never broadcasts silently).
  static void check_config(AlignmentPolicy p, index_t L_s, index_t L_t, index_t d_s, index_t d_t) {
    if (p == AlignmentPolicy::none) return;
    DISTILX_REQUIRE(config_error, L_s >= 1 && L_t >= 1, to_string(p),
                    " alignment needs at least one student block and one teacher layer (L_s = ", L_s, ", L_t = ", L_t,
                    ")");
    DISTILX_REQUIRE(config_error, d_s == d_t, to_string(p), " alignment: student width d = ", d_s,
                    " differs from teacher width d_t = ", d_t);
    DISTILX_REQUIRE(config_error, p != AlignmentPolicy::block_wise || L_s == L_t,
                    "block_wise alignment needs as many student blocks as teacher layers: L_s = ", L_s,
                    ", L_t = ", L_t, " (the ratio policy groups teacher layers)");
    DISTILX_REQUIRE(config_error,
                    (p != AlignmentPolicy::ratio && p != AlignmentPolicy::cosine) || L_t >= L_s, to_string(p),
                    " alignment groups teacher layers per student block and needs L_t >= L_s: L_s = ", L_s,
                    ", L_t = ", L_t);
  }

  /// Teacher layers [first, last) averaged for student block i: floor(L_t / L_s) each, the last
  /// block taking the remainder.
  static std::pair<index_t, index_t> ratio_group(index_t i, index_t L_s, index_t L_t) {
    const index_t g = L_t / L_s;
    return {i * g, i + 1 == L_s ? L_t : (i + 1) * g};
  }

  /// Value of A; when dH_s is given (L_s buffers [M, d]) also writes (=) dH_s[i] = grad_scale * dA/dH_s[i].
  /// Padding rows get zero gradient. The Frobenius norm's gradient at 0 is defined as 0.
  AlignmentResult compute(const AlignmentInputs<T>& in, const std::vector<T*>* dH_s = nullptr,
                          double grad_scale = 1.0) {
    const index_t L_s = index_t(in.H_s.size()), L_t = index_t(in.H_t.size()), M = in.M, d = in.d;
    const bool want_grad = dH_s != nullptr;
    if (want_grad) {
      DISTILX_REQUIRE(shape_error, index_t(dH_s->size()) == L_s, "alignment: ", dH_s->size(),
                      " gradient buffers for L_s = ", L_s, " student blocks");
      for (T* p : *dH_s) DISTILX_REQUIRE(shape_error, p, "alignment: null gradient buffer");
    }
    AlignmentResult res;
    if (policy_ == AlignmentPolicy::none) {
      zero_grads(dH_s, M * d);
      return res;
    }
    check_config(policy_, L_s, L_t, d, in.d_t);
    DISTILX_REQUIRE(shape_error, M >= 0 && d >= 1, "alignment: need M >= 0 and d >= 1 (got M = ", M, ", d = ", d, ")");
    for (const T* p : in.H_s) DISTILX_REQUIRE(shape_error, p || M == 0, "alignment: null student hidden state");
    for (const T* p : in.H_t) DISTILX_REQUIRE(shape_error, p || M == 0, "alignment: null teacher hidden state");

    for (index_t m = 0; m < M; ++m) res.positions += (!in.mask || in.mask[m]) ? 1 : 0;
    res.n_elements = double(L_s) * double(res.positions) * double(d);
    if (res.positions == 0) {
      zero_grads(dH_s, M * d);
      return res;
    }
    rows_.assign(std::size_t(M), 0.0);
    if (!want_grad || policy_ == AlignmentPolicy::average)
      if (diff_.size() < M * d) diff_.resize({M, d});
    const double inv_sqrt_n = 1.0 / std::sqrt(res.n_elements);
    switch (policy_) {
      case AlignmentPolicy::ratio: res.value = ratio(in, dH_s, grad_scale * inv_sqrt_n) * inv_sqrt_n; break;
      case AlignmentPolicy::average: res.value = average(in, dH_s, grad_scale * inv_sqrt_n) * inv_sqrt_n; break;
      case AlignmentPolicy::block_wise: res.value = block_wise(in, dH_s, grad_scale * inv_sqrt_n) * inv_sqrt_n; break;
      case AlignmentPolicy::cosine:
        res.value = cosine(in, dH_s, grad_scale * inv_sqrt_n, res.positions) * inv_sqrt_n;
        break;
      case AlignmentPolicy::none: break;
    }
    return res;
  }

 private:
  double sum_rows(index_t r0, index_t r1) const {
    double s = 0;
    for (index_t m = r0; m < r1; ++m) s += rows_[std::size_t(m)];
    return s;
  }
  static void zero_grads(const std::vector<T*>* dH_s, index_t n) {
    if (dH_s)
      for (T* p : *dH_s) ops::fill_zero(Backend{}, p, n);
  }

  // Each policy returns A * sqrt(N); `scale` is grad_scale / sqrt(N).
  double ratio(const AlignmentInputs<T>& in, const std::vector<T*>* dH_s, double scale) {
    const index_t L_s = index_t(in.H_s.size()), L_t = index_t(in.H_t.size()), M = in.M, d = in.d;
    double total = 0;
    for (index_t i = 0; i < L_s; ++i) {
      const auto [g0, g1] = ratio_group(i, L_s, L_t);
      T* D = dH_s ? (*dH_s)[std::size_t(i)] : diff_.data();  // [M, d] H_s[i] - group mean
      ops::align_mean_diff(Backend{}, D, in.H_s.data() + i, 1, in.H_t.data() + g0, g1 - g0, in.mask, M, d,
                           rows_.data());
      const double norm = std::sqrt(sum_rows(0, M));
      total += norm;
      // d||D|| / dH_s = D / ||D||, times 1/L_s (mean over blocks) and 1/sqrt(N).
      if (dH_s) ops::align_scale(Backend{}, D, D, T(norm > 0 ? scale / (double(L_s) * norm) : 0.0), M * d);
    }
    return total / double(L_s);
  }

  double average(const AlignmentInputs<T>& in, const std::vector<T*>* dH_s, double scale) {
    const index_t L_s = index_t(in.H_s.size()), L_t = index_t(in.H_t.size()), M = in.M, d = in.d;
    ops::align_mean_diff(Backend{}, diff_.data(), in.H_s.data(), L_s, in.H_t.data(), L_t, in.mask, M, d,
                         rows_.data());  // [M, d] student mean - teacher mean
    const double norm = std::sqrt(sum_rows(0, M));
    if (dH_s) {
      // Each block enters the student mean with weight 1/L_s.
      const T s = T(norm > 0 ? scale / (double(L_s) * norm) : 0.0);
      for (T* g : *dH_s) ops::align_scale(Backend{}, g, diff_.data(), s, M * d);
    }
    return norm;
  }

  double block_wise(const AlignmentInputs<T>& in, const std::vector<T*>* dH_s, double scale) {
    const index_t L = index_t(in.H_s.size()), M = in.M, d = in.d, B = in.batch;
    DISTILX_REQUIRE(shape_error, B >= 1 && M % B == 0, "block_wise alignment: batch = ", B,
                    " does not divide M = ", M, " positions");
    const index_t S = M / B;
    // Batch items that are all padding have no norm to average: they are left out of the mean.
    index_t items = 0;
    for (index_t b = 0; b < B; ++b) {
      bool any = !in.mask;
      for (index_t m = b * S; m < (b + 1) * S && !any; ++m) any = in.mask[m] != 0;
      items += any ? 1 : 0;
    }
    const double pairs = double(L) * double(items);
    if (dH_s) scales_.assign(std::size_t(M), 0.0);
    double total = 0;
    for (index_t l = 0; l < L; ++l) {
      T* D = dH_s ? (*dH_s)[std::size_t(l)] : diff_.data();  // [M, d] H_s[l] - H_t[l]
      ops::align_mean_diff(Backend{}, D, in.H_s.data() + l, 1, in.H_t.data() + l, 1, in.mask, M, d, rows_.data());
      for (index_t b = 0; b < B; ++b) {
        const double norm = std::sqrt(sum_rows(b * S, (b + 1) * S));  // over (T, d) of item b
        total += norm;  // an all-padding item adds 0
        if (dH_s) {
          const double s = norm > 0 ? scale / (pairs * norm) : 0.0;
          for (index_t m = b * S; m < (b + 1) * S; ++m) scales_[std::size_t(m)] = s;
        }
      }
      if (dH_s) ops::align_scale_rows(Backend{}, D, scales_.data(), M, d);
    }
    return total / pairs;
  }

  double cosine(const AlignmentInputs<T>& in, const std::vector<T*>* dH_s, double scale, index_t positions) {
    const index_t L_s = index_t(in.H_s.size()), L_t = index_t(in.H_t.size()), M = in.M, d = in.d;
    const double count = double(L_s) * double(positions);  // mean over (block, real position)
    double total = 0;
    for (index_t i = 0; i < L_s; ++i) {
      const auto [g0, g1] = ratio_group(i, L_s, L_t);
      ops::align_cosine_rows(Backend{}, dH_s ? (*dH_s)[std::size_t(i)] : nullptr, in.H_s[std::size_t(i)],
                             in.H_t.data() + g0, g1 - g0, in.mask, M, d, T(scale / count), rows_.data());
      total += sum_rows(0, M);
    }
    return total / count;
  }

  AlignmentPolicy policy_;
  Tensor<T, Backend> diff_;      // [M, d] difference when no gradient buffer receives it (and for average)
  std::vector<double> rows_;     // [M] per-row partial sums
  std::vector<double> scales_;   // [M] per-row gradient scale (block_wise)
};

}  // namespace distilx
