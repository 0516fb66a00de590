// CUDA overloads of the distilx ops: linear / headwise / LM head, causal conv1d, norms,
// activations, elementwise, the mLSTM output gate, embedding, gradient reductions and AdamW.
// Same names, argument order and semantics as the CPU ops; all pointers are device pointers
// except embedding token ids (host). Parameter-gradient and norm reductions are two-pass
// over a partition fixed by the shapes, with no float atomics, so results are run-to-run identical.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <type_traits>
#include <vector>

#include "distilx/backend/cuda/blas.cuh"
#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/cuda/memory.cuh"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"
// The CPU op headers define the shared functors (Silu, Gelu, LogSigmoid) and must be seen
// before callers anyway; they call no op qualified, so including them here is order-safe.
#include "distilx/ops/activations.hpp"
#include "distilx/ops/conv1d.hpp"
#include "distilx/ops/elementwise.hpp"
#include "distilx/ops/embedding.hpp"
#include "distilx/ops/linear.hpp"
#include "distilx/ops/norm.hpp"

namespace distilx::cuda_backend {


/// n elements of T of this thread's scratch for current_stream(); valid until the next call.
template <class T>
T* scratch(index_t n) {
  // Ordered by the stream, so a later op reuses it without synchronising (memory.cuh).
  thread_local detail::SlotScratch<1> s;
  return static_cast<T*>(s.get(0, sizeof(T) * static_cast<std::size_t>(std::max<index_t>(n, 1))));
}

namespace kernels {

constexpr int kBlock = 256;       // threads per block of the 1-D kernels
constexpr int kRowWarps = 8;      // warps (rows in flight) per block of the warp-per-row kernels
constexpr int kTileCols = 32;     // columns per block of the column reductions
constexpr int kTileRows = 8;      // row lanes per block of the column reductions

inline int grid_for(index_t n, int block = kBlock) {
  // Grid-stride loops cover the rest; the cap keeps the grid size in range for huge n.
  return static_cast<int>(std::clamp<index_t>((n + block - 1) / block, 1, index_t(1) << 20));
}
inline cudaStream_t stream() { return current_stream(); }

__device__ inline index_t global_id() { return blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; }
__device__ inline index_t global_stride() { return static_cast<index_t>(gridDim.x) * blockDim.x; }

/// Butterfly sum: every lane ends with the same, bit-identical value (x + y == y + x).
template <class T>
__device__ inline T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ inline float dev_sqrt(float x) { return __fsqrt_rn(x); }
__device__ inline double dev_sqrt(double x) { return __dsqrt_rn(x); }

// ---- elementwise ----------------------------------------------------------------------

template <class Act, class T>
__global__ void act_forward_kernel(T* y, const T* x, index_t n) {
  for (index_t i = global_id(); i < n; i += global_stride()) y[i] = Act::f(x[i]);
}
template <class Act, class T>
__global__ void act_backward_kernel(T* dx, const T* dy, const T* x, index_t n, bool accumulate) {
  for (index_t i = global_id(); i < n; i += global_stride()) {
    const T g = dy[i] * Act::df(x[i]);
    dx[i] = accumulate ? dx[i] + g : g;
  }
}
template <class Act, class T>
__global__ void gated_forward_kernel(T* y, const T* g, const T* a, index_t n) {
  for (index_t i = global_id(); i < n; i += global_stride()) y[i] = Act::f(g[i]) * a[i];
}
template <class Act, class T>
__global__ void gated_backward_kernel(T* dg, T* da, const T* dy, const T* g, const T* a, index_t n) {
  for (index_t i = global_id(); i < n; i += global_stride()) {
    const T gi = g[i], dyi = dy[i];
    dg[i] = dyi * a[i] * Act::df(gi);
    da[i] = dyi * Act::f(gi);
  }
}
template <class T>
__global__ void add_kernel(T* y, const T* a, const T* b, index_t n) {
  for (index_t i = global_id(); i < n; i += global_stride()) y[i] = a[i] + b[i];
}
template <class T>
__global__ void add_inplace_kernel(T* y, const T* a, index_t n) {
  for (index_t i = global_id(); i < n; i += global_stride()) y[i] += a[i];
}
template <class T>
__global__ void scale_kernel(T* x, T alpha, index_t n) {
  for (index_t i = global_id(); i < n; i += global_stride()) x[i] *= alpha;
}
template <class T>
__global__ void add_row_vector_kernel(T* y, const T* b, index_t M, index_t N) {
  for (index_t i = global_id(); i < M * N; i += global_stride()) y[i] += b[i % N];
}
template <class T>
__global__ void mlstm_output_forward_kernel(T* out, T* hs, const T* hn, const T* skip, const T* xc, const T* z,
                                            index_t M, index_t D) {
  for (index_t i = global_id(); i < M * D; i += global_stride()) {
    const T h = hn[i] + skip[i % D] * xc[i];
    hs[i] = h;
    out[i] = h * ops::Silu::f(z[i]);
  }
}
template <class T>
__global__ void mlstm_output_backward_kernel(T* dhn, T* dz, T* dxc, const T* dout, const T* hs, const T* skip,
                                             const T* z, index_t M, index_t D) {
  for (index_t i = global_id(); i < M * D; i += global_stride()) {
    const T zi = z[i], d = dout[i];
    const T dh = d * ops::Silu::f(zi);
    dhn[i] = dh;
    dz[i] = d * hs[i] * ops::Silu::df(zi);
    dxc[i] += dh * skip[i % D];
  }
}

// ---- deterministic column reductions --------------------------------------------------
// out[c] += sum_r f(r, c) over rows r < R. Pass 1: block (32 columns x 8 row lanes) per
// (column tile, row chunk) writes partial[chunk][c]; pass 2 sums the chunks in order. The
// chunking depends only on R, so the summation order is fixed.

template <class T, class F>
__global__ void column_partial_kernel(T* partial, index_t rows, index_t cols, index_t chunk, F f) {
  __shared__ T sm[kTileRows][kTileCols + 1];
  const index_t c = blockIdx.x * static_cast<index_t>(kTileCols) + threadIdx.x;
  const index_t r0 = blockIdx.y * chunk;
  const index_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
  T acc = T(0);
  if (c < cols)
    for (index_t r = r0 + threadIdx.y; r < r1; r += kTileRows) acc += f(r, c);
  sm[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    T s = sm[0][threadIdx.x];
    for (int k = 1; k < kTileRows; ++k) s += sm[k][threadIdx.x];
    partial[blockIdx.y * cols + c] = s;
  }
}
template <class T>
__global__ void column_final_kernel(T* out, const T* partial, index_t chunks, index_t cols) {
  for (index_t c = global_id(); c < cols; c += global_stride()) {
    T s = partial[c];
    for (index_t k = 1; k < chunks; ++k) s += partial[k * cols + c];
    out[c] += s;
  }
}

template <class T, class F>
void column_reduce_add(T* out, index_t rows, index_t cols, F f) {
  if (rows <= 0 || cols <= 0) return;
  const index_t chunk = std::max<index_t>(64, (rows + 255) / 256);
  const index_t chunks = (rows + chunk - 1) / chunk;  // <= 256
  T* partial = scratch<T>(chunks * cols);
  const dim3 block(kTileCols, kTileRows);
  const dim3 grid(static_cast<unsigned>((cols + kTileCols - 1) / kTileCols), static_cast<unsigned>(chunks));
  column_partial_kernel<<<grid, block, 0, stream()>>>(partial, rows, cols, chunk, f);
  DISTILX_CUDA_LAUNCH_CHECK();
  column_final_kernel<<<grid_for(cols), kBlock, 0, stream()>>>(out, partial, chunks, cols);
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// f(r, c) = a[r * ld + c].
template <class T>
struct ColumnOf {
  const T* a;
  index_t ld;
  __device__ T operator()(index_t r, index_t c) const { return a[r * ld + c]; }
};
/// f(r, c) = a[r * cols + c] * b[r * cols + c].
template <class T>
struct ProductOf {
  const T* a;
  const T* b;
  index_t cols;
  __device__ T operator()(index_t r, index_t c) const { return a[r * cols + c] * b[r * cols + c]; }
};
/// Conv1d weight gradient: row r = (batch, t), column c = (f, j): dy[r, f] * x[(batch, t-K+1+j), f].
template <class T>
struct ConvDw {
  const T* dy;
  const T* x;
  index_t S, F, K;
  __device__ T operator()(index_t r, index_t c) const {
    const index_t f = c / K, j = c % K, t = r % S;
    const index_t lag = K - 1 - j;
    return t >= lag ? dy[r * F + f] * x[(r - lag) * F + f] : T(0);
  }
};
/// Group LayerNorm weight gradient: row r, column c = (g, i): dy * (x - mean) * rstd.
template <class T>
struct NormDw {
  const T* dy;
  const T* x;
  const T* mean;
  const T* rstd;
  index_t G, C;
  __device__ T operator()(index_t r, index_t c) const {
    const index_t i = r * G * C + c, s = r * G + c / C;
    return dy[i] * (x[i] - mean[s]) * rstd[s];
  }
};

// ---- causal conv1d --------------------------------------------------------------------

template <class T>
__global__ void conv1d_forward_kernel(T* y, const T* x, const T* W, const T* b, index_t B, index_t S, index_t F,
                                      index_t K) {
  for (index_t i = global_id(); i < B * S * F; i += global_stride()) {
    const index_t f = i % F, r = i / F, t = r % S;
    T acc = b ? b[f] : T(0);
    for (index_t j = 0; j < K; ++j) {
      const index_t lag = K - 1 - j;
      if (t >= lag) acc += W[f * K + j] * x[(r - lag) * F + f];
    }
    y[i] = acc;
  }
}
template <class T>
__global__ void conv1d_backward_dx_kernel(T* dx, const T* dy, const T* W, index_t B, index_t S, index_t F, index_t K,
                                          bool accumulate) {
  for (index_t i = global_id(); i < B * S * F; i += global_stride()) {
    const index_t f = i % F, r = i / F, s = r % S;
    T acc = accumulate ? dx[i] : T(0);
    for (index_t j = 0; j < K; ++j) {
      const index_t lag = K - 1 - j;  // output t = s + lag
      if (s + lag < S) acc += W[f * K + j] * dy[(r + lag) * F + f];
    }
    dx[i] = acc;
  }
}
/// One thread per (batch, channel) owns that channel's window, so the in-place shift is race-free.
template <class T>
__global__ void conv1d_step_kernel(T* y, T* buf, const T* x, const T* W, const T* b, index_t B, index_t F, index_t K) {
  for (index_t i = global_id(); i < B * F; i += global_stride()) {
    const index_t bi = i / F, f = i % F;
    T* bb = buf + bi * K * F + f;
    for (index_t j = 0; j + 1 < K; ++j) bb[j * F] = bb[(j + 1) * F];
    bb[(K - 1) * F] = x[i];
    T acc = b ? b[f] : T(0);
    for (index_t j = 0; j < K; ++j) acc += bb[j * F] * W[f * K + j];
    y[i] = acc;
  }
}

// ---- small fixed-shape helpers for the fast reductions ------------------------------------

/// V consecutive elements moved as one aligned access (16 bytes for float x 4 or double x 2).
template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};
template <class T, int V>
__device__ inline Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}
/// Elements per 16-byte access, or 1 when a row stride or a base pointer is not 16-byte aligned.
template <class T>
inline int pack_width(index_t ld, std::initializer_list<const void*> ptrs) {
  constexpr int w = static_cast<int>(16 / sizeof(T));
  if (ld % w != 0) return 1;
  for (const void* p : ptrs)
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return 1;
  return w;
}

constexpr int kSumLanes = 8;  // chunk lanes per column in chunk_sum_add_kernel

/// out[c] += sum over k < chunks of partial[k * cols + c]. A block takes 32 columns; lane y sums
/// chunks y, y + 8, ..., then lane 0 adds the 8 lane sums in order: a fixed order for given shapes.
template <class T>
__global__ void chunk_sum_add_kernel(T* out, const T* partial, index_t chunks, index_t cols) {
  __shared__ T sm[kSumLanes][kTileCols + 1];
  const index_t c = blockIdx.x * static_cast<index_t>(kTileCols) + threadIdx.x;
  T s = T(0);
  if (c < cols)
    for (index_t k = threadIdx.y; k < chunks; k += kSumLanes) s += partial[k * cols + c];
  sm[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    T t = sm[0][threadIdx.x];
    for (int k = 1; k < kSumLanes; ++k) t += sm[k][threadIdx.x];
    out[c] += t;
  }
}
template <class T>
void chunk_sum_add(T* out, const T* partial, index_t chunks, index_t cols) {
  if (cols <= 0) return;
  const dim3 grid(static_cast<unsigned>((cols + kTileCols - 1) / kTileCols));
  chunk_sum_add_kernel<<<grid, dim3(kTileCols, kSumLanes), 0, stream()>>>(out, partial, chunks, cols);
  DISTILX_CUDA_LAUNCH_CHECK();
}

// ---- causal conv1d weight and bias gradients ----------------------------------------------
// dW[f, j] += sum_r dy[r, f] x[r - (K-1-j), f] (within the row's sequence), db[f] += sum_r dy[r, f].
// Thread g of row chunk c owns features g*V .. g*V+V-1 over the chunk's rows: it reads each dy
// and x element once (V-wide loads, consecutive threads on consecutive features), keeps the
// previous K-1 x rows in registers, and updates all K taps and the bias at once. Each chunk
// writes its own partial sums; chunk_sum_add then adds them in chunk order.

constexpr int kConvDwThreads = 128;
constexpr int kConvDwUnroll = 4;  // rows loaded before they are used, to keep loads in flight

template <class T, int V, int K>
__global__ void __launch_bounds__(kConvDwThreads)
    conv1d_dw_partial_kernel(T* __restrict__ pw, T* __restrict__ pb, const T* __restrict__ dy,
                             const T* __restrict__ x, index_t rows, index_t S, index_t F, index_t chunk) {
  const index_t f0 = (blockIdx.x * static_cast<index_t>(kConvDwThreads) + threadIdx.x) * V;
  if (f0 >= F) return;  // V divides F (host check), so f0 < F means all V features exist
  const index_t r0 = blockIdx.y * chunk;
  const index_t r1 = r0 + chunk < rows ? r0 + chunk : rows;
  constexpr int H = K > 1 ? K - 1 : 1;
  T hist[H][V];  // hist[l - 1] = x of row r - l, zero where that row is before the sequence start
  index_t t = r0 % S;  // position of row r0 in its sequence
#pragma unroll
  for (int l = 1; l < K; ++l) {
    if (t >= l) {
      const Pack<T, V> h = load_pack<T, V>(x + (r0 - l) * F + f0);
#pragma unroll
      for (int v = 0; v < V; ++v) hist[l - 1][v] = h.v[v];
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) hist[l - 1][v] = T(0);
    }
  }
  T aw[K][V], ab[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    ab[v] = T(0);
#pragma unroll
    for (int j = 0; j < K; ++j) aw[j][v] = T(0);
  }
  for (index_t r = r0; r < r1; r += kConvDwUnroll) {
    Pack<T, V> d[kConvDwUnroll], c[kConvDwUnroll];
#pragma unroll
    for (int u = 0; u < kConvDwUnroll; ++u)
      if (r + u < r1) {
        d[u] = load_pack<T, V>(dy + (r + u) * F + f0);
        c[u] = load_pack<T, V>(x + (r + u) * F + f0);
      }
#pragma unroll
    for (int u = 0; u < kConvDwUnroll; ++u)
      if (r + u < r1) {
        if (t == 0) {  // a new sequence: nothing before it
#pragma unroll
          for (int l = 0; l < H; ++l)
#pragma unroll
            for (int v = 0; v < V; ++v) hist[l][v] = T(0);
        }
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const T g = d[u].v[v];
          ab[v] += g;
          aw[K - 1][v] += g * c[u].v[v];
#pragma unroll
          for (int l = 1; l < K; ++l) aw[K - 1 - l][v] += g * hist[l - 1][v];
        }
#pragma unroll
        for (int l = H - 1; l > 0; --l)
#pragma unroll
          for (int v = 0; v < V; ++v) hist[l][v] = hist[l - 1][v];
        if constexpr (K > 1) {
#pragma unroll
          for (int v = 0; v < V; ++v) hist[0][v] = c[u].v[v];
        }
        if (++t == S) t = 0;
      }
  }
  T* w = pw + blockIdx.y * F * K + f0 * K;  // this thread's V*K consecutive dW entries
