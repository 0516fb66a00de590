// The paper-scale distillation step on one GPU (performance.md §1): a teacher with
// Qwen2.5-1.5B's shapes (random weights), the paper-config student (6 blocks, sLSTM at 0, 2,
// 4, 16 heads, d 1536, V 151936, frozen untied embedding and head), 8192 tokens per step at
// B 16 x T 512 and B 4 x T 2048. Per math mode: ms per phase (teacher forward, student
// forward, loss, student backward, optimizer), the whole Distiller::step, tokens/s, MFU
// against the bf16 GEMM rate measured in the same run, peak memory; then student decoding.
// Prints a table and writes JSON (--out) for bench/plot_step.py and bench/compare.py.
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/cuda.cuh"
#include "cuda_bench_util.cuh"

using namespace distilx;
using bench::wall_ms;
namespace fs = std::filesystem;
using Dev = distilx::cuda;
using cuda_backend::MathMode;

namespace {

struct Timer {
  cudaEvent_t e0, e1;
  Timer() {
    DISTILX_CUDA_CHECK(cudaEventCreate(&e0));
    DISTILX_CUDA_CHECK(cudaEventCreate(&e1));
  }
  ~Timer() {
    (void)cudaEventDestroy(e0);
    (void)cudaEventDestroy(e1);
  }
  /// Milliseconds of device time for f (run on the current stream).
  double ms(const std::function<void()>& f) {
    DISTILX_CUDA_CHECK(cudaEventRecord(e0, cuda_backend::current_stream()));
    f();
    DISTILX_CUDA_CHECK(cudaEventRecord(e1, cuda_backend::current_stream()));
    DISTILX_CUDA_CHECK(cudaEventSynchronize(e1));
    float t = 0;
    DISTILX_CUDA_CHECK(cudaEventElapsedTime(&t, e0, e1));
    return t;
  }
};

/// --profile: the profiler's range covers one measured step; a marker kernel with the phase's
/// number ends each phase, so a kernel-by-kernel trace (ncu, scripts/kernel_profile.py) can be
/// cut into phases.
bool g_profile = false;
__global__ void phase_marker_kernel(int) {}
void phase_marker(int phase) {
  if (g_profile) phase_marker_kernel<<<1, 1, 0, cuda_backend::current_stream()>>>(phase);
}

double used_gib() {
  std::size_t free_b = 0, total_b = 0;
  DISTILX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return double(total_b - free_b) / double(1ull << 30);
}

/// bf16 GEMM rate on shapes of this workload (the MFU denominator) and a large square.
nlohmann::json gemm_baselines() {
  nlohmann::json out = nlohmann::json::array();
  struct Shape {
    index_t M, N, K;
    const char* what;
  };
  for (const Shape s : {Shape{8192, 6144, 1536, "student up-projection"}, Shape{8192, 8960, 1536, "teacher FFN"},
                        Shape{8192, 151936, 1536, "LM head"}, Shape{8192, 8192, 8192, "square"}}) {
    Buffer<float, Dev> A(s.M * s.K), W(s.N * s.K), C(s.M * s.N);
    ops::fill_zero(Dev{}, A.data(), A.size());
    ops::fill_zero(Dev{}, W.data(), W.size());
    for (MathMode m : {MathMode::bf16, MathMode::tf32}) {
      cuda_backend::set_math_mode(m);
      // Cached weight operand: the rate of the product itself, as for the (frozen or per-step) weights.
      const auto reg = ops::cache_operands(Dev{}, static_cast<const float*>(W.data()), W.size(), true);
      auto f = [&] {
        ops::gemm(Dev{}, ops::Trans::no, ops::Trans::yes, s.M, s.N, s.K, 1.0f, A.data(), s.K, W.data(), s.K, 0.0f,
                  C.data(), s.N);
      };
      f();
      const double ms = wall_ms(f, 5);
      const double tflops = 2.0 * double(s.M) * double(s.N) * double(s.K) / ms / 1e9;
      out.push_back({{"shape", s.what}, {"M", s.M}, {"N", s.N}, {"K", s.K}, {"mode", to_string(m)}, {"ms", ms},
                     {"tflops", tflops}});
      std::printf("  GEMM %-22s %6lld x %6lld x %5lld %-4s %8.3f ms %7.1f TFLOP/s\n", s.what, (long long)s.M,
                  (long long)s.N, (long long)s.K, to_string(m), ms, tflops);
    }
    cuda_backend::set_math_mode(MathMode::fp32);
  }
  return out;
}

struct Workload {
  LlamaTeacher<float, Dev> teacher{bench::qwen25_15b()};
  StudentConfig sc = StudentConfig::paper();
  std::unique_ptr<Student<float, Dev>> student;

