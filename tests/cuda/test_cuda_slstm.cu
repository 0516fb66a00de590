// Tests of SLSTMCell<T, cuda> (include/distilx/backend/cuda/slstm.cuh, spec-xlstm.md §3.2-3.6): forward and
// backward against the CPU cell on random inputs for both kernel families (quad, simple), several shapes, batch
// tiles and R placements (registers, shared, global); step() against forward() bit for bit; determinism and
// tile / R-placement invariance (bitwise); += accumulation and frozen parameters; dR following the math mode
// (its cuBLAS products) while the rest stays bitwise fp32; timing prints for the paper shapes (not assertions).
#include <boost/test/unit_test.hpp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "distilx/backend/cuda/slstm.cuh"
#include "distilx/cells/slstm.hpp"
#include "distilx/tensor/tensor.hpp"
#include "distilx/testing/gradcheck.hpp"

namespace {

using distilx::Buffer;
using distilx::cpu;
using distilx::index_t;
using distilx::Rng;
using distilx::SLSTMCell;
using distilx::SLSTMCudaTuning;
using distilx::SLSTMKernel;
using distilx::SLSTMRPlace;

template <class T>
Buffer<T, distilx::cuda> upload(const std::vector<T>& v) {
  Buffer<T, distilx::cuda> b(static_cast<index_t>(v.size()));
  if (!v.empty()) b.copy_from_host(v.data(), static_cast<index_t>(v.size()));
  return b;
}

template <class T>
std::vector<T> download(const Buffer<T, distilx::cuda>& b) {
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  return b.to_host();
}

template <class T>
bool bitwise_equal(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

/// Random cell inputs in the cuda layout, as in the CPU cell's tests (R ~ N(0, 0.3^2): far from zero).
template <class T>
struct Problem {
  index_t B, S, NH, DH;
  std::vector<T> wx, R, bias, dy;  // [B,S,4H], [NH,DH,4DH], [NH,4DH], [B,S,H]
  Problem(index_t b, index_t s, index_t nh, index_t dh, std::uint64_t seed) : B(b), S(s), NH(nh), DH(dh) {
    const index_t H = nh * dh;
    wx.resize(b * s * 4 * H);
    R.resize(nh * dh * 4 * dh);
    bias.resize(nh * 4 * dh);
    dy.resize(b * s * H);
    Rng rng(seed);
    distilx::testing::fill_normal(wx.data(), index_t(wx.size()), rng, 1.0);
    distilx::testing::fill_normal(R.data(), index_t(R.size()), rng, 0.3);
    distilx::testing::fill_normal(bias.data(), index_t(bias.size()), rng, 0.5);
    distilx::testing::fill_normal(dy.data(), index_t(dy.size()), rng, 1.0);
  }
  index_t H() const { return NH * DH; }
};

/// y, dwx, dR, dbias of one forward + backward (dR, dbias from zero).
template <class T>
struct Result {
  std::vector<T> y, dwx, dR, dbias;
};

template <class T>
Result<T> run_cpu(const Problem<T>& p) {
  Result<T> r;
  r.y.assign(p.B * p.S * p.H(), T(0));
  r.dwx.assign(p.wx.size(), T(0));
  r.dR.assign(p.R.size(), T(0));
  r.dbias.assign(p.bias.size(), T(0));
  SLSTMCell<T, cpu> cell(p.NH, p.DH);
  cell.forward(r.y.data(), p.wx.data(), p.R.data(), p.bias.data(), p.B, p.S);
  cell.backward(r.dwx.data(), r.dR.data(), r.dbias.data(), p.dy.data(), p.R.data(), p.B, p.S);
  return r;
}

template <class T>
Result<T> run_gpu(const Problem<T>& p, const SLSTMCudaTuning& tune = {}) {
  SLSTMCell<T, distilx::cuda> cell(p.NH, p.DH);
  cell.tuning() = tune;
  auto wx = upload(p.wx), R = upload(p.R), bias = upload(p.bias), dy = upload(p.dy);
  Buffer<T, distilx::cuda> y(p.B * p.S * p.H()), dwx(index_t(p.wx.size())), dR(index_t(p.R.size())),
      dbias(index_t(p.bias.size()));
  cell.forward(y.data(), wx.data(), R.data(), bias.data(), p.B, p.S);
  cell.backward(dwx.data(), dR.data(), dbias.data(), dy.data(), R.data(), p.B, p.S);
  return {download(y), download(dwx), download(dR), download(dbias)};
}

struct Case {
  index_t B, S, NH, DH;
  int batch_tile = 0;  // 0 = auto
  SLSTMRPlace place = SLSTMRPlace::automatic;
};

const char* place_name(SLSTMRPlace p) {
  switch (p) {
    case SLSTMRPlace::registers: return "registers";
    case SLSTMRPlace::shared: return "shared";
    case SLSTMRPlace::global: return "global";
    default: return "auto";
  }
}

/// Each case through the given kernel family (automatic: quad for DH <= 128) against the CPU cell.
template <class T>
void check_against_cpu(const std::vector<Case>& cases, double tol, SLSTMKernel kernel = SLSTMKernel::automatic) {
  std::uint64_t seed = 11;
  for (const Case& c : cases) {
    const Problem<T> p(c.B, c.S, c.NH, c.DH, seed++);
    const Result<T> ref = run_cpu(p);
    SLSTMCudaTuning tune;
    tune.batch_tile = c.batch_tile;
    tune.r_place = c.place;
    tune.kernel = kernel;
    const Result<T> got = run_gpu(p, tune);
    const double ey = distilx::relative_error(got.y.data(), ref.y.data(), index_t(ref.y.size()));
    const double ew = distilx::relative_error(got.dwx.data(), ref.dwx.data(), index_t(ref.dwx.size()));
    const double er = distilx::relative_error(got.dR.data(), ref.dR.data(), index_t(ref.dR.size()));
    const double eb = distilx::relative_error(got.dbias.data(), ref.dbias.data(), index_t(ref.dbias.size()));
    std::printf(
        "cuda_slstm %s %s B=%lld S=%lld NH=%lld DH=%lld tile=%d R=%s: rel err y %.2e dwx %.2e dR %.2e dbias %.2e\n",
        sizeof(T) == 4 ? "float" : "double", kernel == SLSTMKernel::simple ? "simple" : "auto", (long long)c.B,
        (long long)c.S, (long long)c.NH, (long long)c.DH, c.batch_tile, place_name(c.place), ey, ew, er, eb);
    BOOST_TEST_CONTEXT("B=" << c.B << " S=" << c.S << " NH=" << c.NH << " DH=" << c.DH << " tile=" << c.batch_tile
                            << " R=" << place_name(c.place) << " simple=" << (kernel == SLSTMKernel::simple)) {
      BOOST_TEST(ey <= tol);
      BOOST_TEST(ew <= tol);
      BOOST_TEST(er <= tol);
      BOOST_TEST(eb <= tol);
    }
  }
}

// Small shapes: every batch tile (B not a multiple of it, tiles larger than B), S = 1, head dims that are not
// multiples of 4, R in registers, shared and global memory. Fast enough for compute-sanitizer.
const std::vector<Case> kSmallCases = {
    {1, 1, 1, 3},
    {1, 7, 1, 3},
    {2, 7, 2, 8},
    {5, 7, 4, 3, 2},
    {5, 7, 3, 8, 4, SLSTMRPlace::shared},
    {5, 7, 2, 32, 8},
    {9, 5, 2, 8, 4},
    {3, 7, 2, 32, 2, SLSTMRPlace::global},
    {4, 1, 1, 32},
    {3, 7, 2, 5, 1, SLSTMRPlace::global},
    {2, 3, 1, 13, 0, SLSTMRPlace::shared},
    {6, 6, 2, 40, 4, SLSTMRPlace::registers},
};

using distilx::cuda_backend::MathMode;

/// Sets the process-wide math mode (it decides how dR's cuBLAS products run) for one scope.
struct ModeScope {
  MathMode saved = distilx::cuda_backend::math_mode();
  explicit ModeScope(MathMode m) { distilx::cuda_backend::set_math_mode(m); }
  ~ModeScope() { distilx::cuda_backend::set_math_mode(saved); }
  ModeScope(const ModeScope&) = delete;
  ModeScope& operator=(const ModeScope&) = delete;
};

/// Fills [n] device values with a hash of the index, uniform in [lo, hi) (timing inputs; no host generation).
template <class T>
__global__ void fill_hash_kernel(T* x, index_t n, double lo, double hi, std::uint64_t seed) {
  const index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  std::uint64_t z = static_cast<std::uint64_t>(i) + seed * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  x[i] = static_cast<T>(lo + (hi - lo) * (static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0)));
}

template <class T>
void fill_hash(Buffer<T, distilx::cuda>& b, double lo, double hi, std::uint64_t seed) {
  if (b.size() == 0) return;
  fill_hash_kernel<T><<<static_cast<unsigned>((b.size() + 255) / 256), 256>>>(b.data(), b.size(), lo, hi, seed);
  DISTILX_CUDA_LAUNCH_CHECK();
}

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_slstm)

