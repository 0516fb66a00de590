// Matrix products for the CUDA backend through cuBLAS: one handle per host thread,
// bound to cuda_backend::current_stream() at every call, and the row-major
// ops::gemm / ops::gemm_strided_batched overloads for the cuda tag (float, double).
//
// Math mode (MathMode, process-wide): fp32 by default, so float results track the CPU to ~1e-6;
// tf32 runs float products on TF32 tensor cores; bf16 / fp16 are mixed precision: every float
// product rounds its two operands to 16 bits (round to nearest even) and accumulates and writes
// fp32 (cublasGemmEx, CUBLAS_COMPUTE_32F). Tensors stay fp32 in memory (fp32 master weights), so
// everything that is not a product (gate pre-activations after the GEMM, cell states, norm
// statistics, softmax, the loss) is fp32 without further work. double is always exact.
//
// In bf16 / fp16 the 16-bit operands come from one of two places:
//  - the operand cache (cache_operands): a registered device range of floats (weights) has a
//    16-bit copy, built on first use and rebuilt only when the range has changed (see
//    invalidate_cached_operands), and an operand that lies inside a range is read from the copy at
//    the same offset, with the caller's leading dimension and batch stride;
//  - otherwise a conversion kernel packs the operand (rows x cols, any ld / batch stride) into
//    stream-ordered scratch of this thread (two slots, one per operand), row pitch rounded up to
//    8 elements (16 bytes) so cuBLAS can use its vectorised tensor-core kernels.
// Thin products (min(M, N, K) <= 32) are memory-bound and stay fp32 unless cached 16-bit
// operands make them read fewer bytes (detail::thin_product_prefers_fp32); among them are the
// mLSTM gate pre-activations, which the precision policy keeps fp32 anyway.
// fp16 conversion overflows to +-inf beyond 65504 (no saturation), so a dynamic loss scaler sees
// the overflow; bf16 has fp32's range.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "distilx/backend/cpu/blas.hpp"  // ops::Trans, shared with the CPU backend
#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/cuda/memory.cuh"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"

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

/// True for the modes whose products read 16-bit operands (bf16, fp16).
inline bool is_half_mode(MathMode m) { return m == MathMode::bf16 || m == MathMode::fp16; }

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

// ---- float -> 16-bit conversion ---------------------------------------------------------------

template <class H>
__device__ inline H to_half(float x);
template <>
__device__ inline __nv_bfloat16 to_half<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ inline __half to_half<__half>(float x) {
  return __float2half_rn(x);
}

/// Four floats to four 16-bit values at dst (8-byte aligned), one 8-byte store.
template <class H>
__device__ inline void store4(H* dst, float4 v) {
  uint2 u;
  if constexpr (std::is_same_v<H, __nv_bfloat16>) {
    const __nv_bfloat162 a = __floats2bfloat162_rn(v.x, v.y), b = __floats2bfloat162_rn(v.z, v.w);
    u.x = *reinterpret_cast<const unsigned*>(&a);
    u.y = *reinterpret_cast<const unsigned*>(&b);
  } else {
    const __half2 a = __floats2half2_rn(v.x, v.y), b = __floats2half2_rn(v.z, v.w);
    u.x = *reinterpret_cast<const unsigned*>(&a);
    u.y = *reinterpret_cast<const unsigned*>(&b);
  }
  *reinterpret_cast<uint2*>(dst) = u;
}

/// dst[i] = half(src[i]) for n contiguous elements; vec: src 16-byte and dst 8-byte aligned.
template <class H>
__global__ void to_half_flat_kernel(H* __restrict__ dst, const float* __restrict__ src, index_t n, bool vec) {
  const index_t id = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x;
  const index_t step = static_cast<index_t>(gridDim.x) * blockDim.x;
  index_t done = 0;
  if (vec) {
    const index_t n4 = n / 4;
    const float4* s4 = reinterpret_cast<const float4*>(src);
    for (index_t i = id; i < n4; i += step) store4(dst + 4 * i, __ldg(s4 + i));
    done = 4 * n4;
  }
  for (index_t i = done + id; i < n; i += step) dst[i] = to_half<H>(src[i]);
}

