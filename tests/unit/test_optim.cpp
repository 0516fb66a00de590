// Optimizer stack (include/distilx/optim): AdamW against hand-computed formulas and
// against torch.optim.AdamW (fixture from tests/reference/gen_adamw.py via
// $DISTILX_REF_DIR), decay mask, padding, checkpoint state, gradient clipping, the
// NaN/Inf detector, gradient averaging and the HF learning-rate schedules.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/io/safetensors.hpp"
#include "distilx/models/params.hpp"
#include "distilx/optim/adamw.hpp"
#include "distilx/optim/clip.hpp"
#include "distilx/optim/lr_schedule.hpp"

using namespace distilx;
namespace fs = std::filesystem;

namespace {

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-300); }

/// Deterministic pseudo-random values in [-1, 1) (no dependency on the library's Rng API).
double lcg_value(std::uint64_t& s) {
  s = s * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<double>(s >> 11) / static_cast<double>(1ull << 52) - 1.0;
}

/// Layout with tensors whose sizes leave padding, mixing decay and no-decay names.
ParamLayout mixed_layout() {
  ParamLayout l;
  l.add("blocks.0.proj_up.weight", {5, 3});                     // decay
  l.add("blocks.0.proj_up.bias", {17});                         // no decay: bias
  l.add("blocks.1.xlstm.norm.weight", {3});                     // no decay: norm
  l.add("blocks.1.xlstm.slstm_cell._recurrent_kernel_", {2, 5}); // no decay: sLSTM R
  l.add("blocks.1.xlstm.learnable_skip", {4});                  // no decay: skip
  l.add("lm_out.weight", {2, 2});                               // decay
  return l;
}

/// Marks the entries of [0, total) that belong to no tensor.
std::vector<bool> padding_mask(const ParamLayout& l) {
  std::vector<bool> pad(static_cast<std::size_t>(l.total()), true);
  for (const auto& p : l.infos())
    for (index_t i = 0; i < p.size; ++i) pad[static_cast<std::size_t>(p.offset + i)] = false;
  return pad;
}

