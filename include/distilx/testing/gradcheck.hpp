// Central finite-difference gradient checks (double precision), shipped so
// users can check their own policies. The error is norm-based per checked
// tensor: ||g_fd - g_analytic|| / ||g_fd|| over the checked entries, which is
// robust to entries whose gradient is (near) zero. The derivative is the
// fourth-order central stencil (f(x-2h) - 8f(x-h) + 8f(x+h) - f(x+2h)) / 12h, so
// functions with large higher derivatives (exponential gates) still check to 1e-6.
#pragma once

#include <algorithm>
#include <cmath>
#include <functional>
#include <vector>

#include "distilx/core/config.hpp"
#include "distilx/core/rng.hpp"

namespace distilx::testing {

struct GradCheckResult {
  double rel_error = 0;   // ||fd - an|| / max(||fd||, tiny)
  double max_abs_fd = 0;  // largest |fd| seen (to tell a vacuous check)
  index_t checked = 0;
};

/// Checks d loss / d x[i] for up to max_checks entries of x (all if n <= max_checks,
/// else a seeded random subset). `loss` is re-evaluated after perturbing x in place;
/// x is restored exactly afterwards. `grad` holds the analytic gradient. A tensor whose
/// gradient is zero (both ways, below `zero_floor` in norm) compares absolutely.
inline GradCheckResult check_gradient(const std::function<double()>& loss, double* x, const double* grad, index_t n,
                                      index_t max_checks = 64, double h = 1e-4, std::uint64_t seed = 7,
                                      double zero_floor = 1e-8) {
  std::vector<index_t> idx;
  if (n <= max_checks) {
    for (index_t i = 0; i < n; ++i) idx.push_back(i);
  } else {
    Rng rng(seed);
    for (index_t k = 0; k < max_checks; ++k) idx.push_back(static_cast<index_t>(rng.below(n)));
  }
  double num = 0, den = 0;
  GradCheckResult r;
  for (index_t i : idx) {
    const double saved = x[i];
    auto at = [&](double delta) {
      x[i] = saved + delta;
      return loss();
    };
    const double fd = (at(-2 * h) - 8 * at(-h) + 8 * at(h) - at(2 * h)) / (12 * h);
    x[i] = saved;
    num += (fd - grad[i]) * (fd - grad[i]);
    den += fd * fd;
    r.max_abs_fd = std::max(r.max_abs_fd, std::abs(fd));
    ++r.checked;
  }
  r.rel_error = std::sqrt(num) / std::max(std::sqrt(den), zero_floor);
  return r;
}

/// Fills x with N(0, std^2) from a seeded stream.
template <class T>
void fill_normal(T* x, index_t n, Rng& rng, double std = 1.0) {
  for (index_t i = 0; i < n; ++i) x[i] = static_cast<T>(rng.normal() * std);
}
template <class T>
void fill_uniform(T* x, index_t n, Rng& rng, double lo, double hi) {
  for (index_t i = 0; i < n; ++i) x[i] = static_cast<T>(rng.uniform(lo, hi));
}

/// sum_i a[i] * b[i] in double: the scalar "loss" <y, G> used by the checks.
template <class T, class U>
double dot(const T* a, const U* b, index_t n) {
  double s = 0;
  for (index_t i = 0; i < n; ++i) s += double(a[i]) * double(b[i]);
  return s;
}

}  // namespace distilx::testing