/// Packs `batch` row-major [rows, cols] matrices (row pitch lds, batch stride strides) into
/// 16 bits with row pitch ldd and batch stride strided. One warp per row; float4 loads where
/// the row's source and destination are aligned.
template <class H>
__global__ void to_half_rows_kernel(H* __restrict__ dst, index_t ldd, index_t strided, const float* __restrict__ src,
                                    index_t lds, index_t strides, index_t rows, index_t cols, index_t total_rows) {
  const index_t warp = (blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x) / 32;
  const index_t warps = static_cast<index_t>(gridDim.x) * blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (index_t r = warp; r < total_rows; r += warps) {
    const index_t b = r / rows, i = r - b * rows;
    const float* s = src + b * strides + i * lds;
    H* d = dst + b * strided + i * ldd;
    index_t c0 = 0;
    if (reinterpret_cast<std::uintptr_t>(s) % 16 == 0 && reinterpret_cast<std::uintptr_t>(d) % 8 == 0) {
      const index_t n4 = cols / 4;
      for (index_t j = lane; j < n4; j += 32) store4(d + 4 * j, __ldg(reinterpret_cast<const float4*>(s) + j));
      c0 = 4 * n4;
    }
    for (index_t j = c0 + lane; j < cols; j += 32) d[j] = to_half<H>(s[j]);
  }
}

constexpr int kConvertBlock = 256;

inline int convert_grid(index_t units) {
  return static_cast<int>(std::clamp<index_t>((units + kConvertBlock - 1) / kConvertBlock, 1, 16384));
}

