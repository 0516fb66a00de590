// Dense and headwise (block-diagonal) linear maps, PyTorch weight layout
// (out, in): y = x W^T (+ b). Backward accumulates weight/bias gradients into
// the caller's (flat) gradient buffer and writes or accumulates dx.
// Headwise: W (P, out/P, in/P), y[m,p,o] = sum_i x[m,p,i] W[p,o,i] (spec §2.4).
#pragma once

#include "distilx/backend/cpu/blas.hpp"

namespace distilx::ops {

/// y[M,N] = x[M,K] W[N,K]^T (+ b[N]). b may be null.
template <class T>
void linear_forward(cpu be, T* y, const T* x, const T* W, const T* b, index_t M, index_t K, index_t N) {
  gemm(be, Trans::no, Trans::yes, M, N, K, T(1), x, K, W, K, T(0), y, N);
  if (b) {
#pragma omp parallel for if (M * N > 65536)
    for (index_t m = 0; m < M; ++m)
      for (index_t n = 0; n < N; ++n) y[m * N + n] += b[n];
  }
}

/// dW[N,K] += dy^T x; db[N] += sum_m dy; dx[M,K] (= or +=) dy W. Any of dx, dW, db may be null.
template <class T>
void linear_backward(cpu be, T* dx, T* dW, T* db, const T* dy, const T* x, const T* W, index_t M, index_t K,
                     index_t N, bool accumulate_dx = false) {
  if (dW) gemm(be, Trans::yes, Trans::no, N, K, M, T(1), dy, N, x, K, T(1), dW, K);
  if (db)
    for (index_t m = 0; m < M; ++m)
      for (index_t n = 0; n < N; ++n) db[n] += dy[m * N + n];
  if (dx) gemm(be, Trans::no, Trans::no, M, K, N, T(1), dy, N, W, K, accumulate_dx ? T(1) : T(0), dx, K);
}

/// Block-diagonal linear: x [M, P*I], W [P, O, I] -> y [M, P*O].
/// Row strides ldx (default P*I) and ldy (default P*O) let callers read from / write into wider rows.
template <class T>
void headwise_forward(cpu be, T* y, const T* x, const T* W, index_t M, index_t P, index_t I, index_t O,
                      index_t ldy = -1, index_t ldx = -1) {
  if (ldy < 0) ldy = P * O;
  if (ldx < 0) ldx = P * I;
  for (index_t p = 0; p < P; ++p)
    gemm(be, Trans::no, Trans::yes, M, O, I, T(1), x + p * I, ldx, W + p * O * I, I, T(0), y + p * O, ldy);
}

/// dW += per block dy^T x; dx (= or +=) per block dy W. Strides as in headwise_forward (ldx for x and dx).
template <class T>
void headwise_backward(cpu be, T* dx, T* dW, const T* dy, const T* x, const T* W, index_t M, index_t P,
                       index_t I, index_t O, bool accumulate_dx = false, index_t ldy = -1, index_t ldx = -1) {
  if (ldy < 0) ldy = P * O;
  if (ldx < 0) ldx = P * I;
  for (index_t p = 0; p < P; ++p) {
    if (dW) gemm(be, Trans::yes, Trans::no, O, I, M, T(1), dy + p * O, ldy, x + p * I, ldx, T(1), dW + p * O * I, I);
    if (dx)
      gemm(be, Trans::no, Trans::no, M, I, O, T(1), dy + p * O, ldy, W + p * O * I, I, accumulate_dx ? T(1) : T(0),
           dx + p * I, ldx);
  }
}

/// Frozen LM head: logits[M,V] = h[M,d] E[V,d]^T.
template <class T>
void lm_head_forward(cpu be, T* logits, const T* h, const T* E, index_t M, index_t d, index_t V) {
  gemm(be, Trans::no, Trans::yes, M, V, d, T(1), h, d, E, d, T(0), logits, V);
}
/// Input gradient only: dh[M,d] (= or +=) dlogits[M,V] E[V,d].
template <class T>
void lm_head_backward(cpu be, T* dh, const T* dlogits, const T* E, index_t M, index_t d, index_t V,
                      bool accumulate = false) {
  gemm(be, Trans::no, Trans::no, M, d, V, T(1), dlogits, V, E, d, accumulate ? T(1) : T(0), dh, d);
}

}  // namespace distilx::ops