BOOST_AUTO_TEST_CASE(matches_cpu_small_float) {
  check_against_cpu<float>(kSmallCases, 1e-5);
  check_against_cpu<float>(kSmallCases, 1e-5, SLSTMKernel::simple);
}

BOOST_AUTO_TEST_CASE(matches_cpu_small_double) {
  check_against_cpu<double>(kSmallCases, 1e-12);
  check_against_cpu<double>(kSmallCases, 1e-12, SLSTMKernel::simple);
}

BOOST_AUTO_TEST_CASE(matches_cpu_paper_head_dim) {
  // DH = 96 (the paper's head) with S = 64: float R in registers (quad) or shared memory; DH = 128 (quad: shared;
  // simple: global, as it does not fit) and DH = 160 (simple only, global R); double DH = 96 keeps R in shared
  // memory (quad) or global memory (simple).
  const std::vector<Case> f32 = {{3, 64, 2, 96},
                                 {5, 64, 1, 96, 2},
                                 {2, 64, 4, 96, 1},
                                 {4, 64, 1, 96, 8, SLSTMRPlace::global},
                                 {3, 64, 2, 96, 4, SLSTMRPlace::shared},
                                 {2, 16, 1, 128},
                                 {3, 9, 1, 160}};
  check_against_cpu<float>(f32, 1e-5);
  check_against_cpu<float>(f32, 1e-5, SLSTMKernel::simple);
  const std::vector<Case> f64 = {{3, 32, 2, 96}, {5, 16, 1, 96, 4}};
  check_against_cpu<double>(f64, 1e-12);
  check_against_cpu<double>(f64, 1e-12, SLSTMKernel::simple);
}

