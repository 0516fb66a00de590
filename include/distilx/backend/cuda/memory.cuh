// Device memory for the CUDA backend: a caching allocator (size-class free
// lists, no cudaMalloc/cudaFree in the training loop once warm) behind
// Buffer<T, cuda>, plus the per-thread stream and cuBLAS handle every CUDA op
// uses, and host<->device copies.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/memory.hpp"

namespace distilx::cuda_backend {

namespace detail {
/// Called on the freeing thread with each block handed back to the allocator (null: none).
/// blas.cuh sets it while a 16-bit image of a float range is staged, so that freeing the range
/// also ends the staging (a later allocation at that address must not be served the image).
using FreeHook = void (*)(const void* p, std::size_t bytes);
inline FreeHook& free_hook() {
  thread_local FreeHook h = nullptr;
  return h;
}
}  // namespace detail

/// Caching device allocator: freed blocks go back to a free list keyed by their rounded
/// size and are reused by later requests of the same size class.
class CachingAllocator {
 public:
  static CachingAllocator& instance() {
    static CachingAllocator a;
    return a;
  }
  void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    const std::size_t sz = round(bytes);
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = free_.find(sz);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        live_[p] = sz;
        note_in_use_(sz);
        return p;
      }
    }
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, sz);
    if (e == cudaErrorMemoryAllocation) {  // release the cache and retry once
      (void)cudaGetLastError();
      release_cached();
      e = cudaMalloc(&p, sz);
    }
    DISTILX_CUDA_CHECK(e);
    std::lock_guard<std::mutex> lk(mu_);
    live_[p] = sz;
    reserved_ += sz;
    note_in_use_(sz);
    return p;
  }
  void deallocate(void* p) {
    if (!p) return;
    std::size_t sz = 0;
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = live_.find(p);
      if (it == live_.end()) return;
      sz = it->second;
      free_[sz].push_back(p);
      in_use_ -= sz;
      live_.erase(it);
    }
    if (detail::FreeHook h = detail::free_hook()) h(p, sz);
  }
  void release_cached() {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& kv : free_)
      for (void* p : kv.second) {
        cudaFree(p);
        reserved_ -= kv.first;
      }
    free_.clear();
  }
  /// Bytes held from the device, cached free blocks included.
  std::size_t reserved_bytes() const { return reserved_.load(); }
  /// Bytes in live allocations (rounded to the size class), now and at most since reset_peak():
  /// the analogue of torch.cuda.memory_allocated / max_memory_allocated.
  std::size_t in_use_bytes() const { return in_use_.load(); }
  std::size_t peak_in_use_bytes() const { return peak_in_use_.load(); }
  void reset_peak() {
    std::lock_guard<std::mutex> lk(mu_);
    peak_in_use_.store(in_use_.load());
  }

 private:
  static std::size_t round(std::size_t b) {
    // 512-byte granularity below 1 MiB, 2 MiB above: bounded waste, good reuse.
    const std::size_t g = b < (std::size_t(1) << 20) ? 512 : (std::size_t(2) << 20);
    return (b + g - 1) / g * g;
  }
  std::mutex mu_;
  std::map<std::size_t, std::vector<void*>> free_;
  std::map<void*, std::size_t> live_;
  void note_in_use_(std::size_t sz) {  // mu_ held
    in_use_ += sz;
    if (in_use_.load() > peak_in_use_.load()) peak_in_use_.store(in_use_.load());
  }
  // Written under mu_; atomic so that the getters may read them from any thread without it.
  std::atomic<std::size_t> reserved_{0}, in_use_{0}, peak_in_use_{0};
};

/// The stream every distilx CUDA op of this host thread runs on.
inline cudaStream_t& current_stream() {
  thread_local cudaStream_t s = nullptr;  // legacy default stream unless set
  return s;
}

}  // namespace distilx::cuda_backend

