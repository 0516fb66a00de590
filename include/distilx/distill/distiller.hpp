// The generic Δ-distillation trainer (architecture.md §1, spec-distillation.md):
// per optimizer step, for each micro-batch: teacher forward (frozen) → student
// forward → composite loss (KL·τ² + alignment + CE, chunked over V) → student
// backward into the flat gradient buffer; then average, NaN/Inf guard, global
// norm clipping, AdamW with the LR schedule. Callbacks observe steps and
// evaluations; checkpoints hold everything needed to resume the same run.
#pragma once

#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/data/loader.hpp"
#include "distilx/distill/data_parallel.hpp"
#include "distilx/io/checkpoint.hpp"
#include "distilx/loss/distillation_loss.hpp"
#include "distilx/models/student.hpp"
#include "distilx/optim/adamw.hpp"
#include "distilx/optim/clip.hpp"
#include "distilx/optim/lr_schedule.hpp"
#include "distilx/teacher/teacher.hpp"

namespace distilx {

/// Dynamic loss scaling (for fp16 GEMM operands, whose small gradients would underflow): the
/// loss gradient is multiplied by `scale` before the backward pass and the parameter gradient
/// divided by it after; a step whose gradient overflows is skipped and the scale multiplied
/// by backoff; after growth_interval clean steps in a row it is multiplied by growth.
struct LossScaleConfig {
  bool enabled = false;
  double init = 65536.0;
  double growth = 2.0;
  double backoff = 0.5;
  index_t growth_interval = 2000;
  double min_scale = 1.0;  // an overflow at this scale counts as a bad step

