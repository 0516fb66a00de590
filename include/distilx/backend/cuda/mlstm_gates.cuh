// CUDA overloads of ops::mlstm_gates_forward / ops::mlstm_gates_backward (ops/fused.hpp): the mLSTM
// block's input and forget gate pre-activations, ig / fg [M, NH] = [q | k | v] W^T + b with W [NH, 3D].
//
// Both directions are thin products (an output or inner dimension of NH, 4 in the paper's
// model) and therefore bound by memory traffic. Through cuBLAS they took three GEMMs and a bias
// add per gate in the forward and six GEMMs and a column sum per gate in the backward, so q, k, v
// were read once per gate and product, and dq, dk, dv read and written once per gate: on an H100
// at M = 8192, D = 3072, NH = 4 about 0.37 ms forward and 0.9 ms backward per block. The kernels
// here read q, k, v once for both gates, and the backward reads and writes dq, dk, dv once, so the
// floor is about 300 MB (forward) and 900 MB (backward) of DRAM traffic per block.
//
// float only (double and the shapes the kernels do not cover run the GEMM sequence of ops/fused.hpp).
// The arithmetic is fp32 FMA in every math mode: the precision policy keeps the gates fp32 (see the
// thin products in blas.cuh), and bf16 / tf32 would not save any time here anyway.
//
// Forward: a block of 256 threads owns R rows (R * 2NH <= 64 accumulators per thread). Each thread
// walks float4 column chunks of q, k, v; per chunk it loads the 2NH weight float4s once and adds
// their dot products with each of its R rows to registers. The per-thread partials are then folded
// across the warp by a reduce-scatter (each lane ends with a few of the sums) and across the warps
// through shared memory in warp order, and the bias is added.
//
// Backward: the grid is (row ranges) x (column blocks of 256 float4 chunks of [q | k | v]). A thread
// owns one chunk (4 columns of one of q, k, v): it keeps the 2NH weight float4s of those columns in
// registers and walks the rows of its range, updating d{q,k,v} in place (read, add sum_o dg[r, o]
// W[o, c], write) and accumulating its weight-gradient partials sum_r dg[r, o] x[r, c]. The gate
// gradients of the rows are staged in shared memory (all threads read the same ones). Each block
// writes its partials of dW (and, in the first column block, of db); a second kernel adds them in
// row-range order to dW and db. No atomics; every summation order depends only on the shapes, so
// reruns (also on another GPU model) give bit-identical results.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "distilx/backend/cuda/blas.cuh"
#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/cuda/memory.cuh"
#include "distilx/backend/cuda/ops.cuh"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/ops/fused.hpp"

namespace distilx::cuda_backend::mlstm_gates {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeads = 8;        // larger NH runs the GEMM sequence
constexpr int kAccumulators = 64;   // forward: per-thread partial sums (R rows x 2NH gates)
constexpr int kStageRows = 64;      // backward: rows of gate gradients staged in shared memory at a time
constexpr int kTargetBlocks = 264;  // backward: about two blocks per SM of a 132-SM H100 / H200
constexpr index_t kMinRowsPerBlock = 32;

/// Rows per block of the forward for NH heads: as many as keep 64 accumulators per thread.
template <int NH>
constexpr int forward_rows() {
  return kAccumulators / (2 * NH) > 0 ? kAccumulators / (2 * NH) : 1;
}

/// Backward: rows whose loads are issued before any of them is used, and the blocks per SM the
/// register budget aims at (2NH weight and 2NH gradient float4s live in registers; with 128
/// registers NH <= 3 fits two blocks of 256 threads per SM, NH = 4 does with a spill of 12 bytes
/// (ptxas -v), larger NH run one block per SM).
template <int NH>
constexpr int batch_rows() {
  return NH <= 3 ? 4 : (NH == 4 ? 3 : 2);
}
template <int NH>
constexpr int backward_min_blocks() {
  return NH <= 4 ? 2 : 1;
}

__device__ __forceinline__ float dot4(float4 a, float4 b, float acc) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

/// One level of a warp reduce-scatter over N live values: lanes whose bit Off is set keep the upper
/// half and receive their partner's upper half, the others the lower half; then the next level on
/// N / 2. After the levels 16, 8, 4, 2, 1, lane l holds in v[0, N / 32) the warp sums of the values
/// l * (N / 32) + i. Costs about N shuffles instead of 5 N for a butterfly of every value.
template <int N, int Off>
__device__ __forceinline__ void reduce_scatter(float* v, int lane) {
  if constexpr (Off > 0) {
    static_assert(N % 2 == 0, "reduce_scatter: N must be a multiple of 32");
    constexpr int H = N / 2;
    const bool upper = (lane & Off) != 0;
#pragma unroll
    for (int i = 0; i < H; ++i) {
      const float give = upper ? v[i] : v[i + H];
      const float keep = upper ? v[i + H] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, give, Off);
    }
    reduce_scatter<H, Off / 2>(v, lane);
  }
}

