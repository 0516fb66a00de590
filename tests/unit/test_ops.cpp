// Finite-difference gradient checks (double) for every CPU op with a backward:
// linear, headwise linear, causal conv1d, LayerNorm, MultiHeadLayerNorm (group
// norm), GELU, SiLU, log-sigmoid, gated GELU, the frozen LM head (input grad),
// and exact checks for the forward semantics (conv causality, 1+w scale).
#include <boost/test/unit_test.hpp>

#include <functional>
#include <vector>

#include "distilx/ops/activations.hpp"
#include "distilx/ops/conv1d.hpp"
#include "distilx/ops/elementwise.hpp"
#include "distilx/ops/embedding.hpp"
#include "distilx/ops/linear.hpp"
#include "distilx/ops/norm.hpp"
#include "distilx/testing/gradcheck.hpp"

using namespace distilx;
using distilx::testing::check_gradient;
using distilx::testing::dot;
using distilx::testing::fill_normal;
using V = std::vector<double>;

namespace {
constexpr double kTol = 1e-6;  // max per-tensor norm-relative error vs central differences

V randn(index_t n, Rng& rng, double s = 1.0) {
  V v(static_cast<std::size_t>(n));
  fill_normal(v.data(), n, rng, s);
  return v;
}
void expect_grad(const char* what, const std::function<double()>& f, V& x, const V& g) {
  auto r = check_gradient(f, x.data(), g.data(), static_cast<index_t>(x.size()), 96);
  BOOST_TEST_INFO(what << ": rel error " << r.rel_error << " over " << r.checked << " entries");
  BOOST_CHECK_LE(r.rel_error, kTol);
  BOOST_CHECK_GT(r.max_abs_fd, 1e-8);  // the check must not be vacuous
}
}  // namespace

BOOST_AUTO_TEST_SUITE(cpu_ops)

BOOST_AUTO_TEST_CASE(linear_gradients) {
  Rng rng(1);
  for (auto [M, K, N] : std::vector<std::array<index_t, 3>>{{1, 3, 2}, {5, 7, 4}, {6, 16, 9}}) {
    V x = randn(M * K, rng), W = randn(N * K, rng), b = randn(N, rng), G = randn(M * N, rng);
    V y(M * N);
    auto loss = [&] {
      ops::linear_forward(cpu{}, y.data(), x.data(), W.data(), b.data(), M, K, N);
      return dot(y.data(), G.data(), M * N);
    };
    V dx(M * K), dW(N * K, 0.0), db(N, 0.0);
    ops::linear_backward(cpu{}, dx.data(), dW.data(), db.data(), G.data(), x.data(), W.data(), M, K, N);
    expect_grad("linear dx", loss, x, dx);
    expect_grad("linear dW", loss, W, dW);
    expect_grad("linear db", loss, b, db);
  }
}

BOOST_AUTO_TEST_CASE(linear_forward_matches_naive) {
  Rng rng(2);
  const index_t M = 3, K = 5, N = 4;
  V x = randn(M * K, rng), W = randn(N * K, rng), b = randn(N, rng), y(M * N);
  ops::linear_forward(cpu{}, y.data(), x.data(), W.data(), b.data(), M, K, N);
  for (index_t m = 0; m < M; ++m)
    for (index_t n = 0; n < N; ++n) {
      double s = b[n];
      for (index_t k = 0; k < K; ++k) s += x[m * K + k] * W[n * K + k];
      BOOST_CHECK_CLOSE(y[m * N + n], s, 1e-10);
    }
}

BOOST_AUTO_TEST_CASE(headwise_gradients_and_block_structure) {
  Rng rng(3);
  const index_t M = 4, P = 3, I = 2, O = 5;
  V x = randn(M * P * I, rng), W = randn(P * O * I, rng), G = randn(M * P * O, rng), y(M * P * O);
  auto loss = [&] {
    ops::headwise_forward(cpu{}, y.data(), x.data(), W.data(), M, P, I, O);
    return dot(y.data(), G.data(), M * P * O);
  };
  loss();
  // Block-diagonal: y[m,p,o] = sum_i x[m,p,i] W[p,o,i].
  for (index_t m = 0; m < M; ++m)
    for (index_t p = 0; p < P; ++p)
      for (index_t o = 0; o < O; ++o) {
        double s = 0;
        for (index_t i = 0; i < I; ++i) s += x[(m * P + p) * I + i] * W[(p * O + o) * I + i];
        BOOST_CHECK_CLOSE(y[(m * P + p) * O + o], s, 1e-10);
      }
  V dx(M * P * I), dW(P * O * I, 0.0);
  ops::headwise_backward(cpu{}, dx.data(), dW.data(), G.data(), x.data(), W.data(), M, P, I, O);
  expect_grad("headwise dx", loss, x, dx);
  expect_grad("headwise dW", loss, W, dW);
}

