// Small elementwise and layout ops the blocks need besides the named layers:
// residual adds, column sums and the mLSTM output gate
// h = (h_norm + skip ⊙ xc) ⊙ SiLU(z) (spec-xlstm.md §4.1 step 5).
#pragma once

#include <cstring>

#include "distilx/ops/activations.hpp"

namespace distilx::ops {

/// y = a + b (y may alias a or b).
template <class T>
void add(cpu, T* y, const T* a, const T* b, index_t n) {
#pragma omp parallel for if (n > 65536)
  for (index_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}
/// y += a.
template <class T>
void add_inplace(cpu, T* y, const T* a, index_t n) {
#pragma omp parallel for if (n > 65536)
  for (index_t i = 0; i < n; ++i) y[i] += a[i];
}
template <class T>
void copy(cpu, T* y, const T* x, index_t n) {
  if (n) std::memcpy(y, x, sizeof(T) * n);
}
template <class T>
void fill_zero(cpu, T* y, index_t n) {
  if (n) std::memset(static_cast<void*>(y), 0, sizeof(T) * n);
}
/// y[n] += bias-style broadcast add: y[M,N] += b[N].
template <class T>
void add_row_vector(cpu, T* y, const T* b, index_t M, index_t N) {
  for (index_t m = 0; m < M; ++m)
    for (index_t n = 0; n < N; ++n) y[m * N + n] += b[n];
}
/// db[N] += sum over rows of dy[M,N].
template <class T>
void column_sum(cpu, T* db, const T* dy, index_t M, index_t N) {
  for (index_t m = 0; m < M; ++m)
    for (index_t n = 0; n < N; ++n) db[n] += dy[m * N + n];
}

/// mLSTM output: hs = hn + skip ⊙ xc (saved), out = hs ⊙ SiLU(z). Shapes [M, D], skip [D].
template <class T>
void mlstm_output_forward(cpu, T* out, T* hs, const T* hn, const T* skip, const T* xc, const T* z, index_t M,
                          index_t D) {
#pragma omp parallel for if (M * D > 65536)
  for (index_t m = 0; m < M; ++m)
    for (index_t j = 0; j < D; ++j) {
      const index_t i = m * D + j;
      hs[i] = hn[i] + skip[j] * xc[i];
      out[i] = hs[i] * Silu::f(z[i]);
    }
}
/// dhn = dout ⊙ SiLU(z); dz = dout ⊙ hs ⊙ SiLU'(z); dxc += dhn ⊙ skip; dskip += Σ_m dhn ⊙ xc.
template <class T>
void mlstm_output_backward(cpu, T* dhn, T* dz, T* dxc, T* dskip, const T* dout, const T* hs, const T* skip,
                           const T* xc, const T* z, index_t M, index_t D) {
#pragma omp parallel for if (M * D > 65536)
  for (index_t m = 0; m < M; ++m)
    for (index_t j = 0; j < D; ++j) {
      const index_t i = m * D + j;
      dhn[i] = dout[i] * Silu::f(z[i]);
      dz[i] = dout[i] * hs[i] * Silu::df(z[i]);
      dxc[i] += dhn[i] * skip[j];
    }
  for (index_t m = 0; m < M; ++m)
    for (index_t j = 0; j < D; ++j) dskip[j] += dhn[m * D + j] * xc[m * D + j];
}

}  // namespace distilx::ops
