// GPU cost of the Δ-distillation loss at the paper's scale: M 8192 positions (B 16 x T 512),
// d_s = d_t = 1536, V 151936, 6 student blocks, 28 teacher hidden states, ratio alignment,
// forward KL at tau 2 with the gradients. DeltaDistillationLoss::compute whole, per chunk size
// (512 / 1024 / 2048 rows) and GEMM math mode (fp32, TF32), split into LM-head GEMMs, the row
// kernel (distill_rows) and the alignment; the row kernel alone for every divergence and launch
// shape with its bandwidth; peak extra device memory. Baselines of the same run: device copy
// bandwidth and a plain GEMM.
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "distilx/cuda.cuh"
#include "cuda_bench_util.cuh"

using namespace distilx;
using bench::time_ms;

namespace {

__global__ void fill_kernel(float* x, index_t n, std::uint64_t seed, float scale) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    std::uint64_t z = (static_cast<std::uint64_t>(i) + seed) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    // Sum of two uniforms: a cheap bell shape in [-1, 1] times scale * sqrt(6) (unit variance at scale 1).
    const float u = float(z & 0xffffff) * (1.0f / 16777216.0f), v = float((z >> 24) & 0xffffff) * (1.0f / 16777216.0f);
    x[i] = (u + v - 1.0f) * 2.449f * scale;
  }
}
void fill(Buffer<float, distilx::cuda>& b, std::uint64_t seed, float scale) {
  fill_kernel<<<4096, 256>>>(b.data(), b.size(), seed, scale);
  DISTILX_CUDA_LAUNCH_CHECK();
}

double used_gib() {
  std::size_t free_b = 0, total_b = 0;
  DISTILX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return double(total_b - free_b) / double(1 << 30);
}

/// distill_rows arguments of the benchmark: tau 2, coefficients 1e-4, per-row outputs in the vectors
/// (which must hold R entries); divergence and beta stay at their defaults unless the caller sets them.
ops::DistillRows<float> rows_args(const float* zs, const float* zt, float* dz, const std::int32_t* targets, index_t R,
                                  index_t V, std::vector<double>& div, std::vector<double>& ce,
                                  std::vector<std::uint8_t>& agree) {
  ops::DistillRows<float> a;
  a.zs = zs;
  a.zt = zt;
  a.dz = dz;
  a.targets = targets;
  a.R = R;
  a.V = V;
  a.tau = 2.0f;
  a.div_coef = 1e-4f;
  a.ce_coef = 1e-4f;
  a.div = div.data();
  a.ce = ce.data();
  a.agree = agree.data();
  return a;
}

}  // namespace