/// Flat conversion of n floats into dst (bf16 or fp16 by mode) on the current stream.
inline void convert_flat(void* dst, const float* src, index_t n, MathMode mode) {
  if (n == 0) return;
  const bool vec = reinterpret_cast<std::uintptr_t>(src) % 16 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 8 == 0;
  const int grid = convert_grid(vec ? (n + 3) / 4 : n);
  if (mode == MathMode::bf16)
    to_half_flat_kernel<<<grid, kConvertBlock, 0, current_stream()>>>(static_cast<__nv_bfloat16*>(dst), src, n, vec);
  else
    to_half_flat_kernel<<<grid, kConvertBlock, 0, current_stream()>>>(static_cast<__half*>(dst), src, n, vec);
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// Per-thread, per-stream scratch of the 16-bit operands: slots 0 and 1 hold the A and B operands
/// converted for one product; slot 2 holds a staged image (see stage_half_image).
inline void* operand_scratch(int slot, std::size_t bytes) {
  thread_local SlotScratch<3> s;
  return s.get(slot, bytes);
}
constexpr int kStagedImageSlot = 2;

/// A 16-bit image of a float range that the kernel producing the values wrote directly (the
/// loss's row kernel writes the logits gradient in bf16 / fp16 for the LM-head product that
/// follows, instead of fp32 that the product would convert). While staged, a 16-bit product on
/// the same thread and stream that reads inside the range takes the image; the float values in
/// the range are then not meaningful, so such a product never falls back to fp32 (see
/// thin_product_prefers_fp32). One image per thread; a product that writes into the range, or
/// the next staging, drops it.
struct StagedImage {
  const float* p = nullptr;
  index_t n = 0;
  const void* image = nullptr;
  MathMode type = MathMode::bf16;
  cudaStream_t stream = nullptr;
};
inline StagedImage& staged_image() {
  thread_local StagedImage s;
  return s;
}
inline void drop_staged_image() {
  staged_image() = StagedImage{};
  free_hook() = nullptr;
}
/// The allocator's free hook while an image is staged: freeing memory under the range ends it.
inline void drop_staged_image_if_freed(const void* p, std::size_t bytes) {
  const StagedImage& s = staged_image();
  const char* b = static_cast<const char*>(p);
  const char* sb = reinterpret_cast<const char*>(s.p);
  if (s.p && sb < b + bytes && b < reinterpret_cast<const char*>(s.p + s.n)) drop_staged_image();
}
/// Stages image (2 bytes per element, the layout of [p, p + n)) for the current stream.
inline void stage_half_image(const float* p, index_t n, const void* image, MathMode type) {
  staged_image() = StagedImage{p, n, image, type, current_stream()};
  free_hook() = &drop_staged_image_if_freed;
}
/// Products of this thread that read a staged image so far (tests check the handoff with it).
inline std::uint64_t& staged_image_reads() {
  thread_local std::uint64_t n = 0;
  return n;
}
/// True when [p, p + extent) lies inside the staged range (whatever the mode or stream).
inline bool inside_staged_image(const float* p, index_t extent) {
  const StagedImage& s = staged_image();
  return s.p && p >= s.p && p + extent <= s.p + s.n;
}
/// A product writes C[rows, cols] (row pitch ld): an image of values it overwrites is stale.
/// With beta != 0 the product would also read C's floats, which are not meaningful while staged:
/// refused.
inline void drop_staged_image_if_written(const char* fn, const float* c, index_t rows, index_t cols, index_t ld,
                                         bool reads_c, index_t batches = 1, index_t stride = 0) {
  const StagedImage& s = staged_image();
  if (!s.p || rows <= 0 || cols <= 0) return;
  const float* end = c + (batches - 1) * stride + (rows - 1) * ld + cols;
  if (!(c < s.p + s.n && end > s.p)) return;
  if (reads_c)
    throw error(::distilx::detail::concat(fn, ": C at ", static_cast<const void*>(c), " lies in a range staged as a ",
                                          to_string(s.type), " image, whose floats are not meaningful, and beta != 0 "
                                          "would read them; run the products that read the image first"));
  drop_staged_image();
}
/// The error for a float product (or a 16-bit one of another type or stream) that reads a staged
/// operand: what differs, and the fix.
inline error staged_operand_error(const char* fn, const char* which, const float* p, MathMode mode) {
  const StagedImage& s = staged_image();
  return error(::distilx::detail::concat(
      fn, ": operand ", which, " at ", static_cast<const void*>(p), " was staged as a ", to_string(s.type),
      " image on stream ", static_cast<const void*>(s.stream), ", but this product runs in ", to_string(mode),
      " on stream ", static_cast<const void*>(current_stream()),
      "; run it in the staging op's math mode and stream, right after that op (for the loss: lm_head_backward "
      "after distill_rows, or leave DistillRows::dz_feeds_lm_head_only unset)"));
}

}  // namespace detail

// ---- operand cache -----------------------------------------------------------------------------

/// Registry of device ranges of floats whose 16-bit copies serve the bf16 / fp16 products
/// (cache_operands and friends below are its interface). Copies are built lazily, on the
/// calling thread's current stream, by the first product that reads the range in a 16-bit mode
/// (or in the other 16-bit type than last time). Frozen ranges are converted once; the others
/// again after each invalidate_cached_operands().
///
/// Threading: the registry is mutex-protected, so registering and looking up from several
/// threads is safe. A copy built on one stream and read on another is ordered by an event; but a
/// rebuild (after an invalidation) does not wait for readers on other streams, so non-frozen
/// ranges should be used from one stream (the training thread's), as the Distiller does.
class OperandCache {
 public:
  static OperandCache& instance() {
    // Never destroyed: copies live in the caching allocator, whose static may go first at exit.
    static OperandCache* c = new OperandCache;
    return *c;
  }

