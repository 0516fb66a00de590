// Compositions of ops that a backend may fuse: the frozen teacher's attention input projections and
// its gated MLP with the residual add. On the CPU they are the plain sequences below; the CUDA
// backend (backend/cuda/teacher_ops.cuh) converts the shared input to 16 bits once for all of a
// layer's products and, for the MLP, keeps the [M, F] intermediate in 16 bits between the GEMMs
// (the bf16 / fp16 math modes), so the widest activation of the teacher never exists in fp32.
#pragma once

#include "distilx/backend/cpu/blas.hpp"
#include "distilx/ops/activations.hpp"
#include "distilx/ops/linear.hpp"

namespace distilx::ops {

namespace detail {
// The unfused sequences, for any backend whose linear_forward, gated_forward and gemm overloads
// are declared before this header (the CUDA backend's fallback uses them too).
template <class Be, class T>
void qkv_forward_unfused(Be be, T* q, T* k, T* v, const T* x, const T* wq, const T* bq, const T* wk, const T* bk,
                         const T* wv, const T* bv, index_t M, index_t d, index_t nq, index_t nkv) {
  linear_forward(be, q, x, wq, bq, M, d, nq);
  linear_forward(be, k, x, wk, bk, M, d, nkv);
  linear_forward(be, v, x, wv, bv, M, d, nkv);
}
template <class Act, class Be, class T>
void gated_mlp_forward_unfused(Be be, T* x, const T* xn, const T* wg, const T* bg, const T* wu, const T* bu,
                               const T* wd, index_t M, index_t d, index_t F, T* gate, T* up) {
  linear_forward(be, gate, xn, wg, bg, M, d, F);
  linear_forward(be, up, xn, wu, bu, M, d, F);
  gated_forward<Act>(be, gate, gate, up, M * F);
  gemm(be, Trans::no, Trans::yes, M, d, F, T(1), gate, F, wd, F, T(1), x, d);
}
}  // namespace detail

/// q[M, nq] = x Wq^T (+ bq), k[M, nkv] = x Wk^T (+ bk), v[M, nkv] = x Wv^T (+ bv); x [M, d].
/// Biases may be null.
template <class T>
void qkv_forward(cpu be, T* q, T* k, T* v, const T* x, const T* wq, const T* bq, const T* wk, const T* bk,
                 const T* wv, const T* bv, index_t M, index_t d, index_t nq, index_t nkv) {
  detail::qkv_forward_unfused(be, q, k, v, x, wq, bq, wk, bk, wv, bv, M, d, nq, nkv);
}

/// x[M, d] += (Act(xn Wg^T + bg) * (xn Wu^T + bu)) Wd^T: a gated MLP (SwiGLU with Act = Silu) and
/// its residual add; a down-projection bias is the caller's. xn [M, d]; Wg, Wu [F, d]; Wd [d, F];
/// gate and up are scratch [M, F] each (overwritten; their contents afterwards are unspecified).
template <class Act, class T>
void gated_mlp_forward(cpu be, T* x, const T* xn, const T* wg, const T* bg, const T* wu, const T* bu, const T* wd,
                       index_t M, index_t d, index_t F, T* gate, T* up) {
  detail::gated_mlp_forward_unfused<Act>(be, x, xn, wg, bg, wu, bu, wd, M, d, F, gate, up);
}

}  // namespace distilx::ops
