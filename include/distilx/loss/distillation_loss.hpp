// The Δ-distillation loss of Distil-xLSTM (spec-distillation.md §1–§3):
//   L = w_kl tau^2 KL + w_al A + w_ce CE,  w_ce = 1 - w_kl (- w_al when the alignment weight is additive),
// with tau, w_kl and w_al following their schedules; returns the logged metrics and writes the
// gradients w.r.t. the student's final hidden state and its block outputs.
#pragma once

#include <cmath>
#include <vector>

#include "distilx/core/error.hpp"
#include "distilx/loss/alignment.hpp"
#include "distilx/loss/schedule.hpp"
#include "distilx/loss/vocab_loss.hpp"

namespace distilx {

struct DistillationLossConfig {
  Divergence divergence = Divergence::forward_kl;
  double beta = 0.5;         // mixture weight of jsd / skew_kl
  index_t chunk_rows = 256;  // positions per vocabulary chunk
  AlignmentPolicy alignment = AlignmentPolicy::ratio;
  // Paper defaults (spec §2): tau 2.0 -> 1.0, w_kl 0.2 -> 0.1, w_al 0.01 -> 0.001, delta 0.01.
  ScalarSchedule tau = DeltaSchedule{2.0, 1.0, 0.01};
  ScalarSchedule kl_weight = DeltaSchedule{0.2, 0.1, 0.01};
  ScalarSchedule alignment_weight = DeltaSchedule{0.01, 0.001, 0.01};
  bool additive_alignment_weight = false;  // w_ce = 1 - w_kl - w_al instead of 1 - w_kl

  VocabLossConfig vocab() const { return {divergence, beta, chunk_rows}; }

  /// Throws config_error naming the offending numbers.
  void validate() const {
    vocab().validate();
    tau.validate("tau");
    kl_weight.validate("kl_weight");
    alignment_weight.validate("alignment_weight");
    DISTILX_REQUIRE(config_error, tau.min_value() > 0, "temperature tau must stay > 0, but its schedule reaches ",
                    tau.min_value());
    DISTILX_REQUIRE(config_error, kl_weight.min_value() >= 0, "kl_weight must stay >= 0, but its schedule reaches ",
                    kl_weight.min_value());
    DISTILX_REQUIRE(config_error, alignment_weight.min_value() >= 0,
                    "alignment_weight must stay >= 0, but its schedule reaches ", alignment_weight.min_value());
    if (additive_alignment_weight && alignment != AlignmentPolicy::none) {
      DISTILX_REQUIRE(config_error, kl_weight.max_value() + alignment_weight.max_value() <= 1.0,
                      "the CE weight w_ce = 1 - w_kl - w_al would become negative: w_kl reaches ",
                      kl_weight.max_value(), " and w_al reaches ", alignment_weight.max_value());
    } else {
      DISTILX_REQUIRE(config_error, kl_weight.max_value() <= 1.0,
                      "the CE weight w_ce = 1 - w_kl would become negative: w_kl reaches ", kl_weight.max_value());
    }
  }
};

/// The scalars in effect at one step.
struct LossWeights {
  double tau = 1.0, w_kl = 0.0, w_al = 0.0, w_ce = 1.0;
};

/// What a logging step reports (spec §1), plus counts.
struct DistillationMetrics {
  double total = 0, kl = 0, ce = 0, alignment = 0, perplexity = 1;
  double w_kl = 0, w_al = 0, w_ce = 0, tau = 1;
  double top1 = 0;             // top-1 agreement rate over real positions
  index_t positions = 0;       // real positions (KL denominator)
  index_t targets = 0;         // counted targets (CE denominator)
  bool alignment_active = false;  // false: alignment skipped (w_al = 0 or no policy), alignment = 0
};

template <class T>
struct DistillationInputs {
  VocabLossInputs<T> vocab;  // final hidden states, heads, targets, mask, M, d, d_t, V
  std::vector<const T*> H_s; // L_s x [M, d]   student block outputs (before the final norm)
  std::vector<const T*> H_t; // L_t x [M, d_t] teacher hidden states without the embedding entry
  index_t batch = 1;         // B with M = B * T (block_wise alignment)
};

template <class T>
struct DistillationGrads {
  T* dh_s = nullptr;      // [M, d] d L / d (student final hidden state)
  std::vector<T*> dH_s;   // L_s x [M, d] d L / d (block outputs); may be empty while alignment is inactive
};

template <class T, class Backend = cpu>
class DeltaDistillationLoss {
 public:
  explicit DeltaDistillationLoss(const DistillationLossConfig& cfg = {})
      : cfg_(validated(cfg)), vocab_(cfg.vocab()), align_(cfg.alignment) {}

