// CUDA mLSTM cell kernel (spec-xlstm.md §4.3-§4.6): MLSTMCell<T, cuda>, the chunkwise-parallel forward with the
// parallel form's row stabiliser, its exact backward (ε-order stabiliser path included) and the recurrent step
// (§4.4). Computes the same function as the CPU cell (cells/mlstm.hpp), with the same chunking and roundings
// where they matter (double local cumsums of log σ(f̃)); only summation orders differ.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/cuda/memory.cuh"
#include "distilx/cells/mlstm.hpp"
#include "distilx/ops/activations.hpp"

namespace distilx {
namespace detail::mlstm_cuda {

// Work decomposition (TFLA-style, all deterministic: no atomics, fixed summation orders):
//  1. per chunk, in parallel: local cumsum b (double), intra-chunk row maxima, chunk key maximum;
//     per (b, h), sequential over chunks (scalars only): running max M_c, its argmax, the state decays;
//  2. per (b, h, 64×64 state tile), sequential over chunks: the state C, n entering each chunk (each step adds
//     the chunk's 64-deep summary (β k)^T v to the decayed state), materialised per chunk;
//  3. per chunk, in parallel: the L×L score tile W = (q̂ k^T) ⊙ e^{log D - m} and the outputs W v + α q̂ C.
// The backward recomputes phases 2 and 3, then runs phase 2 in reverse for the state G, r of δk, δv.
// Every matrix product is one 64×64 output tile per block (256 threads, 4×4 outputs each, fp32/fp64 FMA), so
// row tiles over L and column tiles over DH make any L and DH work, including the parallel form (L = S).

constexpr int kTile = 64;     // output tile edge
constexpr int kKStep = 16;    // reduction slice staged in shared memory
constexpr int kPad = 4;       // keeps 16-byte alignment of the tile rows
constexpr int kThreads = 256; // 16 × 16 threads per tile block
constexpr int kRowThreads = 256;
static_assert(kKStep * kTile % kThreads == 0 && kThreads == 256, "tile_mma assumes 16 × 16 threads");

/// Shapes of one call. Features of (b, h, t) start at row(); gates at gate() (stride NH in t).
struct Geo {
  index_t B, S, NH, DH, D, L, nc, BH, ntl, ntd;
  DISTILX_HOST_DEVICE index_t row(index_t bh, index_t t) const { return ((bh / NH) * S + t) * D + (bh % NH) * DH; }
  DISTILX_HOST_DEVICE index_t gate(index_t bh, index_t t) const { return ((bh / NH) * S + t) * NH + bh % NH; }
  DISTILX_HOST_DEVICE index_t chunk_len(index_t c) const {
    const index_t r = S - c * L;
    return r < L ? r : L;
  }
};

template <class T>
struct TileShared {
  alignas(16) T a[kKStep][kTile + kPad];  // a[k][row]; 16-byte rows let the 4 values a thread reads be one load
  alignas(16) T b[kKStep][kTile + kPad];  // b[k][col]
};

/// acc[i][j] += Σ_{k in [k_begin, k_end)} fa(4ty+i, k) · fb(k, 4tx+j) for the block's 64×64 tile. fa(r, k) and
/// fb(k, c) return 0 outside the caller's bounds; AKFast / BKFast say whether k is the contiguous index in
/// memory (so consecutive threads load consecutive addresses). The next 16-deep slice is loaded into registers
/// while the current one is multiplied out of shared memory; each output still sums k in ascending order, one FMA
/// per k (results do not depend on the tiling). Must be called by all threads of the block.
template <bool AKFast, bool BKFast, class T, class FA, class FB>
__device__ inline void tile_mma(T (&acc)[4][4], TileShared<T>& sh, index_t k_begin, index_t k_end, const FA& fa,
                                const FB& fb) {
  constexpr int kPer = kKStep * kTile / kThreads;  // elements of each operand slice per thread
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  // Element u of this thread: slice row kk and tile row/column r of operand A (a*) and B (b*).
  auto a_kk = [&](int u) { const int e = tid + u * kThreads; return AKFast ? e % kKStep : e / kTile; };
  auto a_r = [&](int u) { const int e = tid + u * kThreads; return AKFast ? e / kKStep : e % kTile; };
  auto b_kk = [&](int u) { const int e = tid + u * kThreads; return BKFast ? e % kKStep : e / kTile; };
  auto b_c = [&](int u) { const int e = tid + u * kThreads; return BKFast ? e / kKStep : e % kTile; };
  T ra[kPer], rb[kPer];
  auto fetch = [&](index_t k0) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      ra[u] = k0 + a_kk(u) < k_end ? fa(a_r(u), k0 + a_kk(u)) : T(0);
      rb[u] = k0 + b_kk(u) < k_end ? fb(k0 + b_kk(u), b_c(u)) : T(0);
    }
  };
  if (k_begin >= k_end) return;  // uniform over the block
  fetch(k_begin);
  for (index_t k0 = k_begin; k0 < k_end; k0 += kKStep) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      sh.a[a_kk(u)][a_r(u)] = ra[u];
      sh.b[b_kk(u)][b_c(u)] = rb[u];
    }
    __syncthreads();
    if (k0 + kKStep < k_end) fetch(k0 + kKStep);  // in flight during the FMAs below
#pragma unroll
    for (int kk = 0; kk < kKStep; ++kk) {
      T av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        av[i] = sh.a[kk][ty * 4 + i];
        bv[i] = sh.b[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }
}

/// Per-row partial sums of a tile (p[i] for row 4ty+i, over this thread's 4 columns) reduced over the 16 column
/// threads in a fixed order; out(r, value) is called for the first `rows` rows by threads 0..rows-1.
template <class F>
__device__ inline void tile_row_reduce(double (&red)[kTile][17], const double (&p)[4], int rows, const F& out) {
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) red[ty * 4 + i][tx] = p[i];
  __syncthreads();
  if (tid < rows) {
    double s = 0;
    for (int x = 0; x < 16; ++x) s += red[tid][x];
    out(tid, s);
  }
  __syncthreads();
}

template <class T>
DISTILX_HOST_DEVICE inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---------------------------------------------------------------------------------------------------------------
// Forward, phase 1: chunk statistics.

