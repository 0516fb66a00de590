// Tests of the distillation loss (spec-distillation.md §1–§3): finite-difference gradients of every
// divergence + CE and every alignment policy with padding present; chunked == unchunked against an
// independent reference written here; hand-computed values; the Δ-schedules (clean rule and the
// reference quirk); the composite loss; and configuration errors that name the numbers.
#include <boost/test/unit_test.hpp>

#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "distilx/loss/distillation_loss.hpp"
#include "distilx/testing/gradcheck.hpp"

using namespace distilx;
using distilx::testing::check_gradient;
using distilx::testing::fill_normal;
using Vec = std::vector<double>;

namespace {
constexpr double kGradTol = 1e-6;   // per-tensor norm-relative error vs central differences
constexpr double kExactTol = 1e-12;  // chunked vs unchunked, code vs independent reference (double)

Vec randn(index_t n, Rng& rng, double s = 1.0) {
  Vec v(static_cast<std::size_t>(n));
  fill_normal(v.data(), n, rng, s);
  return v;
}

void expect_grad(const std::string& what, const std::function<double()>& f, Vec& x, const Vec& g) {
  auto r = check_gradient(f, x.data(), g.data(), static_cast<index_t>(x.size()), 128);
  BOOST_TEST_INFO(what << ": rel error " << r.rel_error << " over " << r.checked << " entries");
  BOOST_CHECK_LE(r.rel_error, kGradTol);
  BOOST_CHECK_GT(r.max_abs_fd, 1e-8);  // the check must not be vacuous
  BOOST_TEST_MESSAGE(what << ": finite-difference rel error " << r.rel_error);
}

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-300); }

/// Runs f, expects config_error whose message contains every one of `parts`.
template <class F>
void expect_config_error(F&& f, std::initializer_list<const char*> parts) {
  bool thrown = false;
  try {
    f();
  } catch (const config_error& e) {
    thrown = true;
    const std::string msg = e.what();
    for (const char* p : parts) {
      BOOST_TEST_INFO("message: " << msg);
      BOOST_CHECK(msg.find(p) != std::string::npos);
    }
  }
  BOOST_CHECK(thrown);
}

// ---- vocabulary-sized loss ------------------------------------------------------------------

/// M positions with two padded rows (2, 5; row 5 has a target that must still be ignored) and
/// ignored targets at rows 3 and 6.
struct VocabProblem {
  index_t M = 7, d = 5, d_t = 4, V = 11;
  Vec h_s, E_s, h_t, W_t;
  std::vector<std::int32_t> y{3, 0, -1, -1, 10, 4, -1};
  std::vector<std::uint8_t> mask{1, 1, 0, 1, 1, 0, 1};
  explicit VocabProblem(std::uint64_t seed) {
    Rng rng(seed);
    h_s = randn(M * d, rng);
    E_s = randn(V * d, rng, 0.7);
    h_t = randn(M * d_t, rng);
    W_t = randn(V * d_t, rng, 0.8);
  }
  VocabLossInputs<double> inputs() const {
    VocabLossInputs<double> in;
    in.h_s = h_s.data();
    in.E_s = E_s.data();
    in.h_t = h_t.data();
    in.W_t = W_t.data();
    in.targets = y.data();
    in.mask = mask.data();
    in.M = M;
    in.d = d;
    in.d_t = d_t;
    in.V = V;
    return in;
  }
};

struct RefVocab {
  double kl = 0, ce = 0;
  index_t agree = 0;
  Vec dh_forward;  // d(kl_scale KL + ce_weight CE)/dh_s for the forward KL
};

Vec softmax(const Vec& z, double tau) {
  double mx = z[0];
  for (double v : z) mx = std::max(mx, v);
  Vec p(z.size());
  double s = 0;
  for (std::size_t j = 0; j < z.size(); ++j) s += (p[j] = std::exp((z[j] - mx) / tau));
  for (double& v : p) v /= s;
  return p;
}

/// Unchunked reference from the definitions, in probability space (the code works in log space).
RefVocab reference_vocab(const VocabProblem& P, Divergence div, double beta, double tau, double kl_scale,
                         double ce_weight) {
  RefVocab out;
  out.dh_forward.assign(std::size_t(P.M * P.d), 0.0);
  index_t n_kl = 0, n_ce = 0;
  for (index_t m = 0; m < P.M; ++m)
    if (P.mask[m]) {
      ++n_kl;
      n_ce += P.y[m] >= 0;
    }
  for (index_t m = 0; m < P.M; ++m) {
    if (!P.mask[m]) continue;
    Vec zs(P.V), zt(P.V);
    for (index_t v = 0; v < P.V; ++v) {
      for (index_t k = 0; k < P.d; ++k) zs[v] += P.h_s[m * P.d + k] * P.E_s[v * P.d + k];
      for (index_t k = 0; k < P.d_t; ++k) zt[v] += P.h_t[m * P.d_t + k] * P.W_t[v * P.d_t + k];
    }
    const Vec ps = softmax(zs, tau), pt = softmax(zt, tau), p1 = softmax(zs, 1.0);
    double D = 0;
    for (index_t v = 0; v < P.V; ++v) {
      const double mix = beta * pt[v] + (1 - beta) * ps[v];
      switch (div) {
        case Divergence::forward_kl: D += pt[v] * std::log(pt[v] / ps[v]); break;
        case Divergence::reverse_kl: D += ps[v] * std::log(ps[v] / pt[v]); break;
        case Divergence::jsd: D += beta * pt[v] * std::log(pt[v] / mix) + (1 - beta) * ps[v] * std::log(ps[v] / mix); break;
        case Divergence::skew_kl: D += pt[v] * std::log(pt[v] / mix); break;
      }
    }
    out.kl += D / double(n_kl);
    index_t as = 0, at = 0;
    for (index_t v = 1; v < P.V; ++v) {
      if (zs[v] > zs[as]) as = v;
      if (zt[v] > zt[at]) at = v;
    }
    out.agree += as == at;
    if (P.y[m] >= 0) out.ce += -std::log(p1[P.y[m]]) / double(n_ce);
    for (index_t v = 0; v < P.V; ++v) {
      double g = kl_scale / double(n_kl) * (ps[v] - pt[v]) / tau;
      if (P.y[m] >= 0) g += ce_weight / double(n_ce) * (p1[v] - (v == P.y[m] ? 1.0 : 0.0));
      for (index_t k = 0; k < P.d; ++k) out.dh_forward[m * P.d + k] += g * P.E_s[v * P.d + k];
    }
  }
  return out;
}

