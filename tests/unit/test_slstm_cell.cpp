// Tests of the sLSTM cell (include/distilx/cells/slstm.hpp, spec-xlstm.md §3.2-3.7): finite-difference
// gradients, step == forward, checkpoint layout conversions against an independent vanilla-layout loop,
// bias initialisation, invariance to the stabiliser, accumulation semantics and thread-count determinism.
#include <boost/mpl/list.hpp>
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "distilx/cells/slstm.hpp"
#include "distilx/tensor/tensor.hpp"
#include "distilx/testing/gradcheck.hpp"

namespace {

using distilx::index_t;
using distilx::Rng;
using distilx::SLSTMCell;

/// Random cell inputs in the cuda layout. Moderate scales keep every gate away from saturation.
template <class T>
struct Problem {
  index_t B, S, NH, DH;
  std::vector<T> wx, R, bias, G;  // [B,S,4H], [NH,DH,4,DH], [NH,4,DH], [B,S,H]
  Problem(index_t b, index_t s, index_t nh, index_t dh, std::uint64_t seed, double r_scale = 0.3)
      : B(b), S(s), NH(nh), DH(dh) {
    const index_t H = nh * dh;
    wx.resize(b * s * 4 * H);
    R.resize(nh * dh * 4 * dh);
    bias.resize(nh * 4 * dh);
    G.resize(b * s * H);
    Rng rng(seed);
    distilx::testing::fill_normal(wx.data(), index_t(wx.size()), rng, 1.0);
    distilx::testing::fill_normal(R.data(), index_t(R.size()), rng, r_scale);
    distilx::testing::fill_normal(bias.data(), index_t(bias.size()), rng, 0.5);
    distilx::testing::fill_normal(G.data(), index_t(G.size()), rng, 1.0);
  }
  index_t H() const { return NH * DH; }
};

double sigm(double x) { return 1.0 / (1.0 + std::exp(-x)); }

/// Naive sLSTM forward on the vanilla layout (spec §3.4): R_v per head (4DH, DH) applied as y @ R_v^T,
/// bias [g][h][j], whole-tensor n == 0 test, stabiliser as in §3.2. Written independently of the cell.
void vanilla_forward(std::vector<double>& y, const std::vector<double>& wx, const std::vector<double>& Rv,
                     const std::vector<double>& bv, index_t B, index_t S, index_t NH, index_t DH) {
  const index_t H = NH * DH;
  std::vector<double> ys(B * H, 0), cs(B * H, 0), ns(B * H, 0), ms(B * H, 0), raw(B * 4 * H);
  y.assign(B * S * H, 0);
  for (index_t t = 0; t < S; ++t) {
    bool all_zero = true;
    for (double v : ns) all_zero = all_zero && v == 0;
    for (index_t b = 0; b < B; ++b)
      for (index_t g = 0; g < 4; ++g)
        for (index_t h = 0; h < NH; ++h)
          for (index_t j = 0; j < DH; ++j) {
            double ry = 0;
            for (index_t k = 0; k < DH; ++k) ry += ys[b * H + h * DH + k] * Rv[(h * 4 * DH + g * DH + j) * DH + k];
            const index_t q = g * H + h * DH + j;
            raw[b * 4 * H + q] = wx[(b * S + t) * 4 * H + q] + ry + bv[q];
          }
    for (index_t b = 0; b < B; ++b)
      for (index_t u = 0; u < H; ++u) {
        const double* r = &raw[b * 4 * H];
        const double ti = r[u], tf = r[H + u], tz = r[2 * H + u], to = r[3 * H + u];
        const index_t e = b * H + u;
        const double lf = std::log(sigm(tf)) + ms[e];
        const double m = all_zero ? ti : std::max(ti, lf);
        const double ip = std::min(1.0, std::exp(ti - m)), fp = std::min(1.0, std::exp(lf - m));
        cs[e] = fp * cs[e] + ip * std::tanh(tz);
        ns[e] = fp * ns[e] + ip;
        ms[e] = m;
        ys[e] = sigm(to) * cs[e] / ns[e];
        y[(b * S + t) * H + u] = ys[e];
      }
  }
}

/// Unstabilised meaning of the recurrence (spec §3.2): C, N with exp(i~) and sigmoid(f~), no m. Cuda layout.
void unstabilised_forward(std::vector<double>& y, const Problem<double>& p) {
  const index_t B = p.B, S = p.S, NH = p.NH, DH = p.DH, H = p.H();
  std::vector<double> ys(B * H, 0), C(B * H, 0), N(B * H, 0), pre(4 * H);
  y.assign(B * S * H, 0);
  for (index_t t = 0; t < S; ++t) {
    std::vector<double> ynew(B * H);
    for (index_t b = 0; b < B; ++b) {
      for (index_t h = 0; h < NH; ++h)
        for (index_t g = 0; g < 4; ++g)
          for (index_t j = 0; j < DH; ++j) {
            double ry = 0;
            for (index_t k = 0; k < DH; ++k) ry += ys[b * H + h * DH + k] * p.R[(h * DH + k) * 4 * DH + g * DH + j];
            pre[g * H + h * DH + j] = p.wx[(b * S + t) * 4 * H + g * H + h * DH + j] + ry + p.bias[(h * 4 + g) * DH + j];
          }
      for (index_t u = 0; u < H; ++u) {
        const index_t e = b * H + u;
        C[e] = sigm(pre[H + u]) * C[e] + std::exp(pre[u]) * std::tanh(pre[2 * H + u]);
        N[e] = sigm(pre[H + u]) * N[e] + std::exp(pre[u]);
        ynew[e] = sigm(pre[3 * H + u]) * C[e] / N[e];
        y[(b * S + t) * H + u] = ynew[e];
      }
    }
    ys = ynew;
  }
}

template <class T>
std::vector<T> run_forward(SLSTMCell<T>& cell, const Problem<T>& p) {
  std::vector<T> y(p.B * p.S * p.H());
  cell.forward(y.data(), p.wx.data(), p.R.data(), p.bias.data(), p.B, p.S);
  return y;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(slstm_cell)

// 1. Central finite differences (testing::check_gradient's default stencil, double) of L = <y, G> w.r.t. wx, R and bias; every entry is checked.
BOOST_AUTO_TEST_CASE(gradcheck_wx_r_bias) {
  struct Shape {
    index_t B, S, NH, DH;
  };
  const Shape shapes[] = {{2, 1, 2, 3}, {2, 7, 2, 3}, {2, 7, 1, 4}, {3, 5, 1, 4}};
  std::uint64_t seed = 11;
  for (const Shape& s : shapes) {
    Problem<double> p(s.B, s.S, s.NH, s.DH, seed++);
    SLSTMCell<double> cell(s.NH, s.DH);
    std::vector<double> y(p.B * p.S * p.H());
    auto loss = [&] {
      cell.forward(y.data(), p.wx.data(), p.R.data(), p.bias.data(), p.B, p.S);
      return distilx::testing::dot(y.data(), p.G.data(), index_t(y.size()));
    };
    loss();
    std::vector<double> dwx(p.wx.size()), dR(p.R.size(), 0.0), db(p.bias.size(), 0.0);
    cell.backward(dwx.data(), dR.data(), db.data(), p.G.data(), p.R.data(), p.B, p.S);

    const auto n_wx = index_t(p.wx.size()), n_R = index_t(p.R.size()), n_b = index_t(p.bias.size());
    const auto rw = distilx::testing::check_gradient(loss, p.wx.data(), dwx.data(), n_wx, n_wx);
    const auto rr = distilx::testing::check_gradient(loss, p.R.data(), dR.data(), n_R, n_R);
    const auto rb = distilx::testing::check_gradient(loss, p.bias.data(), db.data(), n_b, n_b);
    BOOST_TEST_MESSAGE("slstm gradcheck B=" << s.B << " S=" << s.S << " NH=" << s.NH << " DH=" << s.DH
                                            << ": wx " << rw.rel_error << ", R "
                                            << (s.S == 1 ? rr.max_abs_fd : rr.rel_error)
                                            << (s.S == 1 ? " (max |fd|: exact zero gradient)" : "") << ", bias "
                                            << rb.rel_error);
    BOOST_TEST(rw.rel_error <= 1e-6);
    BOOST_TEST(rb.rel_error <= 1e-6);
    BOOST_TEST(rw.max_abs_fd > 1e-3);  // not vacuous
    BOOST_TEST(rb.max_abs_fd > 1e-3);
    if (s.S == 1) {
      // y_0 = 0: R cannot matter; the analytic gradient is exactly zero, the stencil sees only rounding noise.
      BOOST_TEST(distilx::max_abs(dR.data(), n_R) == 0.0);
      BOOST_TEST(rr.max_abs_fd <= 1e-9);
    } else {
      BOOST_TEST(rr.rel_error <= 1e-6);
      BOOST_TEST(rr.max_abs_fd > 1e-3);
    }
  }
}

// 2. step() fed token by token reproduces forward() at every position (relative error <= 1e-12 in double,
//    <= 1e-6 in float).
using ScalarTypes = boost::mpl::list<float, double>;
BOOST_AUTO_TEST_CASE_TEMPLATE(step_matches_forward, T, ScalarTypes) {
  const double tol = std::is_same_v<T, double> ? 1e-12 : 1e-6;
  Problem<T> p(3, 9, 2, 4, 21);
  const index_t B = p.B, S = p.S, H = p.H();
  SLSTMCell<T> cell(p.NH, p.DH);
  const std::vector<T> y_fwd = run_forward(cell, p);
  std::vector<T> state(4 * B * H, T(0)), wx_t(B * 4 * H), y_t(B * H), y_step(B * S * H);
  for (index_t t = 0; t < S; ++t) {
    for (index_t b = 0; b < B; ++b)
      for (index_t q = 0; q < 4 * H; ++q) wx_t[b * 4 * H + q] = p.wx[(b * S + t) * 4 * H + q];
    SLSTMCell<T>::step(y_t.data(), state.data(), wx_t.data(), p.R.data(), p.bias.data(), B, p.NH, p.DH);
    for (index_t b = 0; b < B; ++b)
      for (index_t u = 0; u < H; ++u) y_step[(b * S + t) * H + u] = y_t[b * H + u];
  }
  for (index_t t = 0; t < S; ++t) {
    std::vector<double> a, r;
    for (index_t b = 0; b < B; ++b)
      for (index_t u = 0; u < H; ++u) {
        a.push_back(y_step[(b * S + t) * H + u]);
        r.push_back(y_fwd[(b * S + t) * H + u]);
      }
    const double err = distilx::relative_error(a.data(), r.data(), index_t(a.size()));
    BOOST_TEST(err <= tol, "position " << t << ": relative error " << err);
  }
  // The state's y slot holds the last output.
  for (index_t b = 0; b < B; ++b)
    for (index_t u = 0; u < H; ++u) BOOST_TEST(state[b * H + u] == y_t[b * H + u]);
}

// 3. Layout conversions round-trip bit-exactly, and the vanilla-layout reference math gives the same y.
BOOST_AUTO_TEST_CASE(layout_conversions) {
  const index_t NH = 3, DH = 4, H = NH * DH, B = 2, S = 6;
  Rng rng(31);
  std::vector<double> Rv(NH * 4 * DH * DH), bv(4 * H), Rc(Rv.size()), bc(bv.size()), Rv2(Rv.size()), bv2(bv.size());
  distilx::testing::fill_normal(Rv.data(), index_t(Rv.size()), rng, 0.3);
  distilx::testing::fill_normal(bv.data(), index_t(bv.size()), rng, 0.5);
  distilx::slstm_r_from_vanilla(Rc.data(), Rv.data(), NH, DH);
  distilx::slstm_bias_from_vanilla(bc.data(), bv.data(), NH, DH);
  distilx::slstm_r_to_vanilla(Rv2.data(), Rc.data(), NH, DH);
  distilx::slstm_bias_to_vanilla(bv2.data(), bc.data(), NH, DH);
  BOOST_TEST(Rv2 == Rv);
  BOOST_TEST(bv2 == bv);
  // The other direction, starting from a cuda-layout tensor.
  std::vector<double> Rc2(Rc.size()), bc2(bc.size());
  distilx::slstm_r_from_vanilla(Rc2.data(), Rv2.data(), NH, DH);
  distilx::slstm_bias_from_vanilla(bc2.data(), bv2.data(), NH, DH);
  BOOST_TEST(Rc2 == Rc);
  BOOST_TEST(bc2 == bc);
  // The conversions are real permutations here (not the identity), so the next check has teeth.
  const bool r_moved = Rc != Rv, b_moved = bc != bv;
  BOOST_TEST(r_moved);
  BOOST_TEST(b_moved);

  Problem<double> p(B, S, NH, DH, 32);
  p.R = Rc;
  p.bias = bc;
  SLSTMCell<double> cell(NH, DH);
  const std::vector<double> y = run_forward(cell, p);
  std::vector<double> y_ref;
  vanilla_forward(y_ref, p.wx, Rv, bv, B, S, NH, DH);
  const double err = distilx::relative_error(y.data(), y_ref.data(), index_t(y.size()));
  BOOST_TEST_MESSAGE("slstm vanilla-layout reference: relative error " << err);
  BOOST_TEST(err <= 1e-13);
}

// 4. Bias initialisation (spec §3.7): exact power-law values, the +5 / -7 endpoints, the other kinds.
BOOST_AUTO_TEST_CASE(bias_init) {
  const index_t NH = 3, DH = 8;
  std::vector<float> b(NH * 4 * DH);
  Rng rng(1);
  struct Pair {
    index_t block_idx, num_blocks;
  };
  const Pair pairs[] = {{1, 6}, {4, 5}, {0, 1}};
  for (const Pair& pr : pairs) {
    distilx::slstm_init_bias(b.data(), NH, DH, distilx::SLSTMBiasInit::powerlaw_blockdependent, pr.block_idx,
                             pr.num_blocks, rng);
    const double r = pr.num_blocks > 1 ? double(pr.block_idx) / double(pr.num_blocks - 1) : 0.0;
    for (index_t h = 0; h < NH; ++h)
      for (index_t g = 0; g < 4; ++g)
        for (index_t j = 0; j < DH; ++j) {
          const double want = g == 1 ? 5.0 - 12.0 * std::pow(double(j) / double(DH - 1), 0.3 + 1.3 * r) : 0.0;
          BOOST_TEST(b[(h * 4 + g) * DH + j] == static_cast<float>(want),
                     "block " << pr.block_idx << "/" << pr.num_blocks << " h=" << h << " g=" << g << " j=" << j);
        }
    for (index_t h = 0; h < NH; ++h) {
      BOOST_TEST(b[(h * 4 + 1) * DH + 0] == 5.0f);
      BOOST_TEST(b[(h * 4 + 1) * DH + DH - 1] == -7.0f);
    }
  }
  // Later blocks keep more long-memory units (more positive forget biases).
  std::vector<double> early(NH * 4 * DH), late(NH * 4 * DH);
  distilx::slstm_init_bias(early.data(), NH, DH, distilx::SLSTMBiasInit::powerlaw_blockdependent, 0, 5, rng);
  distilx::slstm_init_bias(late.data(), NH, DH, distilx::SLSTMBiasInit::powerlaw_blockdependent, 4, 5, rng);
  for (index_t j = 1; j + 1 < DH; ++j) BOOST_TEST(late[DH + j] > early[DH + j]);
  // DH == 1: finite (+5), unlike the reference's 0/0.
  std::vector<double> one(4);
  distilx::slstm_init_bias(one.data(), 1, 1, distilx::SLSTMBiasInit::powerlaw_blockdependent, 1, 3, rng);
  BOOST_TEST(one[1] == 5.0);
  BOOST_TEST(one[0] == 0.0);

  std::vector<double> s(NH * 4 * DH);
  distilx::slstm_init_bias(s.data(), NH, DH, distilx::SLSTMBiasInit::small_init, 0, 1, rng);
  for (index_t h = 0; h < NH; ++h)
    for (index_t g = 0; g < 4; ++g)
      for (index_t j = 0; j < DH; ++j)
        BOOST_TEST(s[(h * 4 + g) * DH + j] == (g == 1 ? 3.0 + 3.0 * double(j) / double(DH - 1) : 0.0));

  distilx::slstm_init_bias(s.data(), NH, DH, distilx::SLSTMBiasInit::zeros, 2, 3, rng);
  BOOST_TEST(distilx::max_abs(s.data(), index_t(s.size())) == 0.0);

  Rng r1(99), r2(99);
  std::vector<double> s2(s.size());
  distilx::slstm_init_bias(s.data(), NH, DH, distilx::SLSTMBiasInit::standard, 0, 1, r1);
  distilx::slstm_init_bias(s2.data(), NH, DH, distilx::SLSTMBiasInit::standard, 0, 1, r2);
  BOOST_TEST(s == s2);  // seeded
  const double a = 1.0 / std::sqrt(double(NH * DH));
  for (double v : s) BOOST_TEST(std::abs(v) <= a);
  BOOST_TEST(distilx::max_abs(s.data(), index_t(s.size())) > 0.5 * a);

  BOOST_TEST((distilx::slstm_bias_init_from_string("small_init") == distilx::SLSTMBiasInit::small_init));
  BOOST_TEST((distilx::slstm_bias_init_from_string("powerlaw_blockdependent") ==
              distilx::SLSTMBiasInit::powerlaw_blockdependent));
  BOOST_CHECK_THROW(distilx::slstm_bias_init_from_string("powerlaw"), distilx::config_error);
  BOOST_CHECK_THROW(distilx::slstm_init_bias(s.data(), NH, DH, distilx::SLSTMBiasInit::zeros, 3, 3, rng),
                    distilx::config_error);
}

// 5. y equals the unstabilised recurrence (C, N without m) for moderate inputs (<= 1e-10, double), and in float
//    a shift of every i~ by +-100 (where exp(i~) over/underflows float) leaves y unchanged (<= 1e-5).
BOOST_AUTO_TEST_CASE(stabiliser_invariance) {
  Problem<double> p(2, 12, 2, 3, 41);
  SLSTMCell<double> cell(p.NH, p.DH);
  const std::vector<double> y = run_forward(cell, p);
  std::vector<double> y_ref;
  unstabilised_forward(y_ref, p);
  const double err = distilx::relative_error(y.data(), y_ref.data(), index_t(y.size()));
  BOOST_TEST_MESSAGE("slstm vs unstabilised reference: relative error " << err);
  BOOST_TEST(err <= 1e-10);

  Problem<float> q(2, 12, 2, 3, 42);
  SLSTMCell<float> fcell(q.NH, q.DH);
  const std::vector<float> y0 = run_forward(fcell, q);
  for (float shift : {100.0f, -100.0f}) {
    Problem<float> qs = q;
    const index_t H = q.H();
    for (index_t r = 0; r < q.B * q.S; ++r)
      for (index_t u = 0; u < H; ++u) qs.wx[r * 4 * H + u] += shift;  // gate i is the first H columns
    const std::vector<float> ys = run_forward(fcell, qs);
    bool finite = true;
    for (float v : ys) finite = finite && std::isfinite(v);
    BOOST_TEST(finite);
    const double e = distilx::relative_error(ys.data(), y0.data(), index_t(ys.size()));
    BOOST_TEST(e <= 1e-5, "shift " << shift << ": relative error " << e);
  }
}

// backward overwrites dwx and accumulates into dR / dbias; null parameter gradients are allowed.
BOOST_AUTO_TEST_CASE(backward_accumulates) {
  Problem<double> p(2, 5, 2, 3, 51);
  SLSTMCell<double> cell(p.NH, p.DH);
  run_forward(cell, p);
  std::vector<double> dwx1(p.wx.size()), dR1(p.R.size(), 0.0), db1(p.bias.size(), 0.0);
  cell.backward(dwx1.data(), dR1.data(), db1.data(), p.G.data(), p.R.data(), p.B, p.S);
  std::vector<double> dwx2(p.wx.size(), 123.0), dR2(dR1), db2(db1);
  cell.backward(dwx2.data(), dR2.data(), db2.data(), p.G.data(), p.R.data(), p.B, p.S);
  BOOST_TEST(dwx2 == dwx1);
  for (std::size_t i = 0; i < dR1.size(); ++i) BOOST_TEST(dR2[i] == 2 * dR1[i]);
  for (std::size_t i = 0; i < db1.size(); ++i) BOOST_TEST(db2[i] == 2 * db1[i]);
  std::vector<double> dwx3(p.wx.size());
  cell.backward(dwx3.data(), nullptr, nullptr, p.G.data(), p.R.data(), p.B, p.S);
  BOOST_TEST(dwx3 == dwx1);
  BOOST_CHECK_THROW(cell.backward(dwx3.data(), nullptr, nullptr, p.G.data(), p.R.data(), p.B, p.S + 1),
                    distilx::shape_error);
  SLSTMCell<double> fresh(p.NH, p.DH);
  BOOST_CHECK_THROW(fresh.backward(dwx3.data(), nullptr, nullptr, p.G.data(), p.R.data(), p.B, p.S),
                    distilx::shape_error);
  BOOST_CHECK_THROW(SLSTMCell<double>(0, 4), distilx::config_error);
}

// float forward/backward agree with double (<= 1e-5 relative), so the float instantiation is exercised too.
BOOST_AUTO_TEST_CASE(float_matches_double) {
  Problem<double> pd(2, 8, 2, 4, 61);
  Problem<float> pf(2, 8, 2, 4, 61);
  SLSTMCell<double> cd(2, 4);
  SLSTMCell<float> cf(2, 4);
  const auto yd = run_forward(cd, pd);
  const auto yf = run_forward(cf, pf);
  BOOST_TEST(distilx::relative_error(yf.data(), yd.data(), index_t(yd.size())) <= 1e-5);
  std::vector<double> dwd(pd.wx.size()), dRd(pd.R.size(), 0.0), dbd(pd.bias.size(), 0.0);
  std::vector<float> dwf(pf.wx.size()), dRf(pf.R.size(), 0.0f), dbf(pf.bias.size(), 0.0f);
  cd.backward(dwd.data(), dRd.data(), dbd.data(), pd.G.data(), pd.R.data(), pd.B, pd.S);
  cf.backward(dwf.data(), dRf.data(), dbf.data(), pf.G.data(), pf.R.data(), pf.B, pf.S);
  BOOST_TEST(distilx::relative_error(dwf.data(), dwd.data(), index_t(dwd.size())) <= 1e-5);
  BOOST_TEST(distilx::relative_error(dRf.data(), dRd.data(), index_t(dRd.size())) <= 1e-5);
  BOOST_TEST(distilx::relative_error(dbf.data(), dbd.data(), index_t(dbd.size())) <= 1e-5);
}

// Results do not depend on the number of threads (bit-identical), at a size where the OpenMP loops engage.
BOOST_AUTO_TEST_CASE(thread_count_determinism) {
  Problem<float> p(16, 6, 4, 64, 71, 0.05);
  auto run = [&](int threads, std::vector<float>& y, std::vector<float>& dwx, std::vector<float>& dR,
                 std::vector<float>& db) {
#ifdef _OPENMP
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
    SLSTMCell<float> cell(p.NH, p.DH);
    y = run_forward(cell, p);
    dwx.assign(p.wx.size(), 0.0f);
    dR.assign(p.R.size(), 0.0f);
    db.assign(p.bias.size(), 0.0f);
    cell.backward(dwx.data(), dR.data(), db.data(), p.G.data(), p.R.data(), p.B, p.S);
#ifdef _OPENMP
    omp_set_num_threads(saved);
#endif
  };
  std::vector<float> y1, w1, r1, b1, y2, w2, r2, b2;
  run(1, y1, w1, r1, b1);
  run(2, y2, w2, r2, b2);
  BOOST_TEST(y1 == y2);
  BOOST_TEST(w1 == w2);
  BOOST_TEST(r1 == r2);
  BOOST_TEST(b1 == b2);
}

BOOST_AUTO_TEST_SUITE_END()
