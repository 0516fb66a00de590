// GPU forward + backward of the paper-config student's block stack (6 blocks, sLSTM at
// 0, 2, 4, 16 heads, d 1536, frozen embedding/head, V 151936) on 8192 tokens per step in
// every float math mode: fp32 exact, TF32, and bf16 mixed precision (16-bit GEMM operands,
// fp32 accumulation; the flat parameters and the frozen embedding/head in the operand cache,
// invalidated once per step as the Distiller does after its optimizer update). Same-run GEMM
// baselines per mode at the mLSTM up-projection shape and at 8192^3 (the ceiling), including a
// bare cublasGemmEx on operands already in bf16. The loss and the teacher are not part of this
// measurement (backward starts from d hidden). First, one mLSTM cell (16 heads of 192, chunk 64) and one
// sLSTM cell (16 heads of 96) forward + backward alone.
#include <chrono>
#include <functional>
#include <cstdio>
#include <vector>

#include "distilx/cuda.cuh"
#include "cuda_bench_util.cuh"

using namespace distilx;
using bench::time_ms;
using cuda_backend::MathMode;

namespace {
/// y[M,N] = x[M,K] W[N,K]^T in each mode through ops::gemm, with W cached in bf16, and as a
/// bare cublasGemmEx on bf16 operands converted beforehand (the cuBLAS ceiling for the shape).
void gemm_baseline(index_t M, index_t N, index_t K, int iters) {
  Buffer<float, distilx::cuda> A(M * K), W(N * K), C(M * N);
  const double flop = 2.0 * double(M) * double(N) * double(K);
  auto report = [&](const char* what, double ms) {
    std::printf("baseline GEMM %lldx%lldx%lld %-34s %8.3f ms %7.1f TFLOP/s\n", (long long)M, (long long)N,
                (long long)K, what, ms, flop / ms / 1e9);
  };
  auto run = [&] {
    ops::gemm(distilx::cuda{}, ops::Trans::no, ops::Trans::yes, M, N, K, 1.0f, A.data(), K, W.data(), K, 0.0f,
              C.data(), N);
  };
  for (MathMode m : {MathMode::fp32, MathMode::tf32, MathMode::bf16, MathMode::fp16}) {
    cuda_backend::set_math_mode(m);
    const char* name = m == MathMode::fp32   ? "fp32 exact"
                       : m == MathMode::tf32 ? "TF32"
                       : m == MathMode::bf16 ? "bf16 (both operands converted)"
                                             : "fp16 (both operands converted)";
    report(name, time_ms(run, iters));
  }
  {
    cuda_backend::set_math_mode(MathMode::bf16);
    cuda_backend::CachedOperands reg(W.data(), N * K, /*frozen=*/true);
    report("bf16 (W cached, x converted)", time_ms(run, iters));
  }
  {
    Buffer<__nv_bfloat16, distilx::cuda> a16(M * K), w16(N * K);
    cuda_backend::detail::convert_flat(a16.data(), A.data(), M * K, MathMode::bf16);
    cuda_backend::detail::convert_flat(w16.data(), W.data(), N * K, MathMode::bf16);
    const float one = 1.f, zero = 0.f;
    report("bf16 bare cublasGemmEx", time_ms([&] {
             DISTILX_CUBLAS_CHECK(cublasGemmEx_64(cuda_backend::cublas_handle(), CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one,
                                                  w16.data(), CUDA_R_16BF, K, a16.data(), CUDA_R_16BF, K, &zero,
                                                  C.data(), CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
           }, iters));
    report("float->bf16 conversion of x alone", time_ms([&] {
             cuda_backend::detail::convert_flat(a16.data(), A.data(), M * K, MathMode::bf16);
           }, iters));
  }
  cuda_backend::set_math_mode(MathMode::fp32);
}
/// Fills a device buffer with uniform values in [lo, hi) (no host generation).
void fill(Buffer<float, distilx::cuda>& b, float lo, float hi, std::uint64_t seed) {
  bench::detail::fill_uniform_kernel<><<<1024, 256, 0, cuda_backend::current_stream()>>>(
      b.data(), b.size(), 0.5f * (lo + hi), (hi - lo) / (2.0f * 1.7320508f), seed);
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// One paper-config cell of each kind, forward + backward on 8192 tokens (the gates' gradients included).
void cell_bench() {
  for (const auto& bt : std::vector<std::pair<index_t, index_t>>{{16, 512}, {4, 2048}}) {
    const index_t B = bt.first, T = bt.second;
    {  // mLSTM: 16 heads of 192 (inner width 3072), chunk 64
      const index_t NH = 16, DH = 192, nf = B * T * NH * DH, ng = B * T * NH;
      Buffer<float, distilx::cuda> q(nf), k(nf), v(nf), dh(nf), h(nf), dq(nf), dk(nf), dv(nf), ig(ng), fg(ng),
          dig(ng), dfg(ng);
      fill(q, -1.7f, 1.7f, 1), fill(k, -1.7f, 1.7f, 2), fill(v, -1.7f, 1.7f, 3), fill(dh, -1.f, 1.f, 4);
      fill(ig, -4.f, 4.f, 5), fill(fg, -3.f, 6.f, 6);
      MLSTMCell<float, distilx::cuda> cell(NH, DH, MLSTMForm::chunkwise, 64);
      const double fwd = time_ms([&] { cell.forward(h.data(), q.data(), k.data(), v.data(), ig.data(), fg.data(), B, T); }, 5);
      const double both = time_ms([&] {
        cell.forward(h.data(), q.data(), k.data(), v.data(), ig.data(), fg.data(), B, T);
        cell.backward(dq.data(), dk.data(), dv.data(), dig.data(), dfg.data(), dh.data(), q.data(), k.data(),
                      v.data(), ig.data(), fg.data(), B, T);
      }, 5);
      std::printf("cell mLSTM 16x192 B %lld x T %lld, chunk 64: forward %.3f ms, forward+backward %.3f ms\n",
                  (long long)B, (long long)T, fwd, both);
    }
    {  // sLSTM: 16 heads of 96 (d 1536), the persistent recurrent kernels
      const index_t NH = 16, DH = 96, H = NH * DH;
      Buffer<float, distilx::cuda> wx(B * T * 4 * H), y(B * T * H), dy(B * T * H), dwx(B * T * 4 * H),
          R(NH * DH * 4 * DH), dR(NH * DH * 4 * DH), bias(4 * H), dbias(4 * H);
      fill(wx, -1.f, 1.f, 7), fill(dy, -1.f, 1.f, 8), fill(R, -0.1f, 0.1f, 9), fill(bias, -1.f, 1.f, 10);
      SLSTMCell<float, distilx::cuda> cell(NH, DH);
      const double fwd = time_ms([&] { cell.forward(y.data(), wx.data(), R.data(), bias.data(), B, T); }, 5);
      const double both = time_ms([&] {
        cell.forward(y.data(), wx.data(), R.data(), bias.data(), B, T);
        cell.backward(dwx.data(), dR.data(), dbias.data(), dy.data(), R.data(), B, T);
      }, 5);
      std::printf("cell sLSTM 16x96 B %lld x T %lld: forward %.3f ms, forward+backward (dR, dbias included) %.3f ms\n",
                  (long long)B, (long long)T, fwd, both);
    }
  }
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
  cell_bench();
  // GEMM baselines in the same run: the mLSTM up-projection (M 8192, K 1536, N 6144) and a
  // large square for the ceiling.
  gemm_baseline(8192, 6144, 1536, 10);
  gemm_baseline(8192, 8192, 8192, 5);
  for (const auto& bt : std::vector<std::pair<index_t, index_t>>{{16, 512}, {4, 2048}}) {
    const index_t B = bt.first, T = bt.second;  // named copies: lambdas may not capture structured bindings in C++17
    std::vector<std::int32_t> tok(static_cast<std::size_t>(B * T));
    Rng rng(3);
    for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab_size)));
    Buffer<float, distilx::cuda> dh(B * T * c.embedding_dim);
    for (MathMode m : {MathMode::fp32, MathMode::tf32, MathMode::bf16}) {
      cuda_backend::set_math_mode(m);
      // bf16: operands of the trainable weights come from one conversion per step (invalidated
      // as after an optimizer update), the frozen embedding/head from a copy made once.
      std::vector<cuda_backend::CachedOperands> regs;
      if (m == MathMode::bf16) {
        regs.emplace_back(s.params(), s.layout().total(), false);
        regs.emplace_back(s.embedding(), c.vocab_size * c.embedding_dim, true);
        if (!c.tie_weights) regs.emplace_back(s.head(), c.vocab_size * c.embedding_dim, true);
      }
      const auto conv0 = cuda_backend::OperandCache::instance().conversions();
      const double fwd = time_ms([&] {
        cuda_backend::invalidate_cached_operands();
        s.forward(tok.data(), B, T);
      }, 3);
      const double step = time_ms([&] {
        cuda_backend::invalidate_cached_operands();
        s.forward(tok.data(), B, T);
        s.zero_grad();
        s.backward(dh.data());
      }, 3);
      const double flops = 0.504e9 * double(B * T);  // trainable weights fwd + both bwd GEMMs (performance.md)
      std::printf("student blocks B %lld x T %lld, %-4s: forward %.1f ms, forward+backward %.1f ms, %.0f tokens/s, "
                  "%.1f TFLOP/s on the trainable GEMMs\n",
                  (long long)B, (long long)T, cuda_backend::to_string(m), fwd, step, double(B * T) / step * 1e3,
                  flops / step / 1e9);
      if (m == MathMode::bf16)
        std::printf("  operand cache: %llu range conversions in %d timed calls, %.1f MB of 16-bit copies\n",
                    (unsigned long long)(cuda_backend::OperandCache::instance().conversions() - conv0), 8,
                    double(cuda_backend::cached_operand_bytes()) / 1e6);
    }
    cuda_backend::set_math_mode(MathMode::fp32);
  }
  std::size_t free_b = 0, total_b = 0;
  DISTILX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  std::printf("device memory in use: %.2f GiB (caching allocator reserved %.2f GiB)\n",
              double(total_b - free_b) / (1 << 30),
              double(cuda_backend::CachingAllocator::instance().reserved_bytes()) / (1 << 30));
  return 0;
}
