// End-to-end Δ-distillation on the CPU with a tiny random Llama-family teacher.
// The corpus is sampled from the teacher itself, so the teacher *is* the data
// distribution: distillation (KL to the teacher) must then beat CE-only training
// on held-out perplexity for the same budget. Also: the loss falls over 100
// steps, resume from a checkpoint is bit-exact, the numerics guard stops a
// poisoned run naming the bad term, and bad checkpoints are refused clearly.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "distilx/data/shards.hpp"
#include "distilx/distill/callbacks.hpp"
#include "distilx/distill/distiller.hpp"
#include "distilx/distill/setup.hpp"
#include "distilx/teacher/llama.hpp"

using namespace distilx;
namespace fs = std::filesystem;

namespace {

using Teacher = LlamaTeacher<float>;
using Stu = Student<float>;

io::HfModelConfig teacher_config() {
  nlohmann::json j{{"architectures", {"Qwen2ForCausalLM"}}, {"model_type", "qwen2"}, {"vocab_size", 48},
                   {"hidden_size", 32}, {"intermediate_size", 64}, {"num_hidden_layers", 4},
                   {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"rms_norm_eps", 1e-6},
                   {"max_position_embeddings", 256}, {"rope_theta", 10000.0}, {"tie_word_embeddings", false}};
  return io::parse_hf_config(j, "test teacher");
}

/// A random teacher whose head is sharpened (x3) so its next-token distribution carries signal.
Teacher make_teacher() {
  Teacher t(teacher_config());
  Rng rng(11);
  t.init_random(rng);
  t.for_each_parameter([](const std::string& name, Tensor<float>& w) {
    if (name == "lm_head.weight")
      for (auto& x : w) x *= 3.0f;
  });
  return t;
}

/// Samples `n` sequences of length `len` from the teacher (ancestral sampling).
std::vector<std::int32_t> sample_corpus(Teacher& t, index_t n, index_t len, std::uint64_t seed) {
  Rng rng(seed);
  const index_t V = t.vocab_size();
  std::vector<std::int32_t> seqs(static_cast<std::size_t>(n * len));
  for (index_t b = 0; b < n; ++b) seqs[b * len] = static_cast<std::int32_t>(rng.below(V));
  std::vector<float> logits;
  std::vector<std::int32_t> prefix;
  for (index_t s = 1; s < len; ++s) {
    prefix.resize(static_cast<std::size_t>(n * s));
    for (index_t b = 0; b < n; ++b)
      for (index_t i = 0; i < s; ++i) prefix[b * s + i] = seqs[b * len + i];
    logits.resize(static_cast<std::size_t>(n * s * V));
    t.forward(prefix.data(), n, s, nullptr, logits.data(), nullptr);
    for (index_t b = 0; b < n; ++b) {
      const float* z = logits.data() + (b * s + s - 1) * V;
      double mx = z[0], sum = 0;
      for (index_t v = 1; v < V; ++v) mx = std::max(mx, double(z[v]));
      for (index_t v = 0; v < V; ++v) sum += std::exp(double(z[v]) - mx);
      double u = rng.uniform() * sum, c = 0;
      index_t pick = V - 1;
      for (index_t v = 0; v < V; ++v) {
        c += std::exp(double(z[v]) - mx);
        if (u < c) {
          pick = v;
          break;
        }
      }
      seqs[b * len + s] = static_cast<std::int32_t>(pick);
    }
  }
  return seqs;
}

struct Fixture {
  fs::path dir;
  Teacher teacher = make_teacher();
  std::string shard;
  Fixture() {
    dir = fs::temp_directory_path() / ("distilx_distill_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    shard = (dir / "train_000000.bin").string();
    // 33 = T + 1: every loader window is exactly one sampled sequence, so the teacher
    // sees the context it generated from.
    const auto corpus = sample_corpus(teacher, 160, 33, 3);
    data::write_shard(shard, corpus);
  }
  ~Fixture() { fs::remove_all(dir); }

  data::TokenLoader loader() const {
    data::LoaderOptions o;
    o.seq_len = 32;
    o.batch_size = 4;
    o.seed = 5;
    o.vocab_size = 48;
    o.val_windows = 16;
    return data::TokenLoader({shard}, o);
  }
  Stu student() const {
    StudentFromTeacher rule;
    rule.num_blocks = 2;
    rule.num_heads = 4;
    rule.base.mlstm_qkv_proj_blocksize = 4;
    StudentConfig c = student_config_for_teacher(48, 32, 4, 4, rule);
    Stu s(c);
    s.init(17);
    copy_frozen_from_teacher(s, teacher);
    return s;
  }
  static DistillerConfig config(index_t steps) {
    DistillerConfig c;
    c.max_steps = steps;
    c.adamw.lr = 3e-3;
    c.lr = LrScheduleConfig{LrScheduleKind::cosine, 3e-3, std::min<index_t>(5, steps), steps, 0.1};
    c.clip_norm = 1.0;
    return c;
  }
};

std::vector<double> run_steps(Distiller<Stu, Teacher>& d, index_t n) {
  std::vector<double> out;
  for (index_t i = 0; i < n; ++i) out.push_back(d.step().loss.total);
  return out;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(distill)

BOOST_AUTO_TEST_CASE(loss_decreases_and_distillation_beats_ce_only) {
  Fixture fx;
  auto loader = fx.loader();
  Stu s = fx.student();
  Distiller<Stu, Teacher> d(s, fx.teacher, loader, Fixture::config(100));
  const auto before = d.evaluate();
  const auto totals = run_steps(d, 100);
  double first = 0, last = 0;
  for (int i = 0; i < 10; ++i) first += totals[i] / 10, last += totals[90 + i] / 10;
  BOOST_TEST_MESSAGE("distillation loss: first 10 steps " << first << ", last 10 steps " << last);
  BOOST_CHECK_LT(last, 0.8 * first);
  const auto after = d.evaluate();
  BOOST_CHECK_LT(after.kl, before.kl);

  // CE-only student: same data, steps, seed; no KL, no alignment.
  auto loader2 = fx.loader();
  Stu s2 = fx.student();
  DistillerConfig c2 = Fixture::config(100);
  c2.loss.kl_weight = FixedSchedule{0.0};
  c2.loss.alignment = AlignmentPolicy::none;
  Distiller<Stu, Teacher> d2(s2, fx.teacher, loader2, c2);
  run_steps(d2, 100);
  const auto ce_only = d2.evaluate();
  BOOST_TEST_MESSAGE("held-out perplexity: teacher " << after.teacher_ppl << ", distilled student " << after.student_ppl
                                                     << ", CE-only student " << ce_only.student_ppl
                                                     << "; KL to teacher " << after.kl << " vs " << ce_only.kl
                                                     << "; top-1 " << after.top1 << " vs " << ce_only.top1);
  BOOST_CHECK_LT(after.student_ppl, ce_only.student_ppl);
  BOOST_CHECK_LT(after.kl, ce_only.kl);
  BOOST_CHECK_LT(after.teacher_ppl, after.student_ppl);  // the teacher generated the data
}

BOOST_AUTO_TEST_CASE(resume_is_exact) {
  Fixture fx;
  // Uninterrupted: 24 steps of 2 micro-batches (crosses an epoch boundary: 36 train batches per epoch).
  auto la = fx.loader();
  Stu sa = fx.student();
  DistillerConfig cfg = Fixture::config(24);
  cfg.grad_accum = 2;
  Distiller<Stu, Teacher> da(sa, fx.teacher, la, cfg);
  const auto full = run_steps(da, 24);
  // Interrupted after 9 steps, then a fresh process-equivalent resumes.
  const std::string ck = (fx.dir / "ck.dxc").string();
  {
    auto lb = fx.loader();
    Stu sb = fx.student();
    Distiller<Stu, Teacher> db(sb, fx.teacher, lb, cfg);
    run_steps(db, 9);
    db.save(ck);
  }
  auto lc = fx.loader();
  Stu sc = fx.student();
  Distiller<Stu, Teacher> dc(sc, fx.teacher, lc, cfg);
  dc.resume(ck);
  BOOST_CHECK_EQUAL(dc.step_count(), 9);
  const auto rest = run_steps(dc, 15);
  for (int i = 0; i < 15; ++i) BOOST_CHECK_EQUAL(rest[i], full[9 + i]);  // bit-exact on the CPU
  BOOST_CHECK_EQUAL_COLLECTIONS(sc.params(), sc.params() + sc.flat_size(), sa.params(), sa.params() + sa.flat_size());
}

BOOST_AUTO_TEST_CASE(bad_checkpoints_are_refused_and_previous_kept) {
  Fixture fx;
  auto l = fx.loader();
  Stu s = fx.student();
  DistillerConfig cfg = Fixture::config(4);
  cfg.run_dir = (fx.dir / "run").string();
  cfg.checkpoint_every = 2;
  cfg.keep_checkpoints = 2;
  Distiller<Stu, Teacher> d(s, fx.teacher, l, cfg);
  d.train();
  const auto cks = io::list_checkpoints(cfg.run_dir);
  BOOST_REQUIRE_EQUAL(cks.size(), 2u);
  BOOST_CHECK_EQUAL(cks.back().first, 4);
  // Corrupt the newest: one flipped byte in the middle.
  {
    std::fstream f(cks.back().second, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(cks.back().second) / 2));
    f.put('\x5a');
  }
  auto l2 = fx.loader();
  Stu s2 = fx.student();
  Distiller<Stu, Teacher> d2(s2, fx.teacher, l2, cfg);
  BOOST_CHECK_EXCEPTION(d2.resume(cks.back().second), io_error, [](const io_error& e) {
    return std::string(e.what()).find("checksum") != std::string::npos;
  });
  d2.resume(cks.front().second);  // the previous one is intact
  BOOST_CHECK_EQUAL(d2.step_count(), 2);
  // Truncated file.
  const std::string trunc = (fx.dir / "trunc.dxc").string();
  fs::copy_file(cks.front().second, trunc);
  fs::resize_file(trunc, fs::file_size(trunc) / 2);
  BOOST_CHECK_EXCEPTION(d2.resume(trunc), io_error,
                        [](const io_error& e) { return std::string(e.what()).find("truncated") != std::string::npos; });
  // Another configuration: the differences are listed.
  DistillerConfig other = cfg;
  other.adamw.weight_decay = 0.5;
  other.loss.alignment = AlignmentPolicy::cosine;
  auto l3 = fx.loader();
  Stu s3 = fx.student();
  Distiller<Stu, Teacher> d3(s3, fx.teacher, l3, other);
  BOOST_CHECK_EXCEPTION(d3.resume(cks.front().second), config_error, [](const config_error& e) {
    const std::string m = e.what();
    return m.find("distiller.adamw.weight_decay") != std::string::npos &&
           m.find("distiller.loss.alignment") != std::string::npos;
  });
}

BOOST_AUTO_TEST_CASE(numerics_guard_skips_and_stops) {
  Fixture fx;
  auto l = fx.loader();
  Stu s = fx.student();
  DistillerConfig cfg = Fixture::config(10);
  cfg.max_bad_steps = 3;
  Distiller<Stu, Teacher> d(s, fx.teacher, l, cfg);
  d.step();
  std::vector<float> before(s.params(), s.params() + s.flat_size());
  s.param("xlstm_block_stack.post_blocks_norm.weight")[0] = std::nanf("");
  before[static_cast<std::size_t>(s.info("xlstm_block_stack.post_blocks_norm.weight").offset)] = std::nanf("");
  const auto r1 = d.step();
  BOOST_CHECK(r1.skipped);
  BOOST_CHECK_EQUAL(r1.bad_term, "kl");
  // Skipped steps leave the weights untouched (compare bit patterns: NaN != NaN).
  BOOST_CHECK(std::memcmp(before.data(), s.params(), before.size() * sizeof(float)) == 0);
  d.step();
  BOOST_CHECK_EXCEPTION(d.step(), distilx::error, [](const distilx::error& e) {
    const std::string m = e.what();
    return m.find("3 consecutive steps") != std::string::npos && m.find("kl") != std::string::npos;
  });
}

// Loss scaling multiplies the loss gradient by a power of two and divides the parameter
// gradient by it again: both are exact in binary floating point, so the trajectory must be
// bit-identical to the unscaled one.
BOOST_AUTO_TEST_CASE(loss_scaling_is_exact_and_backs_off_on_overflow) {
  Fixture fx;
  auto la = fx.loader();
  Stu sa = fx.student();
  Distiller<Stu, Teacher> da(sa, fx.teacher, la, Fixture::config(6));
  const auto plain = run_steps(da, 6);

  DistillerConfig cfg = Fixture::config(6);
  cfg.loss_scale.enabled = true;
  cfg.loss_scale.init = 1024.0;
  cfg.loss_scale.growth_interval = 2;
  auto lb = fx.loader();
  Stu sb = fx.student();
  Distiller<Stu, Teacher> db(sb, fx.teacher, lb, cfg);
  std::vector<double> scales;
  for (int i = 0; i < 6; ++i) {
    const StepReport r = db.step();
    BOOST_CHECK(!r.skipped);
    BOOST_CHECK_EQUAL(r.loss.total, plain[static_cast<std::size_t>(i)]);
    scales.push_back(r.loss_scale);
  }
  BOOST_CHECK_EQUAL_COLLECTIONS(sb.params(), sb.params() + sb.flat_size(), sa.params(), sa.params() + sa.flat_size());
  // Growth every 2 clean steps: 1024, 1024, 2048, 2048, 4096, 4096.
  const std::vector<double> want{1024, 1024, 2048, 2048, 4096, 4096};
  BOOST_CHECK_EQUAL_COLLECTIONS(scales.begin(), scales.end(), want.begin(), want.end());

  // A scale that overflows float: steps are skipped (not counted as bad) and the scale halves
  // until the gradient is finite again; then training goes on.
  DistillerConfig big = Fixture::config(200);
  big.loss_scale.enabled = true;
  big.loss_scale.init = std::ldexp(1.0, 140);  // beyond float's range: the first steps must overflow
  big.max_bad_steps = 2;
  auto lc = fx.loader();
  Stu sc = fx.student();
  Distiller<Stu, Teacher> dc(sc, fx.teacher, lc, big);
  const StepReport first = dc.step();
  BOOST_CHECK(first.skipped);
  BOOST_CHECK_EQUAL(first.bad_term, "gradient");
  BOOST_CHECK_EQUAL(dc.loss_scale(), std::ldexp(1.0, 139));
  int skipped = 1;
  StepReport r;
  do {  // no exception although far more than max_bad_steps steps are skipped
    r = dc.step();
    skipped += r.skipped ? 1 : 0;
  } while (r.skipped && dc.step_count() < 200);
  BOOST_CHECK(!r.skipped);
  BOOST_CHECK_GT(skipped, 2);
  BOOST_CHECK(std::isfinite(r.grad_norm));
  BOOST_TEST_MESSAGE("loss scaling: " << skipped << " overflowing steps skipped, first clean step at scale 2^"
                                      << std::log2(r.loss_scale));
  // The configuration is validated.
  DistillerConfig badcfg = Fixture::config(2);
  badcfg.loss_scale.enabled = true;
  badcfg.loss_scale.backoff = 1.5;
  auto ld = fx.loader();
  Stu sd = fx.student();
  BOOST_CHECK_THROW((Distiller<Stu, Teacher>(sd, fx.teacher, ld, badcfg)), config_error);
}

BOOST_AUTO_TEST_CASE(early_stopping_and_metrics_callbacks) {
  Fixture fx;
  auto l = fx.loader();
  Stu s = fx.student();
  DistillerConfig cfg = Fixture::config(40);
  cfg.eval_every = 2;
  cfg.eval_batches = 1;
  cfg.adamw.lr = 0.0;  // no learning: the held-out perplexity cannot improve after the first evaluation
  cfg.lr.base_lr = 0.0;
  cfg.lr.kind = LrScheduleKind::constant;
  Distiller<Stu, Teacher> d(s, fx.teacher, l, cfg);
  auto es = std::make_shared<EarlyStopping>(3);
  const std::string mdir = (fx.dir / "m").string();
  fs::create_directories(mdir);
  d.add_callback(es);
  d.add_callback(std::make_shared<MetricsWriter>(mdir, false));
  d.train();
  BOOST_CHECK_EQUAL(d.step_count(), 8);  // evaluations at 2 (best), 4, 6, 8 -> three without improvement
  std::ifstream csv(mdir + "/metrics.csv");
  std::string line;
  int steps = 0, evals = 0;
  while (std::getline(csv, line)) steps += line.rfind("step,", 0) == 0, evals += line.rfind("eval,", 0) == 0;
  BOOST_CHECK_EQUAL(steps, 8);
  BOOST_CHECK_EQUAL(evals, 4);
  truncate_metrics(mdir, 5);
  std::ifstream csv2(mdir + "/metrics.csv");
  steps = 0;
  while (std::getline(csv2, line)) steps += line.rfind("step,", 0) == 0;
  BOOST_CHECK_EQUAL(steps, 5);
}

BOOST_AUTO_TEST_CASE(student_from_teacher_rules) {
  StudentFromTeacher rule;
  rule.heads = "teacher";
  rule.blocks = "half";
  // Qwen2.5-1.5B: 28 layers, 12 heads -> 14 blocks, 3 heads.
  StudentConfig c = student_config_for_teacher(151936, 1536, 28, 12, rule);
  BOOST_CHECK_EQUAL(c.num_blocks, 14);
  BOOST_CHECK_EQUAL(c.mlstm_num_heads, 3);
  BOOST_CHECK_EQUAL(c.slstm_at.size(), 7u);
  BOOST_CHECK_EQUAL(c.slstm_at.front(), 0);
  rule.heads = "explicit";
  rule.num_heads = 16;
  rule.blocks = "explicit";
  rule.num_blocks = 6;
  c = student_config_for_teacher(151936, 1536, 28, 12, rule);
  BOOST_CHECK_EQUAL(Student<float>::count(c).trainable, 84175968);
  rule.blocks = "quarter";
  BOOST_CHECK_THROW(student_config_for_teacher(151936, 1536, 28, 12, rule), config_error);
  // heads rule: 14 teacher heads round up to 16 -> 4.
  rule.blocks = "same";
  rule.heads = "teacher";
  BOOST_CHECK_EQUAL(student_config_for_teacher(64, 32, 2, 14, rule).mlstm_num_heads, 4);
}

BOOST_AUTO_TEST_SUITE_END()