  const DistillationLossConfig& config() const { return cfg_; }

  /// Set-up check of the alignment pairing (layer counts, widths); throws config_error naming both numbers.
  void check_shapes(index_t L_s, index_t L_t, index_t d_s, index_t d_t) const {
    AlignmentLoss<T, Backend>::check_config(cfg_.alignment, L_s, L_t, d_s, d_t);
  }

  /// The scheduled scalars at (epoch, 0-based optimizer step within the epoch).
  LossWeights weights(index_t epoch, index_t step_in_epoch) const {
    LossWeights w;
    w.tau = cfg_.tau.value(epoch, step_in_epoch);
    w.w_kl = cfg_.kl_weight.value(epoch, step_in_epoch);
    w.w_al = cfg_.alignment == AlignmentPolicy::none ? 0.0 : cfg_.alignment_weight.value(epoch, step_in_epoch);
    w.w_ce = 1.0 - w.w_kl - (cfg_.additive_alignment_weight ? w.w_al : 0.0);
    return w;
  }

  DistillationMetrics compute(const DistillationInputs<T>& in, index_t epoch, index_t step_in_epoch,
                              const DistillationGrads<T>& grads, bool want_grad = true) {
    return compute(in, weights(epoch, step_in_epoch), grads, want_grad);
  }

  /// With explicit weights (evaluation at tau = 1, ablations). With want_grad, writes (=) grads.dh_s
  /// and, while the alignment term is active, grads.dH_s; inactive, the non-null dH_s are zeroed.
  DistillationMetrics compute(const DistillationInputs<T>& in, const LossWeights& w, const DistillationGrads<T>& grads,
                              bool want_grad = true) {
    DistillationMetrics out;
    out.tau = w.tau;
    out.w_kl = w.w_kl;
    out.w_al = w.w_al;
    out.w_ce = w.w_ce;
    const VocabLossResult v = vocab_.compute(in.vocab, w.tau, w.w_kl * w.tau * w.tau, w.w_ce, grads.dh_s, want_grad);
    out.kl = v.kl;
    out.ce = v.ce;
    out.top1 = v.top1();
    out.positions = v.positions;
    out.targets = v.targets;

    out.alignment_active = cfg_.alignment != AlignmentPolicy::none && w.w_al != 0.0;
    if (out.alignment_active) {
      ain_.H_s = in.H_s;  // assignment reuses capacity: no allocation per step
      ain_.H_t = in.H_t;
      ain_.mask = in.vocab.mask;
      ain_.M = in.vocab.M;
      ain_.d = in.vocab.d;
      ain_.d_t = in.vocab.d_t;
      ain_.batch = in.batch;
      out.alignment = align_.compute(ain_, want_grad ? &grads.dH_s : nullptr, w.w_al).value;
    } else if (want_grad) {
      for (T* p : grads.dH_s)
        if (p) ops::fill_zero(Backend{}, p, in.vocab.M * in.vocab.d);
    }
    out.total = w.w_kl * w.tau * w.tau * out.kl + w.w_al * out.alignment + w.w_ce * out.ce;
    out.perplexity = std::exp(out.ce);
    return out;
  }

 private:
  static const DistillationLossConfig& validated(const DistillationLossConfig& cfg) {
    cfg.validate();
    return cfg;
  }

  DistillationLossConfig cfg_;
  VocabLoss<T, Backend> vocab_;
  AlignmentLoss<T, Backend> align_;
  AlignmentInputs<T> ain_;
};

}  // namespace distilx
