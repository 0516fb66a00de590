// Shared by the CUDA test suites.
#pragma once

#include <vector>

#include "distilx/cuda.cuh"
#include "distilx/testing/gradcheck.hpp"

namespace distilx::testing {

/// Sets the process-wide math mode for one scope and restores the previous one at its end (a
/// failed check must not leak a 16-bit mode into the next test).
class MathModeScope {
 public:
  explicit MathModeScope(cuda_backend::MathMode m) : saved_(cuda_backend::math_mode()) { cuda_backend::set_math_mode(m); }
  ~MathModeScope() { cuda_backend::set_math_mode(saved_); }
  MathModeScope(const MathModeScope&) = delete;
  MathModeScope& operator=(const MathModeScope&) = delete;

 private:
  cuda_backend::MathMode saved_;
};

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

/// Backward through both students from the same random gradients of the final hidden state
/// (N(0, 0.01^2)) and of every block output (N(0, 0.001^2)), drawn from rng; the students must have
/// run forward on [M = B*S] rows. Leaves each student's parameter gradients in grads().
inline void backward_twins(Student<float>& cpu_s, Student<float, distilx::cuda>& gpu_s, index_t M, Rng& rng) {
  const index_t d = cpu_s.config().embedding_dim, L = cpu_s.config().num_blocks;
  std::vector<float> dh(static_cast<std::size_t>(M * d));
  fill_normal(dh.data(), M * d, rng, 1e-2);
  std::vector<std::vector<float>> db(static_cast<std::size_t>(L), std::vector<float>(dh.size()));
  for (auto& v : db) fill_normal(v.data(), M * d, rng, 1e-3);
  Buffer<float, distilx::cuda> d_dh(M * d);
  d_dh.copy_from_host(dh.data(), M * d);
  std::vector<Buffer<float, distilx::cuda>> d_db;
  std::vector<const float*> cpu_ptr, gpu_ptr;
  for (auto& v : db) {
    d_db.emplace_back(M * d);
    d_db.back().copy_from_host(v.data(), M * d);
    cpu_ptr.push_back(v.data());
  }
  for (auto& b : d_db) gpu_ptr.push_back(b.data());
  cpu_s.zero_grad();
  gpu_s.zero_grad();
  cpu_s.backward(dh.data(), &cpu_ptr);
  gpu_s.backward(d_dh.data(), &gpu_ptr);
}

}  // namespace distilx::testing