#pragma unroll
  for (int v = 0; v < V; ++v) {
#pragma unroll
    for (int j = 0; j < K; ++j) w[v * K + j] = aw[j][v];
    pb[blockIdx.y * F + f0 + v] = ab[v];
  }
}

template <class T, int V, int K>
void conv1d_dw_launch(T* pw, T* pb, const T* dy, const T* x, index_t rows, index_t S, index_t F, index_t chunk,
                      index_t chunks) {
  const index_t groups = F / V;
  const dim3 grid(static_cast<unsigned>((groups + kConvDwThreads - 1) / kConvDwThreads), static_cast<unsigned>(chunks));
  conv1d_dw_partial_kernel<T, V, K><<<grid, kConvDwThreads, 0, stream()>>>(pw, pb, dy, x, rows, S, F, chunk);
  DISTILX_CUDA_LAUNCH_CHECK();
}
template <class T, int V>
bool conv1d_dw_dispatch_k(T* pw, T* pb, const T* dy, const T* x, index_t rows, index_t S, index_t F, index_t K,
                          index_t chunk, index_t chunks) {
  switch (K) {
    case 1: conv1d_dw_launch<T, V, 1>(pw, pb, dy, x, rows, S, F, chunk, chunks); return true;
    case 2: conv1d_dw_launch<T, V, 2>(pw, pb, dy, x, rows, S, F, chunk, chunks); return true;
    case 3: conv1d_dw_launch<T, V, 3>(pw, pb, dy, x, rows, S, F, chunk, chunks); return true;
    case 4: conv1d_dw_launch<T, V, 4>(pw, pb, dy, x, rows, S, F, chunk, chunks); return true;
    default: return false;
  }
}
constexpr index_t kConvDwMaxK = 4;
constexpr index_t kConvDwTargetThreads = index_t(1) << 15;  // best of 2^13..2^17 on an H100