  void add(const float* begin, index_t n, bool frozen) {
    if (begin == nullptr || n <= 0)
      throw error(::distilx::detail::concat("cache_operands: expected a non-empty device range, got begin ",
                                 static_cast<const void*>(begin), " and n ", n));
    std::lock_guard<std::mutex> lk(mu_);
    auto next = ranges_.lower_bound(begin);
    const bool hits_next = next != ranges_.end() && next->first < begin + n;
    const bool hits_prev = next != ranges_.begin() && std::prev(next)->first + std::prev(next)->second.n > begin;
    if (hits_next || hits_prev) {
      const auto& o = hits_next ? *next : *std::prev(next);
      throw error(::distilx::detail::concat("cache_operands: range [", static_cast<const void*>(begin), ", +", n,
                                 " floats) overlaps the registered range [", static_cast<const void*>(o.first), ", +",
                                 o.second.n, " floats); call uncache_operands(", static_cast<const void*>(o.first),
                                 ") first or register disjoint ranges"));
    }
    Entry e;
    e.n = n;
    e.frozen = frozen;
    ranges_.emplace(begin, e);
  }

  void remove(const float* begin) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = ranges_.find(begin);
    if (it == ranges_.end())
      throw error(::distilx::detail::concat("uncache_operands: ", static_cast<const void*>(begin),
                                 " is not the begin of a range registered with cache_operands"));
    release(it->second);
    ranges_.erase(it);
  }

  void invalidate() {
    std::lock_guard<std::mutex> lk(mu_);
    ++epoch_;
  }

  std::size_t bytes() const {
    std::lock_guard<std::mutex> lk(mu_);
    std::size_t b = 0;
    for (const auto& kv : ranges_)
      if (kv.second.copy) b += 2 * static_cast<std::size_t>(kv.second.n);
    return b;
  }

  index_t ranges() const {
    std::lock_guard<std::mutex> lk(mu_);
    return static_cast<index_t>(ranges_.size());
  }

  /// The 16-bit (mode's type) copy of p when [p, p + extent) lies inside one registered range,
  /// refreshed if stale and ready on the current stream; nullptr otherwise.
  const void* lookup(const float* p, index_t extent, MathMode mode) {
    std::lock_guard<std::mutex> lk(mu_);
    if (ranges_.empty()) return nullptr;
    auto it = ranges_.upper_bound(p);
    if (it == ranges_.begin()) return nullptr;
    --it;
    const float* begin = it->first;
    Entry& e = it->second;
    if (p + extent > begin + e.n) return nullptr;  // starts inside, ends outside: not served
    const cudaStream_t s = current_stream();
    if (!e.copy) e.copy = CachingAllocator::instance().allocate(2 * static_cast<std::size_t>(e.n));
    if (!e.built || e.type != mode || (!e.frozen && e.epoch != epoch_)) {
      // A rebuild must not overwrite the copy under a reader of another stream.
      if (e.built && e.stream != s) DISTILX_CUDA_CHECK(cudaStreamWaitEvent(s, e.ready, 0));
      detail::convert_flat(e.copy, begin, e.n, mode);
      if (!e.ready) DISTILX_CUDA_CHECK(cudaEventCreateWithFlags(&e.ready, cudaEventDisableTiming));
      DISTILX_CUDA_CHECK(cudaEventRecord(e.ready, s));
      e.built = true;
      e.type = mode;
      e.epoch = epoch_;
      e.stream = s;
      ++conversions_;
    } else if (e.stream != s) {
      DISTILX_CUDA_CHECK(cudaStreamWaitEvent(s, e.ready, 0));
    }
    return static_cast<const char*>(e.copy) + 2 * (p - begin);
  }

  /// True when [p, p + extent) lies inside one registered range (nothing is built).
  bool covers(const float* p, index_t extent) const {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = ranges_.upper_bound(p);
    if (it == ranges_.begin()) return false;
    --it;
    return p + extent <= it->first + it->second.n;
  }

  /// Number of range conversions so far (tests and benchmarks check the caching with it).
  std::uint64_t conversions() const {
    std::lock_guard<std::mutex> lk(mu_);
    return conversions_;
  }

 private:
  struct Entry {
    index_t n = 0;
    bool frozen = false;
    void* copy = nullptr;
    bool built = false;
    MathMode type = MathMode::bf16;
    std::uint64_t epoch = 0;
    cudaStream_t stream = nullptr;
    cudaEvent_t ready = nullptr;
  };
  static void release(Entry& e) {
    // Products queued on any stream may still read the copy: wait before it can be reused.
    if (e.copy) {
      DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
      CachingAllocator::instance().deallocate(e.copy);
      e.copy = nullptr;
    }
    if (e.ready) DISTILX_CUDA_CHECK(cudaEventDestroy(e.ready));
    e.ready = nullptr;
  }
  OperandCache() = default;
  mutable std::mutex mu_;
  std::map<const float*, Entry> ranges_;
  std::uint64_t epoch_ = 1;
  std::uint64_t conversions_ = 0;
};

