// Shared by the CUDA test suites.
#pragma once

#include <vector>

#include "distilx/cuda.cuh"

namespace distilx::testing {

/// A CPU and a GPU student with the same weights: cpu_s.init(5), then every parameter moved by
/// N(0, 0.02^2) noise from rng (so R = 0 and the other special init values carry signal), the
/// embedding and head copied. rng continues from there for the test's inputs.
inline void make_twin_students(Student<float>& cpu_s, Student<float, distilx::cuda>& gpu_s, Rng& rng) {
  cpu_s.init(5);
  std::vector<float> p = cpu_s.params_to_host();
  for (auto& x : p) x += static_cast<float>(0.02 * rng.normal());
  cpu_s.set_params(p.data());
  gpu_s.set_params(p.data());
  gpu_s.set_embedding(cpu_s.embedding_to_host().data());
  gpu_s.set_head(cpu_s.head_to_host().data());
}

}  // namespace distilx::testing