  Workload() {
    bench::init_teacher_on_device(teacher);  // random weights, drawn on the device
    student = std::make_unique<Student<float, Dev>>(sc);
    student->init(1);
    copy_frozen_from_teacher(*student, teacher);
  }
};

/// One hand-written step with a device-timed phase each (the same calls Distiller::step makes).
nlohmann::json phase_breakdown(Workload& w, index_t B, index_t T, int iters) {
  Student<float, Dev>& s = *w.student;
  const index_t M = B * T, d = w.sc.embedding_dim;
  std::vector<std::int32_t> tok(static_cast<std::size_t>(M)), tgt(tok.size());
  Rng rng(3);
  for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(std::uint64_t(w.sc.vocab_size)));
  for (index_t i = 0; i < M; ++i) tgt[i] = (i + 1) % T == 0 ? -1 : tok[i + 1];
  DistillationLossConfig lc;
  lc.chunk_rows = 2048;
  DeltaDistillationLoss<float, Dev> loss(lc);
  const LossWeights lw{2.0, 0.2, 0.01, 0.8};
  AdamW<float, Dev> opt(s.layout(), AdamWConfig{2e-4, 0.9, 0.999, 1e-8, 0.01});
  std::vector<Tensor<float, Dev>> hidden;
  Buffer<float, Dev> dh(M * d);
  std::vector<Buffer<float, Dev>> dH(static_cast<std::size_t>(w.sc.num_blocks));
  for (auto& b : dH) b.resize(M * d);
  std::vector<ops::OperandRegistration> cached;  // as the Distiller does: weights get 16-bit copies
  cached.push_back(ops::cache_operands(Dev{}, static_cast<const float*>(s.params()), s.flat_size(), false));
  cached.push_back(ops::cache_operands(Dev{}, static_cast<const float*>(s.embedding()), w.sc.vocab_size * d, true));
  cached.push_back(ops::cache_operands(Dev{}, static_cast<const float*>(s.head()), w.sc.vocab_size * d, true));
  w.teacher.for_each_parameter([&](const std::string&, const auto& t) {
    cached.push_back(ops::cache_operands(Dev{}, static_cast<const float*>(t.data()), t.size(), true));
  });
  Timer tm;
  double t_teacher = 0, t_sfwd = 0, t_loss = 0, t_bwd = 0, t_opt = 0;
  DistillationMetrics m;
  for (int it = -1; it < iters; ++it) {  // it = -1: warm-up
    if (g_profile && it == 0) DISTILX_CUDA_CHECK(cudaProfilerStart());
    const double a = tm.ms([&] { w.teacher.forward(tok.data(), B, T, nullptr, nullptr, &hidden); });
    if (it == 0) phase_marker(1);
    const double b = tm.ms([&] { s.forward(tok.data(), B, T); });
    if (it == 0) phase_marker(2);
    const double c = tm.ms([&] {
      DistillationInputs<float> in;
      in.vocab.h_s = s.hidden();
      in.vocab.E_s = s.head();
      in.vocab.h_t = hidden.back().data();
      in.vocab.W_t = w.teacher.lm_head().data();
      in.vocab.targets = tgt.data();
      in.vocab.M = M;
      in.vocab.d = d;
      in.vocab.d_t = w.teacher.hidden_size();
      in.vocab.V = w.sc.vocab_size;
      for (index_t i = 0; i < w.sc.num_blocks; ++i) in.H_s.push_back(s.block_output(i));
      for (std::size_t l = 1; l < hidden.size(); ++l) in.H_t.push_back(hidden[l].data());
      in.batch = B;
      DistillationGrads<float> g;
      g.dh_s = dh.data();
      for (auto& x : dH) g.dH_s.push_back(x.data());
      m = loss.compute(in, lw, g, true);
    });
    if (it == 0) phase_marker(3);
    const double e = tm.ms([&] {
      std::vector<const float*> dblocks;
      for (auto& x : dH) dblocks.push_back(x.data());
      s.zero_grad();
      s.backward(dh.data(), &dblocks);
    });
    if (it == 0) phase_marker(4);
    const double f = tm.ms([&] {
      const double sq = ops::sum_squares(Dev{}, s.grads(), s.flat_size());
      const double coef = 1.0 / (std::sqrt(sq) + 1e-6);
      if (coef < 1.0) ops::scale(Dev{}, s.grads(), static_cast<float>(coef), s.flat_size());
      opt.step(s.params(), s.grads(), 2e-4);
      ops::parameters_updated(Dev{});
    });
    if (it == 0) phase_marker(5);
    if (g_profile && it == 0) DISTILX_CUDA_CHECK(cudaProfilerStop());
    if (it >= 0) t_teacher += a, t_sfwd += b, t_loss += c, t_bwd += e, t_opt += f;
  }
  const double n = iters;
  nlohmann::json j{{"teacher_forward_ms", t_teacher / n}, {"student_forward_ms", t_sfwd / n},
                   {"loss_ms", t_loss / n}, {"student_backward_ms", t_bwd / n}, {"optimizer_ms", t_opt / n}};
  const double total = (t_teacher + t_sfwd + t_loss + t_bwd + t_opt) / n;
  j["sum_ms"] = total;
  j["tokens_per_s"] = double(M) / total * 1e3;
  j["loss_total"] = m.total;
  return j;
}