namespace distilx {

/// Device buffer from the caching allocator, zero-initialised on (re)size.
template <class T>
class Buffer<T, cuda> {
 public:
  Buffer() = default;
  explicit Buffer(index_t n) { resize(n); }
  Buffer(const Buffer& o) : Buffer(o.size_) {
    if (size_)
      DISTILX_CUDA_CHECK(cudaMemcpyAsync(data_, o.data_, sizeof(T) * size_, cudaMemcpyDeviceToDevice,
                                         cuda_backend::current_stream()));
  }
  Buffer(Buffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  Buffer& operator=(Buffer o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~Buffer() { cuda_backend::CachingAllocator::instance().deallocate(data_); }

  void resize(index_t n) {
    if (n != size_) {
      cuda_backend::CachingAllocator::instance().deallocate(data_);
      data_ = static_cast<T*>(cuda_backend::CachingAllocator::instance().allocate(sizeof(T) * static_cast<std::size_t>(n)));
      size_ = n;
    }
    zero();
  }
  void zero() {
    if (size_) DISTILX_CUDA_CHECK(cudaMemsetAsync(data_, 0, sizeof(T) * size_, cuda_backend::current_stream()));
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  index_t size() const { return size_; }
  void copy_from_host(const T* h, index_t n) {
    DISTILX_ASSERT(n <= size_);
    DISTILX_CUDA_CHECK(cudaMemcpy(data_, h, sizeof(T) * n, cudaMemcpyHostToDevice));
  }
  void copy_to_host(T* h, index_t n) const {
    DISTILX_ASSERT(n <= size_);
    DISTILX_CUDA_CHECK(cudaMemcpy(h, data_, sizeof(T) * n, cudaMemcpyDeviceToHost));
  }
  std::vector<T> to_host() const {
    std::vector<T> v(static_cast<std::size_t>(size_));
    if (size_) copy_to_host(v.data(), size_);
    return v;
  }

 private:
  T* data_ = nullptr;
  index_t size_ = 0;
};

template <class T>
void upload(Buffer<T, cuda>& b, index_t offset, const T* host, index_t n) {
  DISTILX_ASSERT(offset >= 0 && offset + n <= b.size());
  if (n) DISTILX_CUDA_CHECK(cudaMemcpy(b.data() + offset, host, sizeof(T) * static_cast<std::size_t>(n), cudaMemcpyHostToDevice));
}
template <class T>
void download(const Buffer<T, cuda>& b, index_t offset, T* host, index_t n) {
  DISTILX_ASSERT(offset >= 0 && offset + n <= b.size());
  if (n) DISTILX_CUDA_CHECK(cudaMemcpy(host, b.data() + offset, sizeof(T) * static_cast<std::size_t>(n), cudaMemcpyDeviceToHost));
}

namespace cuda_backend::detail {

/// Per-thread, per-stream scratch with a fixed number of independent slots (e.g. the two operands
/// of one product). Work on the slots is ordered by the stream, so the next product reuses them
/// without synchronising; a slot that must grow waits for its stream once and returns the old
/// block to the caching allocator (geometric growth: a handful of such waits per process).
template <int Slots>
class SlotScratch {
 public:
  SlotScratch() = default;
  SlotScratch(const SlotScratch&) = delete;
  SlotScratch& operator=(const SlotScratch&) = delete;
  ~SlotScratch() {
    for (auto& kv : streams_)
      for (auto& sl : kv.second) CachingAllocator::instance().deallocate(sl.ptr);
  }
  void* get(int slot, std::size_t bytes) {
    const cudaStream_t s = current_stream();
    Slot& sl = streams_[s][slot];
    if (sl.bytes < bytes) {
      if (sl.ptr) {
        DISTILX_CUDA_CHECK(cudaStreamSynchronize(s));
        CachingAllocator::instance().deallocate(sl.ptr);
        sl.ptr = nullptr;
        sl.bytes = 0;
      }
      const std::size_t want = std::max<std::size_t>(bytes, std::max<std::size_t>(sl.bytes + sl.bytes / 2, 4096));
      sl.ptr = CachingAllocator::instance().allocate(want);
      sl.bytes = want;
    }
    return sl.ptr;
  }

 private:
  struct Slot {
    void* ptr = nullptr;
    std::size_t bytes = 0;
  };
  std::map<cudaStream_t, std::array<Slot, Slots>> streams_;
};

}  // namespace cuda_backend::detail

/// True when a CUDA device is present (tests skip with exit code 77 otherwise).
inline bool cuda_device_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

}  // namespace distilx