  void validate() const {
    DISTILX_REQUIRE(config_error, init > 0 && growth >= 1 && backoff > 0 && backoff < 1 && growth_interval >= 1 &&
                                      min_scale > 0,
                    "loss scaling needs init > 0, growth >= 1, 0 < backoff < 1, growth_interval >= 1, min_scale > 0 "
                    "(got init ", init, ", growth ", growth, ", backoff ", backoff, ", growth_interval ",
                    growth_interval, ", min_scale ", min_scale, ")");
  }
};

struct DistillerConfig {
  index_t grad_accum = 1;        // micro-batches per optimizer step
  index_t max_steps = 100;       // optimizer steps of the whole run
  double clip_norm = 1.0;        // global gradient norm (<= 0: off)
  AdamWConfig adamw{2e-4, 0.9, 0.999, 1e-8, 0.01};
  /// base_lr 0 means adamw.lr; total_steps 0 means max_steps.
  LrScheduleConfig lr{LrScheduleKind::cosine, 0.0, 10, 0, 0.0};
  DistillationLossConfig loss;
  index_t eval_every = 0;        // optimizer steps between evaluations (0: only at the end)
  index_t eval_batches = 0;      // validation batches per evaluation (0: all)
  index_t checkpoint_every = 0;  // optimizer steps between checkpoints (0: only at the end)
  index_t keep_checkpoints = 3;
  std::string run_dir;           // empty: no checkpoints
  index_t max_bad_steps = 5;     // consecutive non-finite steps before training stops
  nlohmann::json extra;          // anything the caller wants recorded (e.g. data sources)
  LossScaleConfig loss_scale;    // off by default (fp32, bf16 and tf32 need none)
};

/// JSON of everything that defines the run (stored in checkpoints; a resume with a
/// different configuration is refused with the differences listed).
inline nlohmann::json to_json(const ScalarSchedule& s) {
  if (s.kind == ScheduleKind::fixed) return {{"kind", "fixed"}, {"value", s.fixed.value(0, 0)}};
  return {{"kind", "delta"}, {"v0", s.delta.v0}, {"floor", s.delta.floor}, {"delta", s.delta.delta},
          {"reference_compatible", s.delta.reference_compatible}};
}
inline nlohmann::json distiller_config_json(const DistillerConfig& c) {
  return {{"grad_accum", c.grad_accum},
          {"max_steps", c.max_steps},
          {"clip_norm", c.clip_norm},
          {"adamw", {{"lr", c.adamw.lr}, {"beta1", c.adamw.beta1}, {"beta2", c.adamw.beta2}, {"eps", c.adamw.eps},
                     {"weight_decay", c.adamw.weight_decay}}},
          {"lr", {{"kind", c.lr.kind == LrScheduleKind::cosine ? "cosine" : "constant"}, {"base_lr", c.lr.base_lr},
                  {"warmup_steps", c.lr.warmup_steps}, {"total_steps", c.lr.total_steps},
                  {"min_lr_ratio", c.lr.min_lr_ratio}}},
          {"loss", {{"divergence", to_string(c.loss.divergence)}, {"beta", c.loss.beta},
                    {"alignment", to_string(c.loss.alignment)}, {"tau", to_json(c.loss.tau)},
                    {"kl_weight", to_json(c.loss.kl_weight)}, {"alignment_weight", to_json(c.loss.alignment_weight)},
                    {"additive_alignment_weight", c.loss.additive_alignment_weight}}},
          {"extra", c.extra}};
}
inline nlohmann::json distiller_config_json_full(const DistillerConfig& c) {
  nlohmann::json j = distiller_config_json(c);
  if (c.loss_scale.enabled)  // recorded only when on, so checkpoints of earlier runs still match
    j["loss_scale"] = {{"init", c.loss_scale.init}, {"growth", c.loss_scale.growth},
                       {"backoff", c.loss_scale.backoff}, {"growth_interval", c.loss_scale.growth_interval},
                       {"min_scale", c.loss_scale.min_scale}};
  return j;
}

struct StepReport {
  index_t step = 0;              // optimizer steps completed (1-based after the first)
  index_t epoch = 0;
  DistillationMetrics loss;      // averaged over the micro-batches
  double lr = 0, grad_norm = 0;
  double tokens_per_s = 0, elapsed_s = 0;
  index_t tokens = 0;            // tokens seen so far
  bool skipped = false;          // non-finite loss or gradient: no update
  std::string bad_term;          // which term went bad when skipped
  double loss_scale = 1.0;       // dynamic loss scale used for this step (1 when off)
};

struct EvalReport {
  index_t step = 0;
  double student_ce = 0, teacher_ce = 0;
  double student_ppl = 0, teacher_ppl = 0;
  double kl = 0;                 // mean KL(teacher || student) at tau = 1
  double top1 = 0;               // top-1 agreement
  index_t tokens = 0;
};

/// Observer interface; override what you need.
class DistillerCallback {
 public:
  virtual ~DistillerCallback() = default;
  virtual void on_train_begin(index_t /*start_step*/, index_t /*max_steps*/) {}
  virtual void on_step(const StepReport&) {}
  virtual void on_eval(const EvalReport&) {}
  virtual void on_checkpoint(const std::string& /*path*/, index_t /*step*/) {}
  virtual void on_train_end(index_t /*step*/) {}
  /// Polled after every step (early stopping, Ctrl-C).
  virtual bool stop_requested() { return false; }
};

namespace detail {
struct ParameterProbe {
  template <class X>
  void operator()(const std::string&, const X&) const {}
};
template <class, class = void>
struct has_parameter_visitor : std::false_type {};
template <class Tc>
struct has_parameter_visitor<
    Tc, std::void_t<decltype(std::declval<const Tc&>().for_each_parameter(std::declval<ParameterProbe&>()))>>
    : std::true_type {};
}  // namespace detail

template <class StudentT, class TeacherT, class LossT = DeltaDistillationLoss<typename StudentT::value_type,
                                                                              typename StudentT::backend_type>,
          class OptimizerT = AdamW<typename StudentT::value_type, typename StudentT::backend_type>>
class Distiller {
 public:
  using T = typename StudentT::value_type;
  using Backend = typename StudentT::backend_type;
  static_assert(is_teacher_v<TeacherT>, "Distiller: TeacherT does not model the Teacher concept (teacher/teacher.hpp)");
  static_assert(std::is_same_v<typename TeacherT::value_type, T>,
                "Distiller: the teacher and the student must use the same compute type");