BOOST_AUTO_TEST_CASE(step_matches_forward) {
  // step() is the forward kernel with S = 1 and the state in global memory: same instructions, so bitwise.
  for (const Case& c : std::vector<Case>{{3, 9, 2, 32}, {2, 6, 2, 96}, {5, 4, 3, 5}, {2, 3, 1, 160}}) {
    const Problem<float> p(c.B, c.S, c.NH, c.DH, 3);
    const index_t H = p.H();
    SLSTMCell<float, distilx::cuda> cell(p.NH, p.DH);
    auto wx = upload(p.wx), R = upload(p.R), bias = upload(p.bias);
    Buffer<float, distilx::cuda> y(p.B * p.S * H);
    cell.forward(y.data(), wx.data(), R.data(), bias.data(), p.B, p.S);
    const std::vector<float> y_fwd = download(y);

    Buffer<float, distilx::cuda> state(4 * p.B * H), wx_t(p.B * 4 * H), y_t(p.B * H);
    std::vector<float> wx_host(p.B * 4 * H), y_host;
    for (index_t t = 0; t < p.S; ++t) {
      for (index_t b = 0; b < p.B; ++b)
        std::memcpy(&wx_host[b * 4 * H], &p.wx[(b * p.S + t) * 4 * H], sizeof(float) * 4 * H);
      wx_t.copy_from_host(wx_host.data(), index_t(wx_host.size()));
      SLSTMCell<float, distilx::cuda>::step(y_t.data(), state.data(), wx_t.data(), R.data(), bias.data(), p.B, p.NH,
                                            p.DH);
      y_host = download(y_t);
      const std::vector<float> st = download(state);
      bool same = true, state_y = true;
      for (index_t b = 0; b < p.B; ++b)
        for (index_t u = 0; u < H; ++u) {
          same = same && y_host[b * H + u] == y_fwd[(b * p.S + t) * H + u];
          state_y = state_y && st[b * H + u] == y_host[b * H + u];
        }
      BOOST_TEST(same, "DH=" << c.DH << " position " << t << ": step differs from forward");
      BOOST_TEST(state_y, "DH=" << c.DH << " position " << t << ": state y differs from the output");
    }
  }
}

