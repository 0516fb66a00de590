// End-to-end Δ-distillation on the CPU with a tiny random Llama-family teacher.
// The corpus is sampled from the teacher itself, so the teacher *is* the data
// distribution: distillation (KL to the teacher) must then beat CE-only training
// on held-out perplexity for the same budget. Also: the loss falls over 100
// steps, resume from a checkpoint is bit-exact, the numerics guard stops a
// poisoned run naming the bad term, and bad checkpoints are refused clearly.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <condition_variable>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <mutex>
#include <thread>

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

/// Data parallelism among threads of one process, for testing the Distiller's side of the
/// DataParallel contract on the CPU (the NCCL implementation lives in distilx/parallel/).
class ThreadGroup {
 public:
  explicit ThreadGroup(int n) : n_(n), slots_(static_cast<std::size_t>(n)), fslots_(static_cast<std::size_t>(n)) {}
  int size() const { return n_; }
  void barrier() {
    std::unique_lock<std::mutex> lk(m_);
    const long gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }
  /// Every rank passes `count` doubles; afterwards each holds the combination f over ranks.
  void combine(int rank, double* v, int count, const std::function<double(const std::vector<const double*>&, int)>& f) {
    slots_[static_cast<std::size_t>(rank)] = v;
    barrier();
    if (rank == 0) {
      result_.assign(static_cast<std::size_t>(count), 0.0);
      std::vector<const double*> all(slots_.begin(), slots_.end());
      for (int i = 0; i < count; ++i) result_[static_cast<std::size_t>(i)] = f(all, i);
    }
    barrier();
    std::copy(result_.begin(), result_.end(), v);
    barrier();
  }
  /// Element-wise mean of a float buffer over ranks, in rank order.
  void mean(int rank, float* g, index_t n) {
    fslots_[static_cast<std::size_t>(rank)] = g;
    barrier();
    if (rank == 0) {
      fresult_.assign(static_cast<std::size_t>(n), 0.0f);
      for (index_t i = 0; i < n; ++i) {
        float acc = 0;
        for (int r = 0; r < n_; ++r) acc += fslots_[static_cast<std::size_t>(r)][i];
        fresult_[static_cast<std::size_t>(i)] = acc / float(n_);
      }
    }
    barrier();
    std::copy(fresult_.begin(), fresult_.end(), g);
    barrier();
  }

 private:
  int n_;
  std::mutex m_;
  std::condition_variable cv_;
  int arrived_ = 0;
  long gen_ = 0;
  std::vector<double*> slots_;
  std::vector<double> result_;
  std::vector<float*> fslots_;
  std::vector<float> fresult_;
};

class ThreadDataParallel final : public DataParallel<float> {
 public:
  ThreadDataParallel(ThreadGroup& g, int rank) : g_(g), rank_(rank) {}
  int rank() const override { return rank_; }
  int world_size() const override { return g_.size(); }
  void check_same_on_all_ranks(const std::string& what, std::uint64_t fp) override {
    double v[2] = {double(fp >> 32), double(fp & 0xffffffffu)};
    double lo[2] = {v[0], v[1]}, hi[2] = {v[0], v[1]};
    auto mn = [](const std::vector<const double*>& a, int i) {
      double m = a[0][i];
      for (const double* p : a) m = std::min(m, p[i]);
      return m;
    };
    auto mx = [](const std::vector<const double*>& a, int i) {
      double m = a[0][i];
      for (const double* p : a) m = std::max(m, p[i]);
      return m;
    };
    g_.combine(rank_, lo, 2, mn);
    g_.combine(rank_, hi, 2, mx);
    if (lo[0] != hi[0] || lo[1] != hi[1]) throw config_error("ranks differ in their " + what);
  }
  void reduce_gradients(float* g, index_t n) override { g_.mean(rank_, g, n); }
  double grad_sum_squares(const float* g, index_t n) override { return ops::sum_squares(cpu{}, g, n); }
  void all_reduce_sum(double* v, int count) override {
    g_.combine(rank_, v, count, [](const std::vector<const double*>& a, int i) {
      double s = 0;
      for (const double* p : a) s += p[i];
      return s;
    });
  }
  void barrier() override { g_.barrier(); }

 private:
  ThreadGroup& g_;
  int rank_;
};