/// The whole Distiller::step (loader, teacher, student, loss, backward, clip, AdamW) end to end.
nlohmann::json distiller_step(Workload& w, index_t B, index_t T, int iters, const fs::path& tmp) {
  const std::string shard = (tmp / "bench_000000.bin").string();
  {
    std::vector<std::int32_t> toks(static_cast<std::size_t>(B * (T + 1) * (iters + 4)));
    Rng rng(5);
    for (auto& t : toks) t = static_cast<std::int32_t>(rng.below(std::uint64_t(w.sc.vocab_size)));
    data::write_shard(shard, toks);
  }
  data::LoaderOptions lo;
  lo.seq_len = T;
  lo.batch_size = B;
  lo.vocab_size = static_cast<std::int32_t>(w.sc.vocab_size);
  data::TokenLoader loader({shard}, lo);
  DistillerConfig dc;
  dc.max_steps = 1000;
  dc.grad_accum = 1;
  dc.loss.chunk_rows = 2048;
  if (cuda_backend::math_mode() == MathMode::fp16) dc.loss_scale.enabled = true;
  // Peak memory of the step alone: drop what the phase breakdown cached (its second optimizer,
  // workspaces), then count from the weights that are live now (teacher, student).
  auto& alloc = cuda_backend::CachingAllocator::instance();
  alloc.release_cached();
  alloc.reset_peak();
  const double gib = double(1ull << 30);
  const double weights_gib = double(alloc.in_use_bytes()) / gib;
  double ms = 0;
  {
    Distiller<Student<float, Dev>, LlamaTeacher<float, Dev>> d(*w.student, w.teacher, loader, dc);
    d.step();  // warm-up
    ms = wall_ms([&] { d.step(); }, iters);
  }
  return {{"step_ms", ms},
          {"tokens_per_s", double(B * T) / ms * 1e3},
          {"peak_allocated_gib", double(alloc.peak_in_use_bytes()) / gib},
          {"weights_allocated_gib", weights_gib},
          {"device_used_gib", used_gib()}};
}

/// Recurrent decoding: ms per token at batch 1 and 64 after ctx tokens of context; the state
/// (and so memory) does not grow with the context.
nlohmann::json decoding(Workload& w, const std::vector<index_t>& contexts) {
  nlohmann::json out = nlohmann::json::array();
  Student<float, Dev>& s = *w.student;
  for (index_t Bd : {index_t(1), index_t(64)}) {
    auto st = s.make_state(Bd);
    std::vector<std::int32_t> tok(static_cast<std::size_t>(Bd), 1);
    Buffer<float, Dev> logits(Bd * w.sc.vocab_size);
    index_t done = 0;
    for (index_t ctx : contexts) {
      const double mem0 = used_gib();
      const auto t0 = std::chrono::steady_clock::now();
      const index_t start = done;
      while (done < ctx) {
        s.step(tok.data(), st, logits.data());
        ++done;
      }
      DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double per_tok_ms = sec * 1e3 / double(std::max<index_t>(1, done - start));
      out.push_back({{"batch", Bd}, {"context", ctx}, {"ms_per_step", per_tok_ms},
                     {"tokens_per_s", double(Bd) / per_tok_ms * 1e3}, {"used_gib", used_gib()},
                     {"used_gib_growth", used_gib() - mem0}});
      std::printf("  decode batch %3lld at context %6lld: %.3f ms/step, %.0f tokens/s, device memory %.2f GiB\n",
                  (long long)Bd, (long long)ctx, per_tok_ms, double(Bd) / per_tok_ms * 1e3, used_gib());
      std::fflush(stdout);
    }
  }
  return out;
}

double flops_per_token(index_t T) { return T >= 2048 ? 4.71e9 : 4.58e9; }  // performance.md §1

}  // namespace

