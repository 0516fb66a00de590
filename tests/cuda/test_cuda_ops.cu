// Parity of every CUDA op with its CPU op on random inputs (norm-relative error per tensor:
// float <= 1e-5 with TF32 off, double <= 1e-12), gradients with their accumulate semantics,
// bit-identical reruns of every reduction, embedding id validation, the AdamW / clipping
// front ends on Buffer<T, distilx::cuda>, a non-default stream, and caching-allocator reuse.
#include <boost/mpl/list.hpp>
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "distilx/cuda.cuh"

using namespace distilx;
using ops::Trans;

namespace {

using Scalars = boost::mpl::list<float, double>;

template <class T>
double tol() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-12;
}
template <class T>
const char* tname() {
  return std::is_same_v<T, float> ? "float" : "double";
}

template <class T>
std::vector<T> randv(index_t n, Rng& rng, double lo = -1.0, double hi = 1.0) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = static_cast<T>(rng.uniform(lo, hi));
  return v;
}

/// A device copy of a host vector.
template <class T>
struct Dev {
  Buffer<T, distilx::cuda> buf;
  explicit Dev(const std::vector<T>& h) : buf(static_cast<index_t>(h.size())) { set(h); }
  void set(const std::vector<T>& h) { buf.copy_from_host(h.data(), static_cast<index_t>(h.size())); }
  T* p() { return buf.data(); }
  std::vector<T> host() const { return buf.to_host(); }
};

template <class T>
void expect_close(const std::string& what, const std::vector<T>& got, const std::vector<T>& ref) {
  BOOST_REQUIRE_EQUAL(got.size(), ref.size());
  const double e = relative_error(got.data(), ref.data(), static_cast<index_t>(ref.size()));
  std::printf("  %-44s %-6s rel err %.3e\n", what.c_str(), tname<T>(), e);
  BOOST_CHECK_MESSAGE(e <= tol<T>(), what << " <" << tname<T>() << ">: relative error " << e << " > " << tol<T>());
}
template <class T>
void expect_close(const std::string& what, Dev<T>& got, const std::vector<T>& ref) {
  expect_close(what, got.host(), ref);
}
template <class T>
void expect_identical(const std::string& what, const std::vector<T>& a, const std::vector<T>& b) {
  const bool same = a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * a.size()) == 0;
  BOOST_CHECK_MESSAGE(same, what << " <" << tname<T>() << ">: two runs are not bit-identical");
}

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_ops)

// ---- matrix products ----------------------------------------------------------------------

