// Compositions of ops that a backend may fuse: the frozen teacher's attention input projections and
// its gated MLP with the residual add, and the mLSTM block's input / forget gate pre-activations.
// On the CPU they are the plain sequences below. For the teacher the CUDA backend
// (backend/cuda/teacher_ops.cuh) converts the shared input to 16 bits once for all of a layer's
// products and, for the MLP, keeps the [M, F] intermediate in 16 bits between the GEMMs (the bf16 /
// fp16 math modes), so the widest activation of the teacher never exists in fp32. For the gates
// (backend/cuda/mlstm_gates.cuh) one pass over q, k, v produces both gates, and one pass in the
// backward updates dq, dk, dv and both weight gradients, instead of a thin GEMM per gate and part.
#pragma once

#include "distilx/backend/cpu/blas.hpp"
#include "distilx/ops/activations.hpp"
#include "distilx/ops/elementwise.hpp"
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
// One gate of the mLSTM block without materialising [q | k | v]: out[M, NH] = q W[:, 0:D]^T +
// k W[:, D:2D]^T + v W[:, 2D:3D]^T + b, W [NH, 3D] row-major.
template <class Be, class T>
void mlstm_gate_forward_unfused(Be be, T* out, const T* q, const T* k, const T* v, const T* W, const T* b, index_t M,
                                index_t NH, index_t D) {
  gemm(be, Trans::no, Trans::yes, M, NH, D, T(1), q, D, W, 3 * D, T(0), out, NH);
  gemm(be, Trans::no, Trans::yes, M, NH, D, T(1), k, D, W + D, 3 * D, T(1), out, NH);
  gemm(be, Trans::no, Trans::yes, M, NH, D, T(1), v, D, W + 2 * D, 3 * D, T(1), out, NH);
  add_row_vector(be, out, b, M, NH);
}
// Its backward: d{q,k,v} += dgate W[:, part]; dW[:, part] += dgate^T part; db += column sums.
template <class Be, class T>
void mlstm_gate_backward_unfused(Be be, T* dq, T* dk, T* dv, const T* dgate, T* dW, T* db, const T* q, const T* k,
                                 const T* v, const T* W, index_t M, index_t NH, index_t D) {
  const T* parts[3] = {q, k, v};
  T* dparts[3] = {dq, dk, dv};
  for (int i = 0; i < 3; ++i) {
    gemm(be, Trans::no, Trans::no, M, D, NH, T(1), dgate, NH, W + i * D, 3 * D, T(1), dparts[i], D);
    gemm(be, Trans::yes, Trans::no, NH, D, M, T(1), dgate, NH, parts[i], D, T(1), dW + i * D, 3 * D);
  }
  column_sum(be, db, dgate, M, NH);
}
template <class Be, class T>
void mlstm_gates_forward_unfused(Be be, T* ig, T* fg, const T* q, const T* k, const T* v, const T* Wi, const T* bi,
                                 const T* Wf, const T* bf, index_t M, index_t NH, index_t D) {
  mlstm_gate_forward_unfused(be, ig, q, k, v, Wi, bi, M, NH, D);
  mlstm_gate_forward_unfused(be, fg, q, k, v, Wf, bf, M, NH, D);
}
template <class Be, class T>
void mlstm_gates_backward_unfused(Be be, T* dq, T* dk, T* dv, const T* dig, const T* dfg, T* dWi, T* dbi, T* dWf,
                                  T* dbf, const T* q, const T* k, const T* v, const T* Wi, const T* Wf, index_t M,
                                  index_t NH, index_t D) {
  mlstm_gate_backward_unfused(be, dq, dk, dv, dig, dWi, dbi, q, k, v, Wi, M, NH, D);
  mlstm_gate_backward_unfused(be, dq, dk, dv, dfg, dWf, dbf, q, k, v, Wf, M, NH, D);
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

/// The mLSTM block's gate pre-activations, both gates from one read of q, k, v [M, D] each:
/// ig[M, NH] = [q | k | v] Wi^T + bi and fg[M, NH] = [q | k | v] Wf^T + bf, with Wi, Wf [NH, 3D]
/// row-major and the concatenation never formed.
template <class T>
void mlstm_gates_forward(cpu be, T* ig, T* fg, const T* q, const T* k, const T* v, const T* Wi, const T* bi,
                         const T* Wf, const T* bf, index_t M, index_t NH, index_t D) {
  detail::mlstm_gates_forward_unfused(be, ig, fg, q, k, v, Wi, bi, Wf, bf, M, NH, D);
}

/// Backward of mlstm_gates_forward from dig, dfg [M, NH]; everything accumulates:
/// d{q,k,v} += dig Wi[:, part] + dfg Wf[:, part], dWi += dig^T [q | k | v], dbi += column sums of
/// dig (likewise dWf, dbf from dfg).
template <class T>
void mlstm_gates_backward(cpu be, T* dq, T* dk, T* dv, const T* dig, const T* dfg, T* dWi, T* dbi, T* dWf, T* dbf,
                          const T* q, const T* k, const T* v, const T* Wi, const T* Wf, index_t M, index_t NH,
                          index_t D) {
  detail::mlstm_gates_backward_unfused(be, dq, dk, dv, dig, dfg, dWi, dbi, dWf, dbf, q, k, v, Wi, Wf, M, NH, D);
}

}  // namespace distilx::ops
