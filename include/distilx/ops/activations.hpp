// Pointwise activations as DISTILX_HOST_DEVICE functors shared by every
// backend, plus CPU forward/backward loops. GELU is the exact erf form
// (PyTorch approximate='none'); log-sigmoid uses the stable
// min(x,0) - log1p(exp(-|x|)) form (spec-xlstm.md §0).
#pragma once

#include <cmath>

#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"

namespace distilx::ops {

template <class T>
DISTILX_HOST_DEVICE inline T sigmoid(T x) {
  return x >= T(0) ? T(1) / (T(1) + std::exp(-x)) : std::exp(x) / (T(1) + std::exp(x));
}
template <class T>
DISTILX_HOST_DEVICE inline T log_sigmoid(T x) {
  return (x < T(0) ? x : T(0)) - std::log1p(std::exp(-std::abs(x)));
}

struct Silu {
  template <class T>
  DISTILX_HOST_DEVICE static T f(T x) { return x * sigmoid(x); }
  template <class T>
  DISTILX_HOST_DEVICE static T df(T x) {
    const T s = sigmoid(x);
    return s * (T(1) + x * (T(1) - s));
  }
};

struct Gelu {
  template <class T>
  DISTILX_HOST_DEVICE static T f(T x) { return T(0.5) * x * (T(1) + std::erf(x * T(0.70710678118654752440))); }
  template <class T>
  DISTILX_HOST_DEVICE static T df(T x) {
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
    const T pdf = std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
    return cdf + x * pdf;
  }
};

struct LogSigmoid {
  template <class T>
  DISTILX_HOST_DEVICE static T f(T x) { return log_sigmoid(x); }
  template <class T>
  DISTILX_HOST_DEVICE static T df(T x) { return sigmoid(-x); }
};

enum class Activation { gelu, silu, log_sigmoid };

/// y = act(x) elementwise (y may alias x).
template <class Act, class T>
void act_forward(cpu, T* y, const T* x, index_t n) {
#pragma omp parallel for if (n > 65536)
  for (index_t i = 0; i < n; ++i) y[i] = Act::f(x[i]);
}
/// dx (=, or += when accumulate) dy * act'(x).
template <class Act, class T>
void act_backward(cpu, T* dx, const T* dy, const T* x, index_t n, bool accumulate = false) {
#pragma omp parallel for if (n > 65536)
  for (index_t i = 0; i < n; ++i) {
    const T g = dy[i] * Act::df(x[i]);
    dx[i] = accumulate ? dx[i] + g : g;
  }
}

/// y = act(g) * a (gated unit). g, a, y: [n].
template <class Act, class T>
void gated_forward(cpu, T* y, const T* g, const T* a, index_t n) {
#pragma omp parallel for if (n > 65536)
  for (index_t i = 0; i < n; ++i) y[i] = Act::f(g[i]) * a[i];
}
template <class Act, class T>
void gated_backward(cpu, T* dg, T* da, const T* dy, const T* g, const T* a, index_t n) {
#pragma omp parallel for if (n > 65536)
  for (index_t i = 0; i < n; ++i) {
    dg[i] = dy[i] * a[i] * Act::df(g[i]);
    da[i] = dy[i] * Act::f(g[i]);
  }
}

}  // namespace distilx::ops
