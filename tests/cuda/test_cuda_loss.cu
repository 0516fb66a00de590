// The vocabulary-sized loss and the hidden-state alignment on the GPU against the CPU backend:
// distill_rows on every launch path (one block per row, row split over a cluster, segment cached
// in shared memory or re-read, vector and scalar loads) with -inf logits, padding rows, missing
// targets and an in-place gradient; VocabLoss<T, cuda> for every divergence at tau 1 and 2, with
// the teacher from h_t/W_t, from precomputed z_t, and CE only, over chunks that do not divide M;
// AlignmentLoss<T, cuda> for every policy; DeltaDistillationLoss<float, cuda> end to end; one case
// at the paper's shape (skipped when DISTILX_SKIP_LARGE is set, e.g. under compute-sanitizer).
// Norm-relative tolerances per tensor: float 1e-5 on the row kernel, 1e-4 through the LM-head
// GEMMs (TF32 off); double 1e-11 / 1e-10; bf16 and fp16 GEMM operands 2e-2 (the softmaxes, KL
// and CE stay fp32). Runs must be bit-identical.
#include <boost/mpl/list.hpp>
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "distilx/cuda.cuh"
#include "cuda_test_util.cuh"
#include "distilx/testing/gradcheck.hpp"

using namespace distilx;

namespace {

using Scalars = boost::mpl::list<float, double>;
using Tuning = cuda_backend::DistillRowsTuning;

template <class T>
const char* tname() {
  return std::is_same_v<T, float> ? "float" : "double";
}
/// Tolerance of the row kernel alone, and of results that went through the LM-head GEMMs.
template <class T>
double tol_rows() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-11;
}
template <class T>
double tol_gemm() {
  return std::is_same_v<T, float> ? 1e-4 : 1e-10;
}

template <class T>
std::vector<T> normal(index_t n, Rng& rng, double std) {
  std::vector<T> v(static_cast<std::size_t>(n));
  for (auto& e : v) e = static_cast<T>(rng.normal() * std);
  return v;
}

template <class T>
struct Dev {
  Buffer<T, distilx::cuda> buf;
  explicit Dev(const std::vector<T>& h) : buf(static_cast<index_t>(h.size())) {
    buf.copy_from_host(h.data(), static_cast<index_t>(h.size()));
  }
  explicit Dev(index_t n) : buf(n) {}
  T* p() { return buf.data(); }
  std::vector<T> host() const { return buf.to_host(); }
};

/// Records the worst error seen by a test case and prints it at the end.
struct Worst {
  std::string name;
  double err = 0;
  ~Worst() { BOOST_TEST_MESSAGE(name << ": worst relative error " << err); }
  template <class A, class B>
  void check(const std::string& what, const A* got, const B* ref, index_t n, double tol) {
    const double e = relative_error(got, ref, n);
    err = std::max(err, e);
    BOOST_CHECK_MESSAGE(e <= tol, name << " / " << what << ": relative error " << e << " > " << tol);
  }
  template <class A, class B>
  void check(const std::string& what, const std::vector<A>& got, const std::vector<B>& ref, double tol) {
    BOOST_REQUIRE_EQUAL(got.size(), ref.size());
    check(what, got.data(), ref.data(), static_cast<index_t>(ref.size()), tol);
  }
  void check_scalar(const std::string& what, double got, double ref, double tol) { check(what, &got, &ref, 1, tol); }
};

/// Sets the distill_rows launch tuning for a scope.
struct ScopedTuning {
  Tuning saved;
  explicit ScopedTuning(Tuning t) : saved(cuda_backend::distill_rows_tuning()) { cuda_backend::distill_rows_tuning() = t; }
  ~ScopedTuning() { cuda_backend::distill_rows_tuning() = saved; }
};

std::string describe(const Tuning& t) {
  return "cluster " + std::to_string(t.cluster) + (t.cached == 0 ? " re-read" : t.cached == 1 ? " cached" : " auto") +
         (t.threads ? " threads " + std::to_string(t.threads) : "");
}