/// One block per (bh, chunk). b: local cumsum of log σ(f̃) in double (see load_chunk in the CPU cell), the
/// intra-chunk row max of log D and its argmax (earlier key wins ties), and the chunk's key maximum
/// μ = max_r ĩ_r + g - b_r with g = b_last (its argmax too), all exactly as the CPU cell computes them.
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    k_chunk_stats(Geo g, const T* __restrict__ ig, const T* __restrict__ fg, double* __restrict__ bcum,
                  T* __restrict__ ibest, index_t* __restrict__ iarg, double* __restrict__ cg, T* __restrict__ cmu,
                  index_t* __restrict__ camu) {
  const index_t bh = blockIdx.x / g.nc, c = blockIdx.x % g.nc;
  const index_t t0 = c * g.L, Lc = g.chunk_len(c);
  double* bc = bcum + bh * g.S + t0;
  const T* gi = ig + g.gate(bh, t0);
  const T* gf = fg + g.gate(bh, t0);
  if (threadIdx.x == 0) {  // sequential on purpose: the same double sum as the CPU cell
    double acc = 0;
    for (index_t r = 0; r < Lc; ++r) {
      acc += ops::log_sigmoid(gf[r * g.NH]);
      bc[r] = acc;
    }
  }
  __syncthreads();
  for (index_t r = threadIdx.x; r < Lc; r += blockDim.x) {
    T best = neg_inf<T>();
    index_t arg = -1;
    for (index_t cc = 0; cc <= r; ++cc) {
      const T ld = T(bc[r] - bc[cc]) + gi[cc * g.NH];
      if (ld > best) {
        best = ld;
        arg = t0 + cc;
      }
    }
    ibest[bh * g.S + t0 + r] = best;
    iarg[bh * g.S + t0 + r] = arg;
  }
  if (threadIdx.x == 0) {
    const double gg = bc[Lc - 1];
    T mu = neg_inf<T>();
    index_t amu = -1;
    for (index_t r = 0; r < Lc; ++r) {
      const T beta = gi[r * g.NH] + T(gg - bc[r]);
      if (beta > mu) {
        mu = beta;
        amu = t0 + r;
      }
    }
    cg[bh * g.nc + c] = gg;
    cmu[bh * g.nc + c] = mu;
    camu[bh * g.nc + c] = amu;
  }
}

/// One thread per bh: the inter-chunk running max M (from -inf) and its argmax A after each chunk
/// (cm[c] / ca[c] = before chunk c), and the state decay e^{g_c + M_{c-1} - M_c} of chunk c (0 for c = 0).
template <class T>
__global__ void k_running_max(Geo g, const double* __restrict__ cg, const T* __restrict__ cmu,
                              const index_t* __restrict__ camu, T* __restrict__ cm, index_t* __restrict__ ca,
                              T* __restrict__ decay) {
  const index_t bh = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bh >= g.BH) return;
  T M = neg_inf<T>();
  index_t A = -1;
  T* cmb = cm + bh * (g.nc + 1);
  index_t* cab = ca + bh * (g.nc + 1);
  cmb[0] = M;
  cab[0] = A;
  for (index_t c = 0; c < g.nc; ++c) {
    T dec = T(0);
    if (c + 1 < g.nc) {  // the last chunk's keys are never carried
      const T mu = cmu[bh * g.nc + c];
      const T carried = T(cg[bh * g.nc + c]) + M;
      const T M_new = mu > carried ? mu : carried;
      if (mu > carried) A = camu[bh * g.nc + c];
      dec = std::exp(carried - M_new);
      M = M_new;
    }
    decay[bh * g.nc + c] = dec;
    cmb[c + 1] = M;
    cab[c + 1] = A;
  }
}

/// One thread per (bh, t): the row stabiliser m_t = max(intra max, M_{c-1} + b_t) and its argmax (earlier keys
/// win ties), α_t = e^{M_{c-1} + b_t - m_t} (weight of the carried state in row t) and β_t = e^{ĩ_t + g - b_t - M_c}
/// (weight of key t in the state leaving its chunk).
template <class T>
__global__ void k_row_coeffs(Geo g, const T* __restrict__ ig, const double* __restrict__ bcum,
                             const double* __restrict__ cg, const T* __restrict__ ibest,
                             const index_t* __restrict__ iarg, const T* __restrict__ cm,
                             const index_t* __restrict__ ca, T* __restrict__ m, index_t* __restrict__ arg,
                             T* __restrict__ alpha, T* __restrict__ beta) {
  const index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.BH * g.S) return;
  const index_t bh = idx / g.S, t = idx % g.S, c = t / g.L;
  const double b = bcum[idx];
  const T M = cm[bh * (g.nc + 1) + c];
  const index_t A = ca[bh * (g.nc + 1) + c];
  const T inter = M + T(b);
  T best = ibest[idx];
  index_t a = iarg[idx];
  if (A >= 0 && inter >= best) {
    best = inter;
    a = A;
  }
  if (a < 0) a = t;  // only with non-finite gates; keeps backward's scatter in range
  m[idx] = best;
  arg[idx] = a;
  alpha[idx] = c > 0 ? std::exp(inter - best) : T(0);
  beta[idx] = c + 1 < g.nc
                  ? std::exp(ig[g.gate(bh, t)] + T(cg[bh * g.nc + c] - b) - cm[bh * (g.nc + 1) + c + 1])
                  : T(0);
}

// ---------------------------------------------------------------------------------------------------------------
// Phase 2: inter-chunk states. states[(bh·nc + c)·DH² + i·DH + j] is C entering chunk c (key index i major, as
// the CPU cell's state), nstate[(bh·nc + c)·DH + i] is n entering chunk c; slot 0 is never used. The backward
// reuses the slots for its reverse state G, r (k_states_bwd).

