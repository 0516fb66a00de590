// Shared by the CUDA benchmarks (and the multi-GPU scaling case of tests/nccl): wall-clock timing
// of device work, and the Qwen2.5-1.5B-shaped teacher with random weights drawn on the device.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "distilx/cuda.cuh"

namespace distilx::bench {

/// Mean milliseconds per call of f over iters calls, the device drained before and after.
inline double wall_ms(const std::function<void()>& f, int iters) {
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) f();
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
}

/// The same after one untimed warm-up call (allocations, operand cache, cuBLAS heuristics).
inline double time_ms(const std::function<void()>& f, int iters) {
  f();
  return wall_ms(f, iters);
}

/// Teacher config with Qwen2.5-1.5B's shapes (28 layers by default): d 1536, FFN 8960, 12 query /
/// 2 KV heads of 128, V 151936, tied embedding, QKV biases (qwen2).
inline io::HfModelConfig qwen25_15b(index_t layers = 28) {
  const nlohmann::json j{{"architectures", {"Qwen2ForCausalLM"}},
                         {"model_type", "qwen2"},
                         {"vocab_size", 151936},
                         {"hidden_size", 1536},
                         {"intermediate_size", 8960},
                         {"num_hidden_layers", layers},
                         {"num_attention_heads", 12},
                         {"num_key_value_heads", 2},
                         {"rms_norm_eps", 1e-6},
                         {"max_position_embeddings", 32768},
                         {"rope_theta", 1000000.0},
                         {"use_sliding_window", false},
                         {"tie_word_embeddings", true}};
  return io::parse_hf_config(j, "Qwen2.5-1.5B shapes (in code)");
}

namespace detail {
/// Fills x[n] with a + sd * u, u uniform with unit variance (a counter hash: fast, reproducible).
/// A template only so that the header can be included by several translation units.
template <int = 0>
__global__ void fill_uniform_kernel(float* x, index_t n, float a, float sd, std::uint64_t seed) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * static_cast<std::uint64_t>(i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;  // [-1, 1)
    x[i] = a + sd * 1.7320508f * u;
  }
}
}  // namespace detail

/// The distributions of LlamaTeacher::init_random, drawn on the device (the host Rng would take
/// tens of seconds for 1.5 B weights). Deterministic: every process gets the same weights.
inline void init_teacher_on_device(LlamaTeacher<float, distilx::cuda>& t) {
  std::uint64_t seed = 1;
  t.for_each_parameter([&](const std::string& name, Tensor<float, distilx::cuda>& w) {
    const bool is_norm = name.size() > 11 && name.compare(name.size() - 11, 11, "norm.weight") == 0;
    const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    const bool is_embed = name == "model.embed_tokens.weight";
    const double sd = is_norm || is_bias ? 0.1 : is_embed ? 1.0 : 1.0 / std::sqrt(double(w.dim(1)));
    detail::fill_uniform_kernel<><<<1024, 256, 0, cuda_backend::current_stream()>>>(
        w.data(), w.size(), is_norm ? 1.0f : 0.0f, static_cast<float>(sd), seed++ * 7919);
    DISTILX_CUDA_LAUNCH_CHECK();
  });
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace distilx::bench
