// Scalar schedules for the distillation loss (spec-distillation.md §2): the Δ-schedule
// (logarithmic decay within an epoch, geometric decay of the start value across epochs, with
// an opt-in reproduction of the reference implementation's off-by-one quirk) and the fixed
// schedule of the paper's ablation. A schedule is a pure function of (epoch, step), so its
// plain fields are all a checkpoint has to store.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>

#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"

namespace distilx {

/// v(e, s) = floor + (v0^(e) - floor) / (1 + ln(1 + s)),  v0^(e+1) = max(v0^(e) - delta * v0^(e), floor).
/// `s` is the 0-based optimizer step counted from the start of epoch `e`.
struct DeltaSchedule {
  double v0 = 1.0;     // start value of epoch 0
  double floor = 1.0;  // v_f: the value approached within an epoch and the lower bound of v0^(e)
  double delta = 0.0;  // per-epoch relative decay of the start value, in [0, 1]
  // Reproduce thiomajid/distil_xlstm: the value is updated at the end of a step with a counter
  // starting at 0, so steps 0 and 1 both use v0^(e), step s >= 1 uses 1 + ln(s), and step 0 of
  // epoch e >= 1 still uses the last value of epoch e-1 (which needs steps_per_epoch).
  bool reference_compatible = false;
  index_t steps_per_epoch = 0;  // only read by the reference-compatible variant, for epochs >= 1

  /// v0^(e): the start value after e epoch-end decays. Iterated (not pow) so it equals the
  /// recurrence exactly, as the reference computes it.
  double start_value(index_t epoch) const {
    double v = v0;
    for (index_t e = 0; e < epoch; ++e) {
      const double next = std::max(v - delta * v, floor);
      if (next == v) break;  // at the floor (or delta = 0): fixed point
      v = next;
    }
    return v;
  }

  double value(index_t epoch, index_t step_in_epoch) const {
    DISTILX_REQUIRE(config_error, epoch >= 0 && step_in_epoch >= 0, "DeltaSchedule: epoch (", epoch,
                    ") and step (", step_in_epoch, ") must be >= 0");
    if (!reference_compatible) return at(start_value(epoch), static_cast<double>(step_in_epoch) + 1.0);
    if (step_in_epoch >= 1) return at(start_value(epoch), static_cast<double>(step_in_epoch));
    if (epoch == 0) return v0;
    DISTILX_REQUIRE(config_error, steps_per_epoch >= 1,
                    "DeltaSchedule: the reference-compatible variant needs steps_per_epoch (got ", steps_per_epoch,
                    ") for step 0 of epoch ", epoch);
    // Carried over from the end of the last step of epoch e-1, where the counter was steps_per_epoch - 1.
    return at(start_value(epoch - 1), static_cast<double>(steps_per_epoch));
  }

  /// Throws config_error naming `what` for values the schedule cannot use.
  void validate(const std::string& what) const {
    DISTILX_REQUIRE(config_error, std::isfinite(v0) && std::isfinite(floor), what, " schedule: start value (", v0,
                    ") and floor (", floor, ") must be finite");
    DISTILX_REQUIRE(config_error, delta >= 0 && delta <= 1, what, " schedule: delta = ", delta,
                    " must lie in [0, 1]");
    DISTILX_REQUIRE(config_error, steps_per_epoch >= 0, what, " schedule: steps_per_epoch = ", steps_per_epoch,
                    " must be >= 0");
  }
  double min_value() const { return std::min(v0, floor); }
  double max_value() const { return std::max(v0, floor); }

 private:
  // ln_arg is 1 + s for the clean rule and s for the reference one.
  double at(double start, double ln_arg) const { return floor + (start - floor) / (1.0 + std::log(ln_arg)); }
};

/// A constant value: the paper's "fixed alpha and T" ablation.
struct FixedSchedule {
  double v = 1.0;
  double value(index_t /*epoch*/, index_t /*step_in_epoch*/) const { return v; }
  void validate(const std::string& what) const {
    DISTILX_REQUIRE(config_error, std::isfinite(v), what, " schedule: value ", v, " must be finite");
  }
  double min_value() const { return v; }
  double max_value() const { return v; }
};

enum class ScheduleKind { fixed, delta };

/// Either schedule behind one type (implicitly constructible from both). Plain public fields:
/// the fields of the kind not selected are ignored.
struct ScalarSchedule {
  ScheduleKind kind = ScheduleKind::fixed;
  FixedSchedule fixed{};
  DeltaSchedule delta{};

  ScalarSchedule() = default;
  ScalarSchedule(const FixedSchedule& f) : kind(ScheduleKind::fixed), fixed(f) {}  // NOLINT: implicit by design
  ScalarSchedule(const DeltaSchedule& d) : kind(ScheduleKind::delta), delta(d) {}  // NOLINT: implicit by design

  double value(index_t epoch, index_t step_in_epoch) const {
    return kind == ScheduleKind::delta ? delta.value(epoch, step_in_epoch) : fixed.value(epoch, step_in_epoch);
  }
  void validate(const std::string& what) const {
    if (kind == ScheduleKind::delta) delta.validate(what);
    else fixed.validate(what);
  }
  /// Bounds over all (epoch, step): every value lies between the start value and the floor.
  double min_value() const { return kind == ScheduleKind::delta ? delta.min_value() : fixed.min_value(); }
  double max_value() const { return kind == ScheduleKind::delta ? delta.max_value() : fixed.max_value(); }
};

}  // namespace distilx
