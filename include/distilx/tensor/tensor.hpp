// Owning Tensor<T, Backend> (contiguous, row-major) and a non-owning View.
// Ops take raw pointers plus dimensions (llm.c style); tensors carry shapes
// for validation, I/O and tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <numeric>
#include <vector>

#include "distilx/backend/memory.hpp"
#include "distilx/core/error.hpp"

namespace distilx {

using Shape = std::vector<index_t>;

inline index_t numel(const Shape& s) {
  return std::accumulate(s.begin(), s.end(), index_t{1}, [](index_t a, index_t b) { return a * b; });
}

/// Non-owning view: pointer + shape (contiguous, row-major).
template <class T>
struct View {
  T* data = nullptr;
  Shape shape;
  index_t size() const { return numel(shape); }
  T& operator[](index_t i) const { return data[i]; }
};

template <class T, class Backend = cpu>
class Tensor {
 public:
  using value_type = T;
  using backend_type = Backend;

  Tensor() = default;
  explicit Tensor(Shape shape) : shape_(std::move(shape)), buf_(numel(shape_)) {}
  Tensor(std::initializer_list<index_t> shape) : Tensor(Shape(shape)) {}

  void resize(const Shape& shape) {
    shape_ = shape;
    buf_.resize(numel(shape_));
  }
  void zero() { buf_.zero(); }

  T* data() { return buf_.data(); }
  const T* data() const { return buf_.data(); }
  const Shape& shape() const { return shape_; }
  index_t dim(std::size_t i) const { return shape_.at(i); }
  index_t rank() const { return static_cast<index_t>(shape_.size()); }
  index_t size() const { return buf_.size(); }
  T& operator[](index_t i) { return buf_[i]; }
  const T& operator[](index_t i) const { return buf_[i]; }
  T* begin() { return buf_.begin(); }
  T* end() { return buf_.end(); }
  const T* begin() const { return buf_.begin(); }
  const T* end() const { return buf_.end(); }
  View<T> view() { return {data(), shape_}; }
  View<const T> view() const { return {data(), shape_}; }
  /// The storage, for upload()/download() between the host and any backend.
  Buffer<T, Backend>& buffer() { return buf_; }
  const Buffer<T, Backend>& buffer() const { return buf_; }

 private:
  Shape shape_;
  Buffer<T, Backend> buf_;
};

/// ||a - b|| / ||b||, the norm-based relative error used in every parity test.
template <class T, class U>
double relative_error(const T* a, const U* b, index_t n) {
  double num = 0, den = 0;
  for (index_t i = 0; i < n; ++i) {
    const double d = double(a[i]) - double(b[i]);
    num += d * d;
    den += double(b[i]) * double(b[i]);
  }
  if (den == 0) return std::sqrt(num);
  return std::sqrt(num / den);
}

inline double max_abs(const double* a, index_t n) {
  double m = 0;
  for (index_t i = 0; i < n; ++i) m = std::max(m, std::abs(a[i]));
  return m;
}

}  // namespace distilx