BOOST_AUTO_TEST_CASE_TEMPLATE(gemm_matches_cpu, T, Scalars) {
  Rng rng(1);
  const index_t M = 37, N = 45, K = 29;
  for (Trans ta : {Trans::no, Trans::yes})
    for (Trans tb : {Trans::no, Trans::yes})
      for (T beta : {T(0), T(0.3)}) {
        // Padded leading dimensions: the row-major/column-major mapping must respect them.
        const index_t ar = ta == Trans::no ? M : K, ac = ta == Trans::no ? K : M;
        const index_t br = tb == Trans::no ? K : N, bc = tb == Trans::no ? N : K;
        const index_t lda = ac + 3, ldb = bc + 2, ldc = N + 1;
        auto A = randv<T>(ar * lda, rng), B = randv<T>(br * ldb, rng), C = randv<T>(M * ldc, rng);
        Dev<T> dA(A), dB(B), dC(C);
        ops::gemm(cpu{}, ta, tb, M, N, K, T(0.7), A.data(), lda, B.data(), ldb, beta, C.data(), ldc);
        ops::gemm(distilx::cuda{}, ta, tb, M, N, K, T(0.7), dA.p(), lda, dB.p(), ldb, beta, dC.p(), ldc);
        expect_close(std::string("gemm ") + (ta == Trans::yes ? "T" : "N") + (tb == Trans::yes ? "T" : "N") +
                         (beta == T(0) ? " beta=0" : " beta=0.3"),
                     dC, C);
      }
  // K = 0: C = beta C (cuBLAS would reject the empty inner dimension).
  for (T beta : {T(0), T(1.5)}) {
    auto C = randv<T>(M * N, rng), A = randv<T>(4, rng);
    Dev<T> dC(C), dA(A);
    ops::gemm(cpu{}, Trans::no, Trans::no, M, N, index_t{0}, T(1), A.data(), index_t{1}, A.data(), N, beta, C.data(),
              N);
    ops::gemm(distilx::cuda{}, Trans::no, Trans::no, M, N, index_t{0}, T(1), dA.p(), index_t{1}, dA.p(), N, beta, dC.p(), N);
    expect_close(std::string("gemm K=0 beta=") + (beta == T(0) ? "0" : "1.5"), dC, C);
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(gemm_strided_batched_matches_loop, T, Scalars) {
  Rng rng(2);
  const index_t M = 21, N = 13, K = 17, batch = 5;
  for (Trans ta : {Trans::no, Trans::yes})
    for (Trans tb : {Trans::no, Trans::yes}) {
      const index_t lda = ta == Trans::no ? K : M, ldb = tb == Trans::no ? N : K;
      const index_t sa = M * K + 7, sb = K * N + 3, sc = M * N + 5;
      auto A = randv<T>(sa * batch, rng), B = randv<T>(sb * batch, rng), C = randv<T>(sc * batch, rng);
      Dev<T> dA(A), dB(B), dC(C);
      for (index_t i = 0; i < batch; ++i)
        ops::gemm(cpu{}, ta, tb, M, N, K, T(1.1), A.data() + i * sa, lda, B.data() + i * sb, ldb, T(0.5),
                  C.data() + i * sc, N);
      ops::gemm_strided_batched(distilx::cuda{}, ta, tb, M, N, K, T(1.1), dA.p(), lda, sa, dB.p(), ldb, sb, T(0.5), dC.p(), N,
                                sc, batch);
      expect_close(std::string("gemm_strided_batched ") + (ta == Trans::yes ? "T" : "N") +
                       (tb == Trans::yes ? "T" : "N"),
                   dC, C);
    }
}

BOOST_AUTO_TEST_CASE(tf32_switch) {
  Rng rng(3);
  const index_t M = 64, N = 64, K = 256;
  auto A = randv<float>(M * K, rng), B = randv<float>(K * N, rng);
  std::vector<float> C(static_cast<std::size_t>(M * N), 0.f);
  Dev<float> dA(A), dB(B), dC(C);
  ops::gemm(cpu{}, Trans::no, Trans::no, M, N, K, 1.f, A.data(), K, B.data(), N, 0.f, C.data(), N);
  BOOST_CHECK(!cuda_backend::tf32_enabled());
  cuda_backend::set_tf32(true);
  ops::gemm(distilx::cuda{}, Trans::no, Trans::no, M, N, K, 1.f, dA.p(), K, dB.p(), N, 0.f, dC.p(), N);
  const auto c32 = dC.host();
  const double e_tf32 = relative_error(c32.data(), C.data(), M * N);
  cuda_backend::set_tf32(false);
  ops::gemm(distilx::cuda{}, Trans::no, Trans::no, M, N, K, 1.f, dA.p(), K, dB.p(), N, 0.f, dC.p(), N);
  const auto cfp = dC.host();
  const double e_fp32 = relative_error(cfp.data(), C.data(), M * N);
  std::printf("  %-44s %-6s rel err %.3e (TF32 on), %.3e (off)\n", "gemm tf32 switch", "float", e_tf32, e_fp32);
  BOOST_CHECK_LE(e_tf32, 1e-2);
  BOOST_CHECK_LE(e_fp32, 1e-5);
}

// ---- linear layers ------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE_TEMPLATE(linear_forward_backward, T, Scalars) {
  Rng rng(4);
  const index_t M = 3001, K = 48, N = 40;  // M spans many reduction chunks (db)
  auto x = randv<T>(M * K, rng), W = randv<T>(N * K, rng), b = randv<T>(N, rng), dy = randv<T>(M * N, rng);
  Dev<T> dx_(x), dW_(W), db_(b), ddy(dy);
  for (bool bias : {false, true}) {
    std::vector<T> y(static_cast<std::size_t>(M * N));
    Dev<T> dyo(y);
    ops::linear_forward(cpu{}, y.data(), x.data(), W.data(), bias ? b.data() : nullptr, M, K, N);
    ops::linear_forward(distilx::cuda{}, dyo.p(), dx_.p(), dW_.p(), bias ? db_.p() : nullptr, M, K, N);
    expect_close(bias ? "linear_forward (bias)" : "linear_forward (no bias)", dyo, y);
  }
  for (bool acc : {false, true}) {
    const auto gx0 = randv<T>(M * K, rng), gW0 = randv<T>(N * K, rng), gb0 = randv<T>(N, rng);
    auto gx = gx0, gW = gW0, gb = gb0;
    Dev<T> dgx(gx0), dgW(gW0), dgb(gb0);
    ops::linear_backward(cpu{}, gx.data(), gW.data(), gb.data(), dy.data(), x.data(), W.data(), M, K, N, acc);
    ops::linear_backward(distilx::cuda{}, dgx.p(), dgW.p(), dgb.p(), ddy.p(), dx_.p(), dW_.p(), M, K, N, acc);
    const std::string tag = acc ? " (accumulate dx)" : "";
    expect_close("linear_backward dx" + tag, dgx, gx);
    expect_close("linear_backward dW (+=)" + tag, dgW, gW);
    expect_close("linear_backward db (+=)" + tag, dgb, gb);
    // Rerun from the same starting gradients: bit-identical.
    const auto hW = dgW.host(), hb = dgb.host();
    dgW.set(gW0);
    dgb.set(gb0);
    ops::linear_backward(distilx::cuda{}, static_cast<T*>(nullptr), dgW.p(), dgb.p(), ddy.p(), dx_.p(), dW_.p(), M, K, N);
    expect_identical("linear_backward dW rerun", dgW.host(), hW);
    expect_identical("linear_backward db rerun", dgb.host(), hb);
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(headwise_forward_backward, T, Scalars) {
  Rng rng(5);
  // Blocks of at most 32 take the split-over-rows dW kernel: {33, 4, 8, 6} in one row chunk
  // (adds into dW directly), {1000, 6, 32, 32} over several chunks with a partial last tile,
  // {515, 3, 20, 12} with padded lanes. {77, 3, 40, 33} is wider and stays on cuBLAS.
  struct Shape {
    index_t M, P, I, O;
  };
  for (const Shape sh : {Shape{33, 4, 8, 6}, Shape{1000, 6, 32, 32}, Shape{515, 3, 20, 12}, Shape{77, 3, 40, 33}})
    for (bool wide : {false, true}) {
      const index_t M = sh.M, P = sh.P, I = sh.I, O = sh.O;
      // Wide rows: read from / write into the middle of larger rows via ldx / ldy.
      const index_t ldx = wide ? P * I + 5 : P * I, ldy = wide ? P * O + 3 : P * O;
      const index_t lx = wide ? ldx : -1, ly = wide ? ldy : -1;
      auto x = randv<T>(M * ldx, rng), W = randv<T>(P * O * I, rng), y = randv<T>(M * ldy, rng);
      auto dy = randv<T>(M * ldy, rng);
      Dev<T> dxv(x), dWv(W), dyv(y), ddy(dy);
      ops::headwise_forward(cpu{}, y.data(), x.data(), W.data(), M, P, I, O, ly, lx);
      ops::headwise_forward(distilx::cuda{}, dyv.p(), dxv.p(), dWv.p(), M, P, I, O, ly, lx);
      const std::string tag = " M" + std::to_string(M) + " P" + std::to_string(P) + " I" + std::to_string(I) + " O" +
                              std::to_string(O) + (wide ? " (ldx, ldy)" : "");
      expect_close("headwise_forward" + tag, dyv, y);
      for (bool acc : {false, true}) {
        const auto gx0 = randv<T>(M * ldx, rng), gW0 = randv<T>(P * O * I, rng);
        auto gx = gx0, gW = gW0;
        Dev<T> dgx(gx0), dgW(gW0);
        ops::headwise_backward(cpu{}, gx.data(), gW.data(), dy.data(), x.data(), W.data(), M, P, I, O, acc, ly, lx);
        ops::headwise_backward(distilx::cuda{}, dgx.p(), dgW.p(), ddy.p(), dxv.p(), dWv.p(), M, P, I, O, acc, ly, lx);
        expect_close("headwise_backward dx" + tag + (acc ? " (accumulate)" : ""), dgx, gx);
        expect_close("headwise_backward dW (+=)" + tag, dgW, gW);
        // dW alone from the same starting gradient: bit-identical to the first run.
        const auto hW = dgW.host();
        dgW.set(gW0);
        ops::headwise_backward(distilx::cuda{}, static_cast<T*>(nullptr), dgW.p(), ddy.p(), dxv.p(), dWv.p(), M, P, I, O,
                               false, ly, lx);
        expect_identical("headwise_backward dW rerun" + tag, dgW.host(), hW);
      }
    }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(lm_head_forward_backward, T, Scalars) {
  Rng rng(6);
  const index_t M = 19, d = 32, V = 301;
  auto h = randv<T>(M * d, rng), E = randv<T>(V * d, rng), logits = randv<T>(M * V, rng), dl = randv<T>(M * V, rng);
  Dev<T> dh(h), dE(E), dlog(logits), ddl(dl);
  ops::lm_head_forward(cpu{}, logits.data(), h.data(), E.data(), M, d, V);
  ops::lm_head_forward(distilx::cuda{}, dlog.p(), dh.p(), dE.p(), M, d, V);
  expect_close("lm_head_forward", dlog, logits);
  for (bool acc : {false, true}) {
    auto gh = randv<T>(M * d, rng);
    Dev<T> dgh(gh);
    ops::lm_head_backward(cpu{}, gh.data(), dl.data(), E.data(), M, d, V, acc);
    ops::lm_head_backward(distilx::cuda{}, dgh.p(), ddl.p(), dE.p(), M, d, V, acc);
    expect_close(acc ? "lm_head_backward (accumulate)" : "lm_head_backward", dgh, gh);
  }
}

// ---- causal conv1d ------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE_TEMPLATE(conv1d_forward_backward_step, T, Scalars) {
  Rng rng(7);
  const index_t B = 3, S = 301, F = 19, K = 4;  // B*S rows span several reduction chunks
  auto x = randv<T>(B * S * F, rng), W = randv<T>(F * K, rng), b = randv<T>(F, rng);
  Dev<T> dxv(x), dWv(W), dbv(b);
  for (bool bias : {false, true}) {
    std::vector<T> y(static_cast<std::size_t>(B * S * F));
    Dev<T> dyv(y);
    ops::causal_conv1d_forward(cpu{}, y.data(), x.data(), W.data(), bias ? b.data() : nullptr, B, S, F, K);
    ops::causal_conv1d_forward(distilx::cuda{}, dyv.p(), dxv.p(), dWv.p(), bias ? dbv.p() : nullptr, B, S, F, K);
    expect_close(bias ? "causal_conv1d_forward (bias)" : "causal_conv1d_forward", dyv, y);
  }
  // Backward. K <= 4 takes the dedicated dW/db kernel: F = 19 with scalar loads, F = 24 with
  // 16-byte loads; sequences (S = 301, 77, 3) start inside row chunks and chunks start inside
  // sequences, S = 3 < K - 1 clips every window. K = 5 takes the generic column reduction.
  struct Shape {
    index_t B, S, F, K;
  };
  for (const Shape sh : {Shape{B, S, F, K}, Shape{3, 301, 24, 4}, Shape{4, 77, 8, 3}, Shape{5, 3, 8, 4},
                         Shape{2, 150, 12, 1}, Shape{2, 150, 12, 5}})
    for (bool acc : {false, true}) {
      const index_t Bb = sh.B, Sb = sh.S, Fb = sh.F, Kb = sh.K, n = Bb * Sb * Fb;
      const std::string tag = " B" + std::to_string(Bb) + " S" + std::to_string(Sb) + " F" + std::to_string(Fb) +
                              " K" + std::to_string(Kb);
      const auto xb = randv<T>(n, rng), Wb = randv<T>(Fb * Kb, rng), dyb = randv<T>(n, rng);
      Dev<T> dxb(xb), dWb(Wb), ddyb(dyb);
      const auto gx0 = randv<T>(n, rng), gW0 = randv<T>(Fb * Kb, rng), gb0 = randv<T>(Fb, rng);
      auto gx = gx0, gW = gW0, gb = gb0;
      Dev<T> dgx(gx0), dgW(gW0), dgb(gb0);
      ops::causal_conv1d_backward(cpu{}, gx.data(), gW.data(), gb.data(), dyb.data(), xb.data(), Wb.data(), Bb, Sb, Fb,
                                  Kb, acc);
      ops::causal_conv1d_backward(distilx::cuda{}, dgx.p(), dgW.p(), dgb.p(), ddyb.p(), dxb.p(), dWb.p(), Bb, Sb, Fb,
                                  Kb, acc);
      expect_close("causal_conv1d_backward dx" + tag + (acc ? " (accumulate)" : ""), dgx, gx);
      expect_close("causal_conv1d_backward dW (+=)" + tag, dgW, gW);
      expect_close("causal_conv1d_backward db (+=)" + tag, dgb, gb);
      const auto hW = dgW.host(), hb = dgb.host();
      dgW.set(gW0);
      dgb.set(gb0);
      ops::causal_conv1d_backward(distilx::cuda{}, static_cast<T*>(nullptr), dgW.p(), dgb.p(), ddyb.p(), dxb.p(),
                                  dWb.p(), Bb, Sb, Fb, Kb);
      expect_identical("causal_conv1d_backward dW rerun" + tag, dgW.host(), hW);
      expect_identical("causal_conv1d_backward db rerun" + tag, dgb.host(), hb);
      // dW without db, and db without dW (the generic path), from the same start.
      dgW.set(gW0);
      dgb.set(gb0);
      ops::causal_conv1d_backward(distilx::cuda{}, static_cast<T*>(nullptr), dgW.p(), static_cast<T*>(nullptr),
                                  ddyb.p(), dxb.p(), dWb.p(), Bb, Sb, Fb, Kb);
      ops::causal_conv1d_backward(distilx::cuda{}, static_cast<T*>(nullptr), static_cast<T*>(nullptr), dgb.p(),
                                  ddyb.p(), static_cast<T*>(nullptr), dWb.p(), Bb, Sb, Fb, Kb);
      expect_close("causal_conv1d_backward dW only" + tag, dgW, gW);
      expect_close("causal_conv1d_backward db only" + tag, dgb, gb);
    }
  // Generation steps: y and the rolling window after each step.
  const index_t Bs = 2;
  std::vector<T> buf(static_cast<std::size_t>(Bs * K * F), T(0)), ys(static_cast<std::size_t>(Bs * F));
  Dev<T> dbuf(buf), dys(ys);
  for (int step = 0; step < 6; ++step) {
    auto xt = randv<T>(Bs * F, rng);
    Dev<T> dxt(xt);
    const bool bias = step % 2 == 0;
    ops::causal_conv1d_step(cpu{}, ys.data(), buf.data(), xt.data(), W.data(), bias ? b.data() : nullptr, Bs, F, K);
    ops::causal_conv1d_step(distilx::cuda{}, dys.p(), dbuf.p(), dxt.p(), dWv.p(), bias ? dbv.p() : nullptr, Bs, F, K);
    expect_close("causal_conv1d_step y, step " + std::to_string(step), dys, ys);
    expect_close("causal_conv1d_step window, step " + std::to_string(step), dbuf, buf);
  }
}

// ---- norms --------------------------------------------------------------------------------

template <class T>
void check_group_layernorm(index_t M, index_t G, index_t C, const std::string& name, Rng& rng) {
  const index_t n = M * G * C;
  auto x = randv<T>(n, rng, -2.0, 3.0), w = randv<T>(G * C, rng, -0.5, 0.5), dy = randv<T>(n, rng);
  std::vector<T> y(static_cast<std::size_t>(n)), mean(static_cast<std::size_t>(M * G)),
      rstd(static_cast<std::size_t>(M * G));
  Dev<T> dxv(x), dwv(w), ddy(dy), dyv(y), dmean(mean), drstd(rstd);
  const T eps = T(1e-5);
  if (G == 1) {
    ops::layernorm_forward(cpu{}, y.data(), mean.data(), rstd.data(), x.data(), w.data(), M, C, eps);
    ops::layernorm_forward(distilx::cuda{}, dyv.p(), dmean.p(), drstd.p(), dxv.p(), dwv.p(), M, C, eps);
  } else {
    ops::group_layernorm_forward(cpu{}, y.data(), mean.data(), rstd.data(), x.data(), w.data(), M, G, C, eps);
    ops::group_layernorm_forward(distilx::cuda{}, dyv.p(), dmean.p(), drstd.p(), dxv.p(), dwv.p(), M, G, C, eps);
  }
  expect_close(name + " forward y", dyv, y);
  expect_close(name + " forward mean", dmean, mean);
  expect_close(name + " forward rstd", drstd, rstd);
  for (bool acc : {false, true}) {
    const auto gx0 = randv<T>(n, rng), gw0 = randv<T>(G * C, rng);
    auto gx = gx0, gw = gw0;
    Dev<T> dgx(gx0), dgw(gw0);
    // Both backends use the CPU statistics, so the backward is compared on its own.
    if (G == 1) {
      ops::layernorm_backward(cpu{}, gx.data(), gw.data(), dy.data(), x.data(), w.data(), mean.data(), rstd.data(), M,
                              C, acc);
      dmean.set(mean);
      drstd.set(rstd);
      ops::layernorm_backward(distilx::cuda{}, dgx.p(), dgw.p(), ddy.p(), dxv.p(), dwv.p(), dmean.p(), drstd.p(), M, C, acc);
    } else {
      ops::group_layernorm_backward(cpu{}, gx.data(), gw.data(), dy.data(), x.data(), w.data(), mean.data(),
                                    rstd.data(), M, G, C, acc);
      dmean.set(mean);
      drstd.set(rstd);
      ops::group_layernorm_backward(distilx::cuda{}, dgx.p(), dgw.p(), ddy.p(), dxv.p(), dwv.p(), dmean.p(), drstd.p(), M, G,
                                    C, acc);
    }
    expect_close(name + " backward dx" + (acc ? " (accumulate)" : ""), dgx, gx);
    expect_close(name + " backward dw (+=)", dgw, gw);
    const auto hw = dgw.host();
    dgw.set(gw0);
    ops::group_layernorm_backward(distilx::cuda{}, dgx.p(), dgw.p(), ddy.p(), dxv.p(), dwv.p(), dmean.p(), drstd.p(), M, G, C,
                                  acc);
    expect_identical(name + " backward dw rerun", dgw.host(), hw);
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(layernorms, T, Scalars) {
  Rng rng(8);
  check_group_layernorm<T>(29, 4, 24, "group_layernorm G=4 C=24", rng);
  check_group_layernorm<T>(1500, 4, 16, "group_layernorm G=4 C=16 M=1500", rng);
  check_group_layernorm<T>(37, 1, 300, "layernorm C=300", rng);
  check_group_layernorm<T>(5, 1, 1000, "layernorm C=1000", rng);
  check_group_layernorm<T>(7, 3, 5, "group_layernorm C=5 (< warp)", rng);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(rmsnorm, T, Scalars) {
  Rng rng(9);
  const index_t M = 41, C = 200;
  auto x = randv<T>(M * C, rng, -3.0, 3.0), w = randv<T>(C, rng, 0.5, 1.5);
  std::vector<T> y(static_cast<std::size_t>(M * C)), rstd(static_cast<std::size_t>(M));
  Dev<T> dxv(x), dwv(w), dyv(y), drstd(rstd);
  ops::rmsnorm_forward(cpu{}, y.data(), rstd.data(), x.data(), w.data(), M, C, T(1e-6));
  ops::rmsnorm_forward(distilx::cuda{}, dyv.p(), drstd.p(), dxv.p(), dwv.p(), M, C, T(1e-6));
  expect_close("rmsnorm_forward y", dyv, y);
  expect_close("rmsnorm_forward rstd", drstd, rstd);
  Dev<T> dy2(std::vector<T>(y.size()));
  ops::rmsnorm_forward(distilx::cuda{}, dy2.p(), static_cast<T*>(nullptr), dxv.p(), dwv.p(), M, C, T(1e-6));
  expect_close("rmsnorm_forward (rstd null)", dy2, y);
}

// ---- activations --------------------------------------------------------------------------

template <class Act, class T>
void check_activation(const std::string& name, Rng& rng) {
  const index_t n = 100003;
  auto x = randv<T>(n, rng, -8.0, 8.0), a = randv<T>(n, rng), dy = randv<T>(n, rng);
  std::vector<T> y(static_cast<std::size_t>(n));
  Dev<T> dxv(x), dav(a), ddy(dy), dyv(y);
  ops::act_forward<Act>(cpu{}, y.data(), x.data(), n);
  ops::act_forward<Act>(distilx::cuda{}, dyv.p(), dxv.p(), n);
  expect_close(name + " act_forward", dyv, y);
  {  // in place (y aliases x)
    auto xi = x;
    Dev<T> dxi(x);
    ops::act_forward<Act>(cpu{}, xi.data(), xi.data(), n);
    ops::act_forward<Act>(distilx::cuda{}, dxi.p(), dxi.p(), n);
    expect_close(name + " act_forward in place", dxi, xi);
  }
  for (bool acc : {false, true}) {
    auto gx = randv<T>(n, rng);
    Dev<T> dgx(gx);
    ops::act_backward<Act>(cpu{}, gx.data(), dy.data(), x.data(), n, acc);
    ops::act_backward<Act>(distilx::cuda{}, dgx.p(), ddy.p(), dxv.p(), n, acc);
    expect_close(name + " act_backward" + (acc ? " (accumulate)" : ""), dgx, gx);
  }
  ops::gated_forward<Act>(cpu{}, y.data(), x.data(), a.data(), n);
  ops::gated_forward<Act>(distilx::cuda{}, dyv.p(), dxv.p(), dav.p(), n);
  expect_close(name + " gated_forward", dyv, y);
  std::vector<T> dg(static_cast<std::size_t>(n)), da(static_cast<std::size_t>(n));
  Dev<T> ddg(dg), dda(da);
  ops::gated_backward<Act>(cpu{}, dg.data(), da.data(), dy.data(), x.data(), a.data(), n);
  ops::gated_backward<Act>(distilx::cuda{}, ddg.p(), dda.p(), ddy.p(), dxv.p(), dav.p(), n);
  expect_close(name + " gated_backward dg", ddg, dg);
  expect_close(name + " gated_backward da", dda, da);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(activations, T, Scalars) {
  Rng rng(10);
  check_activation<ops::Silu, T>("silu", rng);
  check_activation<ops::Gelu, T>("gelu", rng);
  check_activation<ops::LogSigmoid, T>("log_sigmoid", rng);
}

// ---- elementwise --------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE_TEMPLATE(elementwise, T, Scalars) {
  Rng rng(11);
  const index_t n = 70001;
  auto a = randv<T>(n, rng), b = randv<T>(n, rng);
  Dev<T> da(a), db(b);
  {
    std::vector<T> y(static_cast<std::size_t>(n));
    Dev<T> dy(y);
    ops::add(cpu{}, y.data(), a.data(), b.data(), n);
    ops::add(distilx::cuda{}, dy.p(), da.p(), db.p(), n);
    expect_close("add", dy, y);
    auto a2 = a;
    Dev<T> da2(a);
    ops::add(cpu{}, a2.data(), a2.data(), b.data(), n);
    ops::add(distilx::cuda{}, da2.p(), da2.p(), db.p(), n);
    expect_close("add (y aliases a)", da2, a2);
    ops::add_inplace(cpu{}, y.data(), a.data(), n);
    ops::add_inplace(distilx::cuda{}, dy.p(), da.p(), n);
    expect_close("add_inplace", dy, y);
    ops::copy(distilx::cuda{}, dy.p(), db.p(), n);
    expect_close("copy", dy, b);
    ops::fill_zero(distilx::cuda{}, dy.p(), n);
    expect_close("fill_zero", dy, std::vector<T>(static_cast<std::size_t>(n), T(0)));
  }
  const index_t M = 5003, N = 70;
  auto y = randv<T>(M * N, rng), r = randv<T>(N, rng);
  Dev<T> dy(y), dr(r);
  ops::add_row_vector(cpu{}, y.data(), r.data(), M, N);
  ops::add_row_vector(distilx::cuda{}, dy.p(), dr.p(), M, N);
  expect_close("add_row_vector", dy, y);
  const auto s0 = randv<T>(N, rng);
  auto s = s0;
  Dev<T> ds(s0);
  ops::column_sum(cpu{}, s.data(), y.data(), M, N);
  ops::column_sum(distilx::cuda{}, ds.p(), dy.p(), M, N);
  expect_close("column_sum (+=)", ds, s);
  const auto h1 = ds.host();
  ds.set(s0);
  ops::column_sum(distilx::cuda{}, ds.p(), dy.p(), M, N);
  expect_identical("column_sum rerun", ds.host(), h1);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(mlstm_output, T, Scalars) {
  Rng rng(12);
  const index_t M = 2900, D = 40;
  auto hn = randv<T>(M * D, rng), skip = randv<T>(D, rng), xc = randv<T>(M * D, rng), z = randv<T>(M * D, rng, -5, 5);
  std::vector<T> out(static_cast<std::size_t>(M * D)), hs(static_cast<std::size_t>(M * D));
  Dev<T> dhn_(hn), dskip_(skip), dxc_(xc), dz_(z), dout(out), dhs(hs);
  ops::mlstm_output_forward(cpu{}, out.data(), hs.data(), hn.data(), skip.data(), xc.data(), z.data(), M, D);
  ops::mlstm_output_forward(distilx::cuda{}, dout.p(), dhs.p(), dhn_.p(), dskip_.p(), dxc_.p(), dz_.p(), M, D);
  expect_close("mlstm_output_forward out", dout, out);
  expect_close("mlstm_output_forward hs", dhs, hs);
  auto gout = randv<T>(M * D, rng);
  const auto gxc0 = randv<T>(M * D, rng), gskip0 = randv<T>(D, rng);
  auto gxc = gxc0, gskip = gskip0;
  std::vector<T> ghn(static_cast<std::size_t>(M * D)), gz(static_cast<std::size_t>(M * D));
  Dev<T> dgout(gout), dgxc(gxc0), dgskip(gskip0), dghn(ghn), dgz(gz);
  ops::mlstm_output_backward(cpu{}, ghn.data(), gz.data(), gxc.data(), gskip.data(), gout.data(), hs.data(),
                             skip.data(), xc.data(), z.data(), M, D);
  dhs.set(hs);
  ops::mlstm_output_backward(distilx::cuda{}, dghn.p(), dgz.p(), dgxc.p(), dgskip.p(), dgout.p(), dhs.p(), dskip_.p(), dxc_.p(),
                             dz_.p(), M, D);
  expect_close("mlstm_output_backward dhn", dghn, ghn);
  expect_close("mlstm_output_backward dz", dgz, gz);
  expect_close("mlstm_output_backward dxc (+=)", dgxc, gxc);
  expect_close("mlstm_output_backward dskip (+=)", dgskip, gskip);
  const auto h1 = dgskip.host();
  dgskip.set(gskip0);
  dgxc.set(gxc0);
  ops::mlstm_output_backward(distilx::cuda{}, dghn.p(), dgz.p(), dgxc.p(), dgskip.p(), dgout.p(), dhs.p(), dskip_.p(), dxc_.p(),
                             dz_.p(), M, D);
  expect_identical("mlstm_output_backward dskip rerun", dgskip.host(), h1);
}

// ---- embedding ----------------------------------------------------------------------------

template <class T, class Tok>
void check_embedding(const std::string& name, Rng& rng) {
  const index_t M = 40, d = 33, V = 50;
  auto E = randv<T>(V * d, rng);
  std::vector<Tok> tok(static_cast<std::size_t>(M));
  for (auto& t : tok) t = static_cast<Tok>(rng.below(V));
  tok[0] = 0;
  tok[1] = static_cast<Tok>(V - 1);
  std::vector<T> y(static_cast<std::size_t>(M * d));
  Dev<T> dE(E), dy(y);
  ops::embedding_forward(cpu{}, y.data(), tok.data(), E.data(), M, d, V);
  ops::embedding_forward(distilx::cuda{}, dy.p(), tok.data(), dE.p(), M, d, V);
  const auto got = dy.host();
  BOOST_CHECK_MESSAGE(got == y, name << ": gathered rows differ");
  expect_close(name, got, y);
  for (Tok bad : {static_cast<Tok>(V), static_cast<Tok>(-1)}) {
    auto t2 = tok;
    t2[7] = bad;
    std::string cpu_msg, cuda_msg;
    try {
      ops::embedding_forward(cpu{}, y.data(), t2.data(), E.data(), M, d, V);
    } catch (const distilx::error& e) {
      cpu_msg = e.what();
    }
    BOOST_CHECK_THROW(ops::embedding_forward(distilx::cuda{}, dy.p(), t2.data(), dE.p(), M, d, V), distilx::error);
    try {
      ops::embedding_forward(distilx::cuda{}, dy.p(), t2.data(), dE.p(), M, d, V);
    } catch (const distilx::error& e) {
      cuda_msg = e.what();
    }
    BOOST_CHECK_EQUAL(cuda_msg, cpu_msg);
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(embedding, T, Scalars) {
  Rng rng(13);
  check_embedding<T, std::int32_t>("embedding_forward (int32 ids)", rng);
  check_embedding<T, std::int64_t>("embedding_forward (int64 ids)", rng);
}

// ---- gradient post-processing and the optimizer -------------------------------------------

BOOST_AUTO_TEST_CASE_TEMPLATE(sum_squares_scale_all_finite, T, Scalars) {
  Rng rng(14);
  for (index_t n : {index_t{1}, index_t{5}, index_t{4097}, index_t{1000003}}) {
    auto x = randv<T>(n, rng);
    Dev<T> dx(x);
    const double ref = ops::sum_squares(cpu{}, x.data(), n);
    const double got = ops::sum_squares(distilx::cuda{}, dx.p(), n);
    const double again = ops::sum_squares(distilx::cuda{}, dx.p(), n);
    const double e = std::abs(got - ref) / ref;
    std::printf("  %-44s %-6s rel err %.3e\n", ("sum_squares n=" + std::to_string(n)).c_str(), tname<T>(), e);
    BOOST_CHECK_LE(e, 1e-12);  // accumulated in double for both scalar types
    BOOST_CHECK_MESSAGE(std::memcmp(&got, &again, sizeof got) == 0, "sum_squares rerun differs");
  }
  BOOST_CHECK_EQUAL(ops::sum_squares(distilx::cuda{}, static_cast<const T*>(nullptr), index_t{0}), 0.0);

  const index_t n = 100001;
  auto x = randv<T>(n, rng);
  Dev<T> dx(x);
  ops::scale(cpu{}, x.data(), T(0.37), n);
  ops::scale(distilx::cuda{}, dx.p(), T(0.37), n);
  expect_close("scale", dx, x);

  BOOST_CHECK(ops::all_finite(distilx::cuda{}, dx.p(), n));
  for (T bad : {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                -std::numeric_limits<T>::infinity()}) {
    auto y = x;
    y[static_cast<std::size_t>(n - 3)] = bad;
    Dev<T> dy(y);
    BOOST_CHECK(!ops::all_finite(distilx::cuda{}, dy.p(), n));
    BOOST_CHECK_EQUAL(ops::all_finite(cpu{}, y.data(), n), ops::all_finite(distilx::cuda{}, dy.p(), n));
  }
  auto big = std::vector<T>{std::numeric_limits<T>::max(), -std::numeric_limits<T>::max(),
                            std::numeric_limits<T>::denorm_min()};
  Dev<T> dbig(big);
  BOOST_CHECK(ops::all_finite(distilx::cuda{}, dbig.p(), 3));
}

BOOST_AUTO_TEST_CASE_TEMPLATE(adamw_update_matches_cpu, T, Scalars) {
  Rng rng(15);
  const index_t n = 10007;
  auto p = randv<T>(n, rng), m = randv<T>(n, rng, -0.1, 0.1), v = randv<T>(n, rng, 0.0, 0.01);
  Dev<T> dp(p), dm(m), dv(v);
  for (int step = 1; step <= 3; ++step) {
    auto g = randv<T>(n, rng);
    Dev<T> dg(g);
    AdamWCoeffs c;
    const double lr = 1e-3 * step, wd = 0.1, b1 = 0.9, b2 = 0.999;
    c.decay_factor = step == 2 ? 1.0 : 1 - lr * wd;
    c.neg_step_size = -(lr / (1 - std::pow(b1, step)));
    c.bias_correction2_sqrt = std::sqrt(1 - std::pow(b2, step));
    ops::adamw_update(cpu{}, p.data(), g.data(), m.data(), v.data(), n, c);
    ops::adamw_update(distilx::cuda{}, dp.p(), dg.p(), dm.p(), dv.p(), n, c);
  }
  const auto hp = dp.host();
  index_t exact = 0;
  for (index_t i = 0; i < n; ++i) exact += hp[static_cast<std::size_t>(i)] == p[static_cast<std::size_t>(i)];
  std::printf("  %-44s %-6s %ld of %ld parameters bit-identical\n", "adamw_update", tname<T>(), long(exact), long(n));
  expect_close("adamw_update p", hp, p);
  expect_close("adamw_update m", dm, m);
  expect_close("adamw_update v", dv, v);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(optimizer_and_clipping_front_ends, T, Scalars) {
  // The library's templates reach the cuda overloads through their qualified ops:: calls.
  Rng rng(16);
  const std::vector<ParamRange> ranges{{0, 100, true}, {112, 50, false}, {176, 300, true}};
  const index_t total = 480;
  AdamWConfig cfg;
  cfg.weight_decay = 0.05;
  AdamW<T, cpu> oc(ranges, total, cfg);
  AdamW<T, distilx::cuda> og(ranges, total, cfg);
  auto p = randv<T>(total, rng);
  Dev<T> dp(p);
  for (int step = 0; step < 3; ++step) {
    auto g = randv<T>(total, rng, -3, 3);
    Dev<T> dg(g);
    const double nc = clip_grad_norm(cpu{}, g.data(), total, 1.0);
    const double ng = clip_grad_norm(distilx::cuda{}, dg.p(), total, 1.0);
    BOOST_CHECK_LE(std::abs(nc - ng) / nc, 1e-12);
    expect_close("clip_grad_norm g, step " + std::to_string(step), dg, g);
    BOOST_CHECK(all_finite(dg.buf));
    oc.step(p.data(), g.data(), 1e-2);
    og.step(dp.p(), dg.p(), 1e-2);
  }
  expect_close("AdamW<T, distilx::cuda>::step params", dp, p);
  std::vector<T> m(oc.exp_avg().begin(), oc.exp_avg().end()), v(oc.exp_avg_sq().begin(), oc.exp_avg_sq().end());
  expect_close("AdamW<T, distilx::cuda>::step exp_avg", og.exp_avg().to_host(), m);
  expect_close("AdamW<T, distilx::cuda>::step exp_avg_sq", og.exp_avg_sq().to_host(), v);
}

// ---- streams and memory -------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(non_default_stream) {
  // Ops and cuBLAS follow current_stream(); switching streams rebinds the handle and scratch.
  Rng rng(17);
  const index_t M = 700, K = 24, N = 36;
  auto x = randv<double>(M * K, rng), W = randv<double>(N * K, rng), b = randv<double>(N, rng);
  std::vector<double> y(static_cast<std::size_t>(M * N)), s(static_cast<std::size_t>(N), 0.0);
  Dev<double> dx(x), dW(W), db(b), dy(y), ds(s);
  ops::linear_forward(cpu{}, y.data(), x.data(), W.data(), b.data(), M, K, N);
  ops::column_sum(cpu{}, s.data(), y.data(), M, N);
  cudaStream_t st = nullptr;
  DISTILX_CUDA_CHECK(cudaStreamCreate(&st));
  cuda_backend::current_stream() = st;
  ops::linear_forward(distilx::cuda{}, dy.p(), dx.p(), dW.p(), db.p(), M, K, N);
  ops::column_sum(distilx::cuda{}, ds.p(), dy.p(), M, N);
  const double ss = ops::sum_squares(distilx::cuda{}, dy.p(), M * N);
  DISTILX_CUDA_CHECK(cudaStreamSynchronize(st));
  cuda_backend::current_stream() = nullptr;
  expect_close("linear_forward on a created stream", dy, y);
  expect_close("column_sum on a created stream", ds, s);
  BOOST_CHECK_LE(std::abs(ss - ops::sum_squares(cpu{}, y.data(), M * N)) / ss, 1e-12);
  // Back on the default stream, the handle is rebound too.
  ops::linear_forward(distilx::cuda{}, dy.p(), dx.p(), dW.p(), db.p(), M, K, N);
  expect_close("linear_forward back on the default stream", dy, y);
  DISTILX_CUDA_CHECK(cudaStreamDestroy(st));
}

BOOST_AUTO_TEST_CASE(buffer_reuse_through_caching_allocator) {
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  float* first = nullptr;
  {
    Buffer<float, distilx::cuda> a(1000);
    first = a.data();
    std::vector<float> ones(1000, 1.f);
    a.copy_from_host(ones.data(), 1000);
  }
  Buffer<float, distilx::cuda> b(1000);
  BOOST_CHECK_EQUAL(static_cast<void*>(b.data()), static_cast<void*>(first));
  const auto hb = b.to_host();
  BOOST_CHECK(std::all_of(hb.begin(), hb.end(), [](float f) { return f == 0.f; }));  // zeroed on reuse
  float* second = b.data();
  b.resize(990);  // same 512-byte size class: freed, then handed straight back
  BOOST_CHECK_EQUAL(static_cast<void*>(b.data()), static_cast<void*>(second));
  const std::size_t reserved = cuda_backend::CachingAllocator::instance().reserved_bytes();
  for (int i = 0; i < 10; ++i) {
    Buffer<double, distilx::cuda> c(12345);
    Buffer<float, distilx::cuda> d(1 << 20);
  }
  Buffer<double, distilx::cuda> c(12345);
  Buffer<float, distilx::cuda> d(1 << 20);
  // Ten allocate/free rounds, then one more, cost no more device memory than one round.
  BOOST_CHECK_LE(cuda_backend::CachingAllocator::instance().reserved_bytes(),
                 reserved + 12345 * sizeof(double) + 512 + (std::size_t(4) << 20) + (std::size_t(2) << 20));
  Buffer<float, distilx::cuda> copy_of_b(b);
  BOOST_CHECK_NE(static_cast<void*>(copy_of_b.data()), static_cast<void*>(b.data()));
  BOOST_CHECK_EQUAL(copy_of_b.size(), b.size());
}

BOOST_AUTO_TEST_CASE(allocator_counts_live_bytes_and_peak) {
  // in_use counts live allocations by size class (512 B below 1 MiB, 2 MiB above); the peak
  // holds the largest in_use since reset_peak(), whether the blocks came fresh or from the cache.
  auto& a = cuda_backend::CachingAllocator::instance();
  const std::size_t base = a.in_use_bytes();
  a.reset_peak();
  BOOST_CHECK_EQUAL(a.peak_in_use_bytes(), base);
  {
    Buffer<float, distilx::cuda> x(1000);       // 4000 B -> 4096
    Buffer<float, distilx::cuda> y(3 << 18);    // 3 MiB -> 4 MiB
    BOOST_CHECK_EQUAL(a.in_use_bytes(), base + 4096 + (std::size_t(4) << 20));
  }
  BOOST_CHECK_EQUAL(a.in_use_bytes(), base);
  BOOST_CHECK_EQUAL(a.peak_in_use_bytes(), base + 4096 + (std::size_t(4) << 20));
  a.reset_peak();
  {
    Buffer<float, distilx::cuda> z(1000);  // served from the cache: counted all the same
    BOOST_CHECK_EQUAL(a.in_use_bytes(), base + 4096);
  }
  BOOST_CHECK_EQUAL(a.peak_in_use_bytes(), base + 4096);
}

BOOST_AUTO_TEST_SUITE_END()