  Distiller(StudentT& student, TeacherT& teacher, data::TokenLoader& loader, DistillerConfig cfg)
      : student_(student),
        teacher_(teacher),
        loader_(loader),
        cfg_(std::move(cfg)),
        loss_(cfg_.loss),
        opt_(student.layout(), cfg_.adamw),
        lr_(resolved_lr(cfg_)) {
    const StudentConfig& sc = student_.config();
    DISTILX_REQUIRE(config_error, sc.vocab_size == teacher_.vocab_size(), "student vocabulary ", sc.vocab_size,
                    " differs from the teacher's ", teacher_.vocab_size());
    DISTILX_REQUIRE(config_error, cfg_.grad_accum >= 1, "grad_accum must be >= 1, got ", cfg_.grad_accum);
    if (cfg_.loss_scale.enabled) {
      cfg_.loss_scale.validate();
      loss_scale_ = cfg_.loss_scale.init;
    }
    loss_.check_shapes(sc.num_blocks, teacher_.num_layers(), sc.embedding_dim, teacher_.hidden_size());
    const auto& lo = loader_.options();
    B_ = lo.batch_size;
    S_ = lo.seq_len;
    steps_per_epoch_ = std::max<index_t>(1, loader_.batches_per_epoch() / cfg_.grad_accum);
    const index_t M = B_ * S_;
    inputs_.resize(static_cast<std::size_t>(M));
    targets_.resize(static_cast<std::size_t>(M));
    dh_.resize(M * sc.embedding_dim);
    // Weights read by many products: the CUDA backend keeps 16-bit copies in bf16 / fp16 math.
    const Backend be{};
    cached_.push_back(ops::cache_operands(be, static_cast<const T*>(student_.params()), student_.flat_size(), false));
    cached_.push_back(
        ops::cache_operands(be, static_cast<const T*>(student_.embedding()), sc.vocab_size * sc.embedding_dim, true));
    if (!sc.tie_weights)
      cached_.push_back(
          ops::cache_operands(be, static_cast<const T*>(student_.head()), sc.vocab_size * sc.embedding_dim, true));
    if constexpr (detail::has_parameter_visitor<TeacherT>::value)
      teacher_.for_each_parameter([&](const std::string&, const auto& t) {
        cached_.push_back(ops::cache_operands(be, static_cast<const T*>(t.data()), t.size(), true));
      });
    ops::parameters_updated(be);  // the student's weights may have been set since the last step
    dH_.resize(static_cast<std::size_t>(sc.num_blocks));
    for (auto& b : dH_) b.resize(M * sc.embedding_dim);
  }

  void add_callback(std::shared_ptr<DistillerCallback> cb) { callbacks_.push_back(std::move(cb)); }

  /// Trains data-parallel under `dp` (one process per GPU; see distilx/parallel/): the loader
  /// must have been built with dp's rank and world size. Gradients are averaged over ranks,
  /// metrics and evaluations summed over ranks, and only the root rank runs the callbacks and
  /// writes checkpoints. Checks at once that every rank runs the same configuration.
  void set_data_parallel(std::shared_ptr<DataParallel<T>> dp) {
    dp_ = std::move(dp);
    if (!dp_) return;
    const auto& lo = loader_.options();
    DISTILX_REQUIRE(config_error, lo.world_size == dp_->world_size() && lo.rank == dp_->rank(),
                    "data parallel: the loader was built for rank ", lo.rank, " of ", lo.world_size,
                    " but this process is rank ", dp_->rank(), " of ", dp_->world_size(),
                    " (set LoaderOptions::rank and world_size from the communicator)");
    nlohmann::json j = run_config();
    j["data"].erase("rank");
    dp_->check_same_on_all_ranks("run configuration (student, distiller, data)", fingerprint_(j.dump()));
    dp_->check_same_on_all_ranks("student initial parameters", fingerprint_params_());
    // ZeRO-1: the policy holds this rank's shard of the optimizer state; drop the full copy.
    if constexpr (std::is_constructible_v<OptimizerT, std::vector<ParamRange>, index_t, AdamWConfig>)
      if (dp_->owns_update()) opt_ = OptimizerT(std::vector<ParamRange>{}, index_t(0), cfg_.adamw);
  }
  DataParallel<T>* data_parallel() const { return dp_.get(); }
  /// True on the rank that prints, writes metrics and checkpoints (always without data parallelism).
  bool is_root() const { return !dp_ || dp_->is_root(); }
  int world_size() const { return dp_ ? dp_->world_size() : 1; }
  double loss_scale() const { return loss_scale_; }