template <int NH, int R>
__global__ void __launch_bounds__(kThreads) forward_kernel(float* __restrict__ ig, float* __restrict__ fg,
                                                           const float* __restrict__ q, const float* __restrict__ k,
                                                           const float* __restrict__ v, const float* __restrict__ Wi,
                                                           const float* __restrict__ bi, const float* __restrict__ Wf,
                                                           const float* __restrict__ bf, index_t M, index_t D) {
  constexpr int G = 2 * NH;             // outputs per row: NH input gates, then NH forget gates
  constexpr int N = R * G;              // partial sums per thread, acc[r * G + g]
  constexpr int P = (N + 31) / 32 * 32; // padded for the reduce-scatter
  __shared__ float red[kWarps][P];
  const index_t row0 = static_cast<index_t>(blockIdx.x) * R;
  const int rows = static_cast<int>(M - row0 < R ? M - row0 : R);
  const index_t D4 = D / 4, W4 = 3 * D4;  // float4s per row of q / k / v and of W
  float acc[P];
#pragma unroll
  for (int i = 0; i < P; ++i) acc[i] = 0.0f;
  for (int p = 0; p < 3; ++p) {
    const float4* x = reinterpret_cast<const float4*>(p == 0 ? q : (p == 1 ? k : v)) + row0 * D4;
    const float4* wi = reinterpret_cast<const float4*>(Wi) + p * D4;
    const float4* wf = reinterpret_cast<const float4*>(Wf) + p * D4;
    for (index_t j = threadIdx.x; j < D4; j += kThreads) {
      float4 w[G];
#pragma unroll
      for (int o = 0; o < NH; ++o) {
        w[o] = __ldg(wi + o * W4 + j);
        w[NH + o] = __ldg(wf + o * W4 + j);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < rows) {
          const float4 xv = __ldg(x + r * D4 + j);
#pragma unroll
          for (int g = 0; g < G; ++g) acc[r * G + g] = dot4(xv, w[g], acc[r * G + g]);
        }
      }
    }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  reduce_scatter<P, 16>(acc, lane);
  constexpr int per_lane = P / 32;
#pragma unroll
  for (int i = 0; i < per_lane; ++i) red[warp][lane * per_lane + i] = acc[i];
  __syncthreads();
  for (int t = threadIdx.x; t < N; t += kThreads) {
    const int r = t / G, g = t - (t / G) * G;
    if (r >= rows) continue;
    float s = red[0][t];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) s += red[w][t];
    const index_t row = row0 + r;
    if (g < NH)
      ig[row * NH + g] = s + bi[g];
    else
      fg[row * NH + (g - NH)] = s + bf[g - NH];
  }
}