const Divergence kDivergences[] = {Divergence::forward_kl, Divergence::reverse_kl, Divergence::jsd,
                                   Divergence::skew_kl};

std::vector<std::uint8_t> make_mask(index_t M, Rng& rng) {
  std::vector<std::uint8_t> m(static_cast<std::size_t>(M));
  for (auto& x : m) x = rng.uniform() < 0.8 ? 1 : 0;
  return m;
}
std::vector<std::int32_t> make_targets(index_t M, index_t V, Rng& rng) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(M));
  for (auto& x : t) x = rng.uniform() < 0.2 ? -1 : static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(V)));
  return t;
}

bool skip_large() { return std::getenv("DISTILX_SKIP_LARGE") != nullptr; }

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_loss)

// ---- the row kernel -------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE_TEMPLATE(distill_rows_matches_cpu_on_every_launch_path, T, Scalars) {
  Worst w{std::string("distill_rows <") + tname<T>() + ">"};
  Rng rng(11);
  const index_t R = 13;
  // Under compute-sanitizer (DISTILX_SKIP_LARGE) fewer shapes, so that racecheck ends in minutes.
  const bool quick = skip_large();
  const std::vector<Tuning> tunings = quick ? std::vector<Tuning>{{0, -1, 0}, {4, 1, 0}, {4, 0, 0}, {16, 1, 32}}
                                            : std::vector<Tuning>{{0, -1, 0}, {4, 1, 0}, {4, 0, 0}, {1, 0, 0},
                                                                  {1, 1, 0}, {2, 1, 64}, {16, 1, 32}, {8, 0, 128}};
  const std::vector<T> taus = quick ? std::vector<T>{T(2)} : std::vector<T>{T(1), T(2)};
  for (index_t V : {index_t(1000), index_t(997)}) {  // vector and scalar loads
    auto zs = normal<T>(R * V, rng, 3.0), zt = normal<T>(R * V, rng, 3.0);
    // A masked vocabulary: -inf on both sides in some columns, and one row whose maximum is late.
    for (index_t r = 0; r < R; ++r)
      for (index_t j : {index_t(0), index_t(5), V - 1}) zs[r * V + j] = zt[r * V + j] = -std::numeric_limits<T>::infinity();
    zs[3 * V + V - 2] = T(40);
    auto mask = make_mask(R, rng);
    mask[2] = 0;
    auto targets = make_targets(R, V, rng);
    targets[4] = -1;
    targets[6] = static_cast<std::int32_t>(V - 2);
    Dev<T> d_zt(zt);
    for (Divergence K : kDivergences)
      for (T tau : taus)
        for (int variant = 0; variant < 3; ++variant) {  // 0: full, 1: no gradient, 2: no teacher
          ops::DistillRows<T> a;
          a.zs = zs.data();
          a.zt = variant == 2 ? nullptr : zt.data();
          a.targets = targets.data();
          a.mask = mask.data();
          a.R = R;
          a.V = V;
          a.divergence = K;
          a.beta = 0.3;
          a.tau = tau;
          a.div_coef = T(0.37);
          a.ce_coef = T(0.81);
          std::vector<double> div(R), ce(R);
          std::vector<std::uint8_t> agree(R);
          std::vector<T> dz(static_cast<std::size_t>(R * V));
          a.div = div.data();
          a.ce = ce.data();
          a.agree = agree.data();
          a.dz = variant == 1 ? nullptr : dz.data();
          ops::distill_rows(cpu{}, a);
          for (const Tuning& tu : tunings) {
            ScopedTuning scope(tu);
            const std::string what = std::string(to_string(K)) + " tau " + std::to_string(int(tau)) + " V " +
                                     std::to_string(V) + " variant " + std::to_string(variant) + " " + describe(tu);
            std::vector<double> gdiv(R, -1), gce(R, -1), gdiv2(R), gce2(R);
            std::vector<std::uint8_t> gagree(R, 7), gagree2(R);
            std::vector<std::vector<T>> gz;
            for (int run = 0; run < (quick ? 1 : 2); ++run) {  // twice: bit-identical
              Dev<T> d_zs(zs);                   // the gradient overwrites it in place
              ops::DistillRows<T> g = a;
              g.zs = d_zs.p();
              g.zt = a.zt ? d_zt.p() : nullptr;
              g.dz = a.dz ? d_zs.p() : nullptr;
              g.div = run ? gdiv2.data() : gdiv.data();
              g.ce = run ? gce2.data() : gce.data();
              g.agree = run ? gagree2.data() : gagree.data();
              ops::distill_rows(distilx::cuda{}, g);
              gz.push_back(d_zs.host());
            }
            w.check(what + " div", gdiv, div, tol_rows<T>());
            w.check(what + " ce", gce, ce, tol_rows<T>());
            BOOST_CHECK_MESSAGE(gagree == agree, what << ": top-1 agreement differs from the CPU");
            if (a.dz) w.check(what + " dz", gz[0], dz, tol_rows<T>());
            if (!quick)
              BOOST_CHECK_MESSAGE(gdiv == gdiv2 && gce == gce2 && gagree == gagree2 &&
                                      std::memcmp(gz[0].data(), gz[1].data(), sizeof(T) * gz[0].size()) == 0,
                                  what << ": two runs are not bit-identical");
          }
        }
  }
}