/// dW += and (if db) db += over B*S rows. K > kConvDwMaxK is left to the caller (returns false).
template <class T>
bool conv1d_dw_db(T* dW, T* db, const T* dy, const T* x, index_t B, index_t S, index_t F, index_t K) {
  if (K < 1 || K > kConvDwMaxK) return false;
  const index_t rows = B * S;
  const int V = pack_width<T>(F, {dy, x});
  const index_t groups = F / V;
  // Rows per chunk from the shapes alone, so the summation order never depends on the device.
  const index_t chunk = std::max({index_t(16), (rows * groups + kConvDwTargetThreads - 1) / kConvDwTargetThreads,
                                  (rows + 65534) / 65535});  // gridDim.y <= 65535
  const index_t chunks = (rows + chunk - 1) / chunk;
  T* pw = scratch<T>(chunks * F * (K + 1));
  T* pb = pw + chunks * F * K;
  constexpr int W = static_cast<int>(16 / sizeof(T));
  if (V == W) conv1d_dw_dispatch_k<T, W>(pw, pb, dy, x, rows, S, F, K, chunk, chunks);
  else conv1d_dw_dispatch_k<T, 1>(pw, pb, dy, x, rows, S, F, K, chunk, chunks);
  chunk_sum_add(dW, pw, chunks, F * K);
  if (db) chunk_sum_add(db, pb, chunks, F);
  return true;
}