/// Grid (row ranges, column blocks). part holds [gridDim.x][2NH][3D] weight-gradient partials,
/// then [gridDim.x][2NH] bias-gradient partials.
template <int NH>
__global__ void __launch_bounds__(kThreads, backward_min_blocks<NH>())
    backward_kernel(float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv, float* __restrict__ part,
                    const float* __restrict__ dig, const float* __restrict__ dfg, const float* __restrict__ q,
                    const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ Wi,
                    const float* __restrict__ Wf, index_t M, index_t D) {
  constexpr int G = 2 * NH;
  constexpr int kBatchRows = batch_rows<NH>();
  __shared__ __align__(16) float s_dg[kStageRows * G];  // s_dg[r * G + g]: dig then dfg of staged row r
  const index_t ranges = gridDim.x, range = blockIdx.x;
  const index_t r_begin = M * range / ranges, r_end = M * (range + 1) / ranges;
  const index_t D4 = D / 4, C4 = 3 * D4;  // float4 chunks per row of q / k / v and of [q | k | v]
  const index_t chunk = static_cast<index_t>(blockIdx.y) * kThreads + threadIdx.x;
  const bool active = chunk < C4;
  const int p = active ? static_cast<int>(chunk / D4) : 0;
  const index_t j = chunk - p * D4;
  const float4* x = reinterpret_cast<const float4*>(p == 0 ? q : (p == 1 ? k : v)) + j;
  float4* dx = reinterpret_cast<float4*>(p == 0 ? dq : (p == 1 ? dk : dv)) + j;
  float4 w[G], acc[G];
#pragma unroll
  for (int o = 0; o < NH; ++o) {
    w[o] = active ? __ldg(reinterpret_cast<const float4*>(Wi) + o * C4 + chunk) : make_float4(0, 0, 0, 0);
    w[NH + o] = active ? __ldg(reinterpret_cast<const float4*>(Wf) + o * C4 + chunk) : make_float4(0, 0, 0, 0);
  }
#pragma unroll
  for (int g = 0; g < G; ++g) acc[g] = make_float4(0, 0, 0, 0);
  const bool bias_thread = blockIdx.y == 0 && threadIdx.x < G;
  float db_acc = 0.0f;

  for (index_t s0 = r_begin; s0 < r_end; s0 += kStageRows) {
    const int n = static_cast<int>(r_end - s0 < kStageRows ? r_end - s0 : kStageRows);
    __syncthreads();  // the previous stage has been consumed
    for (int t = threadIdx.x; t < n * NH; t += kThreads) {
      const int r = t / NH, o = t - (t / NH) * NH;
      s_dg[r * G + o] = dig[s0 * NH + t];
      s_dg[r * G + NH + o] = dfg[s0 * NH + t];
    }
    __syncthreads();
    if (bias_thread)
      for (int r = 0; r < n; ++r) db_acc += s_dg[r * G + threadIdx.x];
    if (!active) continue;
    const float4* xs = x + s0 * D4;
    float4* dxs = dx + s0 * D4;
    for (int r0 = 0; r0 < n; r0 += kBatchRows) {
      float4 xv[kBatchRows], dd[kBatchRows];
#pragma unroll
      for (int u = 0; u < kBatchRows; ++u) {
        xv[u] = make_float4(0, 0, 0, 0);
        dd[u] = make_float4(0, 0, 0, 0);
        if (r0 + u < n) {
          xv[u] = __ldg(xs + (r0 + u) * D4);
          dd[u] = dxs[(r0 + u) * D4];
        }
      }
#pragma unroll
      for (int u = 0; u < kBatchRows; ++u) {
        if (r0 + u < n) {
          const float* a = s_dg + (r0 + u) * G;
          float4 d = dd[u];
#pragma unroll
          for (int g = 0; g < G; ++g) {
            const float ag = a[g];
            d.x = fmaf(ag, w[g].x, d.x);
            d.y = fmaf(ag, w[g].y, d.y);
            d.z = fmaf(ag, w[g].z, d.z);
            d.w = fmaf(ag, w[g].w, d.w);
            acc[g].x = fmaf(ag, xv[u].x, acc[g].x);
            acc[g].y = fmaf(ag, xv[u].y, acc[g].y);
            acc[g].z = fmaf(ag, xv[u].z, acc[g].z);
            acc[g].w = fmaf(ag, xv[u].w, acc[g].w);
          }
          dxs[(r0 + u) * D4] = d;
        }
      }
    }
  }
  const index_t width = 3 * D;  // one gate row of W
  if (active) {
#pragma unroll
    for (int g = 0; g < G; ++g) reinterpret_cast<float4*>(part + (range * G + g) * width)[chunk] = acc[g];
  }
  if (bias_thread) part[ranges * G * width + range * G + threadIdx.x] = db_acc;
}