int main() {
  if (!cuda_device_available()) {
    std::printf("cuda_loss_bench: no CUDA device, skipped\n");
    return 0;
  }
  cudaDeviceProp prop{};
  DISTILX_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const index_t M = 8192, d = 1536, V = 151936, L_s = 6, L_t = 28;

  // Baselines: device copy bandwidth (read + write), one LM-head-sized GEMM.
  {
    const index_t n = index_t(1) << 28;  // 1 GiB of float
    Buffer<float, distilx::cuda> a(n), b(n);
    const double ms = time_ms([&] {
      DISTILX_CUDA_CHECK(cudaMemcpyAsync(b.data(), a.data(), sizeof(float) * n, cudaMemcpyDeviceToDevice));
    }, 5);
    std::printf("baseline device copy: %.1f GB/s (read + write)\n", 2.0 * sizeof(float) * n / ms / 1e6);
  }
  Buffer<float, distilx::cuda> h_s(M * d), h_t(M * d), E_s(V * d), W_t(V * d);
  fill(h_s, 1, 1.0f);
  fill(h_t, 2, 1.0f);
  fill(E_s, 3, 2.0f / 39.2f);  // logits of std ~2
  fill(W_t, 4, 2.0f / 39.2f);
  {
    const index_t R = 1024;
    Buffer<float, distilx::cuda> z(R * V);
    for (auto mode : {cuda_backend::MathMode::fp32, cuda_backend::MathMode::tf32}) {
      cuda_backend::set_math_mode(mode);
      const double ms = time_ms([&] { ops::lm_head_forward(distilx::cuda{}, z.data(), h_s.data(), E_s.data(), R, d, V); }, 3);
      std::printf("baseline LM-head GEMM %lldx%lldx%lld %s: %.2f ms, %.1f TFLOP/s\n", (long long)R, (long long)V,
                  (long long)d, cuda_backend::to_string(mode), ms, 2.0 * R * V * d / ms / 1e9);
    }
    cuda_backend::set_math_mode(cuda_backend::MathMode::fp32);
  }
  std::vector<Buffer<float, distilx::cuda>> Hs, Ht;
  for (index_t i = 0; i < L_s; ++i) Hs.emplace_back(M * d), fill(Hs.back(), 10 + i, 1.0f);
  for (index_t i = 0; i < L_t; ++i) Ht.emplace_back(M * d), fill(Ht.back(), 100 + i, 1.0f);
  std::vector<Buffer<float, distilx::cuda>> dHs;
  for (index_t i = 0; i < L_s; ++i) dHs.emplace_back(M * d);
  Buffer<float, distilx::cuda> dh(M * d);
  std::vector<std::int32_t> targets(static_cast<std::size_t>(M));
  Rng rng(5);
  for (auto& t : targets) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(V)));
  for (index_t b = 0; b < 16; ++b) targets[std::size_t(b * 512 + 511)] = -1;  // last position of each sequence

  DistillationInputs<float> in;
  in.vocab = {h_s.data(), E_s.data(), h_t.data(), W_t.data(), nullptr, targets.data(), nullptr, M, d, d, V};
  for (auto& b : Hs) in.H_s.push_back(b.data());
  for (auto& b : Ht) in.H_t.push_back(b.data());
  in.batch = 16;
  DistillationGrads<float> g;
  g.dh_s = dh.data();
  for (auto& b : dHs) g.dH_s.push_back(b.data());

  // ---- the row kernel alone ----
  std::printf("\ndistill_rows alone (fp32 logits, gradient written; GB/s counts one read of z_s and z_t and one write of dz):\n");
  {
    const index_t R = 2048;
    Buffer<float, distilx::cuda> zs(R * V), zt(R * V), dz(R * V);
    fill(zs, 7, 2.0f);
    fill(zt, 8, 2.0f);
    std::vector<double> div(R), ce(R);
    std::vector<std::uint8_t> agree(R);
    struct Shape {
      const char* name;
      cuda_backend::DistillRowsTuning t;
    };
    const Shape shapes[] = {{"auto", {0, -1, 0}},
                            {"cluster 2, re-read", {2, 0, 512}},
                            {"cluster 4, re-read, 256 thr", {4, 0, 256}},
                            {"cluster 4, re-read, 1024 thr", {4, 0, 1024}},
                            {"cluster 8, re-read", {8, 0, 512}},
                            {"1 block/row, re-read, 1024 thr", {1, 0, 1024}},
                            {"cluster 8, cached", {8, 1, 512}},
                            {"cluster 16, cached", {16, 1, 512}}};
    for (index_t rows : {index_t(1024), index_t(2048)})
      for (Divergence K : {Divergence::forward_kl, Divergence::reverse_kl, Divergence::jsd, Divergence::skew_kl})
        for (const Shape& sh : shapes) {
          if (rows != 1024 && sh.t.cluster != 0) continue;
          if (K != Divergence::forward_kl && sh.t.cluster != 0 && !(sh.t.cluster == 8 && sh.t.cached == 1)) continue;
          cuda_backend::distill_rows_tuning() = sh.t;
          ops::DistillRows<float> a = rows_args(zs.data(), zt.data(), dz.data(), targets.data(), rows, V, div, ce, agree);
          a.divergence = K;
          a.beta = 0.5;
          const double ms = time_ms([&] { ops::distill_rows(distilx::cuda{}, a); }, 5);
          const auto& l = cuda_backend::last_distill_rows_launch();
          // Minimum traffic (one read of z_s and z_t, one write of dz) and what the path moves
          // (each pass reads both rows again unless cached), before any L2 reuse.
          const double unit = sizeof(float) * double(rows) * double(V) / 1e9;
          const double moved = (l.cached ? 2.0 : 2.0 * l.passes) * unit + unit;
          std::printf("  %-10s R %5lld  %-32s -> %2d x %4d thr, %s, %3zu KiB smem, %d passes: %7.3f ms  "
                      "%5.0f GB/s min-traffic, %5.0f GB/s moved\n",
                      to_string(K), (long long)rows, sh.name, l.cluster, l.threads, l.cached ? "cached " : "re-read",
                      l.smem_bytes / 1024, l.passes, ms, 3.0 * unit / ms * 1e3, moved / ms * 1e3);
        }
    cuda_backend::distill_rows_tuning() = {};
  }

  // ---- the whole loss ----
  std::printf("\nDeltaDistillationLoss::compute (forward KL, tau 2, ratio alignment, want_grad), M %lld:\n", (long long)M);
  for (auto mode : {cuda_backend::MathMode::fp32, cuda_backend::MathMode::tf32})
    for (index_t chunk : {index_t(512), index_t(1024), index_t(2048)}) {
      cuda_backend::set_math_mode(mode);
      cuda_backend::CachingAllocator::instance().release_cached();
      const double used0 = used_gib();
      DistillationLossConfig cfg;
      cfg.chunk_rows = chunk;
      double extra = 0;
      double total = 0, gemm = 0, rows_ms = 0, align_ms = 0;
      {
        DeltaDistillationLoss<float, distilx::cuda> loss(cfg);
        DistillationMetrics m;
        total = time_ms([&] { m = loss.compute(in, 0, 0, g); }, 2);
        extra = used_gib() - used0;
        // The parts, on the same shapes: 3 LM-head GEMMs and one distill_rows per chunk.
        Buffer<float, distilx::cuda> zs(chunk * V), zt(chunk * V);
        const index_t chunks = (M + chunk - 1) / chunk;
        gemm = chunks * time_ms([&] {
          ops::lm_head_forward(distilx::cuda{}, zs.data(), h_s.data(), E_s.data(), chunk, d, V);
          ops::lm_head_forward(distilx::cuda{}, zt.data(), h_t.data(), W_t.data(), chunk, d, V);
          ops::lm_head_backward(distilx::cuda{}, dh.data(), zs.data(), E_s.data(), chunk, d, V);
        }, 2);
        std::vector<double> div(chunk), ce(chunk);
        std::vector<std::uint8_t> agree(chunk);
        const ops::DistillRows<float> a =
            rows_args(zs.data(), zt.data(), zs.data(), targets.data(), chunk, V, div, ce, agree);
        rows_ms = chunks * time_ms([&] { ops::distill_rows(distilx::cuda{}, a); }, 3);
        AlignmentLoss<float, distilx::cuda> al(AlignmentPolicy::ratio);
        AlignmentInputs<float> ai;
        ai.H_s = in.H_s;
        ai.H_t = in.H_t;
        ai.M = M;
        ai.d = ai.d_t = d;
        align_ms = time_ms([&] { al.compute(ai, &g.dH_s, 0.01); }, 3);
        if (chunk == 512 && mode == cuda_backend::MathMode::fp32)
          std::printf("  metrics: kl %.4f ce %.4f alignment %.4f top1 %.4f\n", m.kl, m.ce, m.alignment, m.top1);
      }
      const double flops = 3.0 * 2.0 * double(M) * double(V) * double(d);
      std::printf("  %s chunk %4lld: %7.1f ms per call (%6.0f tokens/s) | LM-head GEMMs %7.1f ms (%5.1f TFLOP/s), "
                  "distill_rows %5.2f ms, alignment %5.2f ms, rest %5.2f ms | extra memory %.2f GiB\n",
                  cuda_backend::to_string(mode), (long long)chunk, total, double(M) / total * 1e3, gemm,
                  flops / gemm / 1e9, rows_ms, align_ms, total - gemm - rows_ms - align_ms, extra);
    }
  cuda_backend::set_math_mode(cuda_backend::MathMode::fp32);
  return 0;
}