/// Registers the device range [begin, begin + n) of floats for the bf16 / fp16 products: an
/// operand inside it is read from a 16-bit copy of the range instead of being converted at every
/// product. frozen = true: the range never changes (teacher weights, the student's embedding and
/// LM head), converted once. frozen = false (the student's flat parameters): converted again
/// on first use after each invalidate_cached_operands(), so call that after every write to the
/// range (the optimizer update); until then products see the values of the last conversion.
/// Ranges must not overlap. Call uncache_operands(begin) before the memory is freed: a new
/// allocation at the same address would otherwise be served the old copy. The copy costs
/// 2 bytes per element (cached_operand_bytes()) and is only made once a 16-bit product reads it.
inline void cache_operands(const float* begin, index_t n, bool frozen) {
  OperandCache::instance().add(begin, n, frozen);
}

/// Unregisters the range that starts at begin and frees its copy (waits for the device first).
inline void uncache_operands(const float* begin) { OperandCache::instance().remove(begin); }

/// Marks every non-frozen range stale: its next 16-bit product converts it again. Cheap (no
/// device work); call it after each optimizer update.
inline void invalidate_cached_operands() { OperandCache::instance().invalidate(); }

/// Device bytes held by 16-bit operand copies.
inline std::size_t cached_operand_bytes() { return OperandCache::instance().bytes(); }

/// RAII registration: cache_operands in the constructor, uncache_operands in the destructor.
class CachedOperands {
 public:
  CachedOperands() = default;
  CachedOperands(const float* begin, index_t n, bool frozen) : begin_(begin) { cache_operands(begin, n, frozen); }
  CachedOperands(const CachedOperands&) = delete;
  CachedOperands& operator=(const CachedOperands&) = delete;
  CachedOperands(CachedOperands&& o) noexcept : begin_(std::exchange(o.begin_, nullptr)) {}
  CachedOperands& operator=(CachedOperands&& o) noexcept {
    if (this != &o) {
      reset();
      begin_ = std::exchange(o.begin_, nullptr);
    }
    return *this;
  }
  ~CachedOperands() {
    try {
      reset();
    } catch (...) {  // a destructor must not throw; the range stays registered only on a device fault
    }
  }
  void reset() {
    if (begin_) uncache_operands(std::exchange(begin_, nullptr));
  }

 private:
  const float* begin_ = nullptr;
};

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

