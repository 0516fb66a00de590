// The whole distillation step on the GPU through the same Distiller as the CPU: teacher
// forward, student forward, the Δ-distillation loss with alignment, backward, clipping and
// AdamW, with gradient accumulation. In fp32 math the GPU run must follow the CPU run step by
// step (losses and final weights within 1e-4 relative); bf16 and fp16 (with dynamic loss
// scaling) must stay within 2e-2 and 5e-2 of it. Checkpoints are backend-independent: a run
// saved on the GPU resumes on the CPU.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <filesystem>
#include <string>
#include <unistd.h>
#include <vector>

#include "distilx/cuda.cuh"
#include "cuda_test_util.cuh"

using namespace distilx;
namespace fs = std::filesystem;

namespace {

using CpuTeacher = LlamaTeacher<float>;
using GpuTeacher = LlamaTeacher<float, distilx::cuda>;
using CpuStudent = Student<float>;
using GpuStudent = Student<float, distilx::cuda>;

io::HfModelConfig teacher_config() {
  nlohmann::json j{{"architectures", {"Qwen2ForCausalLM"}}, {"model_type", "qwen2"}, {"vocab_size", 64},
                   {"hidden_size", 64}, {"intermediate_size", 128}, {"num_hidden_layers", 4},
                   {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"rms_norm_eps", 1e-6},
                   {"max_position_embeddings", 256}, {"rope_theta", 10000.0}, {"tie_word_embeddings", false}};
  return io::parse_hf_config(j, "test teacher");
}

/// Copies every weight of one teacher into another (any backends), through the host.
template <class A, class B>
void copy_teacher(const A& from, B& to) {
  std::vector<std::vector<float>> host;
  from.for_each_parameter([&](const std::string&, const auto& t) {
    host.emplace_back(static_cast<std::size_t>(t.size()));
    download(t.buffer(), 0, host.back().data(), t.size());
  });
  std::size_t i = 0;
  to.for_each_parameter([&](const std::string&, auto& t) {
    upload(t.buffer(), 0, host[i].data(), t.size());
    ++i;
  });
}

struct Fixture {
  fs::path dir;
  CpuTeacher cpu_teacher{teacher_config()};
  GpuTeacher gpu_teacher{teacher_config()};
  std::string shard;

  Fixture() {
    dir = fs::temp_directory_path() / ("distilx_cuda_distill_" + std::to_string(::getpid()));
    fs::remove_all(dir);
    fs::create_directories(dir);
    Rng rng(11);
    cpu_teacher.init_random(rng);
    cpu_teacher.for_each_parameter([](const std::string& name, Tensor<float>& w) {
      if (name == "lm_head.weight")  // a sharper teacher distribution carries more signal
        for (auto& x : w) x *= 3.0f;
    });
    copy_teacher(cpu_teacher, gpu_teacher);
    // Token data with structure (a noisy periodic sequence), so the losses move.
    std::vector<std::int32_t> toks(20000);
    Rng r2(3);
    for (std::size_t i = 0; i < toks.size(); ++i)
      toks[i] = static_cast<std::int32_t>(r2.uniform() < 0.8 ? (i * 7 + i / 13) % 64 : r2.below(64));
    shard = (dir / "train_000000.bin").string();
    data::write_shard(shard, toks);
  }
  ~Fixture() { fs::remove_all(dir); }