struct DivCase {
  Divergence div;
  double beta;
};
const std::array<DivCase, 4> kDivergences{{{Divergence::forward_kl, 0.5},
                                           {Divergence::reverse_kl, 0.5},
                                           {Divergence::jsd, 0.3},
                                           {Divergence::skew_kl, 0.4}}};

// ---- alignment -------------------------------------------------------------------------------

/// B = 3 items of T = 3 positions; item 2 is all padding, item 0 has one padded position.
struct AlignProblem {
  index_t B = 3, S = 3, M = 9, d = 4;
  std::vector<Vec> Hs, Ht;
  std::vector<std::uint8_t> mask{1, 0, 1, 1, 1, 1, 0, 0, 0};
  AlignProblem(index_t L_s, index_t L_t, std::uint64_t seed) {
    Rng rng(seed);
    for (index_t i = 0; i < L_s; ++i) Hs.push_back(randn(M * d, rng));
    for (index_t j = 0; j < L_t; ++j) Ht.push_back(randn(M * d, rng));
  }
  AlignmentInputs<double> inputs() const {
    AlignmentInputs<double> in;
    for (const Vec& h : Hs) in.H_s.push_back(h.data());
    for (const Vec& h : Ht) in.H_t.push_back(h.data());
    in.mask = mask.data();
    in.M = M;
    in.d = d;
    in.d_t = d;
    in.batch = B;
    return in;
  }
};

/// Independent reference of spec §3 (N = L_s * real positions * d).
double reference_alignment(AlignmentPolicy p, const AlignProblem& P) {
  const index_t L_s = index_t(P.Hs.size()), L_t = index_t(P.Ht.size());
  index_t n = 0;
  for (auto x : P.mask) n += x;
  const double sqrt_n = std::sqrt(double(L_s * n * P.d));
  auto group = [&](index_t i, index_t m, index_t k) {
    const index_t g = L_t / L_s, a = i * g, b = i == L_s - 1 ? L_t : (i + 1) * g;
    double s = 0;
    for (index_t j = a; j < b; ++j) s += P.Ht[j][m * P.d + k];
    return s / double(b - a);
  };
  double A = 0;
  if (p == AlignmentPolicy::ratio) {
    for (index_t i = 0; i < L_s; ++i) {
      double sq = 0;
      for (index_t m = 0; m < P.M; ++m)
        if (P.mask[m])
          for (index_t k = 0; k < P.d; ++k) sq += std::pow(group(i, m, k) - P.Hs[i][m * P.d + k], 2);
      A += std::sqrt(sq) / double(L_s);
    }
  } else if (p == AlignmentPolicy::average) {
    double sq = 0;
    for (index_t m = 0; m < P.M; ++m)
      if (P.mask[m])
        for (index_t k = 0; k < P.d; ++k) {
          double s = 0, t = 0;
          for (index_t i = 0; i < L_s; ++i) s += P.Hs[i][m * P.d + k] / double(L_s);
          for (index_t j = 0; j < L_t; ++j) t += P.Ht[j][m * P.d + k] / double(L_t);
          sq += (t - s) * (t - s);
        }
    A = std::sqrt(sq);
  } else if (p == AlignmentPolicy::block_wise) {
    index_t pairs = 0;
    for (index_t l = 0; l < L_s; ++l)
      for (index_t b = 0; b < P.B; ++b) {
        double sq = 0;
        bool any = false;
        for (index_t t = 0; t < P.S; ++t) {
          const index_t m = b * P.S + t;
          if (!P.mask[m]) continue;
          any = true;
          for (index_t k = 0; k < P.d; ++k) sq += std::pow(P.Ht[l][m * P.d + k] - P.Hs[l][m * P.d + k], 2);
        }
        if (any) {
          A += std::sqrt(sq);
          ++pairs;
        }
      }
    A /= double(pairs);
  } else if (p == AlignmentPolicy::cosine) {
    for (index_t i = 0; i < L_s; ++i)
      for (index_t m = 0; m < P.M; ++m) {
        if (!P.mask[m]) continue;
        double st = 0, ss = 0, tt = 0;
        for (index_t k = 0; k < P.d; ++k) {
          const double s = P.Hs[i][m * P.d + k], t = group(i, m, k);
          st += s * t;
          ss += s * s;
          tt += t * t;
        }
        A += (1 - st / std::sqrt(ss * tt)) / double(L_s * n);
      }
  }
  return A / sqrt_n;
}

