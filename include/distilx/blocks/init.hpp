// NX-AI xLSTM initialisers (spec-xlstm.md §5): small_init(dim) = N(0, 2/(5 dim)),
// wang_init(dim, n) = N(0, (2 / (n sqrt(dim)))^2), linspace, constants.
#pragma once

#include <cmath>

#include "distilx/core/rng.hpp"

namespace distilx::init {

inline double small_init_std(index_t dim) { return std::sqrt(2.0 / (5.0 * double(dim))); }
inline double wang_init_std(index_t dim, index_t num_blocks) { return 2.0 / (double(num_blocks) * std::sqrt(double(dim))); }

template <class T>
void normal(T* x, index_t n, double std, Rng& rng) {
  for (index_t i = 0; i < n; ++i) x[i] = static_cast<T>(std * rng.normal());
}
template <class T>
void uniform(T* x, index_t n, double lo, double hi, Rng& rng) {
  for (index_t i = 0; i < n; ++i) x[i] = static_cast<T>(rng.uniform(lo, hi));
}
template <class T>
void constant(T* x, index_t n, double v) {
  for (index_t i = 0; i < n; ++i) x[i] = static_cast<T>(v);
}
/// linspace(start, end, n), as torch.linspace (n == 1 gives start).
template <class T>
void linspace(T* x, index_t n, double start, double end) {
  for (index_t i = 0; i < n; ++i) x[i] = static_cast<T>(n == 1 ? start : start + (end - start) * double(i) / double(n - 1));
}

}  // namespace distilx::init