/// dWi / dWf [NH, 3D] and dbi / dbf [NH] += the sums of the ranges' partials, in range order.
/// (A template, so that the header may be included by several translation units.)
template <class T>
__global__ void __launch_bounds__(kThreads)
    backward_reduce_kernel(T* __restrict__ dWi, T* __restrict__ dWf, T* __restrict__ dbi, T* __restrict__ dbf,
                           const T* __restrict__ part, index_t ranges, int NH, index_t width) {
  const index_t G = 2 * NH, n = G * width;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t t = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; t < n + G; t += stride) {
    const bool bias = t >= n;
    const T* src = bias ? part + ranges * n + (t - n) : part + t;
    const index_t step = bias ? G : n;
    T s = T(0);
#pragma unroll 8
    for (index_t b = 0; b < ranges; ++b) s += src[b * step];
    const index_t g = bias ? t - n : t / width, c = bias ? 0 : t - g * width;
    T* dst = bias ? (g < NH ? dbi + g : dbf + (g - NH)) : (g < NH ? dWi + g * width + c : dWf + (g - NH) * width + c);
    *dst += s;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

/// A float range the kernels read: [p, p + n).
struct Read {
  const float* p;
  index_t n;
};

/// Whether the kernels cover this call: NH <= kMaxHeads, float4 rows (D % 4 == 0, 16-byte
/// aligned pointers), and nothing they read lies inside a staged 16-bit image (whose fp32 values
/// are not meaningful; the GEMM path then reports the misuse).
inline bool covered(index_t NH, index_t D, std::initializer_list<const float*> vec, std::initializer_list<Read> reads) {
  if (NH < 1 || NH > kMaxHeads || D < 4 || D % 4 != 0) return false;
  for (const float* p : vec)
    if (!aligned16(p)) return false;
  for (const Read& r : reads)
    if (detail::inside_staged_image(r.p, r.n)) return false;
  return true;
}

/// Per-thread, per-stream scratch of the backward's partial sums.
inline float* partials(index_t n) {
  thread_local detail::SlotScratch<1> s;
  return static_cast<float*>(s.get(0, sizeof(float) * static_cast<std::size_t>(n)));
}

template <int NH>
void launch_forward(float* ig, float* fg, const float* q, const float* k, const float* v, const float* Wi,
                    const float* bi, const float* Wf, const float* bf, index_t M, index_t D) {
  constexpr int R = forward_rows<NH>();
  const index_t blocks = (M + R - 1) / R;
  forward_kernel<NH, R><<<static_cast<unsigned>(blocks), kThreads, 0, current_stream()>>>(ig, fg, q, k, v, Wi, bi, Wf,
                                                                                         bf, M, D);
  DISTILX_CUDA_LAUNCH_CHECK();
}

template <int NH>
void launch_backward(float* dq, float* dk, float* dv, const float* dig, const float* dfg, float* dWi, float* dbi,
                     float* dWf, float* dbf, const float* q, const float* k, const float* v, const float* Wi,
                     const float* Wf, index_t M, index_t D) {
  constexpr int G = 2 * NH;
  const index_t cols = (3 * D / 4 + kThreads - 1) / kThreads;
  // Row ranges: enough blocks for about one full wave, each range at least kMinRowsPerBlock rows
  // (fewer partials to add up). Only the shapes decide, so the summation order is device independent.
  const index_t ranges =
      std::max<index_t>(1, std::min<index_t>(kTargetBlocks / cols, (M + kMinRowsPerBlock - 1) / kMinRowsPerBlock));
  const index_t width = 3 * D;
  float* part = partials(ranges * G * width + ranges * G);
  const dim3 grid(static_cast<unsigned>(ranges), static_cast<unsigned>(cols));
  backward_kernel<NH><<<grid, kThreads, 0, current_stream()>>>(dq, dk, dv, part, dig, dfg, q, k, v, Wi, Wf, M, D);
  DISTILX_CUDA_LAUNCH_CHECK();
  const index_t n = G * width + G;
  const unsigned blocks = static_cast<unsigned>(std::min<index_t>((n + kThreads - 1) / kThreads, 4096));
  backward_reduce_kernel<float><<<blocks, kThreads, 0, current_stream()>>>(dWi, dWf, dbi, dbf, part, ranges, NH, width);
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// Runs f(std::integral_constant<int, NH>) for NH in [1, kMaxHeads].
template <class F>
void dispatch_heads(index_t NH, F&& f) {
  switch (NH) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: break;
  }
}
static_assert(kMaxHeads == 8, "dispatch_heads lists NH = 1 .. 8");

}  // namespace distilx::cuda_backend::mlstm_gates

