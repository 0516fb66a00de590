// AdamW over the student's flat parameter buffer, with PyTorch's torch.optim.AdamW
// semantics (amsgrad=False, maximize=False): decoupled weight decay, bias-corrected
// moments, per-tensor decay flags taken from ParamLayout. The elementwise update is
// ops::adamw_update, overloaded on the backend tag so CUDA can supply a fused kernel.
#pragma once

#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "distilx/backend/memory.hpp"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"
#include "distilx/models/params.hpp"

namespace distilx {

/// Hyperparameters; defaults are torch.optim.AdamW's.
struct AdamWConfig {
  double lr = 1e-3;  // used by step() without an explicit lr; a schedule normally passes its own
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

/// One contiguous tensor of the flat buffer and whether it receives weight decay.
struct ParamRange {
  index_t offset = 0;
  index_t size = 0;
  bool decay = false;
};

/// Scalars of one update, computed once per step on the host (as PyTorch does in Python).
struct AdamWCoeffs {
  double decay_factor = 1;  // 1 − lr·wd, or exactly 1 for no-decay tensors
  double beta1 = 0.9, one_minus_beta1 = 0.1;
  double beta2 = 0.999, one_minus_beta2 = 0.001;
  double bias_correction2_sqrt = 1;  // sqrt(1 − β2^t)
  double eps = 1e-8;
  double neg_step_size = 0;  // −lr / (1 − β1^t)
};

namespace ops {

/// One AdamW update of n elements, in the operation order of PyTorch's single-tensor path
/// (mul_, mul_+add_, mul_+addcmul_, sqrt/div/add_, addcdiv_) so double results agree to rounding.
template <class T>
void adamw_update(cpu, T* DISTILX_RESTRICT p, const T* DISTILX_RESTRICT g, T* DISTILX_RESTRICT m,
                  T* DISTILX_RESTRICT v, index_t n, const AdamWCoeffs& c) {
  // Scalars are rounded to T once, like PyTorch's CPU kernels do for a Python float.
  const T decay = static_cast<T>(c.decay_factor);
  const T b1 = static_cast<T>(c.beta1), ob1 = static_cast<T>(c.one_minus_beta1);
  const T b2 = static_cast<T>(c.beta2), ob2 = static_cast<T>(c.one_minus_beta2);
  const T bc2s = static_cast<T>(c.bias_correction2_sqrt);
  const T eps = static_cast<T>(c.eps);
  const T nss = static_cast<T>(c.neg_step_size);
#pragma omp parallel for if (n > 65536)
  for (index_t i = 0; i < n; ++i) {
    const T gi = g[i];
    const T mi = m[i] * b1 + ob1 * gi;
    const T vi = v[i] * b2 + ob2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const T denom = std::sqrt(vi) / bc2s + eps;
    p[i] = p[i] * decay + nss * (mi / denom);
  }
}

}  // namespace ops

/// Decay ranges of a layout, one per registered tensor (padding between them is never touched).
inline std::vector<ParamRange> param_ranges(const ParamLayout& layout) {
  std::vector<ParamRange> r;
  r.reserve(layout.infos().size());
  for (const ParamInfo& p : layout.infos()) r.push_back({p.offset, p.size, p.decay});
  return r;
}

/// AdamW state (m, v, step) for one flat buffer of `size()` elements.
template <class T, class Backend = cpu>
class AdamW {
  static_assert(std::is_floating_point_v<T>, "AdamW: T must be float or double");
  static_assert(is_backend_v<Backend>, "AdamW: Backend must be a distilx backend tag");

 public:
  using value_type = T;
  using backend_type = Backend;

  AdamW(const ParamLayout& layout, const AdamWConfig& cfg = {}) : AdamW(param_ranges(layout), layout.total(), cfg) {}