/// Grid (BH, DH tiles, DH tiles): one block per (bh, 64×64 state tile), sequential over chunks (a chunk's
/// summary is a 64-deep product, so the scan costs no extra pass over the states): the state entering chunk c+1
/// is decay_c · (state entering c) + Σ_{r in chunk c} β_r k_r v_r^T, written to slot c+1 for c = 0 … nc-2; the
/// blocks of column tile 0 also carry n. Same order of operations as the CPU cell's advance_state.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_states_fwd(Geo g, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ beta,
                 const T* __restrict__ decay, T* __restrict__ states, T* __restrict__ nstate) {
  __shared__ TileShared<T> sh;
  const index_t bh = blockIdx.x, DH = g.DH, D = g.D, L = g.L;
  const index_t i0 = index_t(blockIdx.y) * kTile, j0 = index_t(blockIdx.z) * kTile;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const bool carries_n = blockIdx.z == 0 && tid < kTile && i0 + tid < DH;
  T acc[4][4] = {};
  T nacc = 0;
  for (index_t c = 0; c + 1 < g.nc; ++c) {  // the last chunk's keys are never carried
    const T dec = decay[bh * g.nc + c];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] *= dec;
    const index_t t0 = c * L;  // never the last chunk, so L rows
    const T* kb = k + g.row(bh, t0);
    const T* vb = v + g.row(bh, t0);
    const T* be = beta + bh * g.S + t0;
    tile_mma<false, false>(
        acc, sh, 0, L, [&](int i, index_t r) { return i0 + i < DH ? be[r] * kb[r * D + i0 + i] : T(0); },
        [&](index_t r, int j) { return j0 + j < DH ? vb[r * D + j0 + j] : T(0); });
    T* slot = states + (bh * g.nc + c + 1) * DH * DH;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const index_t I = i0 + ty * 4 + i, J = j0 + tx * 4 + j;
        if (I < DH && J < DH) slot[I * DH + J] = acc[i][j];
      }
    if (carries_n) {
      nacc *= dec;
      for (index_t r = 0; r < L; ++r) nacc += be[r] * kb[r * D + i0 + tid];
      nstate[(bh * g.nc + c + 1) * DH + i0 + tid] = nacc;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Phase 3: intra-chunk tiles and outputs. W[(bh·nc + c)·L² + r·L + c'] is the chunk's score tile (row stride L).

/// Grid (BH·nc, L tiles, L tiles): W = (q̂ k^T) ⊙ E with E_rc = e^{b_r - b_c + ĩ_c - m_r} on and below the
/// diagonal, 0 above. Tiles entirely above the diagonal are never read and stay unwritten.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_scores(Geo g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ ig,
             const double* __restrict__ bcum, const T* __restrict__ m, T* __restrict__ W) {
  __shared__ TileShared<T> sh;
  const index_t bh = blockIdx.x / g.nc, c = blockIdx.x % g.nc;
  const index_t t0 = c * g.L, Lc = g.chunk_len(c);
  const index_t r0 = index_t(blockIdx.y) * kTile, c0 = index_t(blockIdx.z) * kTile;
  if (r0 >= Lc || c0 >= Lc || c0 > r0) return;  // uniform over the block
  const T scale = T(1) / std::sqrt(T(g.DH));
  const T* qb = q + g.row(bh, t0);
  const T* kb = k + g.row(bh, t0);
  const index_t D = g.D;
  T acc[4][4] = {};
  tile_mma<true, true>(
      acc, sh, 0, g.DH, [&](int r, index_t kk) { return r0 + r < Lc ? qb[(r0 + r) * D + kk] * scale : T(0); },
      [&](index_t kk, int cc) { return c0 + cc < Lc ? kb[(c0 + cc) * D + kk] : T(0); });
  const double* bc = bcum + bh * g.S + t0;
  const T* gi = ig + g.gate(bh, t0);
  T* Wc = W + (bh * g.nc + c) * g.L * g.L;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t R = r0 + ty * 4 + i;
    if (R >= Lc) continue;
    const T mR = m[bh * g.S + t0 + R];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t C = c0 + tx * 4 + j;
      if (C >= Lc) continue;
      T w = T(0);
      if (C <= R) w = acc[i][j] * std::exp(T(bc[R] - bc[C]) + gi[C * g.NH] - mR);
      Wc[R * g.L + C] = w;
    }
  }
}

/// One thread per (bh, t): s_t = Σ_{c<=r} W_rc + α_t q̂_t·n (the row sum, summed as the CPU cell does).
template <class T>
__global__ void k_rowsum(Geo g, const T* __restrict__ q, const T* __restrict__ W, const T* __restrict__ alpha,
                         const T* __restrict__ nstate, T* __restrict__ s) {
  const index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.BH * g.S) return;
  const index_t bh = idx / g.S, t = idx % g.S, c = t / g.L, r = t - c * g.L;
  const T* Wr = W + (bh * g.nc + c) * g.L * g.L + r * g.L;
  T sum = 0;
  for (index_t cc = 0; cc <= r; ++cc) sum += Wr[cc];
  if (c > 0) {
    const T scale = T(1) / std::sqrt(T(g.DH));
    const T* qr = q + g.row(bh, t);
    const T* n = nstate + (bh * g.nc + c) * g.DH;
    double d = 0;
    for (index_t j = 0; j < g.DH; ++j) d += double(qr[j] * scale) * double(n[j]);
    sum += alpha[idx] * T(d);
  }
  s[idx] = sum;
}

/// Grid (BH·nc, L tiles, DH tiles): the tile ñ = W v + α q̂ C of the chunk (C entering the chunk), rows × columns.
/// Shared by the forward output and the backward's recomputation.
template <class T>
__device__ inline void numerator_tile(T (&acc)[4][4], TileShared<T>& sh, const Geo& g, index_t bh, index_t c,
                                      index_t r0, index_t j0, const T* __restrict__ q, const T* __restrict__ v,
                                      const T* __restrict__ W, const T* __restrict__ alpha,
                                      const T* __restrict__ states) {
  const index_t t0 = c * g.L, Lc = g.chunk_len(c), D = g.D, DH = g.DH, L = g.L;
  const T* Wc = W + (bh * g.nc + c) * L * L;
  const T* vb = v + g.row(bh, t0);
  const index_t kend = Lc < r0 + kTile ? Lc : r0 + kTile;  // W is zero above the diagonal
  tile_mma<true, false>(
      acc, sh, 0, kend, [&](int r, index_t cc) { return r0 + r < Lc ? Wc[(r0 + r) * L + cc] : T(0); },
      [&](index_t cc, int j) { return j0 + j < DH ? vb[cc * D + j0 + j] : T(0); });
  if (c > 0) {
    const T scale = T(1) / std::sqrt(T(DH));
    const T* qb = q + g.row(bh, t0);
    const T* al = alpha + bh * g.S + t0;
    const T* Cs = states + (bh * g.nc + c) * DH * DH;
    tile_mma<true, false>(
        acc, sh, 0, DH,
        [&](int r, index_t kk) { return r0 + r < Lc ? al[r0 + r] * (qb[(r0 + r) * D + kk] * scale) : T(0); },
        [&](index_t kk, int j) { return j0 + j < DH ? Cs[kk * DH + j0 + j] : T(0); });
  }
}

