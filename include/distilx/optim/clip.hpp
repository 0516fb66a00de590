// Gradient post-processing on the flat gradient buffer: global L2-norm clipping with
// torch.nn.utils.clip_grad_norm_ semantics, a NaN/Inf detector for skipping bad steps,
// and averaging of accumulated micro-batch gradients. Reductions and scaling are
// ops overloaded on the backend tag (sum_squares, scale, all_finite).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "distilx/backend/memory.hpp"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"

namespace distilx {
namespace ops {

/// Σ x², accumulated in double whatever T is (float sums over ~1e8 gradients lose digits).
template <class T>
double sum_squares(cpu, const T* x, index_t n) {
  double acc = 0;
#pragma omp parallel for reduction(+ : acc) if (n > 65536)
  for (index_t i = 0; i < n; ++i) {
    const double xi = static_cast<double>(x[i]);
    acc += xi * xi;
  }
  return acc;
}

/// x ← alpha·x.
template <class T>
void scale(cpu, T* x, T alpha, index_t n) {
#pragma omp parallel for if (n > 65536)
  for (index_t i = 0; i < n; ++i) x[i] *= alpha;
}

namespace detail {
/// Exponent-bits test instead of std::isfinite, so the check survives -ffast-math /
/// -ffinite-math-only, under which the compiler may fold isfinite to true.
template <class T>
inline bool finite_bits(T x) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "finite_bits: float or double");
  if constexpr (std::is_same_v<T, float>) {
    std::uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return (u & 0x7f800000u) != 0x7f800000u;
  } else {
    std::uint64_t u;
    std::memcpy(&u, &x, sizeof u);
    return (u & 0x7ff0000000000000ull) != 0x7ff0000000000000ull;
  }
}
}  // namespace detail

/// True iff no element is NaN or ±Inf.
template <class T>
bool all_finite(cpu, const T* x, index_t n) {
  index_t bad = 0;
  // Counting instead of returning early keeps the loop parallel and branch-free.
#pragma omp parallel for reduction(+ : bad) if (n > 65536)
  for (index_t i = 0; i < n; ++i) bad += detail::finite_bits(x[i]) ? 0 : 1;
  return bad == 0;
}

}  // namespace ops

/// Global L2 norm of g[0..n), accumulated in double.
template <class T, class Backend>
double grad_norm(Backend be, const T* g, index_t n) {
  return std::sqrt(ops::sum_squares(be, g, n));
}

/// torch.nn.utils.clip_grad_norm_ (norm_type 2) over one flat buffer: with
/// total = ‖g‖₂ and coef = max_norm / (total + 1e-6), g is scaled by coef when coef < 1.
/// Returns the pre-clip norm. A non-finite norm is returned as is and g is left untouched
/// (torch would multiply everything by NaN); callers skip such steps (see all_finite).
/// Padding entries are zero, so they add nothing to the norm and stay zero.
template <class T, class Backend>
double clip_grad_norm(Backend be, T* g, index_t n, double max_norm) {
  DISTILX_REQUIRE(config_error, max_norm > 0, "clip_grad_norm: max_norm must be > 0, got ", max_norm);
  const double total = grad_norm(be, g, n);
  if (!std::isfinite(total)) return total;
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) ops::scale(be, g, static_cast<T>(coef), n);
  return total;
}
template <class T, class Backend>
double clip_grad_norm(Buffer<T, Backend>& g, double max_norm) {
  return clip_grad_norm(Backend{}, g.data(), g.size(), max_norm);
}

/// Whether every gradient is finite; the trainer skips the optimizer step when not.
template <class T, class Backend>
bool all_finite(Backend be, const T* g, index_t n) {
  return ops::all_finite(be, g, n);
}
template <class T, class Backend>
bool all_finite(const Buffer<T, Backend>& g) {
  return ops::all_finite(Backend{}, g.data(), g.size());
}

/// Gradient accumulation: backward() adds the gradients of accum_steps micro-batches whose
/// losses are per-micro-batch means; dividing the sum by accum_steps gives the gradient of
/// the mean loss over the whole batch. Call once, before clipping and the optimizer step.
template <class T, class Backend>
void average_accumulated_grads(Backend be, T* g, index_t n, index_t accum_steps) {
  DISTILX_REQUIRE(config_error, accum_steps >= 1, "average_accumulated_grads: accum_steps must be >= 1, got ",
                  accum_steps);
  if (accum_steps > 1) ops::scale(be, g, static_cast<T>(1.0 / static_cast<double>(accum_steps)), n);
}
template <class T, class Backend>
void average_accumulated_grads(Buffer<T, Backend>& g, index_t accum_steps) {
  average_accumulated_grads(Backend{}, g.data(), g.size(), accum_steps);
}

}  // namespace distilx
