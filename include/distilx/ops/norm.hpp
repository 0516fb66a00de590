// Normalisations. LayerNorm and MultiHeadLayerNorm of NX-AI xLSTM share one
// kernel: per row of M rows, G groups of C channels are each normalised
// (biased variance, eps) and scaled by (1 + w) (spec-xlstm.md §2.1-§2.2), no
// bias. G = 1 is the plain LayerNorm. RMSNorm (teacher, HF Llama/Qwen2):
// y = x / sqrt(mean(x^2) + eps) * w, statistics in the compute type.
#pragma once

#include <cmath>

#include "distilx/backend/memory.hpp"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"

namespace distilx::ops {

/// x, y: [M, G*C]; w: [G*C] (effective scale 1 + w); mean, rstd: [M*G] saved for backward.
template <class T>
void group_layernorm_forward(cpu, T* y, T* mean, T* rstd, const T* x, const T* w, index_t M, index_t G, index_t C,
                             T eps) {
#pragma omp parallel for if (M * G * C > 65536)
  for (index_t r = 0; r < M * G; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    const T* wr = w + (r % G) * C;
    T mu = 0;
    for (index_t c = 0; c < C; ++c) mu += xr[c];
    mu /= T(C);
    T var = 0;
    for (index_t c = 0; c < C; ++c) var += (xr[c] - mu) * (xr[c] - mu);
    var /= T(C);
    const T rs = T(1) / std::sqrt(var + eps);
    for (index_t c = 0; c < C; ++c) yr[c] = (xr[c] - mu) * rs * (T(1) + wr[c]);
    mean[r] = mu;
    rstd[r] = rs;
  }
}

/// dx (= or +=); dw += sum over rows of dy * xhat.
template <class T>
void group_layernorm_backward(cpu, T* dx, T* dw, const T* dy, const T* x, const T* w, const T* mean, const T* rstd,
                              index_t M, index_t G, index_t C, bool accumulate_dx = false) {
#pragma omp parallel for if (M * G * C > 65536)
  for (index_t r = 0; r < M * G; ++r) {
    const T* xr = x + r * C;
    const T* dyr = dy + r * C;
    T* dxr = dx + r * C;
    const T* wr = w + (r % G) * C;
    const T mu = mean[r], rs = rstd[r];
    T sum_g = 0, sum_gx = 0;
    for (index_t c = 0; c < C; ++c) {
      const T g = dyr[c] * (T(1) + wr[c]);
      const T xh = (xr[c] - mu) * rs;
      sum_g += g;
      sum_gx += g * xh;
    }
    sum_g /= T(C);
    sum_gx /= T(C);
    for (index_t c = 0; c < C; ++c) {
      const T g = dyr[c] * (T(1) + wr[c]);
      const T xh = (xr[c] - mu) * rs;
      const T v = rs * (g - sum_g - xh * sum_gx);
      dxr[c] = accumulate_dx ? dxr[c] + v : v;
    }
  }
  if (dw) {
    // Serial over rows: deterministic summation order, independent of thread count.
    for (index_t r = 0; r < M * G; ++r) {
      const T* xr = x + r * C;
      const T* dyr = dy + r * C;
      T* dwr = dw + (r % G) * C;
      const T mu = mean[r], rs = rstd[r];
      for (index_t c = 0; c < C; ++c) dwr[c] += dyr[c] * (xr[c] - mu) * rs;
    }
  }
}

template <class T>
void layernorm_forward(cpu be, T* y, T* mean, T* rstd, const T* x, const T* w, index_t M, index_t C, T eps) {
  group_layernorm_forward(be, y, mean, rstd, x, w, M, index_t{1}, C, eps);
}
template <class T>
void layernorm_backward(cpu be, T* dx, T* dw, const T* dy, const T* x, const T* w, const T* mean, const T* rstd,
                        index_t M, index_t C, bool accumulate_dx = false) {
  group_layernorm_backward(be, dx, dw, dy, x, w, mean, rstd, M, index_t{1}, C, accumulate_dx);
}

/// RMSNorm (Llama/Qwen2): y = x * rsqrt(mean(x^2) + eps) * w. rstd [M] may be null.
template <class T>
void rmsnorm_forward(cpu, T* y, T* rstd, const T* x, const T* w, index_t M, index_t C, T eps) {
#pragma omp parallel for if (M * C > 65536)
  for (index_t r = 0; r < M; ++r) {
    const T* xr = x + r * C;
    T* yr = y + r * C;
    T ss = 0;
    for (index_t c = 0; c < C; ++c) ss += xr[c] * xr[c];
    const T rs = T(1) / std::sqrt(ss / T(C) + eps);
    for (index_t c = 0; c < C; ++c) yr[c] = (xr[c] * rs) * w[c];
    if (rstd) rstd[r] = rs;
  }
}

/// RMSNorm whose output only feeds products (gemm and the ops built on it: linear_forward,
/// qkv_forward, gated_mlp_forward) for as long as the returned object lives, without rstd. The
/// CPU writes y exactly as rmsnorm_forward does. A backend with 16-bit products may instead write
/// y in its operand format and serve it to those products (the CUDA backend in bf16 / fp16): the
/// floats in y are then not meaningful, so nothing but products may read y in that scope.
template <class T>
OperandRegistration rmsnorm_forward_for_products(cpu be, T* y, const T* x, const T* w, index_t M, index_t C, T eps) {
  rmsnorm_forward(be, y, static_cast<T*>(nullptr), x, w, M, C, eps);
  return {};
}

}  // namespace distilx::ops