struct CountingCallback : DistillerCallback {
  int steps = 0;
  void on_step(const StepReport&) override { ++steps; }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(distill)

// Two data-parallel ranks of B rows must follow one rank of 2B rows (the loader deals each
// global batch's windows to the ranks), and only rank 0 reports; a checkpoint written by the
// 2-rank run resumes on 1 rank; ranks with different configurations are refused at start-up.
BOOST_AUTO_TEST_CASE(data_parallel_ranks_follow_one_rank) {
  Fixture fx;
  const index_t steps = 6;
  auto loader_for = [&](index_t B, int rank, int world) {
    data::LoaderOptions o;
    o.seq_len = 32;
    o.batch_size = B;
    o.seed = 5;
    o.vocab_size = 48;
    o.val_windows = 16;
    o.rank = rank;
    o.world_size = world;
    return data::TokenLoader({fx.shard}, o);
  };
  DistillerConfig cfg = Fixture::config(steps);
  // One rank, B 4: the reference, with a checkpoint after step 3.
  auto l1 = loader_for(4, 0, 1);
  Stu s1 = fx.student();
  Distiller<Stu, Teacher> d1(s1, fx.teacher, l1, cfg);
  const auto ref = run_steps(d1, steps);
  const EvalReport ref_eval = d1.evaluate();

  // Two ranks, B 2 each, in two threads.
  ThreadGroup group(2);
  std::vector<std::vector<double>> losses(2);
  std::vector<std::vector<float>> params(2);
  std::vector<int> reported(2);
  std::vector<EvalReport> evals(2);
  std::exception_ptr err[2];
  const std::string ck = (fx.dir / "dp_step3.dxc").string();
  auto rank_main = [&](int r) {
    try {
      auto l = loader_for(2, r, 2);
      Stu s = fx.student();
      Teacher teacher = fx.teacher;  // each rank its own (the teacher's workspace is per object)
      Distiller<Stu, Teacher> d(s, teacher, l, cfg);
      auto count = std::make_shared<CountingCallback>();
      d.add_callback(count);
      d.set_data_parallel(std::make_shared<ThreadDataParallel>(group, r));
      for (index_t i = 0; i < steps; ++i) {
        losses[std::size_t(r)].push_back(d.step().loss.total);
        if (d.step_count() == 3) {
          d.save(ck);  // collective: rank 0 writes
          group.barrier();
        }
      }
      evals[std::size_t(r)] = d.evaluate();
      params[std::size_t(r)] = s.params_to_host();
      reported[std::size_t(r)] = count->steps;
    } catch (...) {
      err[r] = std::current_exception();
    }
  };
  std::thread t1(rank_main, 1);
  rank_main(0);
  t1.join();
  for (auto& e : err)
    if (e) std::rethrow_exception(e);
  double worst = 0;
  for (int r = 0; r < 2; ++r)
    for (index_t i = 0; i < steps; ++i) {
      const double e = std::abs(losses[std::size_t(r)][std::size_t(i)] - ref[std::size_t(i)]) / std::abs(ref[std::size_t(i)]);
      BOOST_TEST_INFO("rank " << r << " step " << i + 1);
      BOOST_CHECK_LE(e, 1e-5);
      worst = std::max(worst, e);
    }
  // The loss curve is the contract (1e-5); the weights drift a little more, as AdamW's
  // normalised step turns rounding-level gradient differences on near-zero gradients into
  // update differences of order lr.
  const double pe = relative_error(params[0].data(), s1.params(), s1.flat_size());
  BOOST_CHECK_LE(pe, 1e-4);
  BOOST_CHECK(params[0] == params[1]);  // every rank took the same update
  BOOST_CHECK_LE(std::abs(evals[0].student_ppl - ref_eval.student_ppl) / ref_eval.student_ppl, 1e-5);
  BOOST_CHECK_EQUAL(evals[0].tokens, ref_eval.tokens);
  BOOST_CHECK_EQUAL(reported[0], steps);
  BOOST_CHECK_EQUAL(reported[1], 0);
  BOOST_TEST_MESSAGE("2 ranks x B 2 vs 1 rank x B 4: worst loss difference " << worst << ", weights " << pe);

  // The 2-rank checkpoint resumes on one rank of B 4 and continues the reference run.
  auto l3 = loader_for(4, 0, 1);
  Stu s3 = fx.student();
  Distiller<Stu, Teacher> d3(s3, fx.teacher, l3, cfg);
  d3.resume(ck);
  BOOST_CHECK_EQUAL(d3.step_count(), 3);
  const auto rest = run_steps(d3, steps - 3);
  for (index_t i = 0; i < steps - 3; ++i)
    BOOST_CHECK_LE(std::abs(rest[std::size_t(i)] - ref[std::size_t(i + 3)]) / std::abs(ref[std::size_t(i + 3)]), 1e-5);

  // Different learning rates on the two ranks: refused on both, before any step.
  ThreadGroup g2(2);
  std::exception_ptr e2[2];
  auto bad_rank = [&](int r) {
    try {
      auto l = loader_for(2, r, 2);
      Stu s = fx.student();
      DistillerConfig c = cfg;
      c.adamw.lr = r == 0 ? 1e-3 : 2e-3;
      Teacher teacher = fx.teacher;
      Distiller<Stu, Teacher> d(s, teacher, l, c);
      d.set_data_parallel(std::make_shared<ThreadDataParallel>(g2, r));
    } catch (...) {
      e2[r] = std::current_exception();
    }
  };
  std::thread t2(bad_rank, 1);
  bad_rank(0);
  t2.join();
  for (auto& e : e2) {
    BOOST_REQUIRE_MESSAGE(e, "a rank with a different configuration was not refused");
    BOOST_CHECK_EXCEPTION(std::rethrow_exception(e), config_error, [](const config_error& x) {
      return std::string(x.what()).find("run configuration") != std::string::npos;
    });
  }
}

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