BOOST_AUTO_TEST_CASE(deterministic_and_tile_invariant) {
  // Two runs bit-identical; within a kernel family every batch tile and R placement gives bit-identical results
  // too (each row and unit runs the same instruction sequence; dR is a cuBLAS product of the same operands and
  // shape, dbias a fixed split of the rows without atomics).
  const Problem<float> p(5, 33, 2, 96, 21);
  for (SLSTMKernel kernel : {SLSTMKernel::quad, SLSTMKernel::simple}) {
    SLSTMCudaTuning base;
    base.kernel = kernel;
    const Result<float> a = run_gpu(p, base), b = run_gpu(p, base);
    BOOST_TEST(bitwise_equal(a.y, b.y));
    BOOST_TEST(bitwise_equal(a.dwx, b.dwx));
    BOOST_TEST(bitwise_equal(a.dR, b.dR));
    BOOST_TEST(bitwise_equal(a.dbias, b.dbias));
    for (int bt : {1, 2, 4, 8})
      for (SLSTMRPlace place : {SLSTMRPlace::registers, SLSTMRPlace::shared, SLSTMRPlace::global}) {
        SLSTMCudaTuning tune = base;
        tune.batch_tile = bt;
        tune.r_place = place;
        const Result<float> c = run_gpu(p, tune);
        BOOST_TEST_CONTEXT("simple " << (kernel == SLSTMKernel::simple) << " tile " << bt << " R "
                                     << place_name(place)) {
          BOOST_TEST(bitwise_equal(a.y, c.y));
          BOOST_TEST(bitwise_equal(a.dwx, c.dwx));
          BOOST_TEST(bitwise_equal(a.dR, c.dR));
          BOOST_TEST(bitwise_equal(a.dbias, c.dbias));
        }
      }
  }
  // Many rows: several reduction splits (B*S = 2400 rows).
  const Problem<float> q(3, 800, 1, 8, 22);
  const Result<float> qa = run_gpu(q), qb = run_gpu(q);
  BOOST_TEST(bitwise_equal(qa.dR, qb.dR));
  BOOST_TEST(bitwise_equal(qa.dbias, qb.dbias));
  const Result<float> qr = run_cpu(q);
  BOOST_TEST(distilx::relative_error(qa.dR.data(), qr.dR.data(), index_t(qr.dR.size())) <= 1e-5);
  BOOST_TEST(distilx::relative_error(qa.dbias.data(), qr.dbias.data(), index_t(qr.dbias.size())) <= 1e-5);
  BOOST_TEST(distilx::relative_error(qa.dwx.data(), qr.dwx.data(), index_t(qr.dwx.size())) <= 1e-5);
}

BOOST_AUTO_TEST_CASE(accumulates_and_frozen) {
  // dR and dbias are accumulated (+=); null dR or dbias (frozen) leaves dwx and the other gradient unchanged.
  const Problem<double> p(3, 9, 2, 8, 5);
  const Result<double> ref = run_gpu(p);
  SLSTMCell<double, distilx::cuda> cell(p.NH, p.DH);
  auto wx = upload(p.wx), R = upload(p.R), bias = upload(p.bias), dy = upload(p.dy);
  Buffer<double, distilx::cuda> y(p.B * p.S * p.H()), dwx(index_t(p.wx.size()));
  std::vector<double> r0(p.R.size()), b0(p.bias.size());
  Rng rng(9);
  distilx::testing::fill_normal(r0.data(), index_t(r0.size()), rng, 0.1);
  distilx::testing::fill_normal(b0.data(), index_t(b0.size()), rng, 0.1);
  auto dR = upload(r0), dbias = upload(b0);
  cell.forward(y.data(), wx.data(), R.data(), bias.data(), p.B, p.S);
  cell.backward(dwx.data(), dR.data(), dbias.data(), dy.data(), R.data(), p.B, p.S);
  const std::vector<double> gr = download(dR), gb = download(dbias);
  std::vector<double> er(gr.size()), eb(gb.size());
  for (std::size_t i = 0; i < gr.size(); ++i) er[i] = r0[i] + ref.dR[i];
  for (std::size_t i = 0; i < gb.size(); ++i) eb[i] = b0[i] + ref.dbias[i];
  BOOST_TEST(distilx::relative_error(gr.data(), er.data(), index_t(er.size())) <= 1e-15);
  BOOST_TEST(distilx::relative_error(gb.data(), eb.data(), index_t(eb.size())) <= 1e-15);

  Buffer<double, distilx::cuda> dR2(index_t(p.R.size())), db2(index_t(p.bias.size()));
  cell.backward(dwx.data(), nullptr, db2.data(), dy.data(), R.data(), p.B, p.S);
  BOOST_TEST(bitwise_equal(download(dwx), ref.dwx));
  BOOST_TEST(bitwise_equal(download(db2), ref.dbias));
  cell.backward(dwx.data(), dR2.data(), nullptr, dy.data(), R.data(), p.B, p.S);
  BOOST_TEST(bitwise_equal(download(dR2), ref.dR));
  cell.backward(dwx.data(), nullptr, nullptr, dy.data(), R.data(), p.B, p.S);
  BOOST_TEST(bitwise_equal(download(dwx), ref.dwx));
  // backward with another (B, S) than the last forward is refused.
  BOOST_CHECK_THROW(cell.backward(dwx.data(), nullptr, nullptr, dy.data(), R.data(), p.B, p.S - 1),
                    distilx::shape_error);
}