namespace distilx::ops {

/// ig, fg [M, NH] = [q | k | v] Wi^T + bi, [q | k | v] Wf^T + bf in one pass over q, k, v (float,
/// fp32 arithmetic in every math mode); other cases run the GEMM sequence.
template <class T>
void mlstm_gates_forward(cuda be, T* ig, T* fg, const T* q, const T* k, const T* v, const T* Wi, const T* bi,
                         const T* Wf, const T* bf, index_t M, index_t NH, index_t D) {
  if constexpr (std::is_same_v<T, float>) {
    namespace g = ::distilx::cuda_backend::mlstm_gates;
    if (M == 0) return;
    if (g::covered(NH, D, {q, k, v, Wi, Wf},
                   {{q, M * D}, {k, M * D}, {v, M * D}, {Wi, NH * 3 * D}, {Wf, NH * 3 * D}, {bi, NH}, {bf, NH}})) {
      ::distilx::cuda_backend::detail::drop_staged_image_if_written(ig, M, NH, NH);
      ::distilx::cuda_backend::detail::drop_staged_image_if_written(fg, M, NH, NH);
      g::dispatch_heads(NH, [&](auto nh) {
        g::launch_forward<decltype(nh)::value>(ig, fg, q, k, v, Wi, bi, Wf, bf, M, D);
      });
      return;
    }
  }
  detail::mlstm_gates_forward_unfused(be, ig, fg, q, k, v, Wi, bi, Wf, bf, M, NH, D);
}

/// d{q,k,v} += dig Wi[:, part] + dfg Wf[:, part]; dWi, dWf += dg^T [q | k | v]; dbi, dbf += column
/// sums. One pass over q, k, v and d{q,k,v} for both gates (float); deterministic (fixed order).
template <class T>
void mlstm_gates_backward(cuda be, T* dq, T* dk, T* dv, const T* dig, const T* dfg, T* dWi, T* dbi, T* dWf, T* dbf,
                          const T* q, const T* k, const T* v, const T* Wi, const T* Wf, index_t M, index_t NH,
                          index_t D) {
  if constexpr (std::is_same_v<T, float>) {
    namespace g = ::distilx::cuda_backend::mlstm_gates;
    if (M == 0) return;
    const index_t cols = (3 * D / 4 + g::kThreads - 1) / g::kThreads;
    if (cols <= 65535 &&
        g::covered(NH, D, {q, k, v, Wi, Wf, dq, dk, dv},
                   {{q, M * D}, {k, M * D}, {v, M * D}, {Wi, NH * 3 * D}, {Wf, NH * 3 * D}, {dig, M * NH},
                    {dfg, M * NH}})) {
      namespace cd = ::distilx::cuda_backend::detail;
      for (const T* p : {dq, dk, dv}) cd::drop_staged_image_if_written(p, M, D, D);
      cd::drop_staged_image_if_written(dWi, NH, 3 * D, 3 * D);
      cd::drop_staged_image_if_written(dWf, NH, 3 * D, 3 * D);
      g::dispatch_heads(NH, [&](auto nh) {
        g::launch_backward<decltype(nh)::value>(dq, dk, dv, dig, dfg, dWi, dbi, dWf, dbf, q, k, v, Wi, Wf, M, D);
      });
      return;
    }
  }
  detail::mlstm_gates_backward_unfused(be, dq, dk, dv, dig, dfg, dWi, dbi, dWf, dbf, q, k, v, Wi, Wf, M, NH, D);
}

}  // namespace distilx::ops