fs::path adamw_fixture() {
  const char* d = std::getenv("DISTILX_REF_DIR");
  const std::string how =
      "generate it with `/usr/bin/python3 tests/reference/gen_adamw.py --out DIR` and run the tests with "
      "DISTILX_REF_DIR=DIR (ctest does both through the fixture test `reference_adamw`)";
  if (!d || !*d) BOOST_FAIL("DISTILX_REF_DIR is not set, so the PyTorch AdamW fixture cannot be found; " << how);
  const fs::path p = fs::path(d) / "adamw_ref.safetensors";
  if (!fs::exists(p)) BOOST_FAIL(p.string() << " does not exist; " << how);
  return p;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(optim)

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(adamw_two_steps_by_hand) {
  // Three elements, all decayed; the expected values come straight from the AdamW formulas.
  AdamWConfig cfg;
  cfg.beta1 = 0.8;
  cfg.beta2 = 0.9;
  cfg.eps = 1e-3;  // large enough to matter in the comparison
  cfg.weight_decay = 0.5;
  AdamW<double> opt({{0, 3, true}}, 3, cfg);
  double p[3] = {1.0, -2.0, 0.5};
  const double g1[3] = {0.5, -1.5, 2.0}, g2[3] = {-0.25, 0.75, 1.0};
  const double lr1 = 0.1, lr2 = 0.05;

  double ep[3], m[3], v[3];
  for (int i = 0; i < 3; ++i) {
    m[i] = (1 - 0.8) * g1[i];
    v[i] = (1 - 0.9) * g1[i] * g1[i];
    const double mhat = m[i] / (1 - 0.8), vhat = v[i] / (1 - 0.9);  // = g, g²
    ep[i] = p[i] - lr1 * 0.5 * p[i] - lr1 * mhat / (std::sqrt(vhat) + 1e-3);
  }
  opt.step(p, g1, lr1);
  BOOST_CHECK_EQUAL(opt.step_count(), 1);
  for (int i = 0; i < 3; ++i) {
    BOOST_TEST_INFO("step 1, element " << i);
    BOOST_CHECK_LE(rel(p[i], ep[i]), 1e-14);
    BOOST_CHECK_LE(rel(opt.exp_avg()[i], m[i]), 1e-15);
    BOOST_CHECK_LE(rel(opt.exp_avg_sq()[i], v[i]), 1e-15);
  }
  // Step 1 with g ≠ 0: the bias-corrected update is lr·sign(g)·|g|/(|g|+eps), i.e. ≈ lr.
  BOOST_CHECK_CLOSE(ep[0], 1.0 - 0.05 - 0.1 * 0.5 / 0.501, 1e-12);

  for (int i = 0; i < 3; ++i) {
    m[i] = 0.8 * m[i] + 0.2 * g2[i];
    v[i] = 0.9 * v[i] + 0.1 * g2[i] * g2[i];
    const double mhat = m[i] / (1 - 0.8 * 0.8), vhat = v[i] / (1 - 0.9 * 0.9);
    ep[i] = ep[i] * (1 - lr2 * 0.5) - lr2 * mhat / (std::sqrt(vhat) + 1e-3);
  }
  opt.step(p, g2, lr2);
  for (int i = 0; i < 3; ++i) {
    BOOST_TEST_INFO("step 2, element " << i);
    BOOST_CHECK_LE(rel(p[i], ep[i]), 1e-14);
  }
}

BOOST_AUTO_TEST_CASE(adamw_decay_mask) {
  const ParamLayout l = mixed_layout();
  // The mask is exactly ParamInfo::decay: only names with "weight" and without "norm".
  const std::vector<bool> want = {true, false, false, false, false, true};
  for (std::size_t i = 0; i < want.size(); ++i) BOOST_CHECK_EQUAL(l.infos()[i].decay, want[i]);

  const double lr = 0.01, wd = 0.3;
  AdamWConfig cfg;
  cfg.weight_decay = wd;
  AdamW<double> opt(l, cfg);
  BOOST_REQUIRE_EQUAL(opt.size(), l.total());
  Buffer<double, cpu> p(l.total()), g(l.total());  // g stays 0
  std::uint64_t s = 7;
  for (const auto& info : l.infos())
    for (index_t i = 0; i < info.size; ++i) p[info.offset + i] = lcg_value(s);
  const Buffer<double, cpu> p0 = p;
  opt.step(p.data(), g.data(), lr);
  for (const auto& info : l.infos()) {
    for (index_t i = 0; i < info.size; ++i) {
      const index_t k = info.offset + i;
      BOOST_TEST_INFO(info.name << "[" << i << "]");
      if (info.decay)
        BOOST_CHECK_EQUAL(p[k], p0[k] * (1 - lr * wd));  // exactly: the Adam term is 0/(0+eps)
      else
        BOOST_CHECK_EQUAL(p[k], p0[k]);
    }
  }

  // Same in float.
  AdamW<float> optf(l, cfg);
  Buffer<float, cpu> pf(l.total()), gf(l.total());
  for (index_t k = 0; k < l.total(); ++k) pf[k] = static_cast<float>(p0[k]);
  optf.step(pf.data(), gf.data(), lr);
  for (const auto& info : l.infos())
    for (index_t i = 0; i < info.size; ++i) {
      const index_t k = info.offset + i;
      const float want_f = info.decay ? static_cast<float>(p0[k]) * static_cast<float>(1 - lr * wd)
                                      : static_cast<float>(p0[k]);
      BOOST_CHECK_EQUAL(pf[k], want_f);
    }
}

BOOST_AUTO_TEST_CASE(adamw_padding_stays_zero) {
  const ParamLayout l = mixed_layout();
  const std::vector<bool> pad = padding_mask(l);
  index_t npad = 0;
  for (bool b : pad) npad += b;
  BOOST_REQUIRE_GT(npad, 0);  // the layout must have padding for this test to mean anything

  AdamW<double> opt(l);
  Buffer<double, cpu> p(l.total()), g(l.total());
  std::uint64_t s = 11;
  for (index_t k = 0; k < l.total(); ++k) p[k] = pad[static_cast<std::size_t>(k)] ? 0.0 : lcg_value(s);
  for (int step = 0; step < 4; ++step) {
    // Garbage in the padding of the gradient must not leak into params or state.
    for (index_t k = 0; k < l.total(); ++k) g[k] = 3.0 * lcg_value(s);
    opt.step(p.data(), g.data(), 0.1);
  }
  for (index_t k = 0; k < l.total(); ++k) {
    if (!pad[static_cast<std::size_t>(k)]) continue;
    BOOST_TEST_INFO("padding entry " << k);
    BOOST_CHECK_EQUAL(p[k], 0.0);
    BOOST_CHECK_EQUAL(opt.exp_avg()[k], 0.0);
    BOOST_CHECK_EQUAL(opt.exp_avg_sq()[k], 0.0);
  }
}

BOOST_AUTO_TEST_CASE(adamw_state_save_restore) {
  // A run interrupted after 3 steps and resumed from (m, v, step) matches an uninterrupted one.
  const ParamLayout l = mixed_layout();
  AdamW<float> a(l), b(l);
  Buffer<float, cpu> pa(l.total()), pb(l.total()), g(l.total());
  std::uint64_t s = 5;
  for (const auto& info : l.infos())
    for (index_t i = 0; i < info.size; ++i) pa[info.offset + i] = static_cast<float>(lcg_value(s));
  pb = pa;
  std::vector<std::vector<float>> grads;
  for (int step = 0; step < 6; ++step) {
    for (const auto& info : l.infos())
      for (index_t i = 0; i < info.size; ++i) g[info.offset + i] = static_cast<float>(lcg_value(s));
    grads.emplace_back(g.begin(), g.end());
  }
  for (int step = 0; step < 6; ++step) a.step(pa.data(), grads[step].data(), 1e-2);
  for (int step = 0; step < 3; ++step) b.step(pb.data(), grads[step].data(), 1e-2);

  AdamW<float> c(l);  // the resumed optimizer
  c.exp_avg() = b.exp_avg();
  c.exp_avg_sq() = b.exp_avg_sq();
  c.set_step_count(b.step_count());
  BOOST_CHECK_EQUAL(c.step_count(), 3);
  for (int step = 3; step < 6; ++step) c.step(pb.data(), grads[step].data(), 1e-2);
  for (index_t k = 0; k < l.total(); ++k) BOOST_CHECK_EQUAL(pa[k], pb[k]);

  c.reset();
  BOOST_CHECK_EQUAL(c.step_count(), 0);
  BOOST_CHECK_EQUAL(ops::sum_squares(cpu{}, c.exp_avg().data(), c.size()), 0.0);
}

BOOST_AUTO_TEST_CASE(adamw_rejects_bad_config) {
  AdamWConfig bad;
  bad.beta1 = 1.0;
  BOOST_CHECK_THROW(AdamW<double>({{0, 3, true}}, 3, bad), config_error);
  BOOST_CHECK_THROW(AdamW<double>({{0, 4, true}}, 3), config_error);                 // past the end
  BOOST_CHECK_THROW(AdamW<double>({{0, 3, true}, {2, 1, false}}, 8), config_error);  // overlap
  AdamW<double> ok({{0, 1, true}}, 1);
  double p = 1, g = 1;
  BOOST_CHECK_THROW(ok.step(&p, &g, -1.0), config_error);
}

BOOST_AUTO_TEST_CASE(adamw_matches_pytorch) {
  const fs::path path = adamw_fixture();
  io::SafetensorsFile f(path.string());
  const auto cfg = nlohmann::json::parse(f.metadata().at("config"));

  ParamLayout l;
  for (const auto& p : cfg.at("params")) {
    const std::string name = p.at("name");
    l.add(name, p.at("shape").get<Shape>());
    BOOST_CHECK_MESSAGE(l.find(name)->decay == p.at("decay").get<bool>(), "decay flag of " << name);
  }
  const std::vector<bool> pad = padding_mask(l);

  AdamWConfig oc;
  oc.beta1 = cfg.at("beta1");
  oc.beta2 = cfg.at("beta2");
  oc.eps = cfg.at("eps");
  oc.weight_decay = cfg.at("weight_decay");
  AdamW<double> opt(l, oc);
  LrScheduleConfig sc;
  sc.kind = LrScheduleKind::cosine;
  sc.base_lr = cfg.at("lr");
  sc.warmup_steps = cfg.at("warmup_steps");
  sc.total_steps = cfg.at("total_steps");
  sc.min_lr_ratio = cfg.at("min_lr_ratio");
  LrSchedule sched(sc);
  const double max_norm = cfg.at("max_norm");
  const int steps = cfg.at("steps");

  const auto want_lr = f.read<double>("lr");
  const auto want_norm = f.read<double>("grad_norm");
  BOOST_REQUIRE_EQUAL(want_lr.size(), static_cast<std::size_t>(steps));

  Buffer<double, cpu> p(l.total()), g(l.total());
  for (const auto& info : l.infos()) f.read("init/" + info.name, p.data() + info.offset, info.shape);
  int clipped = 0;
  for (int k = 0; k < steps; ++k) {
    g.zero();
    for (const auto& info : l.infos())
      f.read("grad/" + std::to_string(k) + "/" + info.name, g.data() + info.offset, info.shape);
    const double norm = clip_grad_norm(g, max_norm);
    clipped += norm > max_norm;
    BOOST_TEST_INFO("step " << k);
    BOOST_CHECK_LE(rel(norm, want_norm[k]), 1e-12);
    const double lr = sched.lr();
    BOOST_CHECK_LE(std::abs(lr - want_lr[k]), 1e-12 * sc.base_lr);
    BOOST_REQUIRE(all_finite(g));
    opt.step(p.data(), g.data(), lr);
    sched.step();
    for (const auto& info : l.infos()) {
      const auto want = f.read<double>("param/" + std::to_string(k) + "/" + info.name);
      const double e = relative_error(p.data() + info.offset, want.data(), info.size);
      BOOST_TEST_INFO("step " << k << ", " << info.name << ": rel error " << e);
      BOOST_CHECK_LE(e, 1e-12);
    }
  }
  BOOST_CHECK_GT(clipped, 0);      // clipping was active on some step...
  BOOST_CHECK_LT(clipped, steps);  // ...and inactive on another
  BOOST_CHECK_EQUAL(opt.step_count(), steps);
  for (const auto& info : l.infos()) {
    const auto m = f.read<double>("exp_avg/" + info.name), v = f.read<double>("exp_avg_sq/" + info.name);
    BOOST_TEST_INFO(info.name);
    BOOST_CHECK_LE(relative_error(opt.exp_avg().data() + info.offset, m.data(), info.size), 1e-12);
    BOOST_CHECK_LE(relative_error(opt.exp_avg_sq().data() + info.offset, v.data(), info.size), 1e-12);
  }
  for (index_t k = 0; k < l.total(); ++k)
    if (pad[static_cast<std::size_t>(k)]) BOOST_CHECK_EQUAL(p[k], 0.0);
}

// ---------------------------------------------------------------------------------------------
// Clipping, NaN/Inf detection, accumulation
// ---------------------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(clip_grad_norm_scales_to_max_norm) {
  std::vector<double> g = {3.0, -4.0, 12.0, 0.0};  // norm 13
  const double max_norm = 2.5;
  const double total = clip_grad_norm(cpu{}, g.data(), static_cast<index_t>(g.size()), max_norm);
  BOOST_CHECK_EQUAL(total, 13.0);
  const double after = grad_norm(cpu{}, g.data(), static_cast<index_t>(g.size()));
  // torch's coefficient is max_norm / (total + 1e-6), so the result is that times total.
  BOOST_CHECK_LE(rel(after, max_norm * 13.0 / (13.0 + 1e-6)), 1e-12);
  BOOST_CHECK_LE(rel(after, max_norm), 1e-7);
  BOOST_CHECK_LE(rel(g[2], 12.0 * max_norm / (13.0 + 1e-6)), 1e-15);  // direction kept
  BOOST_CHECK_EQUAL(g[3], 0.0);

  // Below the threshold nothing changes, bit for bit.
  std::vector<double> h = {0.3, -0.4};
  BOOST_CHECK_LE(rel(clip_grad_norm(cpu{}, h.data(), 2, 1.0), 0.5), 1e-15);
  BOOST_CHECK_EQUAL(h[0], 0.3);
  BOOST_CHECK_EQUAL(h[1], -0.4);
  BOOST_CHECK_THROW(clip_grad_norm(cpu{}, h.data(), 2, 0.0), config_error);
}

