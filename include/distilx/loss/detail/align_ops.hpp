// Row kernels of the hidden-state alignment (spec-distillation.md §3): masked differences of
// layer means, row scaling, and per-row cosine distance with its gradient. CPU overloads (a CUDA
// backend adds its own); per-row reductions go to an array the caller sums in order, so results
// do not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"

namespace distilx::ops {

/// D[m,:] = mean_i A_i[m,:] - mean_j B_j[m,:] on real rows and 0 on padding (mask[m] = 0);
/// row_sq[m] = ||D[m,:]||^2 in double. A: nA pointers, B: nB pointers, each [M, d].
template <class T>
void align_mean_diff(cpu, T* D, const T* const* A, index_t nA, const T* const* B, index_t nB,
                     const std::uint8_t* mask, index_t M, index_t d, double* row_sq) {
  const T ia = T(1) / T(nA), ib = T(1) / T(nB);
#pragma omp parallel for schedule(static) if (M * d * (nA + nB) > 65536)
  for (index_t m = 0; m < M; ++m) {
    T* out = D + m * d;  // [d]
    if (mask && !mask[m]) {
      std::fill(out, out + d, T(0));
      row_sq[m] = 0;
      continue;
    }
    double sq = 0;
    for (index_t k = 0; k < d; ++k) {
      T sa = T(0), sb = T(0);
      for (index_t i = 0; i < nA; ++i) sa += A[i][m * d + k];
      for (index_t j = 0; j < nB; ++j) sb += B[j][m * d + k];
      out[k] = sa * ia - sb * ib;
      sq += double(out[k]) * double(out[k]);
    }
    row_sq[m] = sq;
  }
}

/// y[i] = s * x[i] (y may alias x).
template <class T>
void align_scale(cpu, T* y, const T* x, T s, index_t n) {
#pragma omp parallel for schedule(static) if (n > 65536)
  for (index_t i = 0; i < n; ++i) y[i] = s * x[i];
}

/// y[m,:] *= row_scale[m].
template <class T>
void align_scale_rows(cpu, T* y, const double* row_scale, index_t M, index_t d) {
#pragma omp parallel for schedule(static) if (M * d > 65536)
  for (index_t m = 0; m < M; ++m) {
    const T s = T(row_scale[m]);
    for (index_t k = 0; k < d; ++k) y[m * d + k] *= s;
  }
}

/// Per real row m: t = mean_j B_j[m,:], c = cos(S[m,:], t), row_val[m] = 1 - c; when dS is not null,
/// dS[m,:] = coef * d(1 - c)/dS[m,:] = coef * (c s / |s|^2 - t / (|s| |t|)). A zero vector on either side
/// defines c = 0 with zero gradient (the cosine is undefined there). Padding rows: 0 and zero gradient.
template <class T>
void align_cosine_rows(cpu, T* dS, const T* S, const T* const* B, index_t nB, const std::uint8_t* mask, index_t M,
                       index_t d, T coef, double* row_val) {
  const T ib = T(1) / T(nB);
#pragma omp parallel for schedule(static) if (M * d * (nB + 1) > 65536)
  for (index_t m = 0; m < M; ++m) {
    const T* s = S + m * d;  // [d]
    T* ds = dS ? dS + m * d : nullptr;
    auto teacher = [&](index_t k) {
      T sum = T(0);
      for (index_t j = 0; j < nB; ++j) sum += B[j][m * d + k];
      return sum * ib;
    };
    if (mask && !mask[m]) {
      row_val[m] = 0;
      if (ds) std::fill(ds, ds + d, T(0));
      continue;
    }
    double st = 0, ss = 0, tt = 0;
    for (index_t k = 0; k < d; ++k) {
      const double sk = double(s[k]), tk = double(teacher(k));
      st += sk * tk;
      ss += sk * sk;
      tt += tk * tk;
    }
    if (ss == 0 || tt == 0) {
      row_val[m] = 1;
      if (ds) std::fill(ds, ds + d, T(0));
      continue;
    }
    const double ns = std::sqrt(ss), nt = std::sqrt(tt), c = st / (ns * nt);
    row_val[m] = 1 - c;
    if (ds) {
      const T a = T(c / ss), b = T(1 / (ns * nt));
      for (index_t k = 0; k < d; ++k) ds[k] = coef * (a * s[k] - b * teacher(k));
    }
  }
}

}  // namespace distilx::ops