BOOST_AUTO_TEST_CASE(dr_follows_math_mode) {
  // dR is a cuBLAS product (ops::gemm_strided_batched, one call per gate over the heads) and follows
  // cuda_backend::math_mode(): exact fp32 in fp32 mode, TF32 or 16-bit operands otherwise. Head dim 96 (> 32, so
  // the 16-bit path is not skipped as a thin product), 4 heads, 3 sequences of 40 steps: the products cross
  // batch rows and heads, and rows t = 0 must contribute nothing. The recurrence and dbias do not use the math
  // mode: y, dwx and dbias must be bitwise the fp32 mode's.
  const Problem<float> p(3, 40, 4, 96, 31);
  const Result<float> ref = run_cpu(p);
  Result<float> base;
  {
    ModeScope m(MathMode::fp32);
    base = run_gpu(p);
  }
  BOOST_TEST(distilx::relative_error(base.dR.data(), ref.dR.data(), index_t(ref.dR.size())) <= 1e-5);
  // Operands rounded to TF32 / fp16 (10 mantissa bits) or bf16 (7), accumulation in fp32: expected norm-wise
  // errors are a few 1e-4 (fp16, TF32; up to ~1e-3 if TF32 truncates) and ~2e-3 (bf16). The bounds leave room for
  // that and still fail on any indexing or boundary error (those give errors of order one).
  const struct {
    MathMode mode;
    const char* name;
    double tol;
  } modes[] = {{MathMode::tf32, "tf32", 5e-3}, {MathMode::bf16, "bf16", 1e-2}, {MathMode::fp16, "fp16", 3e-3}};
  for (const auto& md : modes) {
    ModeScope m(md.mode);
    const Result<float> got = run_gpu(p);
    const double er = distilx::relative_error(got.dR.data(), ref.dR.data(), index_t(ref.dR.size()));
    std::printf("cuda_slstm dR in %s mode: rel err %.2e (bound %.0e)\n", md.name, er, md.tol);
    BOOST_TEST_CONTEXT("math mode " << md.name) {
      BOOST_TEST(er <= md.tol);
      BOOST_TEST(bitwise_equal(got.y, base.y));
      BOOST_TEST(bitwise_equal(got.dwx, base.dwx));
      BOOST_TEST(bitwise_equal(got.dbias, base.dbias));
      if (md.mode == MathMode::bf16) BOOST_TEST(!bitwise_equal(got.dR, base.dR));  // the 16-bit path did run
    }
  }
}