std::vector<std::pair<AlignmentPolicy, std::array<index_t, 2>>> align_cases() {
  return {{AlignmentPolicy::ratio, {3, 7}},
          {AlignmentPolicy::average, {3, 5}},
          {AlignmentPolicy::block_wise, {3, 3}},
          {AlignmentPolicy::cosine, {3, 7}},
          {AlignmentPolicy::cosine, {2, 2}}};
}

}  // namespace

BOOST_AUTO_TEST_SUITE(loss)

BOOST_AUTO_TEST_CASE(vocab_gradients_each_divergence) {
  for (const DivCase& c : kDivergences)
    for (double tau : {2.0, 1.0}) {
      VocabProblem P(11);
      VocabLossConfig cfg;
      cfg.divergence = c.div;
      cfg.beta = c.beta;
      cfg.chunk_rows = 3;
      VocabLoss<double> loss(cfg);
      const double kl_scale = 0.2 * tau * tau, ce_weight = 0.8;
      auto in = P.inputs();
      auto f = [&] {
        auto r = loss.compute(in, tau, kl_scale, ce_weight, nullptr, false);
        return kl_scale * r.kl + ce_weight * r.ce;
      };
      Vec dh(std::size_t(P.M * P.d), 7.0);  // pre-filled: padded rows must be overwritten with 0
      auto r = loss.compute(in, tau, kl_scale, ce_weight, dh.data(), true);
      BOOST_CHECK_EQUAL(r.positions, 5);
      BOOST_CHECK_EQUAL(r.targets, 3);
      BOOST_CHECK_GT(r.kl, 0.0);
      expect_grad(std::string("dh_s ") + to_string(c.div) + " tau " + std::to_string(tau), f, P.h_s, dh);
      for (index_t m : {2, 5})
        for (index_t k = 0; k < P.d; ++k) BOOST_CHECK_EQUAL(dh[m * P.d + k], 0.0);

      // Padded rows do not change the loss: perturb their hidden states and targets.
      const double before = f();
      for (index_t m : {2, 5}) {
        for (index_t k = 0; k < P.d; ++k) P.h_s[m * P.d + k] += 3.0;
        for (index_t k = 0; k < P.d_t; ++k) P.h_t[m * P.d_t + k] -= 2.0;
        P.y[m] = 1;
      }
      BOOST_CHECK_EQUAL(f(), before);
    }
}

BOOST_AUTO_TEST_CASE(vocab_chunked_matches_unchunked) {
  VocabProblem P(12);
  const double tau = 1.7, kl_scale = 0.3 * tau * tau, ce_weight = 0.7;
  for (const DivCase& c : kDivergences) {
    const RefVocab ref = reference_vocab(P, c.div, c.beta, tau, kl_scale, ce_weight);
    Vec dh_full(std::size_t(P.M * P.d));
    VocabLossResult full;
    double worst_dh = 0;
    for (index_t chunk : {P.M, index_t(1), index_t(3), index_t(4), index_t(100)}) {
      VocabLoss<double> loss({c.div, c.beta, chunk});
      Vec dh(std::size_t(P.M * P.d));
      auto r = loss.compute(P.inputs(), tau, kl_scale, ce_weight, dh.data(), true);
      BOOST_TEST_INFO(to_string(c.div) << " chunk " << chunk);
      BOOST_CHECK_LE(rel(r.kl, ref.kl), kExactTol);
      BOOST_CHECK_LE(rel(r.ce, ref.ce), kExactTol);
      BOOST_CHECK_EQUAL(r.top1_agree, ref.agree);
      if (chunk == P.M) {
        full = r;
        dh_full = dh;
      } else {
        BOOST_CHECK_LE(rel(r.kl, full.kl), kExactTol);
        worst_dh = std::max(worst_dh, relative_error(dh.data(), dh_full.data(), P.M * P.d));
        BOOST_CHECK_LE(relative_error(dh.data(), dh_full.data(), P.M * P.d), kExactTol);
      }
      if (c.div == Divergence::forward_kl) {
        BOOST_TEST_MESSAGE("forward_kl chunk " << chunk << ": dh_s vs reference gradient "
                                               << relative_error(dh.data(), ref.dh_forward.data(), P.M * P.d));
        BOOST_CHECK_LE(relative_error(dh.data(), ref.dh_forward.data(), P.M * P.d), kExactTol);
      }
      // Evaluation path: same values, no gradient.
      auto e = loss.compute(P.inputs(), tau, kl_scale, ce_weight, nullptr, false);
      BOOST_CHECK_EQUAL(e.kl, r.kl);
      BOOST_CHECK_EQUAL(e.ce, r.ce);
    }
    BOOST_TEST_MESSAGE(to_string(c.div) << ": |kl - ref| / ref = " << rel(full.kl, ref.kl)
                                        << ", |ce - ref| / ref = " << rel(full.ce, ref.ce)
                                        << ", dh_s chunked vs unchunked " << worst_dh);
  }
}

BOOST_AUTO_TEST_CASE(vocab_parallel_rows_match_serial) {
  // V large enough that a 7-row chunk takes the OpenMP path and a 3-row chunk does not.
  VocabProblem P(17);
  P.V = 20000;
  Rng rng(18);
  P.E_s = randn(P.V * P.d, rng, 0.7);
  P.W_t = randn(P.V * P.d_t, rng, 0.8);
  P.y[4] = 19999;
  for (const DivCase& c : kDivergences) {
    VocabLoss<double> serial({c.div, c.beta, 3}), parallel({c.div, c.beta, 7});
    Vec d1(std::size_t(P.M * P.d)), d2(d1.size());
    auto r1 = serial.compute(P.inputs(), 2.0, 0.8, 0.2, d1.data(), true);
    auto r2 = parallel.compute(P.inputs(), 2.0, 0.8, 0.2, d2.data(), true);
    BOOST_TEST_INFO(to_string(c.div));
    BOOST_CHECK_LE(rel(r2.kl, r1.kl), kExactTol);
    BOOST_CHECK_LE(rel(r2.ce, r1.ce), kExactTol);
    BOOST_CHECK_EQUAL(r2.top1_agree, r1.top1_agree);
    BOOST_CHECK_LE(relative_error(d2.data(), d1.data(), P.M * P.d), kExactTol);
  }
}

