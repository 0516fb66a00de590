// GPU forward + backward of the paper-config student's block stack (6 blocks, sLSTM at
// 0, 2, 4, 16 heads, d 1536, frozen embedding/head, V 151936) on 8192 tokens per step,
// float32 with TF32 off (exact mode) and on, plus the cells alone. The loss and the
// teacher are not part of this measurement (backward starts from d hidden).
#include <chrono>
#include <functional>
#include <cstdio>
#include <vector>

#include "distilx/cuda.cuh"

using namespace distilx;

namespace {
double time_ms(const std::function<void()>& f, int iters) {
  f();
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) f();
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
}
}  // namespace

int main() {
  if (!cuda_device_available()) {
    std::printf("cuda_student_bench: no CUDA device, skipped\n");
    return 0;
  }
  cudaDeviceProp prop{};
  DISTILX_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n", prop.name);
  const StudentConfig c = StudentConfig::paper();
  Student<float, distilx::cuda> s(c);
  {
    Student<float> host_init(StudentConfig::paper(64, 1536));  // same block shapes, tiny vocab
    host_init.init(1);
    s.set_params(host_init.params_to_host().data());
  }
  // GEMM baseline in the same run: M 8192, K 1536, N 6144 (the mLSTM up-projection).
  {
    const index_t M = 8192, K = 1536, N = 6144;
    Buffer<float, distilx::cuda> A(M * K), W(N * K), C(M * N);
    for (bool tf32 : {false, true}) {
      cuda_backend::set_tf32(tf32);
      const double ms = time_ms([&] {
        ops::gemm(distilx::cuda{}, ops::Trans::no, ops::Trans::yes, M, N, K, 1.0f, A.data(), K, W.data(), K, 0.0f, C.data(), N);
      }, 10);
      std::printf("baseline GEMM %lldx%lldx%lld fp32 %s: %.2f ms, %.1f TFLOP/s\n", (long long)M, (long long)N,
                  (long long)K, tf32 ? "TF32" : "exact", ms, 2.0 * M * N * K / ms / 1e9);
    }
  }
  for (auto [B, T] : std::vector<std::pair<index_t, index_t>>{{16, 512}, {4, 2048}}) {
    std::vector<std::int32_t> tok(static_cast<std::size_t>(B * T));
    Rng rng(3);
    for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab_size)));
    Buffer<float, distilx::cuda> dh(B * T * c.embedding_dim);
    for (bool tf32 : {false, true}) {
      cuda_backend::set_tf32(tf32);
      const double fwd = time_ms([&] { s.forward(tok.data(), B, T); }, 3);
      const double step = time_ms([&] {
        s.forward(tok.data(), B, T);
        s.zero_grad();
        s.backward(dh.data());
      }, 3);
      const double flops = 0.504e9 * double(B * T);  // trainable weights fwd + both bwd GEMMs (performance.md)
      std::printf("student blocks B %lld x T %lld, fp32 %s: forward %.1f ms, forward+backward %.1f ms, %.0f tokens/s, "
                  "%.1f TFLOP/s on the trainable GEMMs\n",
                  (long long)B, (long long)T, tf32 ? "TF32" : "exact", fwd, step, double(B * T) / step * 1e3,
                  flops / step / 1e9);
    }
  }
  std::size_t free_b = 0, total_b = 0;
  DISTILX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  std::printf("device memory in use: %.2f GiB (caching allocator reserved %.2f GiB)\n",
              double(total_b - free_b) / (1 << 30),
              double(cuda_backend::CachingAllocator::instance().reserved_bytes()) / (1 << 30));
  return 0;
}
