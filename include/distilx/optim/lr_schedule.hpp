// Learning-rate schedules with Hugging Face semantics: linear warm-up then cosine decay
// (get_cosine_schedule_with_warmup / get_cosine_with_min_lr_schedule_with_warmup), or
// constant after warm-up (get_constant_schedule_with_warmup). Host-side scalar logic;
// the only state is the step counter, which checkpoints save and restore.
#pragma once

#include <algorithm>
#include <cmath>

#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"

namespace distilx {

enum class LrScheduleKind { constant, cosine };

struct LrScheduleConfig {
  LrScheduleKind kind = LrScheduleKind::cosine;
  double base_lr = 1e-3;
  index_t warmup_steps = 0;  // lr rises linearly from 0 over these steps
  index_t total_steps = 0;   // cosine: HF num_training_steps (warm-up included)
  double min_lr_ratio = 0;   // cosine: lr decays to base_lr·min_lr_ratio instead of 0
};

/// lr(step) for optimizer steps numbered from 0. Like torch's LambdaLR: lr() is the rate for
/// the next optimizer step, step() advances after each optimizer step. With warm-up, the
/// first optimizer step therefore runs with lr 0, exactly as in HF Trainer.
class LrSchedule {
 public:
  LrSchedule() : LrSchedule(LrScheduleConfig{}) {}
  explicit LrSchedule(const LrScheduleConfig& cfg) : cfg_(cfg) {
    DISTILX_REQUIRE(config_error, std::isfinite(cfg.base_lr) && cfg.base_lr >= 0,
                    "LrSchedule: base_lr must be finite and >= 0, got ", cfg.base_lr);
    DISTILX_REQUIRE(config_error, cfg.warmup_steps >= 0, "LrSchedule: warmup_steps must be >= 0, got ",
                    cfg.warmup_steps);
    if (cfg.kind == LrScheduleKind::cosine) {
      DISTILX_REQUIRE(config_error, cfg.total_steps >= cfg.warmup_steps,
                      "LrSchedule: cosine needs total_steps >= warmup_steps, got total_steps ", cfg.total_steps,
                      " and warmup_steps ", cfg.warmup_steps);
      DISTILX_REQUIRE(config_error, cfg.min_lr_ratio >= 0 && cfg.min_lr_ratio <= 1,
                      "LrSchedule: min_lr_ratio must be in [0, 1], got ", cfg.min_lr_ratio);
    }
  }

  /// Multiplier of base_lr at `step` (HF's lr_lambda).
  double factor(index_t step) const {
    DISTILX_REQUIRE(config_error, step >= 0, "LrSchedule: step must be >= 0, got ", step);
    if (step < cfg_.warmup_steps)
      return static_cast<double>(step) / static_cast<double>(std::max<index_t>(1, cfg_.warmup_steps));
    if (cfg_.kind == LrScheduleKind::constant) return 1.0;
    double progress = static_cast<double>(step - cfg_.warmup_steps) /
                      static_cast<double>(std::max<index_t>(1, cfg_.total_steps - cfg_.warmup_steps));
    // HF lets the cosine rise again past total_steps; holding the final value is what a run
    // that overshoots its budget wants.
    progress = std::min(progress, 1.0);
    const double cosine = 0.5 * (1.0 + std::cos(kPi * progress));
    return std::max(0.0, cosine * (1.0 - cfg_.min_lr_ratio) + cfg_.min_lr_ratio);
  }
  double lr_at(index_t step) const { return cfg_.base_lr * factor(step); }

  /// Rate for the next optimizer step.
  double lr() const { return lr_at(step_); }
  /// Advances after an optimizer step; returns the new lr().
  double step() {
    ++step_;
    return lr();
  }

  const LrScheduleConfig& config() const { return cfg_; }
  // Checkpoint state: the number of step() calls so far.
  index_t step_count() const { return step_; }
  void set_step_count(index_t s) {
    DISTILX_REQUIRE(config_error, s >= 0, "LrSchedule: step count must be >= 0, got ", s);
    step_ = s;
  }

 private:
  static constexpr double kPi = 3.14159265358979323846;
  LrScheduleConfig cfg_;
  index_t step_ = 0;
};

}  // namespace distilx