BOOST_AUTO_TEST_CASE(vocab_precomputed_teacher_logits_and_ce_only) {
  VocabProblem P(13);
  Vec zt(std::size_t(P.M * P.V));
  for (index_t m = 0; m < P.M; ++m)
    for (index_t v = 0; v < P.V; ++v)
      for (index_t k = 0; k < P.d_t; ++k) zt[m * P.V + v] += P.h_t[m * P.d_t + k] * P.W_t[v * P.d_t + k];
  VocabLoss<double> loss({Divergence::jsd, 0.5, 2});
  Vec dh1(std::size_t(P.M * P.d)), dh2(dh1.size());
  auto in = P.inputs();
  auto r1 = loss.compute(in, 2.0, 0.5, 0.5, dh1.data(), true);
  in.h_t = nullptr;
  in.W_t = nullptr;
  in.z_t = zt.data();
  auto r2 = loss.compute(in, 2.0, 0.5, 0.5, dh2.data(), true);
  BOOST_CHECK_LE(rel(r2.kl, r1.kl), kExactTol);
  BOOST_CHECK_LE(relative_error(dh2.data(), dh1.data(), P.M * P.d), kExactTol);
  // No teacher at all: CE only (a model's own perplexity), divergence and agreement 0.
  in.z_t = nullptr;
  auto r3 = loss.compute(in, 2.0, 0.5, 0.5, nullptr, false);
  BOOST_CHECK_EQUAL(r3.kl, 0.0);
  BOOST_CHECK_EQUAL(r3.top1_agree, 0);
  BOOST_CHECK_LE(rel(r3.ce, r1.ce), kExactTol);
}

BOOST_AUTO_TEST_CASE(vocab_exact_two_positions) {
  // d = V = 3, E_s = I so z_s = h_s; teacher logits given directly. Logits are logs of small
  // integers so the probabilities are simple fractions.
  const Vec E{1, 0, 0, 0, 1, 0, 0, 0, 1};
  const Vec hs{0, std::log(2.0), 0,  // p_s = [1/4, 1/2, 1/4]
               0, 0, 0};             // p_s = [1/3, 1/3, 1/3]
  const Vec zt{0, 0, std::log(2.0),  // p_t = [1/4, 1/4, 1/2]
               std::log(2.0), 0, 0}; // p_t = [1/2, 1/4, 1/4]
  const std::vector<std::int32_t> y{1, 2};
  VocabLossInputs<double> in;
  in.h_s = hs.data();
  in.E_s = E.data();
  in.z_t = zt.data();
  in.targets = y.data();
  in.M = 2;
  in.d = 3;
  in.V = 3;
  auto run = [&](Divergence dv, double beta, double tau) {
    VocabLoss<double> loss({dv, beta, 1});
    return loss.compute(in, tau, 1.0, 1.0, nullptr, false);
  };
  const double ln2 = std::log(2.0);
  // Forward KL: row 0 = 1/4 ln(1/2) + 1/2 ln 2 = ln2 / 4; row 1 = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8).
  const double kl = (ln2 / 4 + 0.5 * std::log(9.0 / 8.0)) / 2;
  // CE: -ln(1/2) and -ln(1/3).
  const double ce = (ln2 + std::log(3.0)) / 2;
  auto f = run(Divergence::forward_kl, 0.5, 1.0);
  BOOST_CHECK_LE(rel(f.kl, kl), 1e-14);
  BOOST_CHECK_LE(rel(f.ce, ce), 1e-14);
  // argmax: row 0 student 1 vs teacher 2; row 1 student ties -> first index 0, teacher 0.
  BOOST_CHECK_EQUAL(f.top1_agree, 1);
  BOOST_CHECK_EQUAL(f.top1(), 0.5);
  // Reverse KL: row 0 = 1/2 ln 2 + 1/4 ln(1/2) = ln2 / 4; row 1 = 1/3 ln(2/3) + 2/3 ln(4/3).
  const double rkl = (ln2 / 4 + std::log(2.0 / 3.0) / 3 + 2 * std::log(4.0 / 3.0) / 3) / 2;
  BOOST_CHECK_LE(rel(run(Divergence::reverse_kl, 0.5, 1.0).kl, rkl), 1e-14);
  // JSD(1/2): row 0, m = [1/4, 3/8, 3/8]: 1/4 ln(2/3) + 1/2 ln(4/3);
  // row 1, m = [5/12, 7/24, 7/24]: 1/2 (1/2 ln(6/5) + 1/2 ln(6/7)) + 1/2 (1/3 ln(4/5) + 2/3 ln(8/7)).
  const double j0 = std::log(2.0 / 3.0) / 4 + std::log(4.0 / 3.0) / 2;
  const double j1 = 0.5 * (0.5 * std::log(6.0 / 5.0) + 0.5 * std::log(6.0 / 7.0)) +
                    0.5 * (std::log(4.0 / 5.0) / 3 + 2 * std::log(8.0 / 7.0) / 3);
  BOOST_CHECK_LE(rel(run(Divergence::jsd, 0.5, 1.0).kl, (j0 + j1) / 2), 1e-14);
  // tau = 2: row 0 p_s = [1, sqrt2, 1] / (2 + sqrt2), p_t = [1, 1, sqrt2] / (2 + sqrt2);
  // KL = sqrt2 / (2 + sqrt2) ln sqrt2 + 1 / (2 + sqrt2) ln(1 / sqrt2) = (sqrt2 - 1) / (2 + sqrt2) ln2 / 2.
  // row 1 p_s = 1/3 each, p_t = [sqrt2, 1, 1] / (2 + sqrt2): KL = ln 3 - H(p_t)... written out:
  const double r2 = std::sqrt(2.0), z = 2 + r2;
  const double k0 = (r2 - 1) / z * ln2 / 2;
  const double k1 = r2 / z * std::log(3 * r2 / z) + 2 / z * std::log(3 / z);
  BOOST_CHECK_LE(rel(run(Divergence::forward_kl, 0.5, 2.0).kl, (k0 + k1) / 2), 1e-14);
  // CE stays at tau = 1 whatever the divergence's temperature.
  BOOST_CHECK_LE(rel(run(Divergence::forward_kl, 0.5, 2.0).ce, ce), 1e-14);
}