// ---- headwise (block-diagonal) weight gradient for small blocks ---------------------------
// dW[p, o, i] += sum_m dy[m, p*O + o] x[m, p*I + i] for I, O <= 32. cuBLAS runs one CTA per
// block over all M rows; here block p is split into row chunks. A CTA (256 threads) takes one
// (block, chunk) pair, stages 64-row tiles of dy and x through shared memory (register prefetch
// of the next tile while this one is used), and four groups of 64 threads each take 16 rows
// of the tile, every thread a 4x4 piece of the padded 32x32 product. The groups' sums are added
// in order at the end; with one chunk the CTA adds into dW, else it writes the chunk's partial
// and chunk_sum_add adds the chunks in order. Accumulation is in T (fp32 for float) in every
// math mode.

constexpr int kHwMax = 32;      // largest I and O of the small-block path
constexpr int kHwRows = 64;     // rows per staged tile
constexpr int kHwThreads = 256;
constexpr int kHwGroups = kHwThreads / 64;
constexpr int kHwLoads = kHwRows / (kHwThreads / 32);  // tile rows each thread stages
constexpr index_t kHwTargetCtas = 1024;

template <class T>
__global__ void __launch_bounds__(kHwThreads)
    headwise_dw_kernel(T* __restrict__ out, bool direct, const T* __restrict__ dy, index_t ldy,
                       const T* __restrict__ x, index_t ldx, index_t M, index_t P, index_t I, index_t O,
                       index_t chunk) {
  // Staging: dy tile [64][32] then x tile [64][32] (zero-padded); later the groups' sums [4][32*32].
  __shared__ alignas(4 * sizeof(T)) T sm[2 * kHwRows * kHwMax];
  static_assert(2 * kHwRows * kHwMax == kHwGroups * kHwMax * kHwMax, "the group sums reuse the tile buffer");
  T* sdy = sm;
  T* sx = sm + kHwRows * kHwMax;
  const int tid = threadIdx.x;
  const int lane = tid % 32, wrow = tid / 32;  // staging: column lane of rows wrow + 8k
  const int grp = tid / 64, q = tid % 64;
  const int o0 = (q / 8) * 4, i0 = (q % 8) * 4;  // this thread's 4x4 piece
  const index_t p = blockIdx.x;
  const index_t m0 = blockIdx.y * chunk;
  const index_t m1 = m0 + chunk < M ? m0 + chunk : M;
  const T* dyp = dy + p * O;
  const T* xp = x + p * I;

  T acc[4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = T(0);

  T rd[kHwLoads], rx[kHwLoads];
#pragma unroll
  for (int k = 0; k < kHwLoads; ++k) {
    const index_t m = m0 + wrow + 8 * k;
    rd[k] = m < m1 && lane < O ? dyp[m * ldy + lane] : T(0);
    rx[k] = m < m1 && lane < I ? xp[m * ldx + lane] : T(0);
  }
  for (index_t mt = m0; mt < m1; mt += kHwRows) {
    __syncthreads();  // the previous tile is no longer read
#pragma unroll
    for (int k = 0; k < kHwLoads; ++k) {
      sdy[(wrow + 8 * k) * kHwMax + lane] = rd[k];
      sx[(wrow + 8 * k) * kHwMax + lane] = rx[k];
    }
    __syncthreads();
    if (mt + kHwRows < m1) {  // prefetch the next tile
#pragma unroll
      for (int k = 0; k < kHwLoads; ++k) {
        const index_t m = mt + kHwRows + wrow + 8 * k;
        rd[k] = m < m1 && lane < O ? dyp[m * ldy + lane] : T(0);
        rx[k] = m < m1 && lane < I ? xp[m * ldx + lane] : T(0);
      }
    }
    const int rb = grp * (kHwRows / kHwGroups);
#pragma unroll 4
    for (int r = rb; r < rb + kHwRows / kHwGroups; ++r) {
      const Pack<T, 4> a = load_pack<T, 4>(sdy + r * kHwMax + o0);
      const Pack<T, 4> b = load_pack<T, 4>(sx + r * kHwMax + i0);
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int w = 0; w < 4; ++w) acc[u][w] += a.v[u] * b.v[w];
    }
  }
  __syncthreads();
  T* gsum = sm;  // [group][o * 32 + i]
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int w = 0; w < 4; ++w) gsum[grp * kHwMax * kHwMax + (o0 + u) * kHwMax + i0 + w] = acc[u][w];
  __syncthreads();
  for (int e = tid; e < kHwMax * kHwMax; e += kHwThreads) {
    const int o = e / kHwMax, i = e % kHwMax;
    if (o >= O || i >= I) continue;
    T s = gsum[e];
    for (int g = 1; g < kHwGroups; ++g) s += gsum[g * kHwMax * kHwMax + e];
    const index_t idx = (p * O + o) * I + i;
    if (direct) out[idx] += s;
    else out[blockIdx.y * P * O * I + idx] = s;
  }
}

/// dW += per-block dy^T x through headwise_dw_kernel; false (nothing done) unless I, O <= 32.
template <class T>
bool headwise_dw_small(T* dW, const T* dy, index_t ldy, const T* x, index_t ldx, index_t M, index_t P, index_t I,
                       index_t O) {
  if (I > kHwMax || O > kHwMax) return false;
  if (M <= 0 || P <= 0 || I <= 0 || O <= 0) return true;
  // Chunks from the shapes alone (a fixed summation order): about kHwTargetCtas CTAs in all,
  // whole tiles per chunk, at most one chunk per tile of rows.
  const index_t tiles = (M + kHwRows - 1) / kHwRows;
  const index_t want = std::clamp<index_t>((kHwTargetCtas + P - 1) / P, 1, tiles);
  const index_t chunk = (tiles + want - 1) / want * kHwRows;
  const index_t chunks = (M + chunk - 1) / chunk;
  const bool direct = chunks == 1;
  T* out = direct ? dW : scratch<T>(chunks * P * O * I);
  const dim3 grid(static_cast<unsigned>(P), static_cast<unsigned>(chunks));
  headwise_dw_kernel<<<grid, kHwThreads, 0, stream()>>>(out, direct, dy, ldy, x, ldx, M, P, I, O, chunk);
  DISTILX_CUDA_LAUNCH_CHECK();
  if (!direct) chunk_sum_add(dW, out, chunks, P * O * I);
  return true;
}