BOOST_AUTO_TEST_CASE(distill_rows_rejects_bad_input) {
  const index_t R = 2, V = 8;
  Dev<float> zs(std::vector<float>(R * V, 0.f));
  std::vector<double> div(R), ce(R);
  std::vector<std::uint8_t> agree(R);
  std::vector<std::int32_t> targets = {1, 8};
  ops::DistillRows<float> a;
  a.zs = zs.p();
  a.R = R;
  a.V = V;
  a.targets = targets.data();
  a.div = div.data();
  a.ce = ce.data();
  a.agree = agree.data();
  BOOST_CHECK_THROW(ops::distill_rows(distilx::cuda{}, a), error);  // target 8 outside V = 8
  targets[1] = 3;
  ScopedTuning scope({3, -1, 0});
  BOOST_CHECK_THROW(ops::distill_rows(distilx::cuda{}, a), error);  // cluster 3
}

// ---- VocabLoss ------------------------------------------------------------------------------

namespace {

template <class T>
struct VocabCase {
  index_t M = 45, d = 24, d_t = 20, V = 1000;
  std::vector<T> h_s, E_s, h_t, W_t, z_t;
  std::vector<std::int32_t> targets;
  std::vector<std::uint8_t> mask;
  explicit VocabCase(Rng& rng, index_t M_ = 45, index_t d_ = 24, index_t V_ = 1000) : M(M_), d(d_), d_t(d_ - 4), V(V_) {
    h_s = normal<T>(M * d, rng, 1.0);
    E_s = normal<T>(V * d, rng, 2.0 / std::sqrt(double(d)));
    h_t = normal<T>(M * d_t, rng, 1.0);
    W_t = normal<T>(V * d_t, rng, 2.0 / std::sqrt(double(d_t)));
    z_t = normal<T>(M * V, rng, 2.0);
    targets = make_targets(M, V, rng);
    mask = make_mask(M, rng);
  }
};

enum class TeacherFrom { head, logits, none };

template <class T>
void compare_vocab(Worst& w, const VocabCase<T>& c, Divergence K, double tau, TeacherFrom from, index_t chunk,
                   const std::vector<T>* z_t_override = nullptr) {
  const std::vector<T>& zt_host = z_t_override ? *z_t_override : c.z_t;
  Dev<T> h_s(c.h_s), E_s(c.E_s), h_t(c.h_t), W_t(c.W_t), z_t(zt_host), dh(c.M * c.d);
  VocabLossInputs<T> in_c, in_g;
  in_c.M = in_g.M = c.M;
  in_c.d = in_g.d = c.d;
  in_c.V = in_g.V = c.V;
  in_c.targets = in_g.targets = c.targets.data();
  in_c.mask = in_g.mask = c.mask.data();
  in_c.h_s = c.h_s.data();
  in_c.E_s = c.E_s.data();
  in_g.h_s = h_s.p();
  in_g.E_s = E_s.p();
  if (from == TeacherFrom::head) {
    in_c.d_t = in_g.d_t = c.d_t;
    in_c.h_t = c.h_t.data();
    in_c.W_t = c.W_t.data();
    in_g.h_t = h_t.p();
    in_g.W_t = W_t.p();
  } else if (from == TeacherFrom::logits) {
    in_c.z_t = zt_host.data();
    in_g.z_t = z_t.p();
  }
  VocabLossConfig cfg;
  cfg.divergence = K;
  cfg.beta = 0.3;
  cfg.chunk_rows = chunk;
  VocabLoss<T> lc(cfg);
  VocabLoss<T, distilx::cuda> lg(cfg);
  std::vector<T> dh_c(static_cast<std::size_t>(c.M * c.d));
  const double kl_scale = 0.2 * tau * tau, ce_w = 0.8;
  const VocabLossResult rc = lc.compute(in_c, tau, kl_scale, ce_w, dh_c.data(), true);
  const VocabLossResult rg = lg.compute(in_g, tau, kl_scale, ce_w, dh.p(), true);
  const std::string what = std::string(to_string(K)) + " tau " + std::to_string(int(tau)) +
                           (from == TeacherFrom::head ? " teacher head" : from == TeacherFrom::logits ? " z_t" : " CE only") +
                           " chunk " + std::to_string(chunk);
  if (from != TeacherFrom::none) w.check_scalar(what + " kl", rg.kl, rc.kl, tol_gemm<T>());
  w.check_scalar(what + " ce", rg.ce, rc.ce, tol_gemm<T>());
  BOOST_CHECK_EQUAL(rg.positions, rc.positions);
  BOOST_CHECK_EQUAL(rg.targets, rc.targets);
  BOOST_CHECK_MESSAGE(rg.top1_agree == rc.top1_agree,
                      what << ": top-1 agreement " << rg.top1_agree << " vs CPU " << rc.top1_agree);
  w.check(what + " dh_s", dh.host(), dh_c, tol_gemm<T>());
  // Without the gradient: same values.
  const VocabLossResult rn = lg.compute(in_g, tau, kl_scale, ce_w, nullptr, false);
  if (from != TeacherFrom::none) w.check_scalar(what + " kl (no grad)", rn.kl, rc.kl, tol_gemm<T>());
  w.check_scalar(what + " ce (no grad)", rn.ce, rc.ce, tol_gemm<T>());
}

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(vocab_loss_matches_cpu, T, Scalars) {
  Worst w{std::string("VocabLoss <") + tname<T>() + ">"};
  Rng rng(21);
  VocabCase<T> c(rng);
  for (index_t m = 16; m < 32; ++m) c.mask[std::size_t(m)] = 0;  // one whole chunk of padding
  // Masked teacher vocabulary for the precomputed-logits case (finite divergences only for
  // forward_kl, jsd, skew_kl: reverse KL is +inf where p_t = 0 < p_s).
  std::vector<T> zt_masked = c.z_t;
  for (index_t m = 0; m < c.M; ++m)
    for (index_t j = 3; j < c.V; j += 97) zt_masked[m * c.V + j] = -std::numeric_limits<T>::infinity();
  for (Divergence K : kDivergences)
    for (double tau : {1.0, 2.0}) {
      compare_vocab(w, c, K, tau, TeacherFrom::head, 16);
      compare_vocab(w, c, K, tau, TeacherFrom::logits, 7, K == Divergence::reverse_kl ? nullptr : &zt_masked);
    }
  compare_vocab(w, c, Divergence::forward_kl, 1.0, TeacherFrom::none, 16);
  compare_vocab(w, c, Divergence::forward_kl, 2.0, TeacherFrom::none, 64);
  // Split over a cluster (re-read and cached), on a vocabulary of odd size.
  VocabCase<T> odd(rng, 19, 16, 1001);
  for (Tuning tu : {Tuning{8, 1, 128}, Tuning{4, 0, 64}}) {
    ScopedTuning scope(tu);
    compare_vocab(w, odd, Divergence::jsd, 2.0, TeacherFrom::head, 5);
    compare_vocab(w, odd, Divergence::forward_kl, 2.0, TeacherFrom::head, 5);
  }
}

// ---- alignment ------------------------------------------------------------------------------

namespace {

template <class T>
void compare_alignment(Worst& w, AlignmentPolicy p, index_t L_s, index_t L_t, Rng& rng) {
  const index_t B = 3, S = 11, M = B * S, d = 40;
  std::vector<std::vector<T>> hs, ht;
  for (index_t i = 0; i < L_s; ++i) hs.push_back(normal<T>(M * d, rng, 1.0));
  for (index_t i = 0; i < L_t; ++i) ht.push_back(normal<T>(M * d, rng, 1.0));
  for (index_t k = 0; k < d; ++k) hs[0][5 * d + k] = T(0);  // a zero student row (cosine: undefined, gradient 0)
  std::vector<std::uint8_t> mask = make_mask(M, rng);
  for (index_t m = S; m < 2 * S; ++m) mask[std::size_t(m)] = 0;  // batch item 1 is all padding
  mask[5] = 1;
  std::vector<Dev<T>> dhs, dht, dg;
  AlignmentInputs<T> ic, ig;
  std::vector<std::vector<T>> gc(std::size_t(L_s), std::vector<T>(std::size_t(M * d)));
  std::vector<T*> gc_ptr, gg_ptr;
  for (auto& v : hs) dhs.emplace_back(v), ic.H_s.push_back(v.data());
  for (auto& v : ht) dht.emplace_back(v), ic.H_t.push_back(v.data());
  for (auto& v : dhs) ig.H_s.push_back(v.p());
  for (auto& v : dht) ig.H_t.push_back(v.p());
  for (index_t i = 0; i < L_s; ++i) dg.emplace_back(M * d);
  for (auto& v : gc) gc_ptr.push_back(v.data());
  for (auto& v : dg) gg_ptr.push_back(v.p());
  ic.mask = ig.mask = mask.data();
  ic.M = ig.M = M;
  ic.d = ig.d = ic.d_t = ig.d_t = d;
  ic.batch = ig.batch = B;
  AlignmentLoss<T> ac(p);
  AlignmentLoss<T, distilx::cuda> ag(p);
  const AlignmentResult rc = ac.compute(ic, &gc_ptr, 0.7);
  const AlignmentResult rg = ag.compute(ig, &gg_ptr, 0.7);
  const std::string what = to_string(p);
  w.check_scalar(what + " value", rg.value, rc.value, tol_rows<T>());
  BOOST_CHECK_EQUAL(rg.positions, rc.positions);
  for (index_t i = 0; i < L_s; ++i) w.check(what + " dH_s[" + std::to_string(i) + "]", dg[std::size_t(i)].host(), gc[std::size_t(i)], tol_rows<T>());
  const AlignmentResult rn = ag.compute(ig);  // value only
  w.check_scalar(what + " value (no grad)", rn.value, rc.value, tol_rows<T>());
}

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(alignment_matches_cpu, T, Scalars) {
  Worst w{std::string("AlignmentLoss <") + tname<T>() + ">"};
  Rng rng(31);
  compare_alignment<T>(w, AlignmentPolicy::ratio, 3, 7, rng);
  compare_alignment<T>(w, AlignmentPolicy::average, 3, 7, rng);
  compare_alignment<T>(w, AlignmentPolicy::block_wise, 3, 3, rng);
  compare_alignment<T>(w, AlignmentPolicy::cosine, 3, 7, rng);
}

// ---- the whole loss -------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(distillation_loss_end_to_end) {
  Worst w{"DeltaDistillationLoss <float>"};
  Rng rng(41);
  VocabCase<float> c(rng, 40, 32, 1000);
  c.d_t = c.d;
  c.h_t = normal<float>(c.M * c.d, rng, 1.0);
  c.W_t = normal<float>(c.V * c.d, rng, 2.0 / std::sqrt(double(c.d)));
  const index_t L_s = 3, L_t = 8, M = c.M, d = c.d;
  std::vector<std::vector<float>> hs, ht;
  for (index_t i = 0; i < L_s; ++i) hs.push_back(normal<float>(M * d, rng, 1.0));
  for (index_t i = 0; i < L_t; ++i) ht.push_back(normal<float>(M * d, rng, 1.0));
  std::vector<Dev<float>> dhs, dht, dgh;
  Dev<float> h_s(c.h_s), E_s(c.E_s), h_t(c.h_t), W_t(c.W_t), dh(M * d);
  DistillationInputs<float> ic, ig;
  ic.vocab = {c.h_s.data(), c.E_s.data(), c.h_t.data(), c.W_t.data(), nullptr, c.targets.data(), c.mask.data(),
              M, d, d, c.V};
  ig.vocab = {h_s.p(), E_s.p(), h_t.p(), W_t.p(), nullptr, c.targets.data(), c.mask.data(), M, d, d, c.V};
  for (auto& v : hs) dhs.emplace_back(v), ic.H_s.push_back(v.data());
  for (auto& v : ht) dht.emplace_back(v), ic.H_t.push_back(v.data());
  for (auto& v : dhs) ig.H_s.push_back(v.p());
  for (auto& v : dht) ig.H_t.push_back(v.p());
  std::vector<float> dh_c(std::size_t(M * d));
  std::vector<std::vector<float>> dH_c(std::size_t(L_s), std::vector<float>(std::size_t(M * d)));
  DistillationGrads<float> gc, gg;
  gc.dh_s = dh_c.data();
  for (auto& v : dH_c) gc.dH_s.push_back(v.data());
  gg.dh_s = dh.p();
  for (index_t i = 0; i < L_s; ++i) dgh.emplace_back(M * d);
  for (auto& v : dgh) gg.dH_s.push_back(v.p());
  DistillationLossConfig cfg;
  cfg.chunk_rows = 16;
  DeltaDistillationLoss<float> lc(cfg);
  DeltaDistillationLoss<float, distilx::cuda> lg(cfg);
  const DistillationMetrics mc = lc.compute(ic, 0, 0, gc);
  const DistillationMetrics mg = lg.compute(ig, 0, 0, gg);
  w.check_scalar("total", mg.total, mc.total, 1e-4);
  w.check_scalar("kl", mg.kl, mc.kl, 1e-4);
  w.check_scalar("ce", mg.ce, mc.ce, 1e-4);
  w.check_scalar("alignment", mg.alignment, mc.alignment, 1e-4);
  BOOST_CHECK_EQUAL(mg.positions, mc.positions);
  BOOST_CHECK_CLOSE(mg.top1, mc.top1, 1e-9);
  w.check("dh_s", dh.host(), dh_c, 1e-4);
  for (index_t i = 0; i < L_s; ++i) w.check("dH_s[" + std::to_string(i) + "]", dgh[std::size_t(i)].host(), dH_c[std::size_t(i)], 1e-4);
}

// ---- 16-bit GEMM operands --------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(vocab_loss_16bit_gemms_match_cpu) {
  // bf16 / fp16 LM-head products (fp32 accumulation), fp32 softmaxes, KL, CE and gradient: within
  // 2e-2 of the exact CPU loss. Rows per chunk and width above 32 so the 16-bit path is taken
  // (thinner products stay fp32); the result must differ from the fp32 GPU run, or it was not.
  Worst w{"VocabLoss <float> with 16-bit GEMM operands"};
  Rng rng(61);
  VocabCase<float> c(rng, 200, 96, 3000);
  Dev<float> h_s(c.h_s), E_s(c.E_s), h_t(c.h_t), W_t(c.W_t), dh(c.M * c.d), dh32(c.M * c.d);
  VocabLossInputs<float> in_c{c.h_s.data(), c.E_s.data(), c.h_t.data(), c.W_t.data(), nullptr, c.targets.data(),
                              c.mask.data(), c.M, c.d, c.d_t, c.V};
  VocabLossInputs<float> in_g{h_s.p(), E_s.p(), h_t.p(), W_t.p(), nullptr, c.targets.data(), c.mask.data(), c.M, c.d,
                              c.d_t, c.V};
  for (Divergence K : {Divergence::forward_kl, Divergence::jsd}) {
    VocabLossConfig cfg;
    cfg.divergence = K;
    cfg.beta = 0.3;
    cfg.chunk_rows = 64;  // does not divide 200
    VocabLoss<float> lc(cfg);
    VocabLoss<float, distilx::cuda> lg(cfg);
    std::vector<float> dh_c(std::size_t(c.M * c.d));
    const VocabLossResult rc = lc.compute(in_c, 2.0, 0.8, 0.8, dh_c.data(), true);
    VocabLossResult r32;
    {
      testing::MathModeScope fp32(cuda_backend::MathMode::fp32);
      r32 = lg.compute(in_g, 2.0, 0.8, 0.8, dh32.p(), true);
    }
    for (auto mode : {cuda_backend::MathMode::bf16, cuda_backend::MathMode::fp16}) {
      testing::MathModeScope scope(mode);
      const std::uint64_t staged0 = cuda_backend::detail::staged_image_reads();
      const VocabLossResult rg = lg.compute(in_g, 2.0, 0.8, 0.8, dh.p(), true);
      const std::string what = std::string(to_string(K)) + " " + cuda_backend::to_string(mode);
      // The row kernel wrote each chunk's gradient as a 16-bit operand for the LM-head product:
      // one staged read per chunk that has real rows (200 rows in chunks of 64).
      const std::uint64_t staged = cuda_backend::detail::staged_image_reads() - staged0;
      index_t live_chunks = 0;
      for (index_t r0 = 0; r0 < c.M; r0 += cfg.chunk_rows) {
        bool any = false;
        for (index_t r = r0; r < std::min(c.M, r0 + cfg.chunk_rows); ++r) any = any || c.mask[std::size_t(r)] != 0;
        live_chunks += any ? 1 : 0;
      }
      BOOST_CHECK_MESSAGE(staged == std::uint64_t(live_chunks),
                          what << ": " << staged << " LM-head products read the staged gradient, expected " << live_chunks);
      w.check_scalar(what + " kl", rg.kl, rc.kl, 2e-2);
      w.check_scalar(what + " ce", rg.ce, rc.ce, 2e-2);
      const auto g = dh.host();
      w.check(what + " dh_s", g, dh_c, 2e-2);
      BOOST_CHECK_EQUAL(rg.positions, rc.positions);
      BOOST_CHECK_MESSAGE(rg.kl != r32.kl && g != dh32.host(), what << ": same result as fp32, so no 16-bit GEMM ran");
    }
  }
}

