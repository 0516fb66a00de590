// Causal grouped-query softmax attention, forward only (the frozen teacher's self-attention):
//   out[b,i,h] = sum_j softmax_j(scale * q[b,i,h] . k[b,j,g]) v[b,j,g],  g = h / (NH / NKV),
// over keys j <= i (i - j < window if set) whose key_mask is 1: HF's eager_attention_forward with
// repeat_kv and the causal / padding / sliding-window masks of masking_utils. Work goes per (batch,
// head) in query tiles, so at most q_tile x S scores exist per thread, never S x S for all heads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "distilx/backend/cpu/blas.hpp"
#include "distilx/core/error.hpp"

namespace distilx::ops {

/// Shape and masking of one causal attention call. q, out: [B, S, NH, DH]; k, v: [B, S, NKV, DH]
/// (row-major; consecutive positions are ld_* elements apart, NH*DH resp. NKV*DH when packed).
struct CausalAttentionShape {
  index_t B = 1, S = 1, NH = 1, NKV = 1, DH = 1;
  index_t window = 0;  ///< sliding window (keys with i - j >= window masked); 0 = unlimited
  index_t q_tile = 64; ///< queries per tile: the scratch per thread is q_tile x S scores
};

/// Number of threads the CPU attention uses (one score tile each).
inline index_t attention_threads(cpu) {
#ifdef _OPENMP
  return static_cast<index_t>(omp_get_max_threads());
#else
  return 1;
#endif
}

/// Scratch elements causal_attention_forward needs: one q_tile x S tile per thread.
inline index_t causal_attention_scratch_size(cpu be, const CausalAttentionShape& s) {
  return attention_threads(be) * std::max<index_t>(1, std::min(s.q_tile, s.S)) * s.S;
}

/// out = causal GQA attention(q, k, v). key_mask [B, S] (1 = real token, 0 = padding) may be null.
/// Rows whose every key is masked (a left-padding query) get zeros: HF returns an arbitrary finite
/// mix there, and callers must ignore padding positions anyway. scratch: at least
/// causal_attention_scratch_size elements (fewer threads are used when it holds fewer tiles).
template <class T>
void causal_attention_forward(cpu be, T* out, const T* q, const T* k, const T* v, const std::uint8_t* key_mask,
                              const CausalAttentionShape& s, T scale, T* scratch, index_t scratch_size) {
  const index_t B = s.B, S = s.S, NH = s.NH, NKV = s.NKV, DH = s.DH;
  DISTILX_REQUIRE(shape_error, NKV > 0 && NH % NKV == 0, "attention: num_attention_heads (", NH,
                  ") must be a multiple of num_key_value_heads (", NKV, ")");
  if (B == 0 || S == 0 || NH == 0) return;
  const index_t tq = std::max<index_t>(1, std::min(s.q_tile, S));
  const index_t per_thread = tq * S;
  DISTILX_REQUIRE(shape_error, scratch_size >= per_thread, "attention: scratch holds ", scratch_size,
                  " elements, need at least ", per_thread, " (q_tile ", tq, " x S ", S, ")");
  const index_t group = NH / NKV;
  const index_t ldq = NH * DH, ldk = NKV * DH;
  const index_t window = s.window;
  const int nthreads = static_cast<int>(std::min(scratch_size / per_thread, attention_threads(be)));
  const index_t tasks = B * NH;
  (void)nthreads;

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (tasks > 1 && nthreads > 1)
  for (index_t task = 0; task < tasks; ++task) {
#ifdef _OPENMP
    T* P = scratch + static_cast<index_t>(omp_get_thread_num()) * per_thread;
#else
    T* P = scratch;
#endif
    const index_t b = task / NH, h = task % NH, g = h / group;
    const std::uint8_t* mask = key_mask ? key_mask + b * S : nullptr;
    for (index_t i0 = 0; i0 < S; i0 += tq) {
      const index_t i1 = std::min(i0 + tq, S), rows = i1 - i0;
      // Keys any query of the tile may see: causal bound i1, window bound i0 - window + 1.
      const index_t k_lo = window > 0 ? std::max<index_t>(0, i0 - window + 1) : 0;
      const index_t nk = i1 - k_lo;
      const T* qt = q + (b * S + i0) * ldq + h * DH;  // [rows, DH], stride ldq
      const T* kt = k + (b * S + k_lo) * ldk + g * DH;  // [nk, DH], stride ldk
      const T* vt = v + (b * S + k_lo) * ldk + g * DH;
      // P[rows, nk] = scale * q k^T
      gemm(be, Trans::no, Trans::yes, rows, nk, DH, scale, qt, ldq, kt, ldk, T(0), P, nk);
      for (index_t r = 0; r < rows; ++r) {
        const index_t i = i0 + r;
        T* p = P + r * nk;
        const index_t j_lo = window > 0 ? std::max<index_t>(k_lo, i - window + 1) : k_lo;
        T mx = -std::numeric_limits<T>::infinity();
        for (index_t j = j_lo; j <= i; ++j)
          if (!mask || mask[j]) mx = std::max(mx, p[j - k_lo]);
        T sum = 0;
        for (index_t jj = 0; jj < nk; ++jj) {
          const index_t j = k_lo + jj;
          const bool keep = j >= j_lo && j <= i && (!mask || mask[j]);
          const T e = keep ? std::exp(p[jj] - mx) : T(0);
          p[jj] = e;
          sum += e;
        }
        // sum == 0 only when every key is masked; the row stays all zeros.
        const T inv = sum > T(0) ? T(1) / sum : T(0);
        for (index_t jj = 0; jj < nk; ++jj) p[jj] *= inv;
      }
      // out tile [rows, DH] = P [rows, nk] v [nk, DH]
      gemm(be, Trans::no, Trans::no, rows, DH, nk, T(1), P, nk, vt, ldk, T(0), out + (b * S + i0) * ldq + h * DH, ldq);
    }
  }
}

}  // namespace distilx::ops
