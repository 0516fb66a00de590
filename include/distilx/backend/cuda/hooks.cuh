// CUDA overloads of the trainer hooks declared in backend/memory.hpp: they connect trainers
// (the Distiller) to the 16-bit operand cache of blas.cuh.
#pragma once

#include <type_traits>

#include "distilx/backend/cuda/blas.cuh"
#include "distilx/backend/memory.hpp"
#include "distilx/backend/tags.hpp"

namespace distilx::ops {

/// The parameters changed: 16-bit copies of non-frozen GEMM operands must be rebuilt.
inline void parameters_updated(cuda) { cuda_backend::invalidate_cached_operands(); }

/// Registers float weights with the operand cache for as long as the result lives. A range
/// that overlaps one registered already (e.g. by the caller) is left to that registration.
template <class T>
OperandRegistration cache_operands(cuda, const T* p, index_t n, bool frozen) {
  if constexpr (!std::is_same_v<T, float>) {
    return {};  // double products are always exact
  } else {
    if (!p || n <= 0) return {};
    try {
      cuda_backend::cache_operands(p, n, frozen);
    } catch (const error&) {
      return {};  // overlaps an existing registration
    }
    return OperandRegistration([p] { cuda_backend::uncache_operands(p); });
  }
}

}  // namespace distilx::ops
