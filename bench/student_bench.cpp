// CPU forward+backward throughput of a small student (d 256, 4 blocks with sLSTM
// at 1 and 3, T 256) and the share of the step spent in matrix products; then the
// whole distillation step at that size (a d-256 Llama-style teacher, the Δ-loss with
// ratio alignment, clipping and AdamW, through Distiller::step) with its GEMM share.
// Baseline in the same run: one GEMM of the step's largest shape, to report the
// step's GEMM rate against what Eigen reaches on this machine.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

#include "distilx/distilx.hpp"

using Clock = std::chrono::steady_clock;

int main(int argc, char** argv) {
  const long B = argc > 1 ? std::atol(argv[1]) : 4, S = argc > 2 ? std::atol(argv[2]) : 256;
  const int iters = argc > 3 ? std::atoi(argv[3]) : 5;
  distilx::StudentConfig c;
  c.vocab_size = 4096;
  c.embedding_dim = 256;
  c.num_blocks = 4;
  c.slstm_at = {1, 3};
  distilx::Student<float> s(c);
  s.init(1);
  std::vector<std::int32_t> tok(static_cast<std::size_t>(B * S));
  distilx::Rng rng(3);
  for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(4096));
  std::vector<float> dh(static_cast<std::size_t>(B * S * c.embedding_dim), 1e-3f);
  auto step = [&] {
    s.forward(tok.data(), B, S);
    s.zero_grad();
    s.backward(dh.data());
  };
  step();  // warm-up (allocates workspaces)
  auto& st = distilx::ops::gemm_stats();
  st.reset();
  st.enabled = true;
  const auto t0 = Clock::now();
  for (int i = 0; i < iters; ++i) step();
  const double sec = std::chrono::duration<double>(Clock::now() - t0).count() / iters;
  st.enabled = false;
  const double gemm_sec = st.seconds / iters, gemm_flops = st.flops / iters;
  // Baseline: a square-ish GEMM of the step's biggest product (M = B*S, K = d, N = 2*D).
  const long M = B * S, K = c.embedding_dim, N = 2 * c.mlstm_inner_dim();
  std::vector<float> A(M * K, 0.5f), W(N * K, 0.25f), C(M * N);
  const auto g0 = Clock::now();
  for (int i = 0; i < 10; ++i)
    distilx::ops::gemm(distilx::cpu{}, distilx::ops::Trans::no, distilx::ops::Trans::yes, M, N, K, 1.0f, A.data(), K,
                       W.data(), K, 0.0f, C.data(), N);
  const double base = std::chrono::duration<double>(Clock::now() - g0).count() / 10;
  const double base_gflops = 2.0 * M * N * K / base / 1e9;
  std::printf("student forward+backward, CPU float, d %ld, %ld blocks, B %ld x T %ld (%d iterations)\n",
              (long)c.embedding_dim, (long)c.num_blocks, B, S, iters);
  std::printf("  step %.1f ms, %.0f tokens/s\n", sec * 1e3, double(B * S) / sec);
  std::printf("  GEMM share %.1f%% (%ld calls/step, %.1f GFLOP/s inside GEMMs)\n", 100 * gemm_sec / sec,
              st.calls / iters, gemm_flops / gemm_sec / 1e9);
  std::printf("  baseline GEMM %ldx%ldx%ld: %.1f GFLOP/s; step GEMM rate / baseline = %.2f\n", M, N, K, base_gflops,
              gemm_flops / gemm_sec / 1e9 / base_gflops);

  // The whole distillation step at this size.
  nlohmann::json tj{{"architectures", {"Qwen2ForCausalLM"}}, {"model_type", "qwen2"}, {"vocab_size", 4096},
                    {"hidden_size", 256}, {"intermediate_size", 704}, {"num_hidden_layers", 4},
                    {"num_attention_heads", 8}, {"num_key_value_heads", 2}, {"rms_norm_eps", 1e-6},
                    {"max_position_embeddings", 4096}, {"rope_theta", 10000.0}, {"tie_word_embeddings", false}};
  distilx::LlamaTeacher<float> teacher(distilx::io::parse_hf_config(tj, "bench teacher"));
  distilx::Rng trng(5);
  teacher.init_random(trng);
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("distilx_student_bench_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  const std::string shard = (dir / "train_000000.bin").string();
  std::vector<std::int32_t> data(static_cast<std::size_t>((iters + 3) * B * (S + 1)));
  for (auto& t : data) t = static_cast<std::int32_t>(rng.below(4096));
  distilx::data::write_shard(shard, data);
  distilx::data::LoaderOptions lo;
  lo.seq_len = S;
  lo.batch_size = B;
  lo.vocab_size = 4096;
  distilx::data::TokenLoader loader({shard}, lo);
  distilx::Student<float> ds(c);
  ds.init(1);
  distilx::copy_frozen_from_teacher(ds, teacher);
  distilx::DistillerConfig dc;
  dc.max_steps = 1000;
  dc.grad_accum = 1;
  distilx::Distiller<distilx::Student<float>, distilx::LlamaTeacher<float>> d(ds, teacher, loader, dc);
  d.step();  // warm-up
  st.reset();
  st.enabled = true;
  const auto d0 = Clock::now();
  for (int i = 0; i < iters; ++i) d.step();
  const double dsec = std::chrono::duration<double>(Clock::now() - d0).count() / iters;
  st.enabled = false;
  std::printf("distillation step (teacher d 256 x 4 layers, V 4096, student as above, Δ-loss + ratio alignment, "
              "AdamW), B %ld x T %ld\n", B, S);
  std::printf("  step %.1f ms, %.0f tokens/s, GEMM share %.1f%% (%.1f GFLOP/s inside GEMMs)\n", dsec * 1e3,
              double(B * S) / dsec, 100 * st.seconds / iters / dsec, st.flops / st.seconds / 1e9);
  std::filesystem::remove_all(dir);
  return 0;
}