BOOST_AUTO_TEST_CASE(clip_grad_norm_float_accumulates_in_double) {
  // 2^22 floats of 0.1f: a float running sum drifts far from the exact Σx².
  const index_t n = index_t(1) << 22;
  Buffer<float, cpu> g(n);
  for (index_t i = 0; i < n; ++i) g[i] = 0.1f;
  const double x = static_cast<double>(0.1f);
  const double exact = std::sqrt(static_cast<double>(n) * x * x);
  float naive = 0;  // what a float accumulator would give
  for (index_t i = 0; i < n; ++i) naive += g[i] * g[i];
  BOOST_REQUIRE_GT(rel(std::sqrt(static_cast<double>(naive)), exact), 1e-4);  // the test discriminates
  // A double running sum of n equal terms is within ~n·2⁻⁵³ of exact.
  BOOST_CHECK_LE(rel(grad_norm(cpu{}, g.data(), n), exact), 1e-10);
  const double total = clip_grad_norm(g, 1.0);
  BOOST_CHECK_LE(rel(total, exact), 1e-10);
  BOOST_CHECK_LE(rel(grad_norm(cpu{}, g.data(), n), 1.0 * exact / (exact + 1e-6)), 1e-6);  // float rounding
}

BOOST_AUTO_TEST_CASE(nan_inf_detection) {
  Buffer<double, cpu> d(37);
  Buffer<float, cpu> f(37);
  for (index_t i = 0; i < 37; ++i) d[i] = f[i] = static_cast<float>(i) - 18.5f;
  d[3] = std::numeric_limits<double>::max();  // large but finite
  f[3] = std::numeric_limits<float>::max();
  f[4] = std::numeric_limits<float>::denorm_min();
  BOOST_CHECK(all_finite(d));
  BOOST_CHECK(all_finite(f));
  BOOST_CHECK(all_finite(cpu{}, d.data(), 0));

  for (double bad : {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                     -std::numeric_limits<double>::infinity()}) {
    Buffer<double, cpu> dd = d;
    Buffer<float, cpu> ff = f;
    dd[36] = bad;
    ff[0] = static_cast<float>(bad);
    BOOST_TEST_INFO("value " << bad);
    BOOST_CHECK(!all_finite(dd));
    BOOST_CHECK(!all_finite(ff));
    BOOST_CHECK(all_finite(cpu{}, dd.data(), 36));  // the bad entry is outside the span
  }

  // A NaN gradient yields a NaN norm, and clipping leaves the buffer alone for the skip logic.
  Buffer<double, cpu> g(4);
  g[0] = 1.0;
  g[2] = std::numeric_limits<double>::quiet_NaN();
  BOOST_CHECK(std::isnan(clip_grad_norm(g, 0.5)));
  BOOST_CHECK_EQUAL(g[0], 1.0);
}

