// Matrix products for the CPU backend through Eigen (row-major maps with
// leading dimensions). Eigen parallelises large products with OpenMP when the
// build enables it; Eigen types never leave this header.
#pragma once

#include <chrono>

#include <Eigen/Core>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"

namespace distilx::ops {

enum class Trans { no, yes };

/// Opt-in accounting of time spent in matrix products (for bench/: the share of a
/// step spent in GEMMs). Off by default. Calls made from inside an OpenMP parallel
/// region (the mLSTM cell's per-head tiles) are not counted, so the counters never race.
struct GemmStats {
  bool enabled = false;
  double seconds = 0;
  double flops = 0;
  long calls = 0;
  void reset() { seconds = flops = 0; calls = 0; }
};
inline GemmStats& gemm_stats() {
  static GemmStats s;
  return s;
}

/// C[M,N] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions.
/// op(A) is [M,K], op(B) is [K,N].
template <class T>
void gemm(cpu, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda,
          const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using CMap = Eigen::Map<const Mat, Eigen::Unaligned, Eigen::OuterStride<>>;
  using MMap = Eigen::Map<Mat, Eigen::Unaligned, Eigen::OuterStride<>>;
  if (M == 0 || N == 0) return;
  GemmStats& st = gemm_stats();
#ifdef _OPENMP
  const bool account = st.enabled && !omp_in_parallel();
#else
  const bool account = st.enabled;
#endif
  const auto t0 = account ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  MMap c(C, M, N, Eigen::OuterStride<>(ldc));
  if (K == 0) {
    if (beta == T(0)) c.setZero(); else c *= beta;
    return;
  }
  const index_t ar = ta == Trans::no ? M : K, ac = ta == Trans::no ? K : M;
  const index_t br = tb == Trans::no ? K : N, bc = tb == Trans::no ? N : K;
  CMap a(A, ar, ac, Eigen::OuterStride<>(lda));
  CMap b(B, br, bc, Eigen::OuterStride<>(ldb));
  if (beta == T(0)) c.setZero();
  else if (beta != T(1)) c *= beta;
  if (ta == Trans::no && tb == Trans::no) c.noalias() += alpha * a * b;
  else if (ta == Trans::no) c.noalias() += alpha * a * b.transpose();
  else if (tb == Trans::no) c.noalias() += alpha * a.transpose() * b;
  else c.noalias() += alpha * a.transpose() * b.transpose();
  if (account) {
    st.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    st.flops += 2.0 * double(M) * double(N) * double(K);
    ++st.calls;
  }
}

}  // namespace distilx::ops