/// Grid (BH·nc, L tiles, DH tiles): h = ñ / (max(|s|, e^{-m}) + ε).
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_output(Geo g, const T* __restrict__ q, const T* __restrict__ v, const T* __restrict__ W,
             const T* __restrict__ alpha, const T* __restrict__ states, const T* __restrict__ s,
             const T* __restrict__ m, T* __restrict__ h) {
  __shared__ TileShared<T> sh;
  const index_t bh = blockIdx.x / g.nc, c = blockIdx.x % g.nc;
  const index_t t0 = c * g.L, Lc = g.chunk_len(c);
  const index_t r0 = index_t(blockIdx.y) * kTile, j0 = index_t(blockIdx.z) * kTile;
  if (r0 >= Lc) return;
  T acc[4][4] = {};
  numerator_tile(acc, sh, g, bh, c, r0, j0, q, v, W, alpha, states);
  T* hb = h + g.row(bh, t0);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t R = r0 + ty * 4 + i;
    if (R >= Lc) continue;
    const T den = mlstm_denominator(s[bh * g.S + t0 + R], m[bh * g.S + t0 + R]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t J = j0 + tx * 4 + j;
      if (J < g.DH) hb[R * g.D + J] = acc[i][j] / den;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward (spec §4.6 in chunkwise form; the CPU cell's backward_head, step by step).

/// Grid (BH·nc, L tiles, DH tiles): recomputes ñ and reduces Σ_j δh_j ñ_j / den per row and column tile.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_bwd_num(Geo g, const T* __restrict__ q, const T* __restrict__ v, const T* __restrict__ dh,
              const T* __restrict__ W, const T* __restrict__ alpha, const T* __restrict__ states,
              const T* __restrict__ s, const T* __restrict__ m, double* __restrict__ part) {
  __shared__ TileShared<T> sh;
  __shared__ double red[kTile][17];
  const index_t bh = blockIdx.x / g.nc, c = blockIdx.x % g.nc;
  const index_t t0 = c * g.L, Lc = g.chunk_len(c);
  const index_t r0 = index_t(blockIdx.y) * kTile, j0 = index_t(blockIdx.z) * kTile;
  if (r0 >= Lc) return;
  T acc[4][4] = {};
  numerator_tile(acc, sh, g, bh, c, r0, j0, q, v, W, alpha, states);
  const T* dhb = dh + g.row(bh, t0);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  double p[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t R = r0 + ty * 4 + i;
    if (R >= Lc) continue;
    const T den = mlstm_denominator(s[bh * g.S + t0 + R], m[bh * g.S + t0 + R]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t J = j0 + tx * 4 + j;
      if (J < g.DH) p[i] += double(dhb[R * g.D + J]) * double(acc[i][j] / den);
    }
  }
  const int rows = int(Lc - r0 < kTile ? Lc - r0 : kTile);
  tile_row_reduce(red, p, rows, [&](int r, double val) { part[(bh * g.S + t0 + r0 + r) * g.ntd + blockIdx.z] = val; });
}

/// One thread per (bh, t): den, δs = δden · dden/ds and the stabiliser path δm = ε δden (spec §4.6 step 2, in the
/// unstabilised reading h = N / (max(|S|, 1) + ε e^m)).
template <class T>
__global__ void k_bwd_rowstats(Geo g, const T* __restrict__ s, const T* __restrict__ m,
                               const double* __restrict__ part, T* __restrict__ den, T* __restrict__ ds,
                               T* __restrict__ dm) {
  const index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.BH * g.S) return;
  double hh = 0;
  for (index_t j = 0; j < g.ntd; ++j) hh += part[idx * g.ntd + j];
  const T si = s[idx], mi = m[idx];
  const T d = mlstm_denominator(si, mi);
  const T dden = -T(hh) / d;
  den[idx] = d;
  ds[idx] = dden * mlstm_dden_ds(si, mi);
  dm[idx] = T(kMlstmEps) * dden;
}

/// Grid (BH·nc, L tiles, L tiles): δP = (δñ v^T + δs 1^T) ⊙ E, δñ = δh / den; zero above the diagonal.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_bwd_dp(Geo g, const T* __restrict__ v, const T* __restrict__ dh, const T* __restrict__ ig,
             const double* __restrict__ bcum, const T* __restrict__ m, const T* __restrict__ den,
             const T* __restrict__ ds, T* __restrict__ dp) {
  __shared__ TileShared<T> sh;
  const index_t bh = blockIdx.x / g.nc, c = blockIdx.x % g.nc;
  const index_t t0 = c * g.L, Lc = g.chunk_len(c);
  const index_t r0 = index_t(blockIdx.y) * kTile, c0 = index_t(blockIdx.z) * kTile;
  if (r0 >= Lc || c0 >= Lc || c0 > r0) return;
  const T* dhb = dh + g.row(bh, t0);
  const T* vb = v + g.row(bh, t0);
  const T* dn = den + bh * g.S + t0;
  const index_t D = g.D;
  T acc[4][4] = {};
  tile_mma<true, true>(
      acc, sh, 0, g.DH, [&](int r, index_t j) { return r0 + r < Lc ? dhb[(r0 + r) * D + j] / dn[r0 + r] : T(0); },
      [&](index_t j, int cc) { return c0 + cc < Lc ? vb[(c0 + cc) * D + j] : T(0); });
  const double* bc = bcum + bh * g.S + t0;
  const T* gi = ig + g.gate(bh, t0);
  T* dpc = dp + (bh * g.nc + c) * g.L * g.L;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t R = r0 + ty * 4 + i;
    if (R >= Lc) continue;
    const T mR = m[bh * g.S + t0 + R], dsR = ds[bh * g.S + t0 + R];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t C = c0 + tx * 4 + j;
      if (C >= Lc) continue;
      T val = T(0);
      if (C <= R) val = (acc[i][j] + dsR) * std::exp(T(bc[R] - bc[C]) + gi[C * g.NH] - mR);
      dpc[R * g.L + C] = val;
    }
  }
}

/// Grid (BH·nc, L tiles, DH tiles): δq̂ = δP k + α (δñ C^T + δs n^T) (C, n entering the chunk); writes
/// δq = δq̂ / sqrt(DH) and the per-tile row sums of δq̂ · q̂ (the row part of δ log D).
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_bwd_dq(Geo g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ dh,
             const T* __restrict__ dp, const T* __restrict__ alpha, const T* __restrict__ den,
             const T* __restrict__ ds, const T* __restrict__ states, const T* __restrict__ nstate,
             T* __restrict__ dq, double* __restrict__ part) {
  __shared__ TileShared<T> sh;
  __shared__ double red[kTile][17];
  const index_t bh = blockIdx.x / g.nc, c = blockIdx.x % g.nc;
  const index_t t0 = c * g.L, Lc = g.chunk_len(c), D = g.D, DH = g.DH, L = g.L;
  const index_t r0 = index_t(blockIdx.y) * kTile, i0 = index_t(blockIdx.z) * kTile;
  if (r0 >= Lc) return;
  const T* dpc = dp + (bh * g.nc + c) * L * L;
  const T* kb = k + g.row(bh, t0);
  const T* qb = q + g.row(bh, t0);
  const T* dhb = dh + g.row(bh, t0);
  const T* al = alpha + bh * g.S + t0;
  const T* dn = den + bh * g.S + t0;
  const T scale = T(1) / std::sqrt(T(DH));
  T acc[4][4] = {};
  const index_t kend = Lc < r0 + kTile ? Lc : r0 + kTile;
  tile_mma<true, false>(
      acc, sh, 0, kend, [&](int r, index_t cc) { return r0 + r < Lc ? dpc[(r0 + r) * L + cc] : T(0); },
      [&](index_t cc, int i) { return i0 + i < DH ? kb[cc * D + i0 + i] : T(0); });
  const T* Cs = states + (bh * g.nc + c) * DH * DH;
  const T* ns = nstate + (bh * g.nc + c) * DH;
  if (c > 0) {
    tile_mma<true, true>(
        acc, sh, 0, DH,
        [&](int r, index_t j) { return r0 + r < Lc ? al[r0 + r] * (dhb[(r0 + r) * D + j] / dn[r0 + r]) : T(0); },
        [&](index_t j, int i) { return i0 + i < DH ? Cs[(i0 + i) * DH + j] : T(0); });
  }
  T* dqb = dq + g.row(bh, t0);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  double p[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t R = r0 + ty * 4 + i;
    if (R >= Lc) continue;
    const T a = c > 0 ? al[R] * ds[bh * g.S + t0 + R] : T(0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t I = i0 + tx * 4 + j;
      if (I >= DH) continue;
      T val = acc[i][j];
      if (c > 0) val += a * ns[I];
      p[i] += double(val) * double(qb[R * D + I] * scale);
      dqb[R * D + I] = val * scale;
    }
  }
  const int rows = int(Lc - r0 < kTile ? Lc - r0 : kTile);
  tile_row_reduce(red, p, rows, [&](int r, double val) { part[(bh * g.S + t0 + r0 + r) * g.ntd + blockIdx.z] = val; });
}

