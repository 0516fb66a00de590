// Error checking for the CUDA backend: every CUDA runtime / cuBLAS call goes
// through DISTILX_CUDA_CHECK / DISTILX_CUBLAS_CHECK (file, line, error string),
// and DISTILX_CUDA_LAUNCH_CHECK() follows every kernel launch (synchronising in
// debug builds so a fault is reported at its launch). Kernels never throw.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <mutex>

#include "distilx/core/error.hpp"

namespace distilx {

/// A CUDA or cuBLAS call failed.
class cuda_error : public error {
 public:
  using error::error;
};

namespace detail {
[[noreturn]] inline void cuda_fail(cudaError_t e, const char* expr, const char* file, int line) {
  throw cuda_error(concat("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ") in ", expr, " at ", file,
                          ":", line));
}
[[noreturn]] inline void cublas_fail(cublasStatus_t s, const char* expr, const char* file, int line) {
  throw cuda_error(concat("cuBLAS error ", cublasGetStatusName(s), " (", cublasGetStatusString(s), ") in ", expr, " at ",
                          file, ":", line));
}
}  // namespace detail

}  // namespace distilx

#define DISTILX_CUDA_CHECK(expr)                                                   \
  do {                                                                             \
    const cudaError_t distilx_e_ = (expr);                                         \
    if (distilx_e_ != cudaSuccess) ::distilx::detail::cuda_fail(distilx_e_, #expr, __FILE__, __LINE__); \
  } while (0)

#define DISTILX_CUBLAS_CHECK(expr)                                                  \
  do {                                                                              \
    const cublasStatus_t distilx_s_ = (expr);                                       \
    if (distilx_s_ != CUBLAS_STATUS_SUCCESS) ::distilx::detail::cublas_fail(distilx_s_, #expr, __FILE__, __LINE__); \
  } while (0)

#ifndef NDEBUG
#define DISTILX_CUDA_LAUNCH_CHECK()                  \
  do {                                               \
    DISTILX_CUDA_CHECK(cudaGetLastError());          \
    DISTILX_CUDA_CHECK(cudaDeviceSynchronize());     \
  } while (0)
#else
#define DISTILX_CUDA_LAUNCH_CHECK() DISTILX_CUDA_CHECK(cudaGetLastError())
#endif

namespace distilx::cuda_backend::detail {
/// Compute capability major version of the current device (cached per device).
inline int device_cc_major() {
  int dev = 0;
  DISTILX_CUDA_CHECK(cudaGetDevice(&dev));
  static std::mutex mu;
  static int cached[64];
  static bool known[64] = {};
  std::lock_guard<std::mutex> lk(mu);
  if (dev < 0 || dev >= 64) {
    int v = 0;
    DISTILX_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev));
    return v;
  }
  if (!known[dev]) {
    DISTILX_CUDA_CHECK(cudaDeviceGetAttribute(&cached[dev], cudaDevAttrComputeCapabilityMajor, dev));
    known[dev] = true;
  }
  return cached[dev];
}
}  // namespace distilx::cuda_backend::detail