  data::TokenLoader loader() const {
    data::LoaderOptions o;
    o.seq_len = 48;
    o.batch_size = 4;
    o.seed = 5;
    o.vocab_size = 64;
    o.val_windows = 8;
    return data::TokenLoader({shard}, o);
  }
  StudentConfig student_config() const {
    StudentFromTeacher rule;
    rule.num_blocks = 4;  // sLSTM at 0 and 2, mLSTM at 1 and 3
    rule.num_heads = 4;
    rule.base.mlstm_qkv_proj_blocksize = 8;
    rule.base.mlstm_chunk_size = 16;  // chunkwise form at T 48
    return student_config_for_teacher(64, 64, 4, 4, rule);
  }
  static DistillerConfig config(index_t steps) {
    DistillerConfig c;
    c.max_steps = steps;
    c.grad_accum = 2;
    c.adamw.lr = 3e-3;
    c.lr = LrScheduleConfig{LrScheduleKind::cosine, 3e-3, 2, steps, 0.1};
    c.clip_norm = 1.0;
    c.loss.chunk_rows = 40;  // several vocabulary chunks, one partial
    return c;
  }
};

struct Trace {
  std::vector<double> total, kl, ce, alignment, grad_norm;
  std::vector<float> params;
  EvalReport eval;
};

template <class S, class Tc>
Trace run(Fixture& fx, Tc& teacher, index_t steps, const DistillerConfig& cfg, const std::string& save_at = "",
          index_t save_step = -1) {
  auto loader = fx.loader();
  S s(fx.student_config());
  s.init(17);
  copy_frozen_from_teacher(s, teacher);
  Distiller<S, Tc> d(s, teacher, loader, cfg);
  Trace t;
  for (index_t i = 0; i < steps; ++i) {
    const StepReport r = d.step();
    BOOST_REQUIRE_MESSAGE(!r.skipped, "step " << r.step << " skipped: " << r.bad_term);
    t.total.push_back(r.loss.total);
    t.kl.push_back(r.loss.kl);
    t.ce.push_back(r.loss.ce);
    t.alignment.push_back(r.loss.alignment);
    t.grad_norm.push_back(r.grad_norm);
    if (d.step_count() == save_step) d.save(save_at);
  }
  t.eval = d.evaluate();
  t.params = s.params_to_host();
  return t;
}

double rel(double a, double b) { return std::abs(a - b) / std::max(std::abs(b), 1e-12); }

/// Worst relative difference of the per-step losses, gradient norms, the evaluation and the weights.
/// (param_tol: AdamW's normalised updates amplify tiny gradient differences on near-zero
/// gradients, so weights after training are compared more loosely in 16-bit modes.)
double compare(const Trace& g, const Trace& c, double tol, const char* what, double param_tol = -1) {
  if (param_tol < 0) param_tol = tol;
  double worst = 0;
  for (std::size_t i = 0; i < c.total.size(); ++i) {
    for (auto [a, b, name] : {std::tuple{g.total[i], c.total[i], "total"}, std::tuple{g.kl[i], c.kl[i], "kl"},
                              std::tuple{g.ce[i], c.ce[i], "ce"}, std::tuple{g.alignment[i], c.alignment[i], "alignment"},
                              std::tuple{g.grad_norm[i], c.grad_norm[i], "grad_norm"}}) {
      BOOST_TEST_INFO(what << " step " << i + 1 << " " << name << ": gpu " << a << " cpu " << b);
      BOOST_CHECK_LE(rel(a, b), tol);
      worst = std::max(worst, rel(a, b));
    }
  }
  const double pe = relative_error(g.params.data(), c.params.data(), index_t(c.params.size()));
  BOOST_TEST_INFO(what << " final weights");
  BOOST_CHECK_LE(pe, param_tol);
  BOOST_TEST_INFO(what << " held-out perplexity gpu " << g.eval.student_ppl << " cpu " << c.eval.student_ppl);
  BOOST_CHECK_LE(rel(g.eval.student_ppl, c.eval.student_ppl), tol);
  BOOST_CHECK_LE(rel(g.eval.teacher_ppl, c.eval.teacher_ppl), tol);
  BOOST_TEST_MESSAGE(what << ": final weights differ by " << pe << " (relative)");
  return std::max(worst, rel(g.eval.student_ppl, c.eval.student_ppl));
}

using MathModeGuard = testing::MathModeScope;

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_distill)

BOOST_AUTO_TEST_CASE(gpu_step_follows_cpu_in_fp32) {
  Fixture fx;
  const DistillerConfig cfg = Fixture::config(8);
  const Trace c = run<CpuStudent>(fx, fx.cpu_teacher, 8, cfg);
  const Trace g = run<GpuStudent>(fx, fx.gpu_teacher, 8, cfg);
  BOOST_CHECK_LT(c.total.back(), c.total.front());  // it trains
  const double worst = compare(g, c, 1e-4, "fp32");
  BOOST_TEST_MESSAGE("Distiller GPU vs CPU, fp32, 8 steps x 2 micro-batches: worst relative difference " << worst
                     << " (loss " << c.total.front() << " -> " << c.total.back() << ")");
}

BOOST_AUTO_TEST_CASE(gpu_mixed_precision_tracks_fp32) {
  Fixture fx;
  const DistillerConfig cfg = Fixture::config(8);
  const Trace c = run<CpuStudent>(fx, fx.cpu_teacher, 8, cfg);
  {
    MathModeGuard m(cuda_backend::MathMode::bf16);
    const Trace g = run<GpuStudent>(fx, fx.gpu_teacher, 8, cfg);
    BOOST_TEST_MESSAGE("Distiller GPU bf16 vs CPU fp32: worst relative difference " << compare(g, c, 2e-2, "bf16", 5e-2));
  }
  {
    MathModeGuard m(cuda_backend::MathMode::fp16);
    DistillerConfig c16 = cfg;
    c16.loss_scale.enabled = true;
    const Trace g = run<GpuStudent>(fx, fx.gpu_teacher, 8, c16);
    BOOST_TEST_MESSAGE("Distiller GPU fp16 + loss scaling vs CPU fp32: worst relative difference "
                       << compare(g, c, 5e-2, "fp16", 5e-2));
  }
}

BOOST_AUTO_TEST_CASE(gpu_checkpoint_resumes_on_cpu) {
  Fixture fx;
  const DistillerConfig cfg = Fixture::config(6);
  const std::string ck = (fx.dir / "gpu.dxc").string();
  const Trace full = run<CpuStudent>(fx, fx.cpu_teacher, 6, cfg);
  run<GpuStudent>(fx, fx.gpu_teacher, 3, cfg, ck, 3);
  auto loader = fx.loader();
  CpuStudent s(fx.student_config());
  copy_frozen_from_teacher(s, fx.cpu_teacher);
  Distiller<CpuStudent, CpuTeacher> d(s, fx.cpu_teacher, loader, cfg);
  d.resume(ck);
  BOOST_CHECK_EQUAL(d.step_count(), 3);
  for (int i = 3; i < 6; ++i) {
    const StepReport r = d.step();
    BOOST_CHECK_LE(rel(r.loss.total, full.total[static_cast<std::size_t>(i)]), 1e-4);
  }
  const std::vector<float> p = s.params_to_host();
  BOOST_CHECK_LE(relative_error(p.data(), full.params.data(), index_t(p.size())), 1e-4);
}

BOOST_AUTO_TEST_SUITE_END()
