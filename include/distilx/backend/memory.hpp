// Owning, aligned, backend-tagged storage. The CPU specialisation lives here;
// the CUDA one (device memory from a caching allocator) in backend/cuda.
#pragma once

#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>
#include <new>
#include <utility>

#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"

namespace distilx {

template <class T, class Backend>
class Buffer;

/// Host buffer, 64-byte aligned, zero-initialised.
template <class T>
class Buffer<T, cpu> {
 public:
  Buffer() = default;
  explicit Buffer(index_t n) { resize(n); }
  Buffer(const Buffer& o) : Buffer(o.size_) {
    if (size_) std::memcpy(data_, o.data_, sizeof(T) * size_);
  }
  Buffer(Buffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  Buffer& operator=(Buffer o) noexcept {
    std::swap(data_, o.data_);
    std::swap(size_, o.size_);
    return *this;
  }
  ~Buffer() { std::free(data_); }

  /// Reallocates when the size changes; contents are zeroed either way.
  void resize(index_t n) {
    DISTILX_ASSERT(n >= 0);
    if (n != size_) {
      std::free(data_);
      data_ = nullptr;
      size_ = 0;
      if (n > 0) {
        const std::size_t bytes = ((sizeof(T) * static_cast<std::size_t>(n) + 63) / 64) * 64;
        data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
        if (!data_) throw std::bad_alloc();
      }
      size_ = n;
    }
    zero();
  }
  void zero() {
    if (size_) std::memset(static_cast<void*>(data_), 0, sizeof(T) * size_);
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  index_t size() const { return size_; }
  T& operator[](index_t i) { return data_[i]; }
  const T& operator[](index_t i) const { return data_[i]; }
  T* begin() { return data_; }
  T* end() { return data_ + size_; }
  const T* begin() const { return data_; }
  const T* end() const { return data_ + size_; }

 private:
  T* data_ = nullptr;
  index_t size_ = 0;
};

/// Host <-> buffer copies of [offset, offset + n). The CPU versions are memcpy; the CUDA
/// backend (backend/cuda/memory.cuh) overloads them with cudaMemcpy, so code that fills or
/// reads parameters from the host (initialisation, checkpoints, weight files) is written once.
template <class T>
void upload(Buffer<T, cpu>& b, index_t offset, const T* host, index_t n) {
  DISTILX_ASSERT(offset >= 0 && offset + n <= b.size());
  if (n) std::memcpy(b.data() + offset, host, sizeof(T) * static_cast<std::size_t>(n));
}
template <class T>
void download(const Buffer<T, cpu>& b, index_t offset, T* host, index_t n) {
  DISTILX_ASSERT(offset >= 0 && offset + n <= b.size());
  if (n) std::memcpy(host, b.data() + offset, sizeof(T) * static_cast<std::size_t>(n));
}

}  // namespace distilx

namespace distilx::ops {
/// Called by trainers after every optimizer update of the parameters, so that a backend can
/// drop anything derived from the old values (the CUDA backend's 16-bit operand copies).
inline void parameters_updated(cpu) {}
/// Holds a registration made by cache_operands and undoes it when destroyed (move-only).
class OperandRegistration {
 public:
  OperandRegistration() = default;
  explicit OperandRegistration(std::function<void()> release) : release_(std::move(release)) {}
  OperandRegistration(OperandRegistration&& o) noexcept : release_(std::exchange(o.release_, nullptr)) {}
  OperandRegistration& operator=(OperandRegistration&& o) noexcept {
    if (this != &o) {
      reset();
      release_ = std::exchange(o.release_, nullptr);
    }
    return *this;
  }
  OperandRegistration(const OperandRegistration&) = delete;
  OperandRegistration& operator=(const OperandRegistration&) = delete;
  ~OperandRegistration() { reset(); }
  void reset() {
    if (release_) std::exchange(release_, nullptr)();
  }
  bool active() const { return static_cast<bool>(release_); }

 private:
  std::function<void()> release_;
};

/// Tells a backend that [p, p + n) holds weights that are read by many products: `frozen`
/// ones never change, the others change only at parameters_updated(). The CUDA backend keeps
/// 16-bit copies of them in its mixed-precision math modes; the CPU needs nothing. The range
/// stays registered while the returned object lives (keep it no longer than the memory); a
/// range the caller registered already is left as it is.
template <class T>
OperandRegistration cache_operands(cpu, const T* /*p*/, index_t /*n*/, bool /*frozen*/) {
  return {};
}
}  // namespace distilx::ops