BOOST_AUTO_TEST_CASE(vocab_zero_when_student_equals_teacher) {
  VocabProblem P(14);
  auto in = P.inputs();
  in.h_t = P.h_s.data();
  in.W_t = P.E_s.data();
  in.d_t = P.d;
  for (const DivCase& c : kDivergences) {
    VocabLoss<double> loss({c.div, c.beta, 3});
    Vec dh(std::size_t(P.M * P.d), 1.0);
    auto r = loss.compute(in, 1.5, 1.0, 0.0, dh.data(), true);  // divergence only
    BOOST_TEST_INFO(to_string(c.div));
    BOOST_CHECK_LE(std::abs(r.kl), 1e-15);
    BOOST_CHECK_LE(max_abs(dh.data(), P.M * P.d), 1e-15);
    BOOST_CHECK_EQUAL(r.top1_agree, r.positions);
  }
  // The generalised JSD degenerates to 0 at beta = 0 and beta = 1 (m equals one side).
  VocabProblem Q(15);
  for (double beta : {0.0, 1.0}) {
    VocabLoss<double> loss({Divergence::jsd, beta, 4});
    BOOST_CHECK_LE(std::abs(loss.compute(Q.inputs(), 1.0, 1.0, 0.0, nullptr, false).kl), 1e-15);
  }
}

BOOST_AUTO_TEST_CASE(vocab_float_matches_double) {
  VocabProblem P(16);
  auto cast = [](const Vec& v) { return std::vector<float>(v.begin(), v.end()); };
  const auto hs = cast(P.h_s), E = cast(P.E_s), ht = cast(P.h_t), W = cast(P.W_t);
  VocabLossInputs<float> in;
  in.h_s = hs.data();
  in.E_s = E.data();
  in.h_t = ht.data();
  in.W_t = W.data();
  in.targets = P.y.data();
  in.mask = P.mask.data();
  in.M = P.M;
  in.d = P.d;
  in.d_t = P.d_t;
  in.V = P.V;
  VocabLoss<float> lf({Divergence::forward_kl, 0.5, 3});
  VocabLoss<double> ld({Divergence::forward_kl, 0.5, 3});
  std::vector<float> dhf(std::size_t(P.M * P.d));
  Vec dhd(dhf.size());
  auto rf = lf.compute(in, 2.0, 0.8, 0.8, dhf.data(), true);
  auto rd = ld.compute(P.inputs(), 2.0, 0.8, 0.8, dhd.data(), true);
  BOOST_CHECK_LE(rel(rf.kl, rd.kl), 1e-4);
  BOOST_CHECK_LE(rel(rf.ce, rd.ce), 1e-5);
  BOOST_CHECK_LE(relative_error(dhf.data(), dhd.data(), P.M * P.d), 1e-5);
}

BOOST_AUTO_TEST_CASE(alignment_gradients_each_policy) {
  for (const auto& [policy, L] : align_cases()) {
    AlignProblem P(L[0], L[1], 21 + L[0] + L[1]);
    AlignmentLoss<double> al(policy);
    const double scale = 0.7;
    auto f = [&] { return al.compute(P.inputs()).value; };
    std::vector<Vec> g(std::size_t(L[0]), Vec(std::size_t(P.M * P.d), 5.0));
    std::vector<double*> gp;
    for (Vec& x : g) gp.push_back(x.data());
    const auto res = al.compute(P.inputs(), &gp, scale);
    BOOST_CHECK_EQUAL(res.positions, 5);
    BOOST_CHECK_EQUAL(res.n_elements, double(L[0] * 5 * P.d));
    for (Vec& x : g)
      for (double& v : x) v /= scale;  // compare dA/dH_s itself
    for (index_t i = 0; i < L[0]; ++i) {
      expect_grad(std::string("dH_s[") + std::to_string(i) + "] " + to_string(policy), f, P.Hs[std::size_t(i)],
                  g[std::size_t(i)]);
      for (index_t m = 0; m < P.M; ++m)
        if (!P.mask[m])
          for (index_t k = 0; k < P.d; ++k) BOOST_CHECK_EQUAL(g[std::size_t(i)][m * P.d + k], 0.0);
    }
    // Padded rows of either side do not change A.
    const double before = f();
    for (index_t m = 0; m < P.M; ++m)
      if (!P.mask[m])
        for (index_t k = 0; k < P.d; ++k) {
          for (Vec& h : P.Hs) h[m * P.d + k] += 1.5;
          for (Vec& h : P.Ht) h[m * P.d + k] -= 2.5;
        }
    BOOST_CHECK_EQUAL(f(), before);
  }
}