/// Grid (BH, DH tiles, DH tiles), sequential over chunks c = nc-1 … 1: the reverse state after chunk c,
/// G_c = decay_c · G_{c+1} + Σ_{r in chunk c} α_r q̂_r δñ_r^T and r_c = decay_c · r_{c+1} + Σ_r δs_r α_r q̂_r
/// (scaled to M_{c-1}; the last chunk's decay is 0), into slot c. Overwrites the forward states, which k_bwd_dq has
/// finished reading. Same order of operations as the CPU cell's reverse sweep.
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_states_bwd(Geo g, const T* __restrict__ q, const T* __restrict__ dh, const T* __restrict__ alpha,
                 const T* __restrict__ den, const T* __restrict__ ds, const T* __restrict__ decay,
                 T* __restrict__ states, T* __restrict__ nstate) {
  __shared__ TileShared<T> sh;
  const index_t bh = blockIdx.x, DH = g.DH, D = g.D;
  const index_t i0 = index_t(blockIdx.y) * kTile, j0 = index_t(blockIdx.z) * kTile;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const bool carries_n = blockIdx.z == 0 && tid < kTile && i0 + tid < DH;
  const T scale = T(1) / std::sqrt(T(DH));
  T acc[4][4] = {};
  T nacc = 0;
  for (index_t c = g.nc - 1; c >= 1; --c) {
    const T dec = decay[bh * g.nc + c];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] *= dec;
    const index_t t0 = c * g.L, Lc = g.chunk_len(c);
    const T* qb = q + g.row(bh, t0);
    const T* dhb = dh + g.row(bh, t0);
    const T* al = alpha + bh * g.S + t0;
    const T* dn = den + bh * g.S + t0;
    tile_mma<false, false>(
        acc, sh, 0, Lc,
        [&](int i, index_t r) { return i0 + i < DH ? al[r] * (qb[r * D + i0 + i] * scale) : T(0); },
        [&](index_t r, int j) { return j0 + j < DH ? dhb[r * D + j0 + j] / dn[r] : T(0); });
    T* slot = states + (bh * g.nc + c) * DH * DH;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const index_t I = i0 + ty * 4 + i, J = j0 + tx * 4 + j;
        if (I < DH && J < DH) slot[I * DH + J] = acc[i][j];
      }
    if (carries_n) {
      const T* dsb = ds + bh * g.S + t0;
      nacc *= dec;
      for (index_t r = 0; r < Lc; ++r) nacc += dsb[r] * (al[r] * (qb[r * D + i0 + tid] * scale));
      nstate[(bh * g.nc + c) * DH + i0 + tid] = nacc;
    }
  }
}

/// Grid (BH·nc, L tiles, 2·DH tiles); z even: δk, z odd: δv, with G, r = the reverse state after chunk c+1:
///   δk = δP^T q̂ + β (v G^T + r^T),  δv = W^T δñ + β k G;
/// δk also gives the per-tile column sums δk·k (the column part of δ log D).
template <class T>
__global__ void __launch_bounds__(kThreads)
    k_bwd_dkv(Geo g, const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
              const T* __restrict__ dh, const T* __restrict__ W, const T* __restrict__ dp,
              const T* __restrict__ beta, const T* __restrict__ den, const T* __restrict__ states,
              const T* __restrict__ nstate, T* __restrict__ dk, T* __restrict__ dv, double* __restrict__ part) {
  __shared__ TileShared<T> sh;
  __shared__ double red[kTile][17];
  const index_t bh = blockIdx.x / g.nc, c = blockIdx.x % g.nc;
  const index_t t0 = c * g.L, Lc = g.chunk_len(c), D = g.D, DH = g.DH, L = g.L;
  const bool want_dk = blockIdx.z % 2 == 0;
  const index_t r0 = index_t(blockIdx.y) * kTile, i0 = index_t(blockIdx.z / 2) * kTile;
  if (r0 >= Lc) return;
  const bool has_g = c + 1 < g.nc;
  const T scale = T(1) / std::sqrt(T(DH));
  const T* qb = q + g.row(bh, t0);
  const T* kb = k + g.row(bh, t0);
  const T* vb = v + g.row(bh, t0);
  const T* dhb = dh + g.row(bh, t0);
  const T* dn = den + bh * g.S + t0;
  const T* be = beta + bh * g.S + t0;
  const T* Gs = states + (bh * g.nc + c + 1) * DH * DH;  // only read when has_g
  const T* rs = nstate + (bh * g.nc + c + 1) * DH;
  const T* tile = (want_dk ? dp : W) + (bh * g.nc + c) * L * L;
  T acc[4][4] = {};
  // Rows r' < r0 of the transposed tile are above the diagonal (zero): start the reduction at r0.
  if (want_dk) {
    tile_mma<false, false>(
        acc, sh, r0, Lc, [&](int r, index_t rp) { return r0 + r < Lc ? tile[rp * L + r0 + r] : T(0); },
        [&](index_t rp, int i) { return i0 + i < DH ? qb[rp * D + i0 + i] * scale : T(0); });
    if (has_g)
      tile_mma<true, true>(
          acc, sh, 0, DH, [&](int r, index_t j) { return r0 + r < Lc ? be[r0 + r] * vb[(r0 + r) * D + j] : T(0); },
          [&](index_t j, int i) { return i0 + i < DH ? Gs[(i0 + i) * DH + j] : T(0); });
  } else {
    tile_mma<false, false>(
        acc, sh, r0, Lc, [&](int r, index_t rp) { return r0 + r < Lc ? tile[rp * L + r0 + r] : T(0); },
        [&](index_t rp, int j) { return i0 + j < DH ? dhb[rp * D + i0 + j] / dn[rp] : T(0); });
    if (has_g)
      tile_mma<true, false>(
          acc, sh, 0, DH, [&](int r, index_t i) { return r0 + r < Lc ? be[r0 + r] * kb[(r0 + r) * D + i] : T(0); },
          [&](index_t i, int j) { return i0 + j < DH ? Gs[i * DH + i0 + j] : T(0); });
  }
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  T* out = (want_dk ? dk : dv) + g.row(bh, t0);
  double p[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const index_t R = r0 + ty * 4 + i;
    if (R >= Lc) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const index_t I = i0 + tx * 4 + j;
      if (I >= DH) continue;
      T val = acc[i][j];
      if (want_dk) {
        if (has_g) val += be[R] * rs[I];
        p[i] += double(val) * double(kb[R * D + I]);
      }
      out[R * D + I] = val;
    }
  }
  if (want_dk) {
    const int rows = int(Lc - r0 < kTile ? Lc - r0 : kTile);
    tile_row_reduce(red, p, rows,
                    [&](int r, double val) { part[(bh * g.S + t0 + r0 + r) * g.ntd + blockIdx.z / 2] = val; });
  }
}