// ---- the paper's shape ----------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(paper_shape) {
  if (skip_large()) {
    BOOST_TEST_MESSAGE("paper_shape: skipped (DISTILX_SKIP_LARGE)");
    return;
  }
  Worst w{"VocabLoss <float> paper width and vocabulary (M 160, d 1536, V 151936)"};
  Rng rng(51);
  VocabCase<float> c(rng, 4, 8, 16);  // shapes set below; uniform fills keep the host set-up short
  c.M = 160;
  c.d = c.d_t = 1536;
  c.V = 151936;
  const double a = std::sqrt(3.0), e = a * 2.0 / std::sqrt(1536.0);
  auto uni = [&](index_t n, double r) {
    std::vector<float> v(static_cast<std::size_t>(n));
    testing::fill_uniform(v.data(), n, rng, -r, r);
    return v;
  };
  c.h_s = uni(c.M * c.d, a);
  c.h_t = uni(c.M * c.d, a);
  c.E_s = uni(c.V * c.d, e);
  c.W_t = uni(c.V * c.d, e);
  c.targets = make_targets(c.M, c.V, rng);
  c.mask = make_mask(c.M, rng);
  Dev<float> h_s(c.h_s), E_s(c.E_s), h_t(c.h_t), W_t(c.W_t), dh(c.M * c.d);
  VocabLossInputs<float> in_c{c.h_s.data(), c.E_s.data(), c.h_t.data(), c.W_t.data(), nullptr, c.targets.data(),
                              c.mask.data(), c.M, c.d, c.d, c.V};
  VocabLossInputs<float> in_g{h_s.p(), E_s.p(), h_t.p(), W_t.p(), nullptr, c.targets.data(), c.mask.data(), c.M, c.d,
                              c.d, c.V};
  VocabLossConfig cfg;
  cfg.chunk_rows = 64;  // does not divide 160
  VocabLoss<float> lc(cfg);
  VocabLoss<float, distilx::cuda> lg(cfg);
  std::vector<float> dh_c(std::size_t(c.M * c.d));
  const VocabLossResult rc = lc.compute(in_c, 2.0, 0.8, 0.8, dh_c.data(), true);
  const VocabLossResult rg = lg.compute(in_g, 2.0, 0.8, 0.8, dh.p(), true);
  const auto& l = cuda_backend::last_distill_rows_launch();
  BOOST_TEST_MESSAGE("paper_shape: distill_rows launched " << l.cluster << " blocks per row x " << l.threads
                                                           << " threads, segment " << (l.cached ? "cached" : "re-read")
                                                           << ", " << l.smem_bytes << " B shared memory");
  w.check_scalar("kl", rg.kl, rc.kl, 1e-4);
  w.check_scalar("ce", rg.ce, rc.ce, 1e-4);
  w.check("dh_s", dh.host(), dh_c, 1e-4);
  BOOST_CHECK_EQUAL(rg.positions, rc.positions);
  // The GEMMs round differently: a near-tie between the two largest logits may flip.
  BOOST_CHECK_LE(std::abs(double(rg.top1_agree) - double(rc.top1_agree)), 1.0);
  BOOST_TEST_MESSAGE("paper_shape: top-1 agreement " << rg.top1_agree << " (CPU " << rc.top1_agree << ") of "
                                                     << rc.positions);
  {  // The row split over a cluster of 8 with the segments cached in shared memory (150 KiB per block).
    ScopedTuning scope({8, 1, 0});
    const VocabLossResult r8 = lg.compute(in_g, 2.0, 0.8, 0.8, dh.p(), true);
    BOOST_CHECK(cuda_backend::last_distill_rows_launch().cached);
    w.check_scalar("kl (cluster 8, cached)", r8.kl, rc.kl, 1e-4);
    w.check_scalar("ce (cluster 8, cached)", r8.ce, rc.ce, 1e-4);
    w.check("dh_s (cluster 8, cached)", dh.host(), dh_c, 1e-4);
  }
}

BOOST_AUTO_TEST_SUITE_END()
