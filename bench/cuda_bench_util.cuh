// Shared by the CUDA benchmarks: wall-clock timing of device work.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <functional>

#include "distilx/backend/cuda/check.cuh"

namespace distilx::bench {

/// Mean milliseconds per call of f over iters calls, the device drained before and after.
inline double wall_ms(const std::function<void()>& f, int iters) {
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) f();
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters;
}

/// The same after one untimed warm-up call (allocations, operand cache, cuBLAS heuristics).
inline double time_ms(const std::function<void()>& f, int iters) {
  f();
  return wall_ms(f, iters);
}

}  // namespace distilx::bench
