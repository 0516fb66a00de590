// CUDA overloads of the trainer hooks declared in backend/memory.hpp.
#pragma once

#include "distilx/backend/cuda/blas.cuh"
#include "distilx/backend/tags.hpp"

namespace distilx::ops {
/// The parameters changed: 16-bit copies of non-frozen GEMM operands must be rebuilt.
inline void parameters_updated(cuda) {}
/// Registers weights for the 16-bit operand cache of the bf16 / fp16 math modes.
template <class T>
void cache_operands(cuda, const T* /*p*/, index_t /*n*/, bool /*frozen*/) {}
}  // namespace distilx::ops