namespace detail {

/// One stored (row-major, untransposed) operand of a product: `batch` matrices [rows, cols]
/// with row pitch ld, the i-th at p + i * stride.
struct Operand {
  const float* p;
  index_t rows, cols, ld, stride, batch;
};
/// Its 16-bit form as cuBLAS reads it.
struct HalfOperand {
  const void* p;
  index_t ld, stride;
};

inline void check_operand(const char* fn, const char* name, const char* shape, index_t rows, index_t cols, index_t ld) {
  if (ld < std::max<index_t>(cols, 1))
    throw shape_error(::distilx::detail::concat(fn, ": leading dimension of ", name, " is ", ld, ", but the stored ", name, " is ", shape,
                             " = [", rows, ", ", cols, "] row-major, so it must be at least ", std::max<index_t>(cols, 1),
                             " (the row pitch in elements)"));
}

/// Validates the row-major leading dimensions of one product (clear errors instead of cuBLAS's
/// "invalid value").
inline void check_gemm_args(const char* fn, ops::Trans ta, ops::Trans tb, index_t M, index_t N, index_t K, index_t lda,
                            index_t ldb, index_t ldc) {
  if (M < 0 || N < 0 || K < 0) throw shape_error(::distilx::detail::concat(fn, ": negative size M ", M, ", N ", N, ", K ", K));
  if (M == 0 || N == 0) return;
  if (K > 0) {
    if (ta == ops::Trans::no) check_operand(fn, "A", "[M, K]", M, K, lda);
    else check_operand(fn, "A", "[K, M] (transposed)", K, M, lda);
    if (tb == ops::Trans::no) check_operand(fn, "B", "[K, N]", K, N, ldb);
    else check_operand(fn, "B", "[N, K] (transposed)", N, K, ldb);
  }
  check_operand(fn, "C", "[M, N]", M, N, ldc);
}

inline index_t extent(const Operand& o) { return (o.batch - 1) * o.stride + (o.rows - 1) * o.ld + o.cols; }
inline index_t elements(const Operand& o) { return (o.stride == 0 ? 1 : o.batch) * o.rows * o.cols; }

/// Thin products (an output or inner dimension of at most kThinDim, e.g. the mLSTM gate
/// pre-activations and their gradients, or the LM head at generation) are bound by memory
/// traffic, not by tensor-core math. For them the 16-bit path only pays when it reads fewer
/// bytes: an uncached operand costs 8 bytes per element there (read 4, write 2, read 2) against
/// 4 in fp32, a cached one 2. So a thin product runs in fp32 unless cached operands dominate
/// (cached elements > 2x uncached ones, e.g. the cached LM head applied to a few rows). This
/// also keeps the mLSTM gate pre-activations fp32, as the precision policy asks, and the
/// headwise q/k/v projections (blocks of 32): reading them at fp32 costs no time, and their
/// rounding was what pushed the mLSTM gate-parameter gradients past 2e-2 in bf16.
/// A float (fp32 / tf32) product must not read a staged operand: its floats are not meaningful.
inline void refuse_staged_float_operands(const char* fn, const Operand& a, const Operand& b, MathMode mode) {
  if (inside_staged_image(a.p, extent(a))) throw staged_operand_error(fn, "A", a.p, mode);
  if (inside_staged_image(b.p, extent(b))) throw staged_operand_error(fn, "B", b.p, mode);
}

constexpr index_t kThinDim = 32;
inline bool thin_product_prefers_fp32(index_t M, index_t N, index_t K, const Operand& a, const Operand& b) {
  if (std::min({M, N, K}) > kThinDim) return false;
  if (inside_staged_image(a.p, extent(a)) || inside_staged_image(b.p, extent(b))) return false;  // only the image is valid
  index_t cached = 0, uncached = 0;
  for (const Operand* o : {&a, &b})
    (OperandCache::instance().covers(o->p, extent(*o)) ? cached : uncached) += elements(*o);
  return cached <= 2 * uncached;
}

/// The 16-bit form of an operand: from the operand cache if registered, else packed into the
/// slot's scratch on the current stream.
inline HalfOperand half_operand(const Operand& o, MathMode mode, int slot) {
  const index_t extent = detail::extent(o);
  if (inside_staged_image(o.p, extent)) {
    const StagedImage& s = staged_image();
    if (s.type != mode || s.stream != current_stream())
      throw staged_operand_error("gemm(cuda)", slot == 0 ? "A" : "B", o.p, mode);
    ++staged_image_reads();
    return {static_cast<const char*>(s.image) + 2 * (o.p - s.p), o.ld, o.stride};
  }
  if (const void* c = OperandCache::instance().lookup(o.p, extent, mode)) return {c, o.ld, o.stride};
  const index_t ldd = (o.cols + 7) / 8 * 8;  // 16-byte row pitch
  const index_t mats = o.stride == 0 ? 1 : o.batch;
  const index_t strided = o.stride == 0 ? 0 : o.rows * ldd;
  void* dst = operand_scratch(slot, 2 * static_cast<std::size_t>(mats * o.rows * ldd));
  if (o.ld == o.cols && ldd == o.cols && (mats == 1 || o.stride == o.rows * o.cols)) {
    convert_flat(dst, o.p, mats * o.rows * o.cols, mode);
  } else {
    const index_t total = mats * o.rows;
    const int grid = convert_grid((total + kConvertBlock / 32 - 1) / (kConvertBlock / 32) * kConvertBlock);
    if (mode == MathMode::bf16)
      to_half_rows_kernel<<<grid, kConvertBlock, 0, current_stream()>>>(
          static_cast<__nv_bfloat16*>(dst), ldd, strided, o.p, o.ld, o.stride, o.rows, o.cols, total);
    else
      to_half_rows_kernel<<<grid, kConvertBlock, 0, current_stream()>>>(static_cast<__half*>(dst), ldd, strided, o.p,
                                                                         o.ld, o.stride, o.rows, o.cols, total);
    DISTILX_CUDA_LAUNCH_CHECK();
  }
  return {dst, ldd, strided};
}

inline cudaDataType_t half_type(MathMode m) { return m == MathMode::bf16 ? CUDA_R_16BF : CUDA_R_16F; }

}  // namespace detail

}  // namespace distilx::cuda_backend