  index_t step_count() const { return step_; }
  /// The latest evaluation (step -1 before any).
  const EvalReport& last_eval() const { return last_eval_; }
  index_t last_eval_step() const { return last_eval_.step; }
  index_t epoch() const { return epoch_; }
  index_t steps_per_epoch() const { return steps_per_epoch_; }
  const DistillerConfig& config() const { return cfg_; }
  LossT& loss() { return loss_; }
  OptimizerT& optimizer() { return opt_; }

  /// The full configuration of the run: student, distiller, data shape.
  nlohmann::json run_config() const {
    nlohmann::json j;
    j["student"] = student_.config();
    j["distiller"] = distiller_config_json_full(cfg_);
    j["data"] = {{"batch_size", B_}, {"seq_len", S_}, {"seed", loader_.options().seed}};
    if (loader_.options().world_size > 1) j["data"]["world_size"] = loader_.options().world_size;
    return j;
  }

  /// One optimizer step over grad_accum micro-batches.
  StepReport step() {
    const auto t0 = std::chrono::steady_clock::now();
    StepReport r;
    // Schedules run on (epoch, optimizer step within the epoch), both read off the loader so
    // that a resumed run continues the same schedule.
    index_t sched_epoch = loader_.epoch(), pos = loader_.position();
    if (pos + cfg_.grad_accum > loader_.batches_per_epoch()) ++sched_epoch, pos = 0;
    const LossWeights w = loss_.weights(sched_epoch, pos / cfg_.grad_accum);
    student_.zero_grad();
    if (dp_) dp_->begin_step(cfg_.grad_accum);
    r.loss_scale = loss_scale_;
    DistillationMetrics acc;
    for (index_t a = 0; a < cfg_.grad_accum; ++a) {
      next_batch();
      const DistillationMetrics m = micro_step(w, true);
      accumulate(acc, m, a == 0);
    }
    const double inv = 1.0 / double(cfg_.grad_accum);
    finish_average(acc, inv);
    if (dp_) average_over_ranks(acc);
    r.loss = acc;
    r.epoch = epoch_;
    const index_t n = student_.flat_size();
    T* g = student_.grads();
    // Accumulation average and loss-scale removal in one pass over the gradient.
    const double unscale = 1.0 / (double(cfg_.grad_accum) * loss_scale_);
    if (unscale != 1.0) ops::scale(Backend{}, g, static_cast<T>(unscale), n);
    if (dp_) dp_->reduce_gradients(g, n);
    // Sum of squares over every rank's gradient: NaN/Inf anywhere makes it non-finite everywhere.
    const double sq = dp_ ? dp_->grad_sum_squares(g, n) : ops::sum_squares(Backend{}, g, n);
    // Numerics guard: skip the update, name the term that went bad.
    if (!std::isfinite(acc.kl)) r.bad_term = "kl";
    else if (!std::isfinite(acc.ce)) r.bad_term = "ce";
    else if (!std::isfinite(acc.alignment)) r.bad_term = "alignment";
    else if (!std::isfinite(sq)) r.bad_term = "gradient";
    r.lr = lr_.lr();
    if (!r.bad_term.empty()) {
      r.skipped = true;
      if (cfg_.loss_scale.enabled && r.bad_term == "gradient" && loss_scale_ > cfg_.loss_scale.min_scale) {
        // An fp16 overflow: retry the next batch at a smaller scale; not a numerics failure.
        loss_scale_ = std::max(cfg_.loss_scale.min_scale, loss_scale_ * cfg_.loss_scale.backoff);
        good_scaled_steps_ = 0;
      } else {
        ++bad_streak_;
      }
    } else {
      bad_streak_ = 0;
      // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1.
      r.grad_norm = std::sqrt(sq);
      if (cfg_.clip_norm > 0) {
        const double coef = cfg_.clip_norm / (r.grad_norm + 1e-6);
        if (coef < 1.0) ops::scale(Backend{}, g, static_cast<T>(coef), n);
      }
      if (dp_ && dp_->owns_update()) dp_->update(student_.params(), g, n, r.lr);
      else opt_.step(student_.params(), g, r.lr);
      ops::parameters_updated(Backend{});  // e.g. 16-bit operand copies of the weights are stale now
      if (cfg_.loss_scale.enabled && ++good_scaled_steps_ >= cfg_.loss_scale.growth_interval) {
        loss_scale_ *= cfg_.loss_scale.growth;
        good_scaled_steps_ = 0;
      }
    }
    lr_.step();
    ++step_;
    tokens_ += B_ * S_ * cfg_.grad_accum * world_size();
    r.step = step_;
    r.tokens = tokens_;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    elapsed_ += dt;
    r.elapsed_s = elapsed_;
    r.tokens_per_s = double(B_ * S_ * cfg_.grad_accum * world_size()) / dt;
    if (is_root())
      for (auto& cb : callbacks_) cb->on_step(r);
    if (bad_streak_ >= cfg_.max_bad_steps)  // the same on every rank: the guard used reduced values
      throw error(detail::concat("training stopped: ", bad_streak_, " consecutive steps with a non-finite ", r.bad_term,
                                 " (last at step ", step_, "); lower the learning rate, enable clipping, or check "
                                 "the data for out-of-range tokens"));
    return r;
  }