BOOST_AUTO_TEST_CASE(gradient_accumulation_average) {
  Buffer<double, cpu> g(5);
  for (index_t i = 0; i < 5; ++i) g[i] = 4.0 * static_cast<double>(i);
  average_accumulated_grads(g, 4);
  for (index_t i = 0; i < 5; ++i) BOOST_CHECK_EQUAL(g[i], static_cast<double>(i));
  average_accumulated_grads(g, 1);  // no-op
  BOOST_CHECK_EQUAL(g[4], 4.0);
  BOOST_CHECK_THROW(average_accumulated_grads(g, 0), config_error);
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedules
// ---------------------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(lr_cosine_with_warmup) {
  LrScheduleConfig c;
  c.kind = LrScheduleKind::cosine;
  c.base_lr = 2e-3;
  c.warmup_steps = 10;
  c.total_steps = 110;
  const LrSchedule s(c);
  const double pi = 3.14159265358979323846;
  BOOST_CHECK_EQUAL(s.lr_at(0), 0.0);                                          // warm-up start
  BOOST_CHECK_LE(rel(s.lr_at(4), 2e-3 * 0.4), 1e-15);                           // warm-up
  BOOST_CHECK_LE(rel(s.lr_at(10), 2e-3), 1e-15);                                // warm-up end = peak
  BOOST_CHECK_LE(rel(s.lr_at(35), 2e-3 * 0.5 * (1 + std::cos(pi / 4))), 1e-14);  // progress 1/4
  BOOST_CHECK_LE(rel(s.lr_at(60), 1e-3), 1e-14);                                // progress 1/2
  BOOST_CHECK_LE(s.lr_at(110), 1e-20);                                          // end: 0
  BOOST_CHECK_LE(s.lr_at(500), 1e-20);                                          // held past the end

  c.min_lr_ratio = 0.1;  // HF cosine_with_min_lr: base·(r + (1 − r)·cosine)
  const LrSchedule m(c);
  BOOST_CHECK_EQUAL(m.lr_at(0), 0.0);
  BOOST_CHECK_LE(rel(m.lr_at(10), 2e-3), 1e-15);
  BOOST_CHECK_LE(rel(m.lr_at(60), 2e-3 * (0.1 + 0.9 * 0.5)), 1e-14);
  BOOST_CHECK_LE(rel(m.lr_at(110), 2e-4), 1e-14);
  BOOST_CHECK_LE(rel(m.lr_at(1000), 2e-4), 1e-14);

  c.warmup_steps = 0;  // no warm-up: the first step already runs at the peak
  BOOST_CHECK_LE(rel(LrSchedule(c).lr_at(0), 2e-3), 1e-15);
}

