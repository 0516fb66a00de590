// Matrix products for the CUDA backend through cuBLAS: one handle per host thread,
// bound to cuda_backend::current_stream() at every call, and the row-major
// ops::gemm / ops::gemm_strided_batched overloads for the cuda tag (float, double).
// Math mode (MathMode): fp32 by default, so float results track the CPU to ~1e-6; tf32, bf16
// and fp16 trade precision for tensor-core speed (docs/cuda.md, "Precision").
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <type_traits>

#include "distilx/backend/cpu/blas.hpp"  // ops::Trans, shared with the CPU backend
#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/cuda/memory.cuh"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"

namespace distilx::cuda_backend {

/// How float products run. fp32: exact FP32 (default). tf32: TF32 tensor cores. bf16 / fp16:
/// operands rounded to 16 bits, products accumulated and written in fp32 (mixed precision).
/// Kernels with tensor-core paths (e.g. the teacher's attention) follow the same mode.
enum class MathMode { fp32, tf32, bf16, fp16 };

inline const char* to_string(MathMode m) {
  switch (m) {
    case MathMode::fp32: return "fp32";
    case MathMode::tf32: return "tf32";
    case MathMode::bf16: return "bf16";
    case MathMode::fp16: return "fp16";
  }
  return "?";
}

namespace detail {
inline std::atomic<MathMode>& math_mode_flag() {
  static std::atomic<MathMode> m{MathMode::fp32};
  return m;
}

/// A host thread's cuBLAS handle with the stream and math mode last applied to it, so the
/// per-call rebinding costs nothing when neither changed.
class BlasHandle {
 public:
  BlasHandle() = default;
  BlasHandle(const BlasHandle&) = delete;
  BlasHandle& operator=(const BlasHandle&) = delete;
  // Errors are ignored: this runs at thread exit, where throwing would terminate.
  ~BlasHandle() {
    if (h_) (void)cublasDestroy(h_);
  }
  cublasHandle_t get(bool want_tf32) {
    if (!h_) {
      DISTILX_CUBLAS_CHECK(cublasCreate(&h_));
      DISTILX_CUBLAS_CHECK(cublasSetStream(h_, current_stream()));
      stream_ = current_stream();
      DISTILX_CUBLAS_CHECK(cublasSetMathMode(h_, CUBLAS_DEFAULT_MATH));
      tf32_ = false;
    }
    if (stream_ != current_stream()) {
      DISTILX_CUBLAS_CHECK(cublasSetStream(h_, current_stream()));
      stream_ = current_stream();
    }
    if (tf32_ != want_tf32) {
      DISTILX_CUBLAS_CHECK(cublasSetMathMode(h_, want_tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
      tf32_ = want_tf32;
    }
    return h_;
  }

 private:
  cublasHandle_t h_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool tf32_ = false;
};

inline cublasOperation_t to_cublas(ops::Trans t) { return t == ops::Trans::yes ? CUBLAS_OP_T : CUBLAS_OP_N; }

/// C[r, c] *= beta (beta == 0 writes exact zeros, as BLAS does) on a row-major [rows, cols] with ldc.
template <class T>
__global__ void scale_matrix_kernel(T* C, index_t rows, index_t cols, index_t ldc, T beta) {
  const index_t n = rows * cols;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    T* c = C + (i / cols) * ldc + i % cols;
    *c = beta == T(0) ? T(0) : *c * beta;
  }
}
}  // namespace detail

/// Process-wide math mode for float products; takes effect at the next gemm of every thread.
inline void set_math_mode(MathMode m) { detail::math_mode_flag().store(m); }
inline MathMode math_mode() { return detail::math_mode_flag().load(); }

/// Shorthand: TF32 tensor cores on (~1e-3 relative error instead of ~1e-6) or back to fp32.
inline void set_tf32(bool on) { set_math_mode(on ? MathMode::tf32 : MathMode::fp32); }
inline bool tf32_enabled() { return math_mode() == MathMode::tf32; }

/// This thread's cuBLAS handle, bound to current_stream(). float calls also get the TF32 mode.
inline cublasHandle_t cublas_handle(bool float_math = false) {
  thread_local detail::BlasHandle h;
  return h.get(float_math && tf32_enabled());
}

}  // namespace distilx::cuda_backend

namespace distilx::ops {

/// C[M,N] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions (same
/// contract as gemm(cpu, ...)). cuBLAS is column-major, where a row-major matrix reads as its
/// transpose, so it computes C^T = op(B)^T op(A)^T: the operands swap and keep their flags.
template <class T>
void gemm(cuda, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda, const T* B,
          index_t ldb, T beta, T* C, index_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "gemm(cuda): float or double");
  if (M == 0 || N == 0) return;
  if (K == 0) {  // cuBLAS rejects lda < 1 for an empty inner dimension; BLAS semantics: C = beta C
    if (beta == T(1)) return;
    const index_t n = M * N;
    const int grid = static_cast<int>(std::min<index_t>((n + 255) / 256, 4096));
    cuda_backend::detail::scale_matrix_kernel<<<grid, 256, 0, cuda_backend::current_stream()>>>(C, M, N, ldc, beta);
    DISTILX_CUDA_LAUNCH_CHECK();
    return;
  }
  const cublasOperation_t oa = cuda_backend::detail::to_cublas(ta), ob = cuda_backend::detail::to_cublas(tb);
  if constexpr (std::is_same_v<T, float>) {
    DISTILX_CUBLAS_CHECK(cublasSgemm_64(cuda_backend::cublas_handle(true), ob, oa, N, M, K, &alpha, B, ldb, A, lda,
                                        &beta, C, ldc));
  } else {
    DISTILX_CUBLAS_CHECK(
        cublasDgemm_64(cuda_backend::cublas_handle(), ob, oa, N, M, K, &alpha, B, ldb, A, lda, &beta, C, ldc));
  }
}

/// batch independent products C_i = alpha op(A_i) op(B_i) + beta C_i with X_i = X + i * strideX
/// (row-major, as gemm). Used for headwise (block-diagonal) layers: one launch for all heads.
/// The C_i may interleave (e.g. column blocks of one wide row) but must not share elements.
template <class T>
void gemm_strided_batched(cuda, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A,
                          index_t lda, index_t stride_a, const T* B, index_t ldb, index_t stride_b, T beta, T* C,
                          index_t ldc, index_t stride_c, index_t batch) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "gemm_strided_batched(cuda): float or double");
  if (M == 0 || N == 0 || batch == 0) return;
  if (K == 0) {
    for (index_t i = 0; i < batch; ++i)
      gemm(cuda{}, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C + i * stride_c, ldc);
    return;
  }
  const cublasOperation_t oa = cuda_backend::detail::to_cublas(ta), ob = cuda_backend::detail::to_cublas(tb);
  if constexpr (std::is_same_v<T, float>) {
    DISTILX_CUBLAS_CHECK(cublasSgemmStridedBatched_64(cuda_backend::cublas_handle(true), ob, oa, N, M, K, &alpha, B,
                                                      ldb, stride_b, A, lda, stride_a, &beta, C, ldc, stride_c, batch));
  } else {
    DISTILX_CUBLAS_CHECK(cublasDgemmStridedBatched_64(cuda_backend::cublas_handle(), ob, oa, N, M, K, &alpha, B, ldb,
                                                      stride_b, A, lda, stride_a, &beta, C, ldc, stride_c, batch));
  }
}

}  // namespace distilx::ops