/// One block per (bh, chunk): δF_t = δq̂_t·q̂_t - δk_t·k_t + δm_t - Σ_{i: a_i = t} δm_i and
/// δĩ_t = δk_t·k_t + Σ_{i: a_i = t} δm_i (spec §4.6 steps 5-6), in double. The argmax a_i of a row is either in
/// the row's own chunk (summed here) or the carried argmax A before the chunk; the latter rows' δm are summed into
/// X[chunk] and routed by k_bwd_gates_fix, so no atomics are needed. total[chunk] = Σ_t δF_t (before the fix).
template <class T>
__global__ void __launch_bounds__(kRowThreads)
    k_bwd_gates_chunk(Geo g, const T* __restrict__ dm, const index_t* __restrict__ arg,
                      const double* __restrict__ part_row, const double* __restrict__ part_col,
                      double* __restrict__ dF, double* __restrict__ dig_acc, double* __restrict__ total,
                      double* __restrict__ X) {
  const index_t bh = blockIdx.x / g.nc, c = blockIdx.x % g.nc;
  const index_t t0 = c * g.L, Lc = g.chunk_len(c);
  const index_t base = bh * g.S + t0;
  for (index_t r = threadIdx.x; r < Lc; r += blockDim.x) {
    const index_t idx = base + r;
    double rowdot = 0, coldot = 0;
    for (index_t j = 0; j < g.ntd; ++j) {
      rowdot += part_row[idx * g.ntd + j];
      coldot += part_col[idx * g.ntd + j];
    }
    double scat = 0;
    for (index_t i = r; i < Lc; ++i)
      if (arg[base + i] == t0 + r) scat += double(dm[base + i]);
    dF[idx] = rowdot - coldot + double(dm[idx]) - scat;
    dig_acc[idx] = coldot + scat;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double tot = 0, x = 0;
    for (index_t r = Lc - 1; r >= 0; --r) {
      tot += dF[base + r];
      if (arg[base + r] < t0) x += double(dm[base + r]);
    }
    total[bh * g.nc + c] = tot;
    X[bh * g.nc + c] = x;
  }
}

/// One thread per bh, sequential over chunks: routes X[c] to the carried argmax before chunk c.
template <class T>
__global__ void k_bwd_gates_fix(Geo g, const index_t* __restrict__ ca, const double* __restrict__ X,
                                       double* __restrict__ dF, double* __restrict__ dig_acc,
                                       double* __restrict__ total) {
  const index_t bh = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (bh >= g.BH) return;
  for (index_t c = 1; c < g.nc; ++c) {
    const double x = X[bh * g.nc + c];
    const index_t a = ca[bh * (g.nc + 1) + c];
    if (x == 0 || a < 0) continue;
    dig_acc[bh * g.S + a] += x;
    dF[bh * g.S + a] -= x;
    total[bh * g.nc + a / g.L] -= x;
  }
}