BOOST_AUTO_TEST_CASE(timing_paper_shapes) {
  // Not an assertion: forward / backward milliseconds for one sLSTM layer of the paper config (16 heads x 96),
  // 8192 tokens as B 16 x S 512 and B 4 x S 2048, float; the default plan (quad, R in registers) against quad
  // with R in shared memory and the simple kernels, measured in the same run.
  // The default plan also in TF32 and bf16 math mode, which only changes dR's cuBLAS products (dR+dbias column).
  struct Variant {
    const char* name;
    SLSTMKernel kernel;
    SLSTMRPlace place;
    MathMode mode;
  };
  const Variant variants[] = {{"default", SLSTMKernel::automatic, SLSTMRPlace::automatic, MathMode::fp32},
                              {"quad/sharedR", SLSTMKernel::quad, SLSTMRPlace::shared, MathMode::fp32},
                              {"simple", SLSTMKernel::simple, SLSTMRPlace::automatic, MathMode::fp32},
                              {"default/tf32", SLSTMKernel::automatic, SLSTMRPlace::automatic, MathMode::tf32},
                              {"default/bf16", SLSTMKernel::automatic, SLSTMRPlace::automatic, MathMode::bf16}};
  cudaDeviceProp prop{};
  DISTILX_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  for (const Case& c : std::vector<Case>{{16, 512, 16, 96}, {4, 2048, 16, 96}}) {
    const index_t H = c.NH * c.DH, nR = c.NH * c.DH * 4 * c.DH, nb = c.NH * 4 * c.DH;
    Buffer<float, distilx::cuda> wx(c.B * c.S * 4 * H), R(nR), bias(nb), dy(c.B * c.S * H);
    Buffer<float, distilx::cuda> y(c.B * c.S * H), dwx(c.B * c.S * 4 * H), dR(nR), dbias(nb);
    fill_hash(wx, -1.0, 1.0, 1);
    fill_hash(R, -0.1, 0.1, 2);
    fill_hash(bias, -0.5, 0.5, 3);
    fill_hash(dy, -1.0, 1.0, 4);
    cudaEvent_t e[4];
    for (cudaEvent_t& ev : e) DISTILX_CUDA_CHECK(cudaEventCreate(&ev));
    for (const Variant& v : variants) {
      ModeScope mode(v.mode);
      SLSTMCell<float, distilx::cuda> cell(c.NH, c.DH);
      cell.tuning().kernel = v.kernel;
      cell.tuning().r_place = v.place;
      auto fwd = [&] { cell.forward(y.data(), wx.data(), R.data(), bias.data(), c.B, c.S); };
      auto bwd = [&] { cell.backward(dwx.data(), dR.data(), dbias.data(), dy.data(), R.data(), c.B, c.S); };
      auto bwd_rec = [&] { cell.backward(dwx.data(), nullptr, nullptr, dy.data(), R.data(), c.B, c.S); };
      fwd();
      bwd();
      const int iters = 5;
      float ms_f = 0, ms_b = 0, ms_r = 0;
      for (int i = 0; i < iters; ++i) {
        DISTILX_CUDA_CHECK(cudaEventRecord(e[0]));
        fwd();
        DISTILX_CUDA_CHECK(cudaEventRecord(e[1]));
        bwd();
        DISTILX_CUDA_CHECK(cudaEventRecord(e[2]));
        bwd_rec();
        DISTILX_CUDA_CHECK(cudaEventRecord(e[3]));
        DISTILX_CUDA_CHECK(cudaEventSynchronize(e[3]));
        float a = 0, b = 0, r = 0;
        DISTILX_CUDA_CHECK(cudaEventElapsedTime(&a, e[0], e[1]));
        DISTILX_CUDA_CHECK(cudaEventElapsedTime(&b, e[1], e[2]));
        DISTILX_CUDA_CHECK(cudaEventElapsedTime(&r, e[2], e[3]));
        ms_f += a / iters, ms_b += b / iters, ms_r += r / iters;
      }
      std::printf(
          "cuda_slstm timing [%s] %-12s B=%lld S=%lld NH=%lld DH=%lld: forward %.3f ms (%.2f us/step), backward "
          "%.3f ms (recurrence %.3f ms = %.2f us/step, dR+dbias %.3f ms), forward+backward %.3f ms\n",
          prop.name, v.name, (long long)c.B, (long long)c.S, (long long)c.NH, (long long)c.DH, ms_f,
          1000.0 * ms_f / c.S, ms_b, ms_r, 1000.0 * ms_r / c.S, ms_b - ms_r, ms_f + ms_b);
    }
    for (cudaEvent_t ev : e) DISTILX_CUDA_CHECK(cudaEventDestroy(ev));
  }
}

BOOST_AUTO_TEST_SUITE_END()
