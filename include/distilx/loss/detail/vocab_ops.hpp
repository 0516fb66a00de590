// Row kernel of the vocabulary-sized loss (spec-distillation.md §1): for each row of a chunk of
// student and teacher logits, the divergence between the tempered softmaxes, the cross-entropy
// at temperature 1, top-1 agreement, and the gradient w.r.t. the student logits. CPU overload
// here (a CUDA backend adds its own); softmaxes are computed in T with max-subtraction, the
// row reductions accumulate in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"

namespace distilx {

/// The divergence between the tempered teacher (p_t) and student (p_s) distributions.
/// jsd and skew_kl use the mixture m = beta p_t + (1 - beta) p_s.
enum class Divergence {
  forward_kl,  // KL(p_t || p_s), the paper's
  reverse_kl,  // KL(p_s || p_t)
  jsd,         // beta KL(p_t || m) + (1 - beta) KL(p_s || m)  (generalised Jensen-Shannon)
  skew_kl,     // KL(p_t || m)  (skew forward KL)
};

inline const char* to_string(Divergence d) {
  switch (d) {
    case Divergence::forward_kl: return "forward_kl";
    case Divergence::reverse_kl: return "reverse_kl";
    case Divergence::jsd: return "jsd";
    case Divergence::skew_kl: return "skew_kl";
  }
  return "?";
}

namespace ops {

/// Arguments of distill_rows: R rows of V logits. Rows with mask = 0 produce zeros everywhere.
template <class T>
struct DistillRows {
  const T* zs = nullptr;                   // [R, V] student logits
  const T* zt = nullptr;                   // [R, V] teacher logits; null: no divergence, no agreement
  const std::int32_t* targets = nullptr;   // [R] next-token ids, < 0 = ignored; null: no CE
  const std::uint8_t* mask = nullptr;      // [R] 1 = real position; null: all real
  index_t R = 0, V = 0;
  Divergence divergence = Divergence::forward_kl;
  double beta = 0.5;                       // mixture weight (jsd, skew_kl), in [0, 1]
  T tau = T(1);                            // temperature of the divergence (> 0); CE uses 1
  T div_coef = T(0);                       // d total / d div[r] for a real row
  T ce_coef = T(0);                        // d total / d ce[r] for a counted target
  double* div = nullptr;                   // [R] out: divergence per row (0 where excluded)
  double* ce = nullptr;                    // [R] out: -log softmax(z_s)[y] per row (0 where excluded)
  std::uint8_t* agree = nullptr;           // [R] out: argmax z_s == argmax z_t (first index on ties)
  T* dz = nullptr;                         // [R, V] out: d total / d z_s, or null; may alias zs
  // The caller's only use of dz is the lm_head_backward product that follows. A backend may then
  // hand that product the gradient in its own operand format instead (the CUDA backend in bf16 /
  // fp16 mode writes it straight as a 16-bit operand, and the floats in dz are not meaningful).
  bool dz_feeds_lm_head_only = false;
};

namespace detail {

template <class T>
inline T log_add_exp(T a, T b) {
  const T mx = std::max(a, b);
  if (mx == -std::numeric_limits<T>::infinity()) return mx;
  return mx + std::log1p(std::exp(std::min(a, b) - mx));
}

/// log m for m = beta p_t + (1 - beta) p_s, from the log-probabilities (never forms p, so tiny
/// probabilities keep their precision). The ends are special-cased because log 0 = -inf.
template <class T>
struct LogMixture {
  T beta, log_beta, log_one_minus_beta;
  explicit LogMixture(double b)
      : beta(T(b)), log_beta(b > 0 ? T(std::log(b)) : T(0)), log_one_minus_beta(b < 1 ? T(std::log1p(-b)) : T(0)) {}
  T operator()(T lpt, T lps) const {
    if (beta == T(0)) return lps;
    if (beta == T(1)) return lpt;
    return log_add_exp(log_beta + lpt, log_one_minus_beta + lps);
  }
};

// One row; K is a template parameter so the per-element switch is resolved at compile time.
template <Divergence K, class T>
void distill_row(const DistillRows<T>& a, index_t r) {
  const index_t V = a.V;
  const T* s = a.zs + r * V;  // [V]
  const T* t = a.zt ? a.zt + r * V : nullptr;
  T* dz = a.dz ? a.dz + r * V : nullptr;  // may alias s: each element is read before it is written
  a.div[r] = 0;
  a.ce[r] = 0;
  a.agree[r] = 0;
  const bool real = !a.mask || a.mask[r];
  if (!real) {
    if (dz) std::fill(dz, dz + V, T(0));
    return;
  }
  const std::int32_t y = a.targets ? a.targets[r] : -1;
  const bool has_target = y >= 0, has_div = t != nullptr;
  const T inv_tau = T(1) / a.tau;
  const bool tau_one = a.tau == T(1);

  // Pass 1: maxima (tau > 0, so max(z / tau) = max(z) / tau) and first arg-maxima.
  index_t as = 0, at = 0;
  for (index_t j = 1; j < V; ++j)
    if (s[j] > s[as]) as = j;
  if (has_div)
    for (index_t j = 1; j < V; ++j)
      if (t[j] > t[at]) at = j;
  const T ms = s[as], mt = has_div ? t[at] : T(0);

  // Pass 2: normalisers of softmax(z_s / tau), softmax(z_t / tau) and softmax(z_s).
  double sum_s = 0, sum_t = 0, sum_1 = 0;
  for (index_t j = 0; j < V; ++j) {
    sum_s += double(std::exp((s[j] - ms) * inv_tau));
    if (has_div) sum_t += double(std::exp((t[j] - mt) * inv_tau));
    if (has_target && !tau_one) sum_1 += double(std::exp(s[j] - ms));
  }
  if (tau_one) sum_1 = sum_s;
  const T ls = T(std::log(sum_s)), lt = has_div ? T(std::log(sum_t)) : T(0), l1 = T(std::log(sum_1));
  auto log_ps = [&](index_t j) { return (s[j] - ms) * inv_tau - ls; };  // log p_s^tau
  auto log_pt = [&](index_t j) { return (t[j] - mt) * inv_tau - lt; };  // log p_t^tau
  const LogMixture<T> log_mix(a.beta);
  const T beta = T(a.beta), one_minus_beta = T(1) - T(a.beta);

  if (has_target) a.ce[r] = -double((s[y] - ms) - l1);

  // Pass 3: the divergence, plus the row constant its gradient needs (aux). Terms whose weight
  // underflows to 0 are skipped so that -inf logits (masked vocabulary) give 0, not 0 * inf.
  double D = 0, aux = 0;
  if (has_div) {
    a.agree[r] = as == at;
    double d_t = 0, d_s = 0;
    for (index_t j = 0; j < V; ++j) {
      const T lps = log_ps(j), lpt = log_pt(j);
      if constexpr (K == Divergence::forward_kl) {
        const T pt = std::exp(lpt);
        if (pt > T(0)) D += double(pt * (lpt - lps));
      } else if constexpr (K == Divergence::reverse_kl) {
        const T ps = std::exp(lps);
        if (ps > T(0)) D += double(ps * (lps - lpt));
      } else {
        const T lm = log_mix(lpt, lps), pt = std::exp(lpt), ps = std::exp(lps);
        if (pt > T(0)) d_t += double(pt * (lpt - lm));
        if constexpr (K == Divergence::jsd) {
          if (ps > T(0)) d_s += double(ps * (lps - lm));
        } else {
          if (ps > T(0) && pt > T(0)) aux += double(ps * std::exp(lpt - lm));  // sum p_s p_t / m
        }
      }
    }
    if constexpr (K == Divergence::jsd) {
      D = double(beta) * d_t + double(one_minus_beta) * d_s;
      aux = d_s;  // KL(p_s || m)
    } else if constexpr (K == Divergence::skew_kl) {
      D = d_t;
    } else {
      aux = D;
    }
    a.div[r] = D;
  }
  if (!dz) return;

  // Pass 4: gradient. With q = z_s / tau and g = dD/dp_s, dD/dq = p_s (g - <p_s, g>):
  //   forward  g = -p_t / p_s                   -> p_s - p_t
  //   reverse  g = log(p_s / p_t) + 1           -> p_s (log(p_s / p_t) - D)
  //   jsd      g = (1 - beta) log(p_s / m)      -> (1 - beta) p_s (log(p_s / m) - KL(p_s || m))
  //   skew     g = -(1 - beta) p_t / m          -> (1 - beta) p_s (<p_s, p_t / m> - p_t / m)
  // and dD/dz_s = dD/dq / tau. CE adds softmax(z_s) - onehot(y).
  const T kc = has_div ? a.div_coef * inv_tau : T(0);
  const T cc = has_target ? a.ce_coef : T(0);
  const T aux_t = T(aux);
  for (index_t j = 0; j < V; ++j) {
    T g = T(0);
    if (kc != T(0)) {
      const T lps = log_ps(j), lpt = log_pt(j), ps = std::exp(lps);
      T gq;
      if constexpr (K == Divergence::forward_kl) {
        gq = ps - std::exp(lpt);
      } else if constexpr (K == Divergence::reverse_kl) {
        gq = ps > T(0) ? ps * (lps - lpt - aux_t) : T(0);
      } else if constexpr (K == Divergence::jsd) {
        gq = ps > T(0) ? one_minus_beta * ps * (lps - log_mix(lpt, lps) - aux_t) : T(0);
      } else {
        const T pt_over_m = std::exp(lpt) > T(0) ? std::exp(lpt - log_mix(lpt, lps)) : T(0);
        gq = one_minus_beta * ps * (aux_t - pt_over_m);
      }
      g = kc * gq;
    }
    if (cc != T(0)) g += cc * (std::exp(s[j] - ms - l1) - (j == y ? T(1) : T(0)));
    dz[j] = g;
  }
}

}  // namespace detail

/// Per-row divergence, CE, agreement and (optionally) gradient; rows run in parallel and write
/// only their own outputs, so results do not depend on the thread count.
template <class T>
void distill_rows(cpu, const DistillRows<T>& a) {
  auto run = [&](auto row_fn) {
#pragma omp parallel for schedule(static) if (a.R * a.V > 65536)
    for (index_t r = 0; r < a.R; ++r) row_fn(a, r);
  };
  switch (a.divergence) {
    case Divergence::forward_kl: run(detail::distill_row<Divergence::forward_kl, T>); break;
    case Divergence::reverse_kl: run(detail::distill_row<Divergence::reverse_kl, T>); break;
    case Divergence::jsd: run(detail::distill_row<Divergence::jsd, T>); break;
    case Divergence::skew_kl: run(detail::distill_row<Divergence::skew_kl, T>); break;
  }
}

}  // namespace ops
}  // namespace distilx