BOOST_AUTO_TEST_CASE(causal_conv1d_gradients_and_causality) {
  Rng rng(4);
  for (auto [B, S, F, K] : std::vector<std::array<index_t, 4>>{{2, 7, 3, 4}, {1, 1, 2, 4}, {2, 3, 2, 1}}) {
    V x = randn(B * S * F, rng), W = randn(F * K, rng), b = randn(F, rng), G = randn(B * S * F, rng), y(B * S * F);
    auto loss = [&] {
      ops::causal_conv1d_forward(cpu{}, y.data(), x.data(), W.data(), b.data(), B, S, F, K);
      return dot(y.data(), G.data(), B * S * F);
    };
    V dx(B * S * F), dW(F * K, 0.0), db(F, 0.0);
    ops::causal_conv1d_backward(cpu{}, dx.data(), dW.data(), db.data(), G.data(), x.data(), W.data(), B, S, F, K);
    expect_grad("conv dx", loss, x, dx);
    expect_grad("conv dW", loss, W, dW);
    expect_grad("conv db", loss, b, db);
    // Causality: changing the last time step changes no earlier output.
    loss();
    V y0 = y;
    for (index_t f = 0; f < F; ++f) x[((B - 1) * S + S - 1) * F + f] += 1.0;
    loss();
    for (index_t t = 0; t + 1 < S; ++t)
      for (index_t f = 0; f < F; ++f) BOOST_CHECK_EQUAL(y[((B - 1) * S + t) * F + f], y0[((B - 1) * S + t) * F + f]);
  }
}

BOOST_AUTO_TEST_CASE(conv1d_step_matches_forward) {
  Rng rng(5);
  const index_t B = 2, S = 6, F = 3, K = 4;
  V x = randn(B * S * F, rng), W = randn(F * K, rng), b = randn(F, rng), y(B * S * F);
  ops::causal_conv1d_forward(cpu{}, y.data(), x.data(), W.data(), b.data(), B, S, F, K);
  V buf(B * K * F, 0.0), xt(B * F), yt(B * F);
  for (index_t t = 0; t < S; ++t) {
    for (index_t bi = 0; bi < B; ++bi)
      for (index_t f = 0; f < F; ++f) xt[bi * F + f] = x[(bi * S + t) * F + f];
    ops::causal_conv1d_step(cpu{}, yt.data(), buf.data(), xt.data(), W.data(), b.data(), B, F, K);
    for (index_t bi = 0; bi < B; ++bi)
      for (index_t f = 0; f < F; ++f) BOOST_CHECK_CLOSE(yt[bi * F + f], y[(bi * S + t) * F + f], 1e-10);
  }
}

BOOST_AUTO_TEST_CASE(layernorm_and_group_norm_gradients) {
  Rng rng(6);
  for (auto [M, G, C] : std::vector<std::array<index_t, 3>>{{3, 1, 8}, {4, 3, 5}, {1, 2, 3}}) {
    V x = randn(M * G * C, rng, 2.0), w = randn(G * C, rng, 0.3), Gr = randn(M * G * C, rng), y(M * G * C);
    V mean(M * G), rstd(M * G);
    auto loss = [&] {
      ops::group_layernorm_forward(cpu{}, y.data(), mean.data(), rstd.data(), x.data(), w.data(), M, G, C, 1e-5);
      return dot(y.data(), Gr.data(), M * G * C);
    };
    loss();
    // Each group is normalised and scaled by (1 + w).
    for (index_t r = 0; r < M * G; ++r) {
      double mu = 0, var = 0;
      for (index_t c = 0; c < C; ++c) mu += x[r * C + c] / C;
      for (index_t c = 0; c < C; ++c) var += (x[r * C + c] - mu) * (x[r * C + c] - mu) / C;
      for (index_t c = 0; c < C; ++c)
        BOOST_CHECK_CLOSE(y[r * C + c], (x[r * C + c] - mu) / std::sqrt(var + 1e-5) * (1 + w[(r % G) * C + c]), 1e-9);
    }
    V dx(M * G * C), dw(G * C, 0.0);
    ops::group_layernorm_backward(cpu{}, dx.data(), dw.data(), Gr.data(), x.data(), w.data(), mean.data(), rstd.data(),
                                  M, G, C);
    expect_grad("norm dx", loss, x, dx);
    expect_grad("norm dw", loss, w, dw);
  }
}