  /// Explicit ranges inside a buffer of `total` elements (ranges may not overlap or run past it).
  AdamW(std::vector<ParamRange> ranges, index_t total, const AdamWConfig& cfg = {})
      : cfg_(cfg), ranges_(std::move(ranges)), total_(total) {
    validate_(cfg_);
    DISTILX_REQUIRE(config_error, total_ >= 0, "AdamW: buffer size must be >= 0, got ", total_);
    index_t end = 0;
    for (const ParamRange& r : ranges_) {
      DISTILX_REQUIRE(config_error, r.offset >= end && r.size >= 0 && r.offset + r.size <= total_,
                      "AdamW: parameter ranges must be ascending, disjoint and inside the buffer of ", total_,
                      " elements; got [", r.offset, ", ", r.offset + r.size, ") after end ", end);
      end = r.offset + r.size;
    }
    m_.resize(total_);
    v_.resize(total_);
  }

  /// One optimizer step with learning rate `lr` (the schedule's value for this step):
  /// increments the step count, then updates params from grads. Both hold size() elements.
  void step(T* params, const T* grads, double lr) {
    DISTILX_REQUIRE(config_error, std::isfinite(lr) && lr >= 0, "AdamW::step: lr must be finite and >= 0, got ", lr);
    ++step_;
    const double t = static_cast<double>(step_);
    AdamWCoeffs c;
    c.beta1 = cfg_.beta1;
    c.one_minus_beta1 = 1 - cfg_.beta1;
    c.beta2 = cfg_.beta2;
    c.one_minus_beta2 = 1 - cfg_.beta2;
    c.eps = cfg_.eps;
    c.neg_step_size = -(lr / (1 - std::pow(cfg_.beta1, t)));
    c.bias_correction2_sqrt = std::sqrt(1 - std::pow(cfg_.beta2, t));
    const double decay_factor = 1 - lr * cfg_.weight_decay;
    for (const ParamRange& r : ranges_) {
      if (r.size == 0) continue;
      // No-decay tensors use exactly 1, so their values are not perturbed by a multiply.
      c.decay_factor = r.decay ? decay_factor : 1.0;
      ops::adamw_update(Backend{}, params + r.offset, grads + r.offset, m_.data() + r.offset, v_.data() + r.offset,
                        r.size, c);
    }
  }
  void step(T* params, const T* grads) { step(params, grads, cfg_.lr); }

  /// Clears m, v and the step count (e.g. before loading a checkpoint that lacks optimizer state).
  void reset() {
    m_.zero();
    v_.zero();
    step_ = 0;
  }

  const AdamWConfig& config() const { return cfg_; }
  void set_config(const AdamWConfig& cfg) {
    validate_(cfg);
    cfg_ = cfg;
  }
  const std::vector<ParamRange>& ranges() const { return ranges_; }
  /// Length of params, grads, m and v (ParamLayout::total(), padding included).
  index_t size() const { return total_; }

  // Checkpoint state: m, v (flat, padding entries 0) and the number of steps taken.
  Buffer<T, Backend>& exp_avg() { return m_; }
  const Buffer<T, Backend>& exp_avg() const { return m_; }
  Buffer<T, Backend>& exp_avg_sq() { return v_; }
  const Buffer<T, Backend>& exp_avg_sq() const { return v_; }
  index_t step_count() const { return step_; }
  void set_step_count(index_t s) {
    DISTILX_REQUIRE(config_error, s >= 0, "AdamW: step count must be >= 0, got ", s);
    step_ = s;
  }

 private:
  static void validate_(const AdamWConfig& c) {
    // Same admissible ranges as torch.optim.AdamW.
    DISTILX_REQUIRE(config_error, c.lr >= 0, "AdamW: lr must be >= 0, got ", c.lr);
    DISTILX_REQUIRE(config_error, c.eps >= 0, "AdamW: eps must be >= 0, got ", c.eps);
    DISTILX_REQUIRE(config_error, c.beta1 >= 0 && c.beta1 < 1, "AdamW: beta1 must be in [0, 1), got ", c.beta1);
    DISTILX_REQUIRE(config_error, c.beta2 >= 0 && c.beta2 < 1, "AdamW: beta2 must be in [0, 1), got ", c.beta2);
    DISTILX_REQUIRE(config_error, c.weight_decay >= 0, "AdamW: weight_decay must be >= 0, got ", c.weight_decay);
  }

  AdamWConfig cfg_;
  std::vector<ParamRange> ranges_;
  index_t total_ = 0;
  index_t step_ = 0;
  Buffer<T, Backend> m_, v_;
};

}  // namespace distilx
