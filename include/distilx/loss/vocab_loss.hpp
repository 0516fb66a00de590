// Vocabulary-sized part of the distillation loss (spec-distillation.md §1): the divergence between
// tempered teacher and student softmaxes (forward KL, reverse KL, generalised JSD, skew KL) and the
// next-token cross-entropy, fused with the frozen LM heads and chunked over positions, so that
// neither [M, V] logits tensor is ever held whole. Gradient: w.r.t. the student's final hidden state.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "distilx/backend/cpu/blas.hpp"
#include "distilx/core/error.hpp"
#include "distilx/loss/detail/vocab_ops.hpp"
#include "distilx/ops/elementwise.hpp"
#include "distilx/ops/linear.hpp"
#include "distilx/tensor/tensor.hpp"

namespace distilx {

/// Parses "forward_kl" | "reverse_kl" | "jsd" | "skew_kl".
inline Divergence parse_divergence(const std::string& s) {
  for (Divergence d : {Divergence::forward_kl, Divergence::reverse_kl, Divergence::jsd, Divergence::skew_kl})
    if (s == to_string(d)) return d;
  throw config_error(detail::concat("unknown divergence '", s, "' (expected forward_kl, reverse_kl, jsd or skew_kl)"));
}

struct VocabLossConfig {
  Divergence divergence = Divergence::forward_kl;
  // Mixture weight of jsd and skew_kl: m = beta p_t + (1 - beta) p_s. At 0 and 1 both
  // divergences are identically 0 (use forward_kl / reverse_kl instead).
  double beta = 0.5;
  index_t chunk_rows = 256;  // positions per chunk: scratch is 2 * chunk_rows * V values of T

  void validate() const {
    DISTILX_REQUIRE(config_error, beta >= 0 && beta <= 1, "divergence ", to_string(divergence), ": beta = ", beta,
                    " must lie in [0, 1]");
    DISTILX_REQUIRE(config_error, chunk_rows >= 1, "vocab loss: chunk_rows = ", chunk_rows, " must be >= 1");
  }
};

/// Pointers the loss reads (none is written). Teacher logits come either from h_t and W_t
/// (computed chunk by chunk) or, when z_t is set, from a precomputed [M, V] tensor; with neither,
/// only the CE is computed (e.g. a teacher's or student's own perplexity).
template <class T>
struct VocabLossInputs {
  const T* h_s = nullptr;                  // [M, d]   student final hidden state (after its final norm)
  const T* E_s = nullptr;                  // [V, d]   student LM head (frozen)
  const T* h_t = nullptr;                  // [M, d_t] teacher final hidden state (after its final norm)
  const T* W_t = nullptr;                  // [V, d_t] teacher LM head
  const T* z_t = nullptr;                  // [M, V]   precomputed teacher logits (instead of h_t, W_t)
  const std::int32_t* targets = nullptr;   // [M] next-token ids; < 0 = no target (last position, padding)
  const std::uint8_t* mask = nullptr;      // [M] 1 = real token, 0 = padding; null: all real
  index_t M = 0, d = 0, d_t = 0, V = 0;
};

struct VocabLossResult {
  double kl = 0;           // divergence at tau: sum over V, mean over real positions (before tau^2, weights)
  double ce = 0;           // mean over counted targets of -log softmax(z_s)[y] (tau = 1)
  index_t positions = 0;   // real positions (mask = 1): the divergence's denominator
  index_t targets = 0;     // real positions with a target >= 0: the CE's denominator
  index_t top1_agree = 0;  // real positions where argmax z_s == argmax z_t
  double top1() const { return positions ? double(top1_agree) / double(positions) : 0.0; }
};

/// Fused, chunked LM-head + divergence + CE. Workspace grows to the largest chunk seen and is reused.
template <class T, class Backend = cpu>
class VocabLoss {
 public:
  explicit VocabLoss(const VocabLossConfig& cfg = {}) : cfg_(cfg) { cfg_.validate(); }

  const VocabLossConfig& config() const { return cfg_; }