int main(int argc, char** argv) {
  std::string out_path, modes_arg = "bf16,tf32";
  int iters = 5;
  std::vector<index_t> contexts{1024, 8192, 32768};
  bool decode = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out_path = argv[++i];
    else if (a == "--modes" && i + 1 < argc) modes_arg = argv[++i];
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (a == "--no-decode") decode = false;
    else if (a == "--short-decode") contexts = {1024, 2048};
    else if (a == "--profile") g_profile = true;
    else {
      std::fprintf(stderr, "usage: paper_step_bench [--out FILE.json] [--modes bf16,tf32,fp16,fp32] [--iters N] "
                           "[--no-decode | --short-decode] [--profile]\n"
                           "  --profile: one bf16 B16 x T512 step inside cudaProfilerStart/Stop, phases ended by\n"
                           "  phase_marker_kernel (run under ncu --profile-from-start off, see scripts/kernel_profile.py)\n");
      return 2;
    }
  }
  if (!cuda_device_available()) {
    std::printf("paper_step_bench: no CUDA device, skipped\n");
    return 0;
  }
  cudaDeviceProp prop{};
  DISTILX_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n", prop.name);
  if (g_profile) {
    Workload w;
    cuda_backend::set_math_mode(MathMode::bf16);
    const nlohmann::json row = phase_breakdown(w, 16, 512, 1);
    std::printf("profiled step (bf16, B 16 x T 512): %s\n", row.dump().c_str());
    return 0;
  }
  nlohmann::json J;
  J["bench"] = "paper_step_bench";
  J["device"] = prop.name;
  J["gemm"] = gemm_baselines();
  double bf16_rate = 0;
  for (const auto& g : J["gemm"])
    if (g["mode"] == "bf16" && g["shape"] != "square") bf16_rate = std::max(bf16_rate, g["tflops"].get<double>());
  J["mfu_denominator_tflops"] = bf16_rate;

  Workload w;
  const fs::path tmp = fs::temp_directory_path() / ("distilx_bench_" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  J["steps"] = nlohmann::json::array();
  std::vector<MathMode> modes;
  for (std::size_t p = 0; p < modes_arg.size();) {
    const std::size_t q = std::min(modes_arg.find(',', p), modes_arg.size());
    const std::string m = modes_arg.substr(p, q - p);
    modes.push_back(m == "bf16" ? MathMode::bf16 : m == "fp16" ? MathMode::fp16 : m == "tf32" ? MathMode::tf32 : MathMode::fp32);
    p = q + 1;
  }
  for (MathMode mode : modes) {
    cuda_backend::set_math_mode(mode);
    for (auto [B, T] : std::vector<std::pair<index_t, index_t>>{{16, 512}, {4, 2048}}) {
      nlohmann::json row = phase_breakdown(w, B, T, iters);
      row["mode"] = to_string(mode);
      row["B"] = B;
      row["T"] = T;
      const nlohmann::json ds = distiller_step(w, B, T, iters, tmp);
      row["distiller_step_ms"] = ds["step_ms"];
      row["distiller_tokens_per_s"] = ds["tokens_per_s"];
      row["mfu"] = flops_per_token(T) * ds["tokens_per_s"].get<double>() / (bf16_rate * 1e12);
      row["teacher_tokens_per_s"] = double(B * T) / row["teacher_forward_ms"].get<double>() * 1e3;
      row["peak_allocated_gib"] = ds["peak_allocated_gib"];  // Distiller::step's peak (max_memory_allocated)
      row["weights_allocated_gib"] = ds["weights_allocated_gib"];
      row["peak_reserved_gib"] = double(cuda_backend::CachingAllocator::instance().reserved_bytes()) / double(1ull << 30);
      row["device_used_gib"] = ds["device_used_gib"];
      J["steps"].push_back(row);
      std::printf("%-4s B %2lld x T %4lld: teacher %.1f | student fwd %.1f | loss %.1f | backward %.1f | optimizer %.1f "
                  "ms -> %.0f tokens/s; Distiller::step %.1f ms = %.0f tokens/s, MFU %.1f%%, peak allocated %.1f GiB "
                  "(weights %.1f), device used %.1f GiB\n",
                  to_string(mode), (long long)B, (long long)T, row["teacher_forward_ms"].get<double>(),
                  row["student_forward_ms"].get<double>(), row["loss_ms"].get<double>(),
                  row["student_backward_ms"].get<double>(), row["optimizer_ms"].get<double>(),
                  row["tokens_per_s"].get<double>(), ds["step_ms"].get<double>(), ds["tokens_per_s"].get<double>(),
                  100 * row["mfu"].get<double>(), row["peak_allocated_gib"].get<double>(),
                  row["weights_allocated_gib"].get<double>(), row["device_used_gib"].get<double>());
      std::fflush(stdout);
      if (!out_path.empty()) std::ofstream(out_path) << J.dump(2) << "\n";  // incrementally
    }
  }
  cuda_backend::set_math_mode(MathMode::bf16);
  if (decode) J["decode"] = decoding(w, contexts);
  fs::remove_all(tmp);
  if (!out_path.empty()) std::ofstream(out_path) << J.dump(2) << "\n";
  return 0;
}