template <class Act>
void check_activation(const char* name) {
  Rng rng(7);
  const index_t n = 40;
  V x = randn(n, rng, 3.0), G = randn(n, rng), y(n);
  auto loss = [&] {
    ops::act_forward<Act>(cpu{}, y.data(), x.data(), n);
    return dot(y.data(), G.data(), n);
  };
  V dx(n);
  ops::act_backward<Act>(cpu{}, dx.data(), G.data(), x.data(), n);
  expect_grad(name, loss, x, dx);
}

BOOST_AUTO_TEST_CASE(activation_gradients) {
  check_activation<ops::Gelu>("gelu");
  check_activation<ops::Silu>("silu");
  check_activation<ops::LogSigmoid>("log_sigmoid");
  // Exact values: GELU(1) = 0.5 (1 + erf(1/sqrt 2)); log-sigmoid stable at large |x|.
  BOOST_CHECK_CLOSE(ops::Gelu::f(1.0), 0.8413447460685429, 1e-12);
  BOOST_CHECK_CLOSE(ops::log_sigmoid(-800.0), -800.0, 1e-12);
  BOOST_CHECK_SMALL(ops::log_sigmoid(800.0), 1e-300);
  BOOST_CHECK_CLOSE(ops::log_sigmoid(0.0), -std::log(2.0), 1e-12);
}

BOOST_AUTO_TEST_CASE(gated_gelu_gradients) {
  Rng rng(8);
  const index_t n = 30;
  V g = randn(n, rng, 2.0), a = randn(n, rng), G = randn(n, rng), y(n);
  auto loss = [&] {
    ops::gated_forward<ops::Gelu>(cpu{}, y.data(), g.data(), a.data(), n);
    return dot(y.data(), G.data(), n);
  };
  V dg(n), da(n);
  ops::gated_backward<ops::Gelu>(cpu{}, dg.data(), da.data(), G.data(), g.data(), a.data(), n);
  expect_grad("gated dg", loss, g, dg);
  expect_grad("gated da", loss, a, da);
}

BOOST_AUTO_TEST_CASE(lm_head_input_gradient) {
  Rng rng(9);
  const index_t M = 5, d = 6, Vv = 11;
  V h = randn(M * d, rng), E = randn(Vv * d, rng), G = randn(M * Vv, rng), z(M * Vv);
  auto loss = [&] {
    ops::lm_head_forward(cpu{}, z.data(), h.data(), E.data(), M, d, Vv);
    return dot(z.data(), G.data(), M * Vv);
  };
  V dh(M * d);
  ops::lm_head_backward(cpu{}, dh.data(), G.data(), E.data(), M, d, Vv);
  expect_grad("lm head dh", loss, h, dh);
}

BOOST_AUTO_TEST_CASE(embedding_lookup_and_bad_ids) {
  const index_t Vv = 4, d = 3;
  V E(Vv * d);
  for (index_t i = 0; i < Vv * d; ++i) E[i] = double(i);
  std::vector<std::int32_t> tok{3, 0, 2};
  V y(3 * d);
  ops::embedding_forward(cpu{}, y.data(), tok.data(), E.data(), 3, d, Vv);
  BOOST_CHECK_EQUAL(y[0], 9.0);
  BOOST_CHECK_EQUAL(y[3], 0.0);
  BOOST_CHECK_EQUAL(y[8], 8.0);
  std::vector<std::int32_t> bad{1, 4};
  BOOST_CHECK_EXCEPTION(ops::embedding_forward(cpu{}, y.data(), bad.data(), E.data(), 2, d, Vv), distilx::error,
                        [](const distilx::error& e) { return std::string(e.what()).find("token id 4") != std::string::npos; });
  std::vector<std::int32_t> neg{-1};
  BOOST_CHECK_THROW(ops::embedding_forward(cpu{}, y.data(), neg.data(), E.data(), 1, d, Vv), distilx::error);
}

BOOST_AUTO_TEST_SUITE_END()