  /// Computes the divergence at temperature tau and the CE; with want_grad also writes (=)
  /// dh_s [M, d] = d total / d h_s for total = kl_scale * KL + ce_weight * CE, where the caller
  /// passes kl_scale = w_kl * tau^2. Padded positions get a zero gradient row.
  VocabLossResult compute(const VocabLossInputs<T>& in, double tau, double kl_scale, double ce_weight, T* dh_s,
                          bool want_grad) {
    check(in, tau, dh_s, want_grad);
    const Backend be{};
    const index_t M = in.M, V = in.V, d = in.d;
    const bool have_teacher = in.z_t || in.h_t;

    // Denominators first: every chunk's gradient is scaled by them.
    VocabLossResult res;
    for (index_t m = 0; m < M; ++m) {
      if (in.mask && !in.mask[m]) continue;
      ++res.positions;
      if (in.targets && in.targets[m] >= 0) ++res.targets;
    }
    const double kl_coef = have_teacher && res.positions ? kl_scale / double(res.positions) : 0.0;
    const double ce_coef = res.targets ? ce_weight / double(res.targets) : 0.0;

    const index_t R = std::min(cfg_.chunk_rows, std::max<index_t>(M, 1));
    reserve(R, V, have_teacher && !in.z_t);
    double kl_sum = 0, ce_sum = 0;
    for (index_t r0 = 0; r0 < M; r0 += R) {
      const index_t rows = std::min(R, M - r0);
      const std::uint8_t* mask = in.mask ? in.mask + r0 : nullptr;
      if (mask && std::none_of(mask, mask + rows, [](std::uint8_t x) { return x != 0; })) {
        // All padding: no logits needed, and the gradient rows are zero.
        if (want_grad) ops::fill_zero(be, dh_s + r0 * d, rows * d);
        continue;
      }
      ops::lm_head_forward(be, zs_.data(), in.h_s + r0 * d, in.E_s, rows, d, V);  // [rows, V]
      const T* zt = nullptr;
      if (in.z_t) {
        zt = in.z_t + r0 * V;
      } else if (in.h_t) {
        ops::lm_head_forward(be, zt_.data(), in.h_t + r0 * in.d_t, in.W_t, rows, in.d_t, V);  // [rows, V]
        zt = zt_.data();
      }
      ops::DistillRows<T> a;
      a.zs = zs_.data();
      a.zt = zt;
      a.targets = in.targets ? in.targets + r0 : nullptr;
      a.mask = mask;
      a.R = rows;
      a.V = V;
      a.divergence = cfg_.divergence;
      a.beta = cfg_.beta;
      a.tau = T(tau);
      a.div_coef = T(kl_coef);
      a.ce_coef = T(ce_coef);
      a.div = div_.data();
      a.ce = ce_.data();
      a.agree = agree_.data();
      a.dz = want_grad ? zs_.data() : nullptr;  // the gradient overwrites the student logits in place
      a.dz_feeds_lm_head_only = true;           // read by lm_head_backward below, nothing else
      ops::distill_rows(be, a);
      // Sequential sums over rows: the result does not depend on the thread count.
      for (index_t r = 0; r < rows; ++r) {
        kl_sum += div_[r];
        ce_sum += ce_[r];
        res.top1_agree += agree_[r];
      }
      if (want_grad) ops::lm_head_backward(be, dh_s + r0 * d, zs_.data(), in.E_s, rows, d, V);  // [rows, d]
    }
    res.kl = have_teacher && res.positions ? kl_sum / double(res.positions) : 0.0;
    res.ce = res.targets ? ce_sum / double(res.targets) : 0.0;
    return res;
  }

 private:
  void check(const VocabLossInputs<T>& in, double tau, const T* dh_s, bool want_grad) const {
    DISTILX_REQUIRE(config_error, tau > 0 && std::isfinite(tau), "temperature tau = ", tau, " must be > 0");
    DISTILX_REQUIRE(shape_error, in.M >= 0 && in.d >= 1 && in.V >= 1, "vocab loss: need M >= 0, d >= 1, V >= 1 (got M = ",
                    in.M, ", d = ", in.d, ", V = ", in.V, ")");
    if (in.M == 0) return;
    DISTILX_REQUIRE(shape_error, in.h_s && in.E_s, "vocab loss: student hidden state and LM head are required");
    DISTILX_REQUIRE(shape_error, !in.h_t || in.z_t || (in.W_t && in.d_t >= 1),
                    "vocab loss: teacher hidden state given without its LM head W_t or width d_t (d_t = ", in.d_t, ")");
    DISTILX_REQUIRE(shape_error, !want_grad || dh_s, "vocab loss: want_grad needs a dh_s buffer [M, d]");
    if (in.targets)
      for (index_t m = 0; m < in.M; ++m)
        DISTILX_REQUIRE(error, in.targets[m] < in.V, "vocab loss: target id ", in.targets[m], " at position ", m,
                        " is outside the vocabulary (V = ", in.V, ")");
  }

  void reserve(index_t R, index_t V, bool teacher_scratch) {
    if (zs_.size() < R * V) zs_.resize({R, V});
    if (teacher_scratch && zt_.size() < R * V) zt_.resize({R, V});
    if (index_t(div_.size()) < R) {
      div_.resize(std::size_t(R));
      ce_.resize(std::size_t(R));
      agree_.resize(std::size_t(R));
    }
  }

  VocabLossConfig cfg_;
  Tensor<T, Backend> zs_;  // [R, V] student logits, then d total / d z_s in place
  Tensor<T, Backend> zt_;  // [R, V] teacher logits
  std::vector<double> div_, ce_;      // [R] per-row divergence and CE
  std::vector<std::uint8_t> agree_;  // [R]
};

}  // namespace distilx