BOOST_AUTO_TEST_CASE(alignment_matches_reference) {
  for (const auto& [policy, L] : align_cases()) {
    AlignProblem P(L[0], L[1], 31 + L[0] * L[1]);
    AlignmentLoss<double> al(policy);
    const double a = al.compute(P.inputs()).value, r = reference_alignment(policy, P);
    BOOST_TEST_INFO(to_string(policy) << " L_s " << L[0] << " L_t " << L[1] << ": " << a << " vs " << r);
    BOOST_CHECK_LE(rel(a, r), kExactTol);
  }
  // By hand: one block, one position, d = 2, H_s = (3, 0), H_t = (0, 4); N = 2.
  const Vec hs{3, 0}, ht{0, 4};
  AlignmentInputs<double> in;
  in.H_s = {hs.data()};
  in.H_t = {ht.data()};
  in.M = 1;
  in.d = in.d_t = 2;
  for (auto p : {AlignmentPolicy::ratio, AlignmentPolicy::average, AlignmentPolicy::block_wise})
    BOOST_CHECK_LE(rel(AlignmentLoss<double>(p).compute(in).value, 5 / std::sqrt(2.0)), 1e-15);
  BOOST_CHECK_LE(rel(AlignmentLoss<double>(AlignmentPolicy::cosine).compute(in).value, 1 / std::sqrt(2.0)), 1e-15);
  // Ratio grouping: 28 teacher layers over 6 blocks -> 4 layers each, the last block 8.
  BOOST_CHECK((AlignmentLoss<double>::ratio_group(0, 6, 28) == std::pair<index_t, index_t>{0, 4}));
  BOOST_CHECK((AlignmentLoss<double>::ratio_group(5, 6, 28) == std::pair<index_t, index_t>{20, 28}));
}

BOOST_AUTO_TEST_CASE(alignment_zero_difference_has_zero_gradient) {
  // ||0||'s gradient is defined as 0 (not NaN); also the cosine of a zero vector.
  for (auto p : {AlignmentPolicy::ratio, AlignmentPolicy::average, AlignmentPolicy::block_wise,
                 AlignmentPolicy::cosine}) {
    AlignProblem P(2, 2, 41);
    P.Ht = P.Hs;
    if (p == AlignmentPolicy::cosine)
      for (double& v : P.Hs[0]) v = 0;
    Vec g0(std::size_t(P.M * P.d), 9.0), g1(g0);
    std::vector<double*> gp{g0.data(), g1.data()};
    const double a = AlignmentLoss<double>(p).compute(P.inputs(), &gp).value;
    BOOST_TEST_INFO(to_string(p));
    if (p != AlignmentPolicy::cosine) BOOST_CHECK_EQUAL(a, 0.0);
    BOOST_CHECK_EQUAL(max_abs(g0.data(), P.M * P.d), 0.0);
    BOOST_CHECK(std::isfinite(max_abs(g1.data(), P.M * P.d)));
  }
}

BOOST_AUTO_TEST_CASE(alignment_bad_configuration) {
  AlignProblem P(2, 3, 51);
  expect_config_error([&] { AlignmentLoss<double>(AlignmentPolicy::block_wise).compute(P.inputs()); },
                      {"block_wise", "L_s = 2", "L_t = 3"});
  expect_config_error([] { AlignmentLoss<double>::check_config(AlignmentPolicy::ratio, 6, 4, 8, 8); },
                      {"L_s = 6", "L_t = 4"});
  expect_config_error([] { AlignmentLoss<double>::check_config(AlignmentPolicy::average, 2, 3, 64, 48); },
                      {"d = 64", "d_t = 48"});
  BOOST_CHECK_NO_THROW(AlignmentLoss<double>::check_config(AlignmentPolicy::ratio, 6, 28, 1536, 1536));
  BOOST_CHECK(parse_alignment_policy("cosine") == AlignmentPolicy::cosine);
  expect_config_error([] { parse_alignment_policy("frobenius"); }, {"frobenius"});
}

BOOST_AUTO_TEST_CASE(delta_schedule_clean_rule) {
  const DeltaSchedule s{2.0, 1.0, 0.01};
  BOOST_CHECK_EQUAL(s.value(0, 0), 2.0);  // 1 + 1 / (1 + ln 1)
  BOOST_CHECK_LE(rel(s.value(0, 1), 1.0 + 1.0 / (1.0 + std::log(2.0))), 1e-15);
  BOOST_CHECK_LE(rel(s.value(0, 9), 1.0 + 1.0 / (1.0 + std::log(10.0))), 1e-15);
  // Epoch decay of the start value: 2 -> 1.98 -> 1.9602.
  BOOST_CHECK_LE(rel(s.value(1, 0), 1.98), 1e-15);
  BOOST_CHECK_LE(rel(s.value(1, 4), 1.0 + 0.98 / (1.0 + std::log(5.0))), 1e-15);
  BOOST_CHECK_LE(rel(s.value(2, 0), 1.9602), 1e-15);
  // Monotone within an epoch, never below the floor.
  for (index_t k = 1; k < 1000; k += 37) BOOST_CHECK_LT(s.value(0, k), s.value(0, k - 1));
  BOOST_CHECK_GT(s.value(0, 1000000), 1.0);
  // Floor reached: 1.05 -> max(0.525, 1) = 1 from epoch 1 on, at every step.
  const DeltaSchedule fl{1.05, 1.0, 0.5};
  BOOST_CHECK_EQUAL(fl.start_value(1), 1.0);
  BOOST_CHECK_EQUAL(fl.value(1, 0), 1.0);
  BOOST_CHECK_EQUAL(fl.value(7, 123), 1.0);
  // A rising schedule (reference config w_al 0.4 -> 0.5): start value jumps to the "floor".
  const DeltaSchedule up{0.4, 0.5, 0.01};
  BOOST_CHECK_EQUAL(up.value(0, 0), 0.4);
  BOOST_CHECK_LE(rel(up.value(0, 2), 0.5 - 0.1 / (1.0 + std::log(3.0))), 1e-15);
  BOOST_CHECK_EQUAL(up.value(1, 5), 0.5);
}

