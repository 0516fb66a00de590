// Backend tags. Ops are overloaded on the tag (first argument) and found by
// argument-dependent lookup in distilx::ops, so a backend added later (CUDA)
// supplies its own overloads without touching cells, blocks or models.
#pragma once

#include <type_traits>

namespace distilx {
namespace ops {
/// Host backend: Eigen for matrix products, plain loops elsewhere. Scalars: float, double.
struct cpu {
  static constexpr const char* name = "cpu";
};
/// CUDA backend (distilx/cuda.cuh). Declared here so host code can name it.
struct cuda {
  static constexpr const char* name = "cuda";
};
}  // namespace ops

using ops::cpu;
using ops::cuda;

template <class B>
inline constexpr bool is_backend_v = std::is_same_v<B, cpu> || std::is_same_v<B, cuda>;

}  // namespace distilx
