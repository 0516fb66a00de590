// GPU forward of the teacher at Qwen2.5-1.5B shapes (28 layers, d 1536, FFN 8960, 12 query / 2 KV
// heads of 128, V 151936, tied embedding; random weights) with logits and all 29 hidden states, on
// 8192 tokens as B16 x T512 and B4 x T2048, in the fp32, tf32 and bf16 math modes: ms per forward,
// tokens/s, TFLOP/s (performance.md's FLOPs per token: 3.131 G at T 512, 3.263 G at T 2048), the
// fused attention alone (28 calls at the layer shape) and the device memory peak. In bf16 every
// weight tensor is registered in the 16-bit operand cache (frozen), as a trainer would do.
//
//   cuda_teacher_bench [--layers N] [--iters N] [--modes fp32,tf32,bf16] [--attention-only]
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/cuda.cuh"
#include "cuda_bench_util.cuh"

using namespace distilx;
using bench::time_ms;
using cuda_backend::MathMode;

namespace {

MathMode parse_mode(const std::string& s) {
  if (s == "fp32") return MathMode::fp32;
  if (s == "tf32") return MathMode::tf32;
  if (s == "bf16") return MathMode::bf16;
  if (s == "fp16") return MathMode::fp16;
  std::fprintf(stderr, "unknown mode '%s' (fp32, tf32, bf16, fp16)\n", s.c_str());
  std::exit(2);
}

double used_gib() {
  std::size_t free_b = 0, total_b = 0;
  DISTILX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return double(total_b - free_b) / double(1 << 30);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda_device_available()) {
    std::printf("cuda_teacher_bench: no CUDA device\n");
    return 77;
  }
  index_t layers = 28;
  int iters = 3;
  bool attention_only = false;
  std::vector<MathMode> modes{MathMode::fp32, MathMode::tf32, MathMode::bf16};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--layers" && i + 1 < argc) layers = std::atoll(argv[++i]);
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (a == "--attention-only") attention_only = true;
    else if (a == "--modes" && i + 1 < argc) {
      modes.clear();
      std::string list = argv[++i];
      for (std::size_t p = 0; p <= list.size();) {
        const std::size_t q = std::min(list.find(',', p), list.size());
        modes.push_back(parse_mode(list.substr(p, q - p)));
        p = q + 1;
      }
    } else {
      std::fprintf(stderr, "usage: %s [--layers N] [--iters N] [--modes fp32,tf32,bf16] [--attention-only]\n", argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop{};
  DISTILX_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s; teacher: Qwen2.5-1.5B shapes, %lld layers, random weights, logits + all hidden states\n",
              prop.name, static_cast<long long>(layers));

  const io::HfModelConfig cfg = bench::qwen25_15b(layers);
  const index_t NH = cfg.num_attention_heads, NKV = cfg.num_key_value_heads, DH = cfg.head_dim;
  struct Shape2 {
    index_t B, S;
    double gflop_per_token;
  };
  const Shape2 shapes[] = {{16, 512, 3.131}, {4, 2048, 3.263}};

  // The attention op alone at the layer shape, 28 calls (one per layer), per mode.
  std::printf("\n| attention (x%lld layers) | mode | kernel | ms | TFLOP/s (causal) |\n|---|---|---|---|---|\n",
              static_cast<long long>(layers));
  for (const Shape2& sh : shapes) {
    const index_t M = sh.B * sh.S;
    Buffer<float, distilx::cuda> q(M * NH * DH), k(M * NKV * DH), v(M * NKV * DH), o(M * NH * DH);
    bench::detail::fill_uniform_kernel<><<<1024, 256>>>(q.data(), q.size(), 0.f, 1.f, 11);
    bench::detail::fill_uniform_kernel<><<<1024, 256>>>(k.data(), k.size(), 0.f, 1.f, 12);
    bench::detail::fill_uniform_kernel<><<<1024, 256>>>(v.data(), v.size(), 0.f, 1.f, 13);
    DISTILX_CUDA_LAUNCH_CHECK();
    ops::CausalAttentionShape as;
    as.B = sh.B;
    as.S = sh.S;
    as.NH = NH;
    as.NKV = NKV;
    as.DH = DH;
    const float scale = 1.0f / std::sqrt(float(DH));
    // QK^T and PV over the causal triangle (keys j <= i), multiply-add = 2.
    const double flop = 4.0 * double(sh.B) * double(NH) * double(DH) * double(sh.S) * double(sh.S + 1) / 2.0 * layers;
    for (MathMode m : modes) {
      cuda_backend::set_math_mode(m);
      const double ms = time_ms(
          [&] {
            for (index_t l = 0; l < layers; ++l)
              ops::causal_attention_forward(distilx::cuda{}, o.data(), q.data(), k.data(), v.data(), nullptr, as, scale,
                                            static_cast<float*>(nullptr), index_t{0});
          },
          std::max(iters, 5));
      std::printf("| B%lld x T%lld | %s | %s | %.3f | %.1f |\n", static_cast<long long>(sh.B),
                  static_cast<long long>(sh.S), cuda_backend::to_string(m),
                  cuda_backend::to_string(cuda_backend::attention_kernel_for<float>(as, o.data(), q.data(), k.data(),
                                                                                     v.data())),
                  ms, flop / ms / 1e9);
    }
  }
  if (attention_only) return 0;

  std::printf("\ninitialising %lld-layer teacher on the device...\n", static_cast<long long>(layers));
  LlamaTeacher<float, distilx::cuda> teacher(cfg);
  bench::init_teacher_on_device(teacher);
  std::printf("parameters: %zu (%.2f GiB fp32); device memory in use: %.2f GiB\n", teacher.num_parameters(),
              teacher.num_parameters() * 4.0 / double(1 << 30), used_gib());

  std::printf("\n| shape | mode | ms / forward | tokens/s | TFLOP/s | peak device GiB |\n|---|---|---|---|---|---|\n");
  for (const Shape2& sh : shapes) {
    const index_t M = sh.B * sh.S, V = cfg.vocab_size;
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(M));
    Rng rng(3);
    for (auto& t : tokens) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(V)));
    Buffer<float, distilx::cuda> logits(M * V);
    std::vector<Tensor<float, distilx::cuda>> hidden;
    for (MathMode m : modes) {
      cuda_backend::set_math_mode(m);
      std::vector<std::unique_ptr<cuda_backend::CachedOperands>> cached;
      if (m == MathMode::bf16 || m == MathMode::fp16)
        teacher.for_each_parameter([&](const std::string&, Tensor<float, distilx::cuda>& w) {
          if (w.rank() == 2) cached.push_back(std::make_unique<cuda_backend::CachedOperands>(w.data(), w.size(), true));
        });
      double peak = 0;
      const double ms = time_ms(
          [&] {
            teacher.forward(tokens.data(), sh.B, sh.S, nullptr, logits.data(), &hidden);
            peak = std::max(peak, used_gib());
          },
          iters);
      DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
      peak = std::max(peak, used_gib());
      std::printf("| B%lld x T%lld | %s | %.1f | %.0f | %.1f | %.2f |\n", static_cast<long long>(sh.B),
                  static_cast<long long>(sh.S), cuda_backend::to_string(m), ms, double(M) / (ms / 1e3),
                  sh.gflop_per_token * 1e9 * double(M) * (double(layers) / 28.0) / (ms / 1e3) / 1e12, peak);
      std::fflush(stdout);
    }
  }
  std::printf("\n(peak: device memory in use as cudaMemGetInfo reports it, caching allocator included; TFLOP/s "
              "scales performance.md's per-token FLOPs by layers/28, which slightly overstates it for fewer layers "
              "since the LM head does not scale)\n");
  return 0;
}