// ---- norms (one warp per row) ---------------------------------------------------------

template <class T>
__global__ void group_layernorm_forward_kernel(T* y, T* mean, T* rstd, const T* x, const T* w, index_t rows,
                                               index_t G, index_t C, T eps) {
  const int lane = threadIdx.x % 32;
  const index_t warp = blockIdx.x * static_cast<index_t>(kRowWarps) + threadIdx.x / 32;
  for (index_t r = warp; r < rows; r += static_cast<index_t>(gridDim.x) * kRowWarps) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    const T* wr = w + (r % G) * C;
    T s = T(0);
    for (index_t c = lane; c < C; c += 32) s += xr[c];
    const T mu = warp_sum(s) / T(C);
    T v = T(0);
    for (index_t c = lane; c < C; c += 32) {
      const T d = xr[c] - mu;
      v += d * d;
    }
    const T var = warp_sum(v) / T(C);
    const T rs = T(1) / dev_sqrt(var + eps);
    for (index_t c = lane; c < C; c += 32) yr[c] = (xr[c] - mu) * rs * (T(1) + wr[c]);
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}
template <class T>
__global__ void group_layernorm_backward_kernel(T* dx, const T* dy, const T* x, const T* w, const T* mean,
                                                const T* rstd, index_t rows, index_t G, index_t C, bool accumulate) {
  const int lane = threadIdx.x % 32;
  const index_t warp = blockIdx.x * static_cast<index_t>(kRowWarps) + threadIdx.x / 32;
  for (index_t r = warp; r < rows; r += static_cast<index_t>(gridDim.x) * kRowWarps) {
    const T* xr = x + r * C;
    const T* dyr = dy + r * C;
    T* dxr = dx + r * C;
    const T* wr = w + (r % G) * C;
    const T mu = mean[r], rs = rstd[r];
    T sg = T(0), sgx = T(0);
    for (index_t c = lane; c < C; c += 32) {
      const T g = dyr[c] * (T(1) + wr[c]);
      sg += g;
      sgx += g * ((xr[c] - mu) * rs);
    }
    sg = warp_sum(sg) / T(C);
    sgx = warp_sum(sgx) / T(C);
    for (index_t c = lane; c < C; c += 32) {
      const T g = dyr[c] * (T(1) + wr[c]);
      const T xh = (xr[c] - mu) * rs;
      const T v = rs * (g - sg - xh * sgx);
      dxr[c] = accumulate ? dxr[c] + v : v;
    }
  }
}
template <class T>
__global__ void rmsnorm_forward_kernel(T* y, T* rstd, const T* x, const T* w, index_t M, index_t C, T eps) {
  const int lane = threadIdx.x % 32;
  const index_t warp = blockIdx.x * static_cast<index_t>(kRowWarps) + threadIdx.x / 32;
  for (index_t r = warp; r < M; r += static_cast<index_t>(gridDim.x) * kRowWarps) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    T ss = T(0);
    for (index_t c = lane; c < C; c += 32) ss += xr[c] * xr[c];
    const T rs = T(1) / dev_sqrt(warp_sum(ss) / T(C) + eps);
    for (index_t c = lane; c < C; c += 32) yr[c] = (xr[c] * rs) * w[c];
    if (rstd && lane == 0) rstd[r] = rs;
  }
}
inline int row_grid(index_t rows) {
  return static_cast<int>(std::clamp<index_t>((rows + kRowWarps - 1) / kRowWarps, 1, index_t(1) << 20));
}

// ---- embedding ------------------------------------------------------------------------

template <class T>
__global__ void embedding_gather_kernel(T* y, const index_t* ids, const T* E, index_t M, index_t d) {
  for (index_t i = global_id(); i < M * d; i += global_stride()) y[i] = E[ids[i / d] * d + i % d];
}

// ---- gradient reductions and the optimizer --------------------------------------------

/// Fixed-shape tree over kBlock values in shared memory; thread 0 returns the total.
__device__ inline double block_sum(double v, double* sm) {
  sm[threadIdx.x] = v;
  __syncthreads();
  for (int s = kBlock / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sm[threadIdx.x] += sm[threadIdx.x + s];
    __syncthreads();
  }
  return sm[0];
}
template <class T>
__global__ void sum_squares_partial_kernel(double* partial, const T* x, index_t n) {
  __shared__ double sm[kBlock];
  double acc = 0;
  for (index_t i = global_id(); i < n; i += global_stride()) {
    const double v = static_cast<double>(x[i]);
    acc += v * v;
  }
  const double s = block_sum(acc, sm);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
template <class Acc = double>  // a template, so the header defines no non-inline kernel symbol
__global__ void sum_final_kernel(Acc* out, const Acc* partial, int parts) {
  __shared__ Acc sm[kBlock];
  Acc acc = 0;
  for (int k = threadIdx.x; k < parts; k += kBlock) acc += partial[k];
  const double s = block_sum(acc, sm);
  if (threadIdx.x == 0) *out = s;
}

__device__ inline bool finite_bits(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }
__device__ inline bool finite_bits(double x) {
  return (static_cast<unsigned long long>(__double_as_longlong(x)) & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
}
template <class T>
__global__ void all_finite_kernel(int* bad, const T* x, index_t n) {
  // An integer flag: any order of the atomics gives the same answer.
  bool ok = true;
  for (index_t i = global_id(); i < n; i += global_stride()) ok &= finite_bits(x[i]);
  if (__syncthreads_or(!ok) && threadIdx.x == 0) atomicOr(bad, 1);
}

// Rounded arithmetic without FMA contraction, so AdamW matches the CPU loop to the last bit.
__device__ inline float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ inline double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <class T>
struct AdamWScalars {
  T decay, b1, ob1, b2, ob2, bc2s, eps, nss;
};
template <class T>
__global__ void adamw_kernel(T* DISTILX_RESTRICT p, const T* DISTILX_RESTRICT g, T* DISTILX_RESTRICT m,
                             T* DISTILX_RESTRICT v, index_t n, AdamWScalars<T> c) {
  for (index_t i = global_id(); i < n; i += global_stride()) {
    const T gi = g[i];
    const T mi = add_rn(mul_rn(m[i], c.b1), mul_rn(c.ob1, gi));
    const T vi = add_rn(mul_rn(v[i], c.b2), mul_rn(mul_rn(c.ob2, gi), gi));
    m[i] = mi;
    v[i] = vi;
    const T denom = add_rn(div_rn(dev_sqrt(vi), c.bc2s), c.eps);
    p[i] = add_rn(mul_rn(p[i], c.decay), mul_rn(c.nss, div_rn(mi, denom)));
  }
}

}  // namespace kernels
}  // namespace distilx::cuda_backend