namespace distilx::ops {

/// C[M,N] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions (same
/// contract as gemm(cpu, ...)). cuBLAS is column-major, where a row-major matrix reads as its
/// transpose, so it computes C^T = op(B)^T op(A)^T: the operands swap and keep their flags.
/// float follows cuda_backend::math_mode() (fp32, tf32, or bf16 / fp16 operands with fp32
/// accumulation and output); double is always exact.
template <class T>
void gemm(cuda, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A, index_t lda, const T* B,
          index_t ldb, T beta, T* C, index_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "gemm(cuda): float or double");
  cuda_backend::detail::check_gemm_args("gemm(cuda)", ta, tb, M, N, K, lda, ldb, ldc);
  if (M == 0 || N == 0) return;
  if (K == 0) {  // cuBLAS rejects lda < 1 for an empty inner dimension; BLAS semantics: C = beta C
    if (beta == T(1)) return;
    if constexpr (std::is_same_v<T, float>)
      cuda_backend::detail::drop_staged_image_if_written("gemm(cuda)", C, M, N, ldc, beta != T(0));
    const index_t n = M * N;
    const int grid = static_cast<int>(std::min<index_t>((n + 255) / 256, 4096));
    cuda_backend::detail::scale_matrix_kernel<<<grid, 256, 0, cuda_backend::current_stream()>>>(C, M, N, ldc, beta);
    DISTILX_CUDA_LAUNCH_CHECK();
    return;
  }
  const cublasOperation_t oa = cuda_backend::detail::to_cublas(ta), ob = cuda_backend::detail::to_cublas(tb);
  if constexpr (std::is_same_v<T, float>) {
    const cuda_backend::MathMode mode = cuda_backend::math_mode();
    namespace d = cuda_backend::detail;
    const d::Operand oa32{A, ta == Trans::no ? M : K, ta == Trans::no ? K : M, lda, 0, 1};
    const d::Operand ob32{B, tb == Trans::no ? K : N, tb == Trans::no ? N : K, ldb, 0, 1};
    if (cuda_backend::is_half_mode(mode) && !d::thin_product_prefers_fp32(M, N, K, oa32, ob32)) {
      const d::HalfOperand a = d::half_operand(oa32, mode, 0);
      const d::HalfOperand b = d::half_operand(ob32, mode, 1);
      d::drop_staged_image_if_written("gemm(cuda)", C, M, N, ldc, beta != 0.f);  // after the reads
      const cudaDataType_t t16 = d::half_type(mode);
      DISTILX_CUBLAS_CHECK(cublasGemmEx_64(cuda_backend::cublas_handle(true), ob, oa, N, M, K, &alpha, b.p, t16, b.ld,
                                           a.p, t16, a.ld, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                                           CUBLAS_GEMM_DEFAULT));
      return;
    }
    d::refuse_staged_float_operands("gemm(cuda)", oa32, ob32, mode);
    d::drop_staged_image_if_written("gemm(cuda)", C, M, N, ldc, beta != 0.f);
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
/// A and B strides may be 0 (one matrix for every batch). Math mode as gemm.
template <class T>
void gemm_strided_batched(cuda, Trans ta, Trans tb, index_t M, index_t N, index_t K, T alpha, const T* A,
                          index_t lda, index_t stride_a, const T* B, index_t ldb, index_t stride_b, T beta, T* C,
                          index_t ldc, index_t stride_c, index_t batch) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "gemm_strided_batched(cuda): float or double");
  cuda_backend::detail::check_gemm_args("gemm_strided_batched(cuda)", ta, tb, M, N, K, lda, ldb, ldc);
  if (batch < 0 || stride_a < 0 || stride_b < 0 || stride_c < 0)
    throw shape_error(::distilx::detail::concat("gemm_strided_batched(cuda): batch (", batch, ") and strides (A ", stride_a,
                                     ", B ", stride_b, ", C ", stride_c, ") must be non-negative"));
  if (M == 0 || N == 0 || batch == 0) return;
  if (K == 0) {
    for (index_t i = 0; i < batch; ++i)
      gemm(cuda{}, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C + i * stride_c, ldc);
    return;
  }
  const cublasOperation_t oa = cuda_backend::detail::to_cublas(ta), ob = cuda_backend::detail::to_cublas(tb);
  if constexpr (std::is_same_v<T, float>) {
    const cuda_backend::MathMode mode = cuda_backend::math_mode();
    namespace d = cuda_backend::detail;
    const d::Operand oa32{A, ta == Trans::no ? M : K, ta == Trans::no ? K : M, lda, stride_a, batch};
    const d::Operand ob32{B, tb == Trans::no ? K : N, tb == Trans::no ? N : K, ldb, stride_b, batch};
    if (cuda_backend::is_half_mode(mode) && !d::thin_product_prefers_fp32(M, N, K, oa32, ob32)) {
      const d::HalfOperand a = d::half_operand(oa32, mode, 0);
      const d::HalfOperand b = d::half_operand(ob32, mode, 1);
      d::drop_staged_image_if_written("gemm_strided_batched(cuda)", C, M, N, ldc, beta != 0.f, batch, stride_c);
      const cudaDataType_t t16 = d::half_type(mode);
      DISTILX_CUBLAS_CHECK(cublasGemmStridedBatchedEx_64(
          cuda_backend::cublas_handle(true), ob, oa, N, M, K, &alpha, b.p, t16, b.ld, b.stride, a.p, t16, a.ld,
          a.stride, &beta, C, CUDA_R_32F, ldc, stride_c, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      return;
    }
    d::refuse_staged_float_operands("gemm_strided_batched(cuda)", oa32, ob32, mode);
    d::drop_staged_image_if_written("gemm_strided_batched(cuda)", C, M, N, ldc, beta != 0.f, batch, stride_c);
    DISTILX_CUBLAS_CHECK(cublasSgemmStridedBatched_64(cuda_backend::cublas_handle(true), ob, oa, N, M, K, &alpha, B,
                                                      ldb, stride_b, A, lda, stride_a, &beta, C, ldc, stride_c, batch));
  } else {
    DISTILX_CUBLAS_CHECK(cublasDgemmStridedBatched_64(cuda_backend::cublas_handle(), ob, oa, N, M, K, &alpha, B, ldb,
                                                      stride_b, A, lda, stride_a, &beta, C, ldc, stride_c, batch));
  }
}

}  // namespace distilx::ops