BOOST_AUTO_TEST_CASE(delta_schedule_reference_quirk) {
  DeltaSchedule s{2.0, 1.0, 0.01, true, 10};
  BOOST_CHECK_EQUAL(s.value(0, 0), 2.0);
  BOOST_CHECK_EQUAL(s.value(0, 1), 2.0);  // steps 0 and 1 both v0
  BOOST_CHECK_LE(rel(s.value(0, 2), 1.0 + 1.0 / (1.0 + std::log(2.0))), 1e-15);
  BOOST_CHECK_LE(rel(s.value(0, 9), 1.0 + 1.0 / (1.0 + std::log(9.0))), 1e-15);
  // Step 0 of epoch 1 keeps the value set at the end of epoch 0's last step (counter 9: 1 + ln 10).
  BOOST_CHECK_LE(rel(s.value(1, 0), 1.0 + 1.0 / (1.0 + std::log(10.0))), 1e-15);
  BOOST_CHECK_LE(rel(s.value(1, 1), 1.98), 1e-15);
  BOOST_CHECK_LE(rel(s.value(1, 3), 1.0 + 0.98 / (1.0 + std::log(3.0))), 1e-15);
  s.steps_per_epoch = 0;
  expect_config_error([&] { s.value(1, 0); }, {"steps_per_epoch", "epoch 1"});
}

BOOST_AUTO_TEST_CASE(fixed_schedule_and_scalar_schedule) {
  const ScalarSchedule f = FixedSchedule{0.5};
  BOOST_CHECK(f.kind == ScheduleKind::fixed);
  BOOST_CHECK_EQUAL(f.value(0, 0), 0.5);
  BOOST_CHECK_EQUAL(f.value(9, 999), 0.5);
  ScalarSchedule d = DeltaSchedule{0.2, 0.1, 0.01};
  BOOST_CHECK(d.kind == ScheduleKind::delta);
  BOOST_CHECK_EQUAL(d.value(0, 0), 0.2);
  // Plain fields: a copy (what a checkpoint restores) gives the same values.
  ScalarSchedule restored;
  restored.kind = d.kind;
  restored.delta.v0 = d.delta.v0;
  restored.delta.floor = d.delta.floor;
  restored.delta.delta = d.delta.delta;
  BOOST_CHECK_EQUAL(restored.value(3, 17), d.value(3, 17));
  expect_config_error([] { DeltaSchedule{1.0, 0.5, 1.5}.validate("tau"); }, {"tau", "1.5"});
}

BOOST_AUTO_TEST_CASE(composite_total_metrics_and_gradients) {
  for (bool additive : {false, true})
    for (auto policy : {AlignmentPolicy::ratio, AlignmentPolicy::cosine}) {
      VocabProblem P(61);
      P.d_t = P.d;  // alignment pairs widths
      Rng rng(62);
      P.h_t = randn(P.M * P.d, rng);
      P.W_t = randn(P.V * P.d, rng, 0.8);
      const index_t L_s = 2, L_t = 5;
      std::vector<Vec> Hs, Ht;
      for (index_t i = 0; i < L_s; ++i) Hs.push_back(randn(P.M * P.d, rng));
      for (index_t j = 0; j < L_t; ++j) Ht.push_back(randn(P.M * P.d, rng));

      DistillationLossConfig cfg;
      cfg.alignment = policy;
      cfg.additive_alignment_weight = additive;
      cfg.alignment_weight = DeltaSchedule{0.4, 0.1, 0.01};  // large enough to matter in the check
      cfg.chunk_rows = 3;
      DeltaDistillationLoss<double> loss(cfg);
      loss.check_shapes(L_s, L_t, P.d, P.d);

      DistillationInputs<double> in;
      in.vocab = P.inputs();
      for (const Vec& h : Hs) in.H_s.push_back(h.data());
      for (const Vec& h : Ht) in.H_t.push_back(h.data());
      in.batch = 1;

      const index_t epoch = 1, step = 3;
      const LossWeights w = loss.weights(epoch, step);
      BOOST_CHECK_LE(rel(w.tau, 1.0 + 0.98 / (1.0 + std::log(4.0))), 1e-15);
      BOOST_CHECK_LE(rel(w.w_kl, 0.1 + (0.2 * 0.99 - 0.1) / (1.0 + std::log(4.0))), 1e-15);
      BOOST_CHECK_LE(rel(w.w_ce, 1.0 - w.w_kl - (additive ? w.w_al : 0.0)), 1e-15);

      DistillationGrads<double> g;
      Vec dh(std::size_t(P.M * P.d));
      std::vector<Vec> dH(std::size_t(L_s), Vec(std::size_t(P.M * P.d)));
      g.dh_s = dh.data();
      for (Vec& x : dH) g.dH_s.push_back(x.data());
      const DistillationMetrics mt = loss.compute(in, epoch, step, g);

      // Components recomputed separately.
      VocabLoss<double> vl(cfg.vocab());
      const auto v = vl.compute(in.vocab, w.tau, 0.0, 0.0, nullptr, false);
      AlignmentInputs<double> ai;
      ai.H_s = in.H_s;
      ai.H_t = in.H_t;
      ai.mask = in.vocab.mask;
      ai.M = P.M;
      ai.d = ai.d_t = P.d;
      const double A = AlignmentLoss<double>(policy).compute(ai).value;
      BOOST_CHECK(mt.alignment_active);
      BOOST_CHECK_LE(rel(mt.kl, v.kl), kExactTol);
      BOOST_CHECK_LE(rel(mt.ce, v.ce), kExactTol);
      BOOST_CHECK_LE(rel(mt.alignment, A), kExactTol);
      BOOST_CHECK_LE(rel(mt.total, w.w_kl * w.tau * w.tau * v.kl + w.w_al * A + w.w_ce * v.ce), kExactTol);
      BOOST_CHECK_LE(rel(mt.perplexity, std::exp(v.ce)), kExactTol);
      BOOST_CHECK_EQUAL(mt.top1, v.top1());

      auto f = [&] { return loss.compute(in, w, DistillationGrads<double>{}, false).total; };
      const std::string tag = std::string(to_string(policy)) + (additive ? " additive" : "");
      expect_grad("composite dh_s " + tag, f, P.h_s, dh);
      for (index_t i = 0; i < L_s; ++i)
        expect_grad("composite dH_s[" + std::to_string(i) + "] " + tag, f, Hs[std::size_t(i)], dH[std::size_t(i)]);
    }
}