namespace distilx {
struct AdamWCoeffs;  // optim/adamw.hpp, included at the end of this header
}

namespace distilx::ops {

namespace cuk = ::distilx::cuda_backend::kernels;

// ---- linear maps (cuBLAS) -------------------------------------------------------------

/// y[M,N] += b[N] for every row.
template <class T>
void add_row_vector(cuda, T* y, const T* b, index_t M, index_t N) {
  if (M * N <= 0) return;
  cuk::add_row_vector_kernel<<<cuk::grid_for(M * N), cuk::kBlock, 0, cuk::stream()>>>(y, b, M, N);
  DISTILX_CUDA_LAUNCH_CHECK();
}
/// db[N] += sum over rows of dy[M,N] (deterministic).
template <class T>
void column_sum(cuda, T* db, const T* dy, index_t M, index_t N) {
  cuk::column_reduce_add(db, M, N, cuk::ColumnOf<T>{dy, N});
}

/// y[M,N] = x[M,K] W[N,K]^T (+ b[N]). b may be null.
template <class T>
void linear_forward(cuda be, T* y, const T* x, const T* W, const T* b, index_t M, index_t K, index_t N) {
  gemm(be, Trans::no, Trans::yes, M, N, K, T(1), x, K, W, K, T(0), y, N);
  if (b) add_row_vector(be, y, b, M, N);
}
/// dW[N,K] += dy^T x; db[N] += sum_m dy; dx[M,K] (= or +=) dy W. Any of dx, dW, db may be null.
template <class T>
void linear_backward(cuda be, T* dx, T* dW, T* db, const T* dy, const T* x, const T* W, index_t M, index_t K,
                     index_t N, bool accumulate_dx = false) {
  if (dW) gemm(be, Trans::yes, Trans::no, N, K, M, T(1), dy, N, x, K, T(1), dW, K);
  if (db) column_sum(be, db, dy, M, N);
  if (dx) gemm(be, Trans::no, Trans::no, M, K, N, T(1), dy, N, W, K, accumulate_dx ? T(1) : T(0), dx, K);
}

/// Block-diagonal linear: x [M, P*I], W [P, O, I] -> y [M, P*O], one batched product for all blocks.
template <class T>
void headwise_forward(cuda be, T* y, const T* x, const T* W, index_t M, index_t P, index_t I, index_t O,
                      index_t ldy = -1, index_t ldx = -1) {
  if (ldy < 0) ldy = P * O;
  if (ldx < 0) ldx = P * I;
  gemm_strided_batched(be, Trans::no, Trans::yes, M, O, I, T(1), x, ldx, I, W, I, O * I, T(0), y, ldy, O, P);
}
/// dW += per block dy^T x; dx (= or +=) per block dy W. Strides as in headwise_forward.
template <class T>
void headwise_backward(cuda be, T* dx, T* dW, const T* dy, const T* x, const T* W, index_t M, index_t P, index_t I,
                       index_t O, bool accumulate_dx = false, index_t ldy = -1, index_t ldx = -1) {
  if (ldy < 0) ldy = P * O;
  if (ldx < 0) ldx = P * I;
  // Small blocks (the mLSTM q/k/v, 32 wide): a split-over-rows kernel; cuBLAS keeps the rest.
  if (dW && !cuk::headwise_dw_small(dW, dy, ldy, x, ldx, M, P, I, O))
    gemm_strided_batched(be, Trans::yes, Trans::no, O, I, M, T(1), dy, ldy, O, x, ldx, I, T(1), dW, I, O * I, P);
  if (dx)
    gemm_strided_batched(be, Trans::no, Trans::no, M, I, O, T(1), dy, ldy, O, W, I, O * I,
                         accumulate_dx ? T(1) : T(0), dx, ldx, I, P);
}

/// Frozen LM head: logits[M,V] = h[M,d] E[V,d]^T.
template <class T>
void lm_head_forward(cuda be, T* logits, const T* h, const T* E, index_t M, index_t d, index_t V) {
  gemm(be, Trans::no, Trans::yes, M, V, d, T(1), h, d, E, d, T(0), logits, V);
}
/// Input gradient only: dh[M,d] (= or +=) dlogits[M,V] E[V,d].
template <class T>
void lm_head_backward(cuda be, T* dh, const T* dlogits, const T* E, index_t M, index_t d, index_t V,
                      bool accumulate = false) {
  gemm(be, Trans::no, Trans::no, M, d, V, T(1), dlogits, V, E, d, accumulate ? T(1) : T(0), dh, d);
  // A gradient staged as this product's 16-bit operand (distill_rows) has had its one reader.
  if constexpr (std::is_same_v<T, float>)
    if (::distilx::cuda_backend::detail::inside_staged_image(dlogits, M * V))
      ::distilx::cuda_backend::detail::drop_staged_image();
}

// ---- causal conv1d --------------------------------------------------------------------

template <class T>
void causal_conv1d_forward(cuda, T* y, const T* x, const T* W, const T* b, index_t B, index_t S, index_t F,
                           index_t K) {
  const index_t n = B * S * F;
  if (n <= 0) return;
  cuk::conv1d_forward_kernel<<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(y, x, W, b, B, S, F, K);
  DISTILX_CUDA_LAUNCH_CHECK();
}
/// dx (= or +=); dW, db accumulate (deterministic). Any may be null.
template <class T>
void causal_conv1d_backward(cuda, T* dx, T* dW, T* db, const T* dy, const T* x, const T* W, index_t B, index_t S,
                            index_t F, index_t K, bool accumulate_dx = false) {
  const index_t n = B * S * F;
  if (n <= 0) return;
  if (dx) {
    cuk::conv1d_backward_dx_kernel<<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(dx, dy, W, B, S, F, K,
                                                                                           accumulate_dx);
    DISTILX_CUDA_LAUNCH_CHECK();
  }
  // dW (and db in the same pass) through the dedicated kernel for K <= 4; the generic column
  // reduction covers longer kernels and a bias gradient without dW.
  if (dW && cuk::conv1d_dw_db(dW, db, dy, x, B, S, F, K)) return;
  if (dW) cuk::column_reduce_add(dW, B * S, F * K, cuk::ConvDw<T>{dy, x, S, F, K});
  if (db) cuk::column_reduce_add(db, B * S, F, cuk::ColumnOf<T>{dy, F});
}
/// One generation step; buf [B, K, F] is the rolling window (see the CPU op).
template <class T>
void causal_conv1d_step(cuda, T* y, T* buf, const T* x, const T* W, const T* b, index_t B, index_t F, index_t K) {
  if (B * F <= 0) return;
  cuk::conv1d_step_kernel<<<cuk::grid_for(B * F), cuk::kBlock, 0, cuk::stream()>>>(y, buf, x, W, b, B, F, K);
  DISTILX_CUDA_LAUNCH_CHECK();
}

// ---- norms ----------------------------------------------------------------------------

/// x, y: [M, G*C]; w: [G*C] (scale 1 + w); mean, rstd: [M*G].
template <class T>
void group_layernorm_forward(cuda, T* y, T* mean, T* rstd, const T* x, const T* w, index_t M, index_t G, index_t C,
                             T eps) {
  const index_t rows = M * G;
  if (rows <= 0) return;
  cuk::group_layernorm_forward_kernel<<<cuk::row_grid(rows), 32 * cuk::kRowWarps, 0, cuk::stream()>>>(
      y, mean, rstd, x, w, rows, G, C, eps);
  DISTILX_CUDA_LAUNCH_CHECK();
}
/// dx (= or +=); dw += sum over rows of dy * xhat (deterministic; dw may be null).
template <class T>
void group_layernorm_backward(cuda, T* dx, T* dw, const T* dy, const T* x, const T* w, const T* mean, const T* rstd,
                              index_t M, index_t G, index_t C, bool accumulate_dx = false) {
  const index_t rows = M * G;
  if (rows <= 0) return;
  cuk::group_layernorm_backward_kernel<<<cuk::row_grid(rows), 32 * cuk::kRowWarps, 0, cuk::stream()>>>(
      dx, dy, x, w, mean, rstd, rows, G, C, accumulate_dx);
  DISTILX_CUDA_LAUNCH_CHECK();
  if (dw) cuk::column_reduce_add(dw, M, G * C, cuk::NormDw<T>{dy, x, mean, rstd, G, C});
}
template <class T>
void layernorm_forward(cuda be, T* y, T* mean, T* rstd, const T* x, const T* w, index_t M, index_t C, T eps) {
  group_layernorm_forward(be, y, mean, rstd, x, w, M, index_t{1}, C, eps);
}
template <class T>
void layernorm_backward(cuda be, T* dx, T* dw, const T* dy, const T* x, const T* w, const T* mean, const T* rstd,
                        index_t M, index_t C, bool accumulate_dx = false) {
  group_layernorm_backward(be, dx, dw, dy, x, w, mean, rstd, M, index_t{1}, C, accumulate_dx);
}
/// RMSNorm: y = x * rsqrt(mean(x^2) + eps) * w. rstd [M] may be null.
template <class T>
void rmsnorm_forward(cuda, T* y, T* rstd, const T* x, const T* w, index_t M, index_t C, T eps) {
  if (M <= 0) return;
  cuk::rmsnorm_forward_kernel<<<cuk::row_grid(M), 32 * cuk::kRowWarps, 0, cuk::stream()>>>(y, rstd, x, w, M, C, eps);
  DISTILX_CUDA_LAUNCH_CHECK();
}

// ---- activations ----------------------------------------------------------------------

/// y = act(x) elementwise (y may alias x).
template <class Act, class T>
void act_forward(cuda, T* y, const T* x, index_t n) {
  if (n <= 0) return;
  cuk::act_forward_kernel<Act><<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(y, x, n);
  DISTILX_CUDA_LAUNCH_CHECK();
}
/// dx (=, or += when accumulate) dy * act'(x).
template <class Act, class T>
void act_backward(cuda, T* dx, const T* dy, const T* x, index_t n, bool accumulate = false) {
  if (n <= 0) return;
  cuk::act_backward_kernel<Act><<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(dx, dy, x, n, accumulate);
  DISTILX_CUDA_LAUNCH_CHECK();
}
/// y = act(g) * a.
template <class Act, class T>
void gated_forward(cuda, T* y, const T* g, const T* a, index_t n) {
  if (n <= 0) return;
  cuk::gated_forward_kernel<Act><<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(y, g, a, n);
  DISTILX_CUDA_LAUNCH_CHECK();
}
template <class Act, class T>
void gated_backward(cuda, T* dg, T* da, const T* dy, const T* g, const T* a, index_t n) {
  if (n <= 0) return;
  cuk::gated_backward_kernel<Act><<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(dg, da, dy, g, a, n);
  DISTILX_CUDA_LAUNCH_CHECK();
}

// ---- elementwise ----------------------------------------------------------------------

/// y = a + b (y may alias a or b).
template <class T>
void add(cuda, T* y, const T* a, const T* b, index_t n) {
  if (n <= 0) return;
  cuk::add_kernel<<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(y, a, b, n);
  DISTILX_CUDA_LAUNCH_CHECK();
}
/// y += a.
template <class T>
void add_inplace(cuda, T* y, const T* a, index_t n) {
  if (n <= 0) return;
  cuk::add_inplace_kernel<<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(y, a, n);
  DISTILX_CUDA_LAUNCH_CHECK();
}
template <class T>
void copy(cuda, T* y, const T* x, index_t n) {
  if (n > 0) DISTILX_CUDA_CHECK(cudaMemcpyAsync(y, x, sizeof(T) * n, cudaMemcpyDeviceToDevice, cuk::stream()));
}
template <class T>
void fill_zero(cuda, T* y, index_t n) {
  if (n > 0) DISTILX_CUDA_CHECK(cudaMemsetAsync(y, 0, sizeof(T) * n, cuk::stream()));
}

/// mLSTM output: hs = hn + skip ⊙ xc (saved), out = hs ⊙ SiLU(z). Shapes [M, D], skip [D].
template <class T>
void mlstm_output_forward(cuda, T* out, T* hs, const T* hn, const T* skip, const T* xc, const T* z, index_t M,
                          index_t D) {
  if (M * D <= 0) return;
  cuk::mlstm_output_forward_kernel<<<cuk::grid_for(M * D), cuk::kBlock, 0, cuk::stream()>>>(out, hs, hn, skip, xc, z,
                                                                                             M, D);
  DISTILX_CUDA_LAUNCH_CHECK();
}
/// dhn = dout ⊙ SiLU(z); dz = dout ⊙ hs ⊙ SiLU'(z); dxc += dhn ⊙ skip; dskip += Σ_m dhn ⊙ xc (deterministic).
template <class T>
void mlstm_output_backward(cuda, T* dhn, T* dz, T* dxc, T* dskip, const T* dout, const T* hs, const T* skip,
                           const T* xc, const T* z, index_t M, index_t D) {
  if (M * D <= 0) return;
  cuk::mlstm_output_backward_kernel<<<cuk::grid_for(M * D), cuk::kBlock, 0, cuk::stream()>>>(dhn, dz, dxc, dout, hs,
                                                                                              skip, z, M, D);
  DISTILX_CUDA_LAUNCH_CHECK();
  if (dskip) cuk::column_reduce_add(dskip, M, D, cuk::ProductOf<T>{dhn, xc, D});
}

// ---- embedding ------------------------------------------------------------------------

/// y[M, d] = E[tokens[m], :] with E and y on the device and tokens in host memory. Ids are
/// checked on the host (same error as the CPU op) and staged through this thread's scratch.
template <class T, class Tok>
void embedding_forward(cuda, T* y, const Tok* tokens, const T* E, index_t M, index_t d, index_t V) {
  thread_local std::vector<index_t> ids;
  ids.resize(static_cast<std::size_t>(std::max<index_t>(M, 0)));
  for (index_t m = 0; m < M; ++m) {
    const auto id = static_cast<index_t>(tokens[m]);
    DISTILX_REQUIRE(error, id >= 0 && id < V, "token id ", id, " at position ", m,
                    " is outside the vocabulary [0, ", V, "); check the tokenizer matches the model");
    ids[static_cast<std::size_t>(m)] = id;
  }
  if (M <= 0 || d <= 0) return;
  index_t* dev_ids = cuda_backend::scratch<index_t>(M);
  // From pageable memory the copy returns once `ids` is staged, so the vector may be reused.
  DISTILX_CUDA_CHECK(
      cudaMemcpyAsync(dev_ids, ids.data(), sizeof(index_t) * M, cudaMemcpyHostToDevice, cuk::stream()));
  cuk::embedding_gather_kernel<<<cuk::grid_for(M * d), cuk::kBlock, 0, cuk::stream()>>>(y, dev_ids, E, M, d);
  DISTILX_CUDA_LAUNCH_CHECK();
}

// ---- gradient post-processing (optim/clip.hpp) ----------------------------------------

/// Σ x² in double, two passes over a partition fixed by n (run-to-run identical). Synchronises.
template <class T>
double sum_squares(cuda, const T* x, index_t n) {
  if (n <= 0) return 0.0;
  const int parts = static_cast<int>(std::clamp<index_t>((n + 8 * cuk::kBlock - 1) / (8 * cuk::kBlock), 1, 1024));
  double* buf = cuda_backend::scratch<double>(parts + 1);
  cuk::sum_squares_partial_kernel<<<parts, cuk::kBlock, 0, cuk::stream()>>>(buf + 1, x, n);
  DISTILX_CUDA_LAUNCH_CHECK();
  cuk::sum_final_kernel<<<1, cuk::kBlock, 0, cuk::stream()>>>(buf, buf + 1, parts);
  DISTILX_CUDA_LAUNCH_CHECK();
  double out = 0;
  DISTILX_CUDA_CHECK(cudaMemcpyAsync(&out, buf, sizeof(double), cudaMemcpyDeviceToHost, cuk::stream()));
  DISTILX_CUDA_CHECK(cudaStreamSynchronize(cuk::stream()));
  return out;
}

/// x ← alpha·x.
template <class T>
void scale(cuda, T* x, T alpha, index_t n) {
  if (n <= 0) return;
  cuk::scale_kernel<<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(x, alpha, n);
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// True iff no element is NaN or ±Inf (exponent-bit test, as on the CPU). Synchronises.
template <class T>
bool all_finite(cuda, const T* x, index_t n) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "all_finite(cuda): float or double");
  if (n <= 0) return true;
  int* bad = cuda_backend::scratch<int>(1);
  DISTILX_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), cuk::stream()));
  cuk::all_finite_kernel<<<cuk::grid_for(n, cuk::kBlock * 8), cuk::kBlock, 0, cuk::stream()>>>(bad, x, n);
  DISTILX_CUDA_LAUNCH_CHECK();
  int h = 0;
  DISTILX_CUDA_CHECK(cudaMemcpyAsync(&h, bad, sizeof(int), cudaMemcpyDeviceToHost, cuk::stream()));
  DISTILX_CUDA_CHECK(cudaStreamSynchronize(cuk::stream()));
  return h == 0;
}

