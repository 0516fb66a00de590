// Causal grouped-query softmax attention, forward only (the frozen teacher's self-attention):
//   out[b,i,h] = sum_j softmax_j(scale * q[b,i,h] . k[b,j,g]) v[b,j,g],  g = h / (NH / NKV),
// over keys j <= i (i - j < window if set) whose key_mask is 1: HF's eager_attention_forward with
// repeat_kv and the causal / padding / sliding-window masks of masking_utils. Work goes per (batch,
// head) in query tiles, so at most q_tile x S scores exist per thread, never S x S for all heads.
// With RoPE tables the op rotates q and k itself as it reads them (HF applies
// apply_rotary_pos_emb to q and k right before the attention), so no rotated copy of q and k is
// written back: the CUDA kernels rotate while staging their tiles.
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
#include "distilx/ops/rope.hpp"

namespace distilx::ops {

/// Shape and masking of one causal attention call. q, out: [B, S, NH, DH]; k, v: [B, S, NKV, DH]
/// (row-major; consecutive positions are ld_* elements apart, NH*DH resp. NKV*DH when packed).
struct CausalAttentionShape {
  index_t B = 1, S = 1, NH = 1, NKV = 1, DH = 1;
  index_t window = 0;  ///< sliding window (keys with i - j >= window masked); 0 = unlimited
  index_t q_tile = 64; ///< queries per tile: the scratch per thread is q_tile x S scores
  bool rope = false;   ///< q and k are rotated in the op (AttentionRope tables given); sizes the scratch
};

/// RoPE inside the attention: cos/sin tables [B * S, DH / 2] of rope_cos_sin, row b * S + i for
/// position i of sequence b; q and k are rotated as rope_forward would (HF's rotate_half layout).
/// Both null: q and k are used as given.
template <class T>
struct AttentionRope {
  const T* cos = nullptr;
  const T* sin = nullptr;
  explicit operator bool() const { return cos != nullptr; }
};

/// Number of threads the CPU attention uses (one score tile each).
inline index_t attention_threads(cpu) {
#ifdef _OPENMP
  return static_cast<index_t>(omp_get_max_threads());
#else
  return 1;
#endif
}

namespace detail {
/// Scratch of one CPU attention thread: a q_tile x S score tile, and with RoPE the rotated query
/// tile [q_tile, DH] and keys [S, DH] of the (batch, head) it works on.
inline index_t attention_scratch_per_thread(const CausalAttentionShape& s, bool rope) {
  const index_t tq = std::max<index_t>(1, std::min(s.q_tile, s.S));
  return tq * s.S + (rope ? (tq + s.S) * s.DH : 0);
}
}  // namespace detail

/// Scratch elements causal_attention_forward needs: one q_tile x S tile per thread (and the
/// rotated q tile and keys when s.rope).
inline index_t causal_attention_scratch_size(cpu be, const CausalAttentionShape& s) {
  return attention_threads(be) * detail::attention_scratch_per_thread(s, s.rope);
}

/// out = causal GQA attention(q, k, v). key_mask [B, S] (1 = real token, 0 = padding) may be null.
/// Rows whose every key is masked (a left-padding query) get zeros: HF returns an arbitrary finite
/// mix there, and callers must ignore padding positions anyway. scratch: at least
/// causal_attention_scratch_size elements (fewer threads are used when it holds fewer tiles).
/// rope: see AttentionRope (then s.rope must be set, for the scratch size; DH even).
template <class T>
void causal_attention_forward(cpu be, T* out, const T* q, const T* k, const T* v, const std::uint8_t* key_mask,
                              const CausalAttentionShape& s, T scale, T* scratch, index_t scratch_size,
                              AttentionRope<T> rope = {}) {
  const index_t B = s.B, S = s.S, NH = s.NH, NKV = s.NKV, DH = s.DH;
  DISTILX_REQUIRE(shape_error, NKV > 0 && NH % NKV == 0, "attention: num_attention_heads (", NH,
                  ") must be a multiple of num_key_value_heads (", NKV, ")");
  DISTILX_REQUIRE(shape_error, !rope || (s.rope && DH % 2 == 0 && rope.sin != nullptr),
                  "attention: RoPE tables need both cos and sin, an even head dim (got ", DH,
                  ") and CausalAttentionShape::rope set (it sizes the scratch)");
  if (B == 0 || S == 0 || NH == 0) return;
  const index_t tq = std::max<index_t>(1, std::min(s.q_tile, S));
  const index_t per_thread = detail::attention_scratch_per_thread(s, static_cast<bool>(rope));
  DISTILX_REQUIRE(shape_error, scratch_size >= per_thread, "attention: scratch holds ", scratch_size,
                  " elements, need at least ", per_thread, " (q_tile ", tq, " x S ", S,
                  rope ? " scores, and the rotated q tile and keys)" : ")");
  const index_t half = DH / 2;
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
    T* Qr = P + tq * S;  // with RoPE: rotated query tile [tq, DH] and keys [S, DH]
    T* Kr = Qr + tq * DH;
    if (rope)
      for (index_t j = 0; j < S; ++j)
        rope_rotate_row(Kr + j * DH, k + (b * S + j) * ldk + g * DH, rope.cos + (b * S + j) * half,
                        rope.sin + (b * S + j) * half, half);
    for (index_t i0 = 0; i0 < S; i0 += tq) {
      const index_t i1 = std::min(i0 + tq, S), rows = i1 - i0;
      // Keys any query of the tile may see: causal bound i1, window bound i0 - window + 1.
      const index_t k_lo = window > 0 ? std::max<index_t>(0, i0 - window + 1) : 0;
      const index_t nk = i1 - k_lo;
      const T* qt = q + (b * S + i0) * ldq + h * DH;  // [rows, DH], stride qld
      const T* kt = k + (b * S + k_lo) * ldk + g * DH;  // [nk, DH], stride kld
      index_t qld = ldq, kld = ldk;
      if (rope) {
        for (index_t r = 0; r < rows; ++r)
          rope_rotate_row(Qr + r * DH, qt + r * ldq, rope.cos + (b * S + i0 + r) * half,
                          rope.sin + (b * S + i0 + r) * half, half);
        qt = Qr;
        kt = Kr + k_lo * DH;
        qld = kld = DH;
      }
      const T* vt = v + (b * S + k_lo) * ldk + g * DH;
      // P[rows, nk] = scale * q k^T
      gemm(be, Trans::no, Trans::yes, rows, nk, DH, scale, qt, qld, kt, kld, T(0), P, nk);
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
