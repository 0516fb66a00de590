// Depthwise causal conv1d (spec-xlstm.md §2.3): per channel f,
// y_t[f] = b[f] + sum_j W[f,j] x_{t-K+1+j}[f], x_{<0} = 0; W stored (F,1,K).
// Layout: x, y [B, T, F] (channels fastest).
#pragma once

#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"

namespace distilx::ops {

template <class T>
void causal_conv1d_forward(cpu, T* y, const T* x, const T* W, const T* b, index_t B, index_t S, index_t F, index_t K) {
#pragma omp parallel for collapse(2) if (B * S * F * K > 65536)
  for (index_t bi = 0; bi < B; ++bi)
    for (index_t t = 0; t < S; ++t) {
      T* yr = y + (bi * S + t) * F;
      for (index_t f = 0; f < F; ++f) yr[f] = b ? b[f] : T(0);
      for (index_t j = 0; j < K; ++j) {
        const index_t s = t - K + 1 + j;
        if (s < 0) continue;
        const T* xr = x + (bi * S + s) * F;
        for (index_t f = 0; f < F; ++f) yr[f] += W[f * K + j] * xr[f];
      }
    }
}

/// dx (= or +=); dW, db accumulate (deterministic order). Any may be null.
template <class T>
void causal_conv1d_backward(cpu, T* dx, T* dW, T* db, const T* dy, const T* x, const T* W, index_t B, index_t S,
                            index_t F, index_t K, bool accumulate_dx = false) {
  if (dx) {
#pragma omp parallel for collapse(2) if (B * S * F * K > 65536)
    for (index_t bi = 0; bi < B; ++bi)
      for (index_t s = 0; s < S; ++s) {
        T* dxr = dx + (bi * S + s) * F;
        if (!accumulate_dx)
          for (index_t f = 0; f < F; ++f) dxr[f] = T(0);
        for (index_t j = 0; j < K; ++j) {
          const index_t t = s + K - 1 - j;
          if (t >= S) continue;
          const T* dyr = dy + (bi * S + t) * F;
          for (index_t f = 0; f < F; ++f) dxr[f] += W[f * K + j] * dyr[f];
        }
      }
  }
  for (index_t bi = 0; bi < B; ++bi)
    for (index_t t = 0; t < S; ++t) {
      const T* dyr = dy + (bi * S + t) * F;
      if (db)
        for (index_t f = 0; f < F; ++f) db[f] += dyr[f];
      if (dW)
        for (index_t j = 0; j < K; ++j) {
          const index_t s = t - K + 1 + j;
          if (s < 0) continue;
          const T* xr = x + (bi * S + s) * F;
          for (index_t f = 0; f < F; ++f) dW[f * K + j] += dyr[f] * xr[f];
        }
    }
}

/// One generation step. buf [B, K, F] is a rolling window whose last row becomes x_t;
/// y_t = b + sum_j buf[j] * W[:, j].
template <class T>
void causal_conv1d_step(cpu, T* y, T* buf, const T* x, const T* W, const T* b, index_t B, index_t F, index_t K) {
  for (index_t bi = 0; bi < B; ++bi) {
    T* bb = buf + bi * K * F;
    for (index_t j = 0; j + 1 < K; ++j)
      for (index_t f = 0; f < F; ++f) bb[j * F + f] = bb[(j + 1) * F + f];
    for (index_t f = 0; f < F; ++f) bb[(K - 1) * F + f] = x[bi * F + f];
    for (index_t f = 0; f < F; ++f) {
      T acc = b ? b[f] : T(0);
      for (index_t j = 0; j < K; ++j) acc += bb[j * F + f] * W[f * K + j];
      y[bi * F + f] = acc;
    }
  }
}

}  // namespace distilx::ops