/// Declared before optim/adamw.hpp so that AdamW<T, cuda>::step's qualified call sees it.
template <class T>
void adamw_update(cuda, T* DISTILX_RESTRICT p, const T* DISTILX_RESTRICT g, T* DISTILX_RESTRICT m,
                  T* DISTILX_RESTRICT v, index_t n, const AdamWCoeffs& c);

}  // namespace distilx::ops

#include "distilx/optim/adamw.hpp"

namespace distilx::ops {

/// One fused AdamW update of n elements: the CPU loop's operations in the same order, rounded
/// the same way (no FMA contraction), with the scalars rounded to T once on the host.
template <class T>
void adamw_update(cuda, T* DISTILX_RESTRICT p, const T* DISTILX_RESTRICT g, T* DISTILX_RESTRICT m,
                  T* DISTILX_RESTRICT v, index_t n, const AdamWCoeffs& c) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "adamw_update(cuda): float or double");
  if (n <= 0) return;
  const cuda_backend::kernels::AdamWScalars<T> s{
      static_cast<T>(c.decay_factor),          static_cast<T>(c.beta1), static_cast<T>(c.one_minus_beta1),
      static_cast<T>(c.beta2),                 static_cast<T>(c.one_minus_beta2),
      static_cast<T>(c.bias_correction2_sqrt), static_cast<T>(c.eps),   static_cast<T>(c.neg_step_size)};
  cuk::adamw_kernel<<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(p, g, m, v, n, s);
  DISTILX_CUDA_LAUNCH_CHECK();
}

}  // namespace distilx::ops
