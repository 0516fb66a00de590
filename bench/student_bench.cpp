// CPU forward+backward throughput of a small student (d 256, 4 blocks with sLSTM
// at 1 and 3, T 256) and the share of the step spent in matrix products.
// Baseline in the same run: one GEMM of the step's largest shape, to report the
// step's GEMM rate against what Eigen reaches on this machine.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

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
  return 0;
}