BOOST_AUTO_TEST_CASE(lr_constant_and_state) {
  LrScheduleConfig c;
  c.kind = LrScheduleKind::constant;
  c.base_lr = 1e-4;
  c.warmup_steps = 4;
  LrSchedule s(c);
  BOOST_CHECK_EQUAL(s.lr(), 0.0);
  BOOST_CHECK_LE(rel(s.step(), 0.25e-4), 1e-15);
  s.step();
  s.step();
  BOOST_CHECK_LE(rel(s.lr(), 0.75e-4), 1e-15);
  BOOST_CHECK_EQUAL(s.step(), 1e-4);
  BOOST_CHECK_EQUAL(s.lr_at(1000000), 1e-4);
  BOOST_CHECK_EQUAL(s.step_count(), 4);

  LrSchedule r(c);  // restored from a checkpoint
  r.set_step_count(s.step_count());
  BOOST_CHECK_EQUAL(r.lr(), s.lr());

  c.kind = LrScheduleKind::cosine;
  c.total_steps = 3;  // < warmup_steps
  BOOST_CHECK_THROW(LrSchedule{c}, config_error);
  c.total_steps = 10;
  c.min_lr_ratio = 1.5;
  BOOST_CHECK_THROW(LrSchedule{c}, config_error);
}

BOOST_AUTO_TEST_SUITE_END()