BOOST_AUTO_TEST_CASE(composite_skips_inactive_alignment) {
  VocabProblem P(71);
  P.d_t = P.d;
  Rng rng(72);
  P.h_t = randn(P.M * P.d, rng);
  P.W_t = randn(P.V * P.d, rng);
  Vec h0 = randn(P.M * P.d, rng);
  for (bool no_policy : {true, false}) {
    DistillationLossConfig cfg;
    if (no_policy) cfg.alignment = AlignmentPolicy::none;
    else cfg.alignment_weight = FixedSchedule{0.0};
    DeltaDistillationLoss<double> loss(cfg);
    DistillationInputs<double> in;
    in.vocab = P.inputs();
    in.H_s = {h0.data()};
    in.H_t = {};  // not even looked at
    Vec dh(std::size_t(P.M * P.d)), dH(std::size_t(P.M * P.d), 3.0);
    DistillationGrads<double> g;
    g.dh_s = dh.data();
    g.dH_s = {dH.data()};
    const auto mt = loss.compute(in, 0, 0, g);
    BOOST_CHECK(!mt.alignment_active);
    BOOST_CHECK_EQUAL(mt.alignment, 0.0);
    BOOST_CHECK_EQUAL(mt.w_al, 0.0);
    BOOST_CHECK_EQUAL(max_abs(dH.data(), P.M * P.d), 0.0);
    BOOST_CHECK_LE(rel(mt.w_ce, 0.8), 1e-15);  // 1 - w_kl(0, 0) = 1 - 0.2
    BOOST_CHECK_LE(rel(mt.total, 0.2 * 4.0 * mt.kl + 0.8 * mt.ce), 1e-15);
  }
}

BOOST_AUTO_TEST_CASE(bad_configuration_errors) {
  VocabProblem P(81);
  VocabLoss<double> vl;
  expect_config_error([&] { vl.compute(P.inputs(), -0.5, 1.0, 1.0, nullptr, false); }, {"tau", "-0.5"});
  expect_config_error([] { VocabLoss<double>({Divergence::jsd, 1.5, 8}); }, {"beta", "1.5"});
  expect_config_error([] { VocabLoss<double>({Divergence::skew_kl, -0.25, 8}); }, {"beta", "-0.25"});
  expect_config_error([] { VocabLoss<double>({Divergence::forward_kl, 0.5, 0}); }, {"chunk_rows", "0"});
  DistillationLossConfig c;
  c.tau = FixedSchedule{-2.0};
  expect_config_error([&] { DeltaDistillationLoss<double> l(c); }, {"tau", "-2"});
  c = {};
  c.tau = DeltaSchedule{2.0, -0.7, 0.01};
  expect_config_error([&] { DeltaDistillationLoss<double> l(c); }, {"tau", "-0.7"});
  c = {};
  c.beta = 2.5;
  c.divergence = Divergence::jsd;
  expect_config_error([&] { DeltaDistillationLoss<double> l(c); }, {"beta", "2.5"});
  c = {};
  c.kl_weight = DeltaSchedule{0.7, 0.2, 0.01};
  c.alignment_weight = FixedSchedule{0.4};
  c.additive_alignment_weight = true;
  expect_config_error([&] { DeltaDistillationLoss<double> l(c); }, {"w_ce", "0.7", "0.4"});
  c = {};
  c.alignment = AlignmentPolicy::block_wise;
  DeltaDistillationLoss<double> bw(c);
  expect_config_error([&] { bw.check_shapes(6, 28, 1536, 1536); }, {"L_s = 6", "L_t = 28"});
  expect_config_error([] { parse_divergence("kl"); }, {"kl"});
  BOOST_CHECK(parse_divergence("reverse_kl") == Divergence::reverse_kl);
  // Out-of-vocabulary targets are bad input too.
  P.y[0] = std::int32_t(P.V);
  BOOST_CHECK_THROW(vl.compute(P.inputs(), 1.0, 1.0, 1.0, nullptr, false), error);
}

BOOST_AUTO_TEST_SUITE_END()