  /// Held-out evaluation over the loader's validation split (spec §6).
  EvalReport evaluate(index_t max_batches = 0) {
    EvalReport e;
    e.step = step_;
    const index_t nb = max_batches > 0 ? std::min(max_batches, loader_.val_batches()) : loader_.val_batches();
    DISTILX_REQUIRE(config_error, nb > 0, "evaluation needs a validation split (set a validation fraction)");
    const StudentConfig& sc = student_.config();
    double s_ce = 0, t_ce = 0, kl = 0, top1 = 0;
    index_t targets = 0, positions = 0;
    VocabLoss<T, Backend> teacher_ce;
    for (index_t k = 0; k < nb; ++k) {
      loader_.val_batch(k, inputs_.data(), targets_.data());
      forward_both();
      DistillationInputs<T> in = inputs_for();
      LossWeights w1{1.0, 1.0, 0.0, 1.0};
      const DistillationMetrics m = loss_.compute(in, w1, DistillationGrads<T>{}, false);
      VocabLossInputs<T> tin;
      tin.h_s = teacher_hidden_.back().data();
      tin.E_s = teacher_.lm_head().data();
      tin.targets = targets_.data();
      tin.M = B_ * S_;
      tin.d = teacher_.hidden_size();
      tin.d_t = teacher_.hidden_size();
      tin.V = sc.vocab_size;
      const VocabLossResult tr = teacher_ce.compute(tin, 1.0, 0.0, 1.0, nullptr, false);
      s_ce += m.ce * double(m.targets);
      t_ce += tr.ce * double(tr.targets);
      kl += m.kl * double(m.positions);
      top1 += m.top1 * double(m.positions);
      targets += m.targets;
      positions += m.positions;
    }
    if (dp_) {  // every rank evaluated its own slice of the validation split
      double v[6] = {s_ce, t_ce, kl, top1, double(targets), double(positions)};
      dp_->all_reduce_sum(v, 6);
      s_ce = v[0], t_ce = v[1], kl = v[2], top1 = v[3];
      targets = index_t(v[4]), positions = index_t(v[5]);
    }
    e.student_ce = s_ce / double(targets);
    e.teacher_ce = t_ce / double(targets);
    e.student_ppl = std::exp(e.student_ce);
    e.teacher_ppl = std::exp(e.teacher_ce);
    e.kl = kl / double(positions);
    e.top1 = top1 / double(positions);
    e.tokens = targets;
    last_eval_ = e;
    if (is_root())
      for (auto& cb : callbacks_) cb->on_eval(e);
    return e;
  }