/// One thread per (bh, chunk): δ log σ(f̃_s) = Σ_{t>=s} δF_t (suffix of the later chunks' totals, then the
/// chunk's own reverse cumsum, in double); δf̃ = δ log σ(f̃) · σ(-f̃); δĩ written as T.
template <class T>
__global__ void k_bwd_gates_out(Geo g, const T* __restrict__ fg, const double* __restrict__ dF,
                                const double* __restrict__ dig_acc, const double* __restrict__ total,
                                T* __restrict__ dig, T* __restrict__ dfg) {
  const index_t idx = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= g.BH * g.nc) return;
  const index_t bh = idx / g.nc, c = idx % g.nc;
  const index_t t0 = c * g.L, Lc = g.chunk_len(c);
  double acc = 0;
  for (index_t cc = g.nc - 1; cc > c; --cc) acc += total[bh * g.nc + cc];
  for (index_t r = Lc - 1; r >= 0; --r) {
    const index_t t = t0 + r, gi = g.gate(bh, t);
    acc += dF[bh * g.S + t];
    dfg[gi] = T(acc) * ops::sigmoid(-fg[gi]);
    dig[gi] = T(dig_acc[bh * g.S + t]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Recurrent step (spec §4.4), one block per (b, h): thread j owns column j of C (coalesced), the CPU cell's
// order of summation per output is kept (h_j over i ascending; q·n sequential).

template <class T>
__global__ void k_step(T* __restrict__ h, T* __restrict__ C, T* __restrict__ n, T* __restrict__ m,
                       const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ ig, const T* __restrict__ fg, index_t DH) {
  __shared__ T qn_sh;
  const index_t bh = blockIdx.x, o = bh * DH;
  const T log_f = ops::log_sigmoid(fg[bh]);
  const T m_old = m[bh], igv = ig[bh];
  const T m_new = (log_f + m_old > igv) ? log_f + m_old : igv;
  const T f_act = std::exp(log_f + m_old - m_new);
  const T i_act = std::exp(igv - m_new);
  const T scale = T(1) / std::sqrt(T(DH));
  T* Cb = C + bh * DH * DH;
  for (index_t j = threadIdx.x; j < DH; j += blockDim.x) {
    const T vj = v[o + j];
    T hj = 0;
    for (index_t i = 0; i < DH; ++i) {
      const T ki = i_act * (k[o + i] * scale);
      const T cij = f_act * Cb[i * DH + j] + ki * vj;
      Cb[i * DH + j] = cij;
      hj += q[o + i] * cij;
    }
    h[o + j] = hj;
  }
  for (index_t i = threadIdx.x; i < DH; i += blockDim.x) n[o + i] = f_act * n[o + i] + i_act * (k[o + i] * scale);
  __syncthreads();
  if (threadIdx.x == 0) {
    T qn = 0;
    for (index_t i = 0; i < DH; ++i) qn += q[o + i] * n[o + i];
    qn_sh = qn;
    m[bh] = m_new;  // every thread has read m[bh] before the barrier above
  }
  __syncthreads();
  const T den = mlstm_denominator(qn_sh, m_new);
  for (index_t j = threadIdx.x; j < DH; j += blockDim.x) h[o + j] /= den;
}

inline unsigned grid_1d(index_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

}  // namespace detail::mlstm_cuda

/// The mLSTM cell kernel on the GPU: the CPU cell's interface with device pointers (T = float or double).
/// forward saves the row statistics m, s, the argmax a and the chunk scalars ([B, NH, S] and [B, NH, nc]);
/// backward recomputes the states and the score tiles. Workspace (grow-only, reused across calls): the
/// per-chunk states B·NH·nc·DH² plus two L×L tiles per chunk and O(B·NH·S) scalars.
template <class T>
class MLSTMCell<T, cuda> : public detail::MLSTMCellShape {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "MLSTMCell: T must be float or double");

 public:
  MLSTMCell(index_t num_heads, index_t head_dim, MLSTMForm form = MLSTMForm::automatic, index_t chunk_size = 64)
      : detail::MLSTMCellShape(num_heads, head_dim, form, chunk_size) {}

  /// Allocates the saved-statistics buffers for batch B, length S (no allocation in forward/backward when
  /// unchanged).
  void resize(index_t B, index_t S) {
    DISTILX_REQUIRE(shape_error, B >= 0 && S >= 0, "MLSTMCell::resize: B and S must be >= 0, got B=", B, " S=", S);
    const index_t L = chunk_length(S);
    if (B != B_ || S != S_ || L != saved_L_) {
      const index_t n = B * nh_ * S, nc = (S + L - 1) / L, nb = B * nh_ * (nc + 1);
      grow(m_, n), grow(s_, n), grow(alpha_, n), grow(beta_, n), grow(arg_, n), grow(bcum_, n);
      grow(cm_, nb), grow(ca_, nb), grow(decay_, B * nh_ * nc);
      B_ = B;
      S_ = S;
      saved_L_ = L;
      saved_valid_ = false;
    }
  }

  /// q, k, v: [B, S, NH*DH] (feature h*DH + j); igate, fgate (pre-activations): [B, S, NH]; h: [B, S, NH*DH].
  /// All device pointers, on cuda_backend::current_stream().
  void forward(T* h, const T* q, const T* k, const T* v, const T* igate, const T* fgate, index_t B, index_t S) {
    using namespace detail::mlstm_cuda;
    DISTILX_REQUIRE(shape_error, B >= 0 && S >= 0, "MLSTMCell::forward: B and S must be >= 0, got B=", B, " S=", S);
    resize(B, S);
    const index_t L = chunk_length(S);
    fwd_L_ = L;
    saved_valid_ = true;
    if (B * nh_ == 0 || S == 0) return;
    const Geo g = geo(B, S, L);
    cudaStream_t st = cuda_backend::current_stream();
    const index_t n = g.BH * S;
    grow(ibest_, n), grow(iarg_, n), grow(cg_, g.BH * g.nc), grow(cmu_, g.BH * g.nc), grow(camu_, g.BH * g.nc);
    grow(W_, g.BH * g.nc * L * L);
    grow_states(g);

    const dim3 chunks(unsigned(g.BH * g.nc)), tiles_ll = grid_ll(g), tiles_ld = grid_ld(g);
    const unsigned rows = grid_1d(n, kRowThreads);
    k_chunk_stats<T><<<chunks, kRowThreads, 0, st>>>(g, igate, fgate, bcum_.data(), ibest_.data(), iarg_.data(),
                                                     cg_.data(), cmu_.data(), camu_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    k_running_max<T><<<grid_1d(g.BH, 128), 128, 0, st>>>(g, cg_.data(), cmu_.data(), camu_.data(), cm_.data(),
                                                         ca_.data(), decay_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    k_row_coeffs<T><<<rows, kRowThreads, 0, st>>>(g, igate, bcum_.data(), cg_.data(), ibest_.data(), iarg_.data(),
                                                  cm_.data(), ca_.data(), m_.data(), arg_.data(), alpha_.data(),
                                                  beta_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    build_states(g, k, v);
    k_scores<T><<<tiles_ll, kThreads, 0, st>>>(g, q, k, igate, bcum_.data(), m_.data(), W_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    k_rowsum<T><<<rows, kRowThreads, 0, st>>>(g, q, W_.data(), alpha_.data(), nstate_.data(), s_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    k_output<T><<<tiles_ld, kThreads, 0, st>>>(g, q, v, W_.data(), alpha_.data(), states_.data(), s_.data(),
                                               m_.data(), h);
    DISTILX_CUDA_LAUNCH_CHECK();
  }

  /// Gradients of the scalar loss: writes (overwrites) dq, dk, dv [B,S,NH*DH], digate, dfgate [B,S,NH], given dh
  /// and the inputs of the last forward (same B, S). Device pointers; outputs must not alias the inputs.
  void backward(T* dq, T* dk, T* dv, T* digate, T* dfgate, const T* dh, const T* q, const T* k, const T* v,
                const T* igate, const T* fgate, index_t B, index_t S) {
    using namespace detail::mlstm_cuda;
    DISTILX_REQUIRE(error, saved_valid_, "MLSTMCell::backward: call forward first");
    DISTILX_REQUIRE(shape_error, B == B_ && S == S_, "MLSTMCell::backward: shape (B=", B, ", S=", S,
                    ") differs from the last forward (B=", B_, ", S=", S_, ")");
    if (B * nh_ == 0 || S == 0) return;
    const index_t L = fwd_L_;  // the chunking of the forward whose statistics are saved
    const Geo g = geo(B, S, L);
    cudaStream_t st = cuda_backend::current_stream();
    const index_t n = g.BH * S;
    grow(W_, g.BH * g.nc * L * L), grow(dp_, g.BH * g.nc * L * L);
    grow_states(g);
    grow(part_a_, n * g.ntd), grow(part_b_, n * g.ntd), grow(den_, n), grow(ds_, n), grow(dm_, n);
    grow(dF_, n), grow(dig_acc_, n), grow(total_, g.BH * g.nc), grow(X_, g.BH * g.nc);
    const dim3 chunks(unsigned(g.BH * g.nc)), tiles_ll = grid_ll(g), tiles_ld = grid_ld(g);
    const dim3 tiles_kv(unsigned(g.BH * g.nc), unsigned(g.ntl), unsigned(2 * g.ntd));
    const unsigned rows = grid_1d(n, kRowThreads);

    // Forward recomputation: states entering each chunk, score tiles W.
    build_states(g, k, v);
    k_scores<T><<<tiles_ll, kThreads, 0, st>>>(g, q, k, igate, bcum_.data(), m_.data(), W_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    // δñ = δh / den, δs, δm, δP.
    k_bwd_num<T><<<tiles_ld, kThreads, 0, st>>>(g, q, v, dh, W_.data(), alpha_.data(), states_.data(), s_.data(),
                                                m_.data(), part_a_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    k_bwd_rowstats<T><<<rows, kRowThreads, 0, st>>>(g, s_.data(), m_.data(), part_a_.data(), den_.data(), ds_.data(),
                                                    dm_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    k_bwd_dp<T><<<tiles_ll, kThreads, 0, st>>>(g, v, dh, igate, bcum_.data(), m_.data(), den_.data(), ds_.data(),
                                               dp_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    k_bwd_dq<T><<<tiles_ld, kThreads, 0, st>>>(g, q, k, dh, dp_.data(), alpha_.data(), den_.data(), ds_.data(),
                                               states_.data(), nstate_.data(), dq, part_a_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    // Reverse state G, r (replaces the forward states in place), then δk, δv.
    if (g.nc > 1) {
      k_states_bwd<T><<<grid_states(g), kThreads, 0, st>>>(g, q, dh, alpha_.data(), den_.data(), ds_.data(),
                                                           decay_.data(), states_.data(), nstate_.data());
      DISTILX_CUDA_LAUNCH_CHECK();
    }
    k_bwd_dkv<T><<<tiles_kv, kThreads, 0, st>>>(g, q, k, v, dh, W_.data(), dp_.data(), beta_.data(), den_.data(),
                                                states_.data(), nstate_.data(), dk, dv, part_b_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    // Gate gradients.
    k_bwd_gates_chunk<T><<<chunks, kRowThreads, 0, st>>>(g, dm_.data(), arg_.data(), part_a_.data(), part_b_.data(),
                                                         dF_.data(), dig_acc_.data(), total_.data(), X_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    k_bwd_gates_fix<T><<<grid_1d(g.BH, 128), 128, 0, st>>>(g, ca_.data(), X_.data(), dF_.data(), dig_acc_.data(),
                                                           total_.data());
    DISTILX_CUDA_LAUNCH_CHECK();
    k_bwd_gates_out<T><<<grid_1d(g.BH * g.nc, 128), 128, 0, st>>>(g, fgate, dF_.data(), dig_acc_.data(),
                                                                  total_.data(), digate, dfgate);
    DISTILX_CUDA_LAUNCH_CHECK();
  }

  /// Recurrent step (spec §4.4), device pointers: C [B,NH,DH,DH], n [B,NH,DH], m [B,NH] (zero-initialised by the
  /// caller), q, k, v [B, NH*DH], igate/fgate [B, NH]; writes h [B, NH*DH]; updates C, n, m.
  static void step(T* h, T* C, T* n, T* m, const T* q, const T* k, const T* v, const T* igate, const T* fgate,
                   index_t B, index_t NH, index_t DH) {
    using namespace detail::mlstm_cuda;
    const index_t BH = B * NH;
    if (BH == 0) return;
    const int threads = DH >= 256 ? 256 : int((DH + 31) / 32 * 32);
    cudaStream_t st = cuda_backend::current_stream();
    k_step<T><<<dim3(unsigned(BH)), threads, 0, st>>>(h, C, n, m, q, k, v, igate, fgate, DH);
    DISTILX_CUDA_LAUNCH_CHECK();
  }

 private:
  detail::mlstm_cuda::Geo geo(index_t B, index_t S, index_t L) const {
    detail::mlstm_cuda::Geo g;
    g.B = B, g.S = S, g.NH = nh_, g.DH = dh_, g.D = nh_ * dh_, g.L = L, g.nc = (S + L - 1) / L, g.BH = B * nh_;
    g.ntl = (L + detail::mlstm_cuda::kTile - 1) / detail::mlstm_cuda::kTile;
    g.ntd = (dh_ + detail::mlstm_cuda::kTile - 1) / detail::mlstm_cuda::kTile;
    return g;
  }
  static dim3 grid_ll(const detail::mlstm_cuda::Geo& g) {  // (chunk, L tile, L tile)
    return dim3(unsigned(g.BH * g.nc), unsigned(g.ntl), unsigned(g.ntl));
  }
  static dim3 grid_ld(const detail::mlstm_cuda::Geo& g) {  // (chunk, L tile, DH tile)
    return dim3(unsigned(g.BH * g.nc), unsigned(g.ntl), unsigned(g.ntd));
  }
  static dim3 grid_states(const detail::mlstm_cuda::Geo& g) {  // (bh, DH tile, DH tile)
    return dim3(unsigned(g.BH), unsigned(g.ntd), unsigned(g.ntd));
  }
  template <class U>
  static void grow(Buffer<U, cuda>& b, index_t n) {
    if (b.size() < n) b.resize(n);
  }
  /// One DH×DH state (and DH vector) per chunk; none is needed with a single chunk (parallel form).
  void grow_states(const detail::mlstm_cuda::Geo& g) {
    if (g.nc > 1) grow(states_, g.BH * g.nc * dh_ * dh_), grow(nstate_, g.BH * g.nc * dh_);
  }
  /// Phase 2: states_ / nstate_ slot c = C, n entering chunk c (c >= 1), from the saved β and decays.
  void build_states(const detail::mlstm_cuda::Geo& g, const T* k, const T* v) {
    using namespace detail::mlstm_cuda;
    cudaStream_t st = cuda_backend::current_stream();
    if (g.nc > 1) {
      k_states_fwd<T><<<grid_states(g), kThreads, 0, st>>>(g, k, v, beta_.data(), decay_.data(), states_.data(),
                                                           nstate_.data());
      DISTILX_CUDA_LAUNCH_CHECK();
    }
  }

  // Saved by forward for backward: [B, NH, S] (m, s, α, β, argmax, local cumsum b) and [B, NH, nc(+1)].
  Buffer<T, cuda> m_, s_, alpha_, beta_, cm_, decay_;
  Buffer<index_t, cuda> arg_, ca_;
  Buffer<double, cuda> bcum_;
  index_t B_ = -1, S_ = -1, saved_L_ = -1, fwd_L_ = 1;
  bool saved_valid_ = false;
  // Workspace.
  Buffer<T, cuda> ibest_, cmu_, W_, dp_, states_, nstate_, den_, ds_, dm_;
  Buffer<index_t, cuda> iarg_, camu_;
  Buffer<double, cuda> cg_, part_a_, part_b_, dF_, dig_acc_, total_, X_;
};

}  // namespace distilx