  /// Trains until max_steps or a callback asks to stop; evaluates and checkpoints on schedule.
  void train() {
    if (is_root())
      for (auto& cb : callbacks_) cb->on_train_begin(step_, cfg_.max_steps);
    bool stop = false;
    while (step_ < cfg_.max_steps && !stop) {
      step();
      if (cfg_.eval_every > 0 && step_ % cfg_.eval_every == 0 && loader_.val_batches() > 0) evaluate(cfg_.eval_batches);
      if (!cfg_.run_dir.empty() && cfg_.checkpoint_every > 0 && step_ % cfg_.checkpoint_every == 0) checkpoint();
      if (is_root())
        for (auto& cb : callbacks_) stop = stop || cb->stop_requested();  // after this step's evaluation
      if (dp_) {  // the root decides (Ctrl-C, early stopping); every rank follows
        double v = stop ? 1.0 : 0.0;
        dp_->all_reduce_sum(&v, 1);
        stop = v > 0;
      }
    }
    if (!cfg_.run_dir.empty() && step_ != last_checkpoint_step_) checkpoint();
    if (is_root())
      for (auto& cb : callbacks_) cb->on_train_end(step_);
  }

  /// Writes ckpt_<step>.dxc in the run directory (atomically) and keeps the newest N.
  /// With data parallelism every rank must call it (the optimizer state may be sharded); the
  /// root writes the file, and every rank waits for it.
  std::string checkpoint() {
    const std::string path = (std::filesystem::path(cfg_.run_dir) / ("ckpt_" + std::to_string(step_) + ".dxc")).string();
    if (is_root()) std::filesystem::create_directories(cfg_.run_dir);
    save(path);
    last_checkpoint_step_ = step_;
    if (is_root()) {
      io::prune_checkpoints(cfg_.run_dir, static_cast<std::size_t>(std::max<index_t>(1, cfg_.keep_checkpoints)));
      for (auto& cb : callbacks_) cb->on_checkpoint(path, step_);
    }
    if (dp_) dp_->barrier();
    return path;
  }

  /// Writes the full training state to `path` (collective under data parallelism: only the
  /// root writes). The state does not depend on the number of ranks it was trained on.
  void save(const std::string& path) const {
    io::Checkpoint ck;
    ck.meta["format"] = "distilx-checkpoint";
    ck.meta["config"] = run_config();
    ck.meta["step"] = step_;
    ck.meta["epoch"] = epoch_;
    ck.meta["tokens"] = tokens_;
    ck.meta["elapsed_s"] = elapsed_;
    ck.meta["bad_streak"] = bad_streak_;
    ck.meta["loader"] = nlohmann::json::parse(loader_.state().to_json());
    ck.meta["lr_step"] = lr_.step_count();
    ck.meta["adam_step"] = opt_.step_count();
    ck.meta["scalar_type"] = sizeof(T) == 8 ? "f64" : "f32";
    ck.meta["loss_scale"] = loss_scale_;
    ck.meta["loss_scale_good_steps"] = good_scaled_steps_;
    const index_t n = student_.flat_size();
    std::vector<T> m(static_cast<std::size_t>(n)), v(m.size());
    if (dp_ && dp_->owns_update()) {
      index_t adam_step = 0;
      dp_->get_optimizer_state(m, v, adam_step);  // collective: gathers every shard
      ck.meta["adam_step"] = adam_step;
    } else {
      download(opt_.exp_avg(), 0, m.data(), n);
      download(opt_.exp_avg_sq(), 0, v.data(), n);
    }
    if (!is_root()) return;
    const std::vector<T> host = student_.params_to_host();
    ck.put("params", host.data(), host.size());
    ck.put("adam_m", m.data(), m.size());
    ck.put("adam_v", v.data(), v.size());
    io::save_checkpoint(ck, path);
  }

  /// Restores a checkpoint written by save(); refuses one from another configuration,
  /// listing the differences.
  void resume(const std::string& path) {
    const io::Checkpoint ck = io::load_checkpoint(path);
    DISTILX_REQUIRE(io_error, ck.meta.value("format", "") == "distilx-checkpoint", path,
                    " is not a distilx training checkpoint");
    // The number of ranks may differ from the run that wrote the checkpoint (the global batch
    // then changes with it: the loader state below says how far the data went).
    // Compared per global batch (rows per rank x ranks): 2 GPUs x 2 rows resume as 1 GPU x 4 rows;
    // the loader checks that the position is a whole number of the new global batches.
    nlohmann::json saved = ck.meta.at("config"), now = run_config();
    for (nlohmann::json* c : {&saved, &now}) {
      nlohmann::json& d = (*c)["data"];
      const index_t w = d.value("world_size", index_t(1));
      if (d.contains("batch_size")) d["batch_size"] = d["batch_size"].get<index_t>() * w;
      d.erase("world_size");
    }
    const auto diffs = io::config_differences(saved, now);
    if (!diffs.empty()) {
      std::string msg = path + " was written by a run with a different configuration:";
      bool batch = false;
      for (const auto& d : diffs) {
        msg += "\n  " + d;
        batch = batch || d.rfind("data.batch_size", 0) == 0;
      }
      if (batch)
        msg += "\ndata.batch_size is the global batch (rows per rank x ranks); to resume on another number of "
               "GPUs, keep it: give each rank the global batch divided by the number of ranks";
      throw config_error(msg + "\n(start a new run directory, or use the same options)");
    }
    DISTILX_REQUIRE(io_error, ck.meta.at("scalar_type") == (sizeof(T) == 8 ? "f64" : "f32"), path,
                    " holds ", ck.meta.at("scalar_type").get<std::string>(), " weights; this run computes in ",
                    sizeof(T) == 8 ? "f64" : "f32");
    const index_t n = student_.flat_size();
    std::vector<T> host(static_cast<std::size_t>(n));
    ck.get("params", host.data(), host.size(), path);
    student_.set_params(host.data());
    std::vector<T> v(host.size());
    ck.get("adam_m", host.data(), host.size(), path);
    ck.get("adam_v", v.data(), v.size(), path);
    if (dp_ && dp_->owns_update()) {
      dp_->set_optimizer_state(host.data(), v.data(), n, ck.meta.at("adam_step").get<index_t>());
    } else {
      upload(opt_.exp_avg(), 0, host.data(), n);
      upload(opt_.exp_avg_sq(), 0, v.data(), n);
      opt_.set_step_count(ck.meta.at("adam_step").get<index_t>());
    }
    ops::parameters_updated(Backend{});
    loss_scale_ = ck.meta.value("loss_scale", cfg_.loss_scale.enabled ? cfg_.loss_scale.init : 1.0);
    good_scaled_steps_ = ck.meta.value("loss_scale_good_steps", index_t(0));
    lr_.set_step_count(ck.meta.at("lr_step").get<index_t>());
    step_ = ck.meta.at("step");
    epoch_ = ck.meta.at("epoch");
    tokens_ = ck.meta.at("tokens");
    elapsed_ = ck.meta.at("elapsed_s");
    bad_streak_ = ck.meta.at("bad_streak");
    loader_.set_state(data::LoaderState::from_json(ck.meta.at("loader").dump()));
  }

 private:
  static LrScheduleConfig resolved_lr(DistillerConfig& c) {
    if (c.lr.base_lr <= 0) c.lr.base_lr = c.adamw.lr;
    if (c.lr.total_steps <= 0) c.lr.total_steps = c.max_steps;
    c.lr.warmup_steps = std::min(c.lr.warmup_steps, c.lr.total_steps);
    return c.lr;
  }

  void next_batch() {
    if (!loader_.next(inputs_.data(), targets_.data())) {
      const bool ok = loader_.next(inputs_.data(), targets_.data());
      DISTILX_REQUIRE(error, ok, "the training split holds no full batch (B ", B_, ", T ", S_, ")");
    }
    epoch_ = loader_.epoch();
  }

  void forward_both() {
    teacher_.forward(inputs_.data(), B_, S_, nullptr, nullptr, &teacher_hidden_);
    student_.forward(inputs_.data(), B_, S_);
  }

  DistillationInputs<T> inputs_for() {
    const StudentConfig& sc = student_.config();
    DistillationInputs<T> in;
    in.vocab.h_s = student_.hidden();
    in.vocab.E_s = student_.head();
    in.vocab.h_t = teacher_hidden_.back().data();
    in.vocab.W_t = teacher_.lm_head().data();
    in.vocab.targets = targets_.data();
    in.vocab.M = B_ * S_;
    in.vocab.d = sc.embedding_dim;
    in.vocab.d_t = teacher_.hidden_size();
    in.vocab.V = sc.vocab_size;
    for (index_t i = 0; i < sc.num_blocks; ++i) in.H_s.push_back(student_.block_output(i));
    for (std::size_t l = 1; l < teacher_hidden_.size(); ++l) in.H_t.push_back(teacher_hidden_[l].data());
    in.batch = B_;
    return in;
  }

  DistillationMetrics micro_step(const LossWeights& w, bool want_grad) {
    forward_both();
    DistillationInputs<T> in = inputs_for();
    DistillationGrads<T> g;
    g.dh_s = dh_.data();
    for (auto& b : dH_) g.dH_s.push_back(b.data());
    const DistillationMetrics m = loss_.compute(in, w, g, want_grad);
    if (want_grad) {
      if (loss_scale_ != 1.0) {  // fp16: lift small gradients out of the 16-bit underflow range
        const index_t Md = B_ * S_ * student_.config().embedding_dim;
        ops::scale(Backend{}, dh_.data(), static_cast<T>(loss_scale_), Md);
        if (m.alignment_active)
          for (auto& b : dH_) ops::scale(Backend{}, b.data(), static_cast<T>(loss_scale_), Md);
      }
      std::vector<const T*> dblocks;
      if (m.alignment_active)
        for (auto& b : dH_) dblocks.push_back(b.data());
      student_.backward(dh_.data(), m.alignment_active ? &dblocks : nullptr);
    }
    return m;
  }

  /// Means over ranks of the per-rank step metrics (each rank saw the same number of tokens).
  void average_over_ranks(DistillationMetrics& acc) const {
    double v[7] = {acc.total, acc.kl, acc.ce, acc.alignment, acc.top1, double(acc.positions), double(acc.targets)};
    dp_->all_reduce_sum(v, 7);
    const double inv = 1.0 / double(dp_->world_size());
    acc.total = v[0] * inv, acc.kl = v[1] * inv, acc.ce = v[2] * inv, acc.alignment = v[3] * inv, acc.top1 = v[4] * inv;
    acc.positions = index_t(v[5]), acc.targets = index_t(v[6]);
    acc.perplexity = std::exp(acc.ce);
  }

  static std::uint64_t fingerprint_(const std::string& s) {  // FNV-1a 64
    std::uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
  }
  std::uint64_t fingerprint_params_() const {
    const std::vector<T> p = student_.params_to_host();
    return fingerprint_(std::string(reinterpret_cast<const char*>(p.data()), p.size() * sizeof(T)));
  }

  static void accumulate(DistillationMetrics& acc, const DistillationMetrics& m, bool first) {
    if (first) {
      acc = m;
      return;
    }
    acc.total += m.total;
    acc.kl += m.kl;
    acc.ce += m.ce;
    acc.alignment += m.alignment;
    acc.top1 += m.top1;
    acc.positions += m.positions;
    acc.targets += m.targets;
  }
  static void finish_average(DistillationMetrics& acc, double inv) {
    acc.total *= inv;
    acc.kl *= inv;
    acc.ce *= inv;
    acc.alignment *= inv;
    acc.top1 *= inv;
    acc.perplexity = std::exp(acc.ce);
  }

  StudentT& student_;
  TeacherT& teacher_;
  data::TokenLoader& loader_;
  DistillerConfig cfg_;
  LossT loss_;
  OptimizerT opt_;
  LrSchedule lr_;
  std::vector<std::shared_ptr<DistillerCallback>> callbacks_;
  index_t B_ = 0, S_ = 0, steps_per_epoch_ = 1;
  index_t step_ = 0, epoch_ = 0, tokens_ = 0, bad_streak_ = 0, last_checkpoint_step_ = -1;
  double elapsed_ = 0;
  double loss_scale_ = 1.0;
  index_t good_scaled_steps_ = 0;
  std::shared_ptr<DataParallel<T>> dp_;
  std::vector<ops::OperandRegistration> cached_;  // weights registered with the backend while training
  EvalReport last_eval_{-1};
  std::vector<std::int32_t> inputs_, targets_;
  std::vector<Tensor<T, Backend>> teacher_hidden_;
  Buffer<T, Backend> dh_;
  std::vector<Buffer<T, Backend>> dH_;
};

}  // namespace distilx
