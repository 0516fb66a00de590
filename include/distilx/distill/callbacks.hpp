// Ready-made Distiller callbacks: progress on stderr (one line redrawn in place
// on a terminal, plain lines otherwise), metrics.csv + metrics.jsonl flushed per
// line, early stopping on the held-out perplexity, and a stop flag (e.g. set by
// a Ctrl-C handler) that ends training after the current step.
#pragma once

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <cstdlib>
#include <string>

#include "distilx/distill/distiller.hpp"

namespace distilx {

/// Process-wide stop flag polled by ProgressPrinter::stop_requested (set it from a signal handler).
inline std::atomic<bool>& stop_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

/// On resume, drops metric rows logged after the checkpoint's step (they will be logged again).
inline void truncate_metrics(const std::string& dir, index_t step) {
  for (const std::string name : {"metrics.csv", "metrics.jsonl"}) {
    const std::string path = dir + "/" + name;
    std::ifstream in(path);
    if (!in) continue;
    std::string line, kept;
    bool first = true;
    while (std::getline(in, line)) {
      long long s = -1;
      if (name == "metrics.csv") {
        if (!first) {
          const auto c1 = line.find(',');
          if (c1 != std::string::npos) s = std::atoll(line.c_str() + c1 + 1);
        }
      } else {
        const auto k = line.find("\"step\":");
        if (k != std::string::npos) s = std::atoll(line.c_str() + k + 7);
      }
      if (first || s <= step) kept += line + "\n";
      first = false;
    }
    in.close();
    std::ofstream(path, std::ios::trunc) << kept;
  }
}

inline std::string fmt_duration(double s) {
  if (!(s >= 0) || s > 1e7) return "--:--";
  const long t = static_cast<long>(s + 0.5);
  char buf[32];
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
  else std::snprintf(buf, sizeof buf, "%02ld:%02ld", t / 60, t % 60);
  return buf;
}

class ProgressPrinter : public DistillerCallback {
 public:
  explicit ProgressPrinter(std::string label, index_t every = 1) : label_(std::move(label)), every_(every) {
    tty_ = ::isatty(STDERR_FILENO) == 1;
  }
  void on_train_begin(index_t start, index_t max_steps) override {
    start_ = start;
    max_ = max_steps;
    t0_ = std::chrono::steady_clock::now();
  }
  void on_step(const StepReport& r) override {
    if (r.step % every_ != 0 && r.step != max_ && !r.skipped) return;
    const double session = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
    const double rate = session > 0 ? double(r.step - start_) / session : 0;  // steps/s in this session
    const double eta = rate > 0 ? double(max_ - r.step) / rate : -1;
    char line[512];
    std::snprintf(line, sizeof line,
                  "%s step %lld/%lld ep %lld | loss %.4f kl %.4f ce %.4f al %.4f ppl %.2f | tau %.3f w_kl %.3f "
                  "w_al %.4f w_ce %.3f | lr %.2e | %.0f tok/s | ETA %s%s",
                  label_.c_str(), (long long)r.step, (long long)max_, (long long)r.epoch, r.loss.total, r.loss.kl,
                  r.loss.ce, r.loss.alignment, r.loss.perplexity, r.loss.tau, r.loss.w_kl, r.loss.w_al, r.loss.w_ce,
                  r.lr, r.tokens_per_s, fmt_duration(eta).c_str(),
                  r.skipped ? (" | SKIPPED (non-finite " + r.bad_term + ")").c_str() : "");
    if (tty_) std::fprintf(stderr, "\r\033[K%s", line);
    else std::fprintf(stderr, "%s\n", line);
    std::fflush(stderr);
    dirty_ = tty_;
  }
  void on_eval(const EvalReport& e) override {
    newline();
    std::fprintf(stderr, "%s eval @ step %lld: student ppl %.3f | teacher ppl %.3f | KL(t||s) %.4f | top-1 %.3f\n",
                 label_.c_str(), (long long)e.step, e.student_ppl, e.teacher_ppl, e.kl, e.top1);
  }
  void on_checkpoint(const std::string& path, index_t) override {
    if (!tty_) std::fprintf(stderr, "%s checkpoint %s\n", label_.c_str(), path.c_str());
  }
  void on_train_end(index_t) override { newline(); }
  bool stop_requested() override { return stop_flag().load(); }

 private:
  void newline() {
    if (dirty_) std::fprintf(stderr, "\n");
    dirty_ = false;
  }
  std::string label_;
  std::chrono::steady_clock::time_point t0_ = std::chrono::steady_clock::now();
  index_t every_ = 1, start_ = 0, max_ = 0;
  bool tty_ = false, dirty_ = false;
};

/// metrics.csv / metrics.jsonl (one row per step, evaluations as rows with kind=eval), flushed per line.
class MetricsWriter : public DistillerCallback {
 public:
  MetricsWriter(const std::string& dir, bool append) {
    const std::string csv = dir + "/metrics.csv", jsonl = dir + "/metrics.jsonl";
    const bool had = append && std::ifstream(csv).good();
    csv_.open(csv, append ? std::ios::app : std::ios::trunc);
    jsonl_.open(jsonl, append ? std::ios::app : std::ios::trunc);
    DISTILX_REQUIRE(io_error, csv_.good() && jsonl_.good(), "cannot write metrics in ", dir);
    if (!had)
      csv_ << "kind,step,epoch,tokens,total,kl,ce,alignment,perplexity,tau,w_kl,w_al,w_ce,lr,grad_norm,tokens_per_s,"
              "elapsed_s,skipped,student_ppl,teacher_ppl,kl_tau1,top1\n"
           << std::flush;
  }
  void on_step(const StepReport& r) override {
    csv_ << "step," << r.step << ',' << r.epoch << ',' << r.tokens << ',' << r.loss.total << ',' << r.loss.kl << ','
         << r.loss.ce << ',' << r.loss.alignment << ',' << r.loss.perplexity << ',' << r.loss.tau << ',' << r.loss.w_kl
         << ',' << r.loss.w_al << ',' << r.loss.w_ce << ',' << r.lr << ',' << r.grad_norm << ',' << r.tokens_per_s
         << ',' << r.elapsed_s << ',' << (r.skipped ? 1 : 0) << ",,,,\n"
         << std::flush;
    nlohmann::json j{{"kind", "step"},         {"step", r.step},       {"epoch", r.epoch},
                     {"tokens", r.tokens},     {"total", r.loss.total}, {"kl", r.loss.kl},
                     {"ce", r.loss.ce},        {"alignment", r.loss.alignment}, {"perplexity", r.loss.perplexity},
                     {"tau", r.loss.tau},      {"w_kl", r.loss.w_kl},   {"w_al", r.loss.w_al},
                     {"w_ce", r.loss.w_ce},    {"lr", r.lr},            {"grad_norm", r.grad_norm},
                     {"tokens_per_s", r.tokens_per_s}, {"elapsed_s", r.elapsed_s}, {"skipped", r.skipped}};
    if (r.skipped) j["bad_term"] = r.bad_term;
    jsonl_ << j.dump() << '\n' << std::flush;
  }
  void on_eval(const EvalReport& e) override {
    csv_ << "eval," << e.step << ",,,,,,,,,,,,,,,,," << e.student_ppl << ',' << e.teacher_ppl << ',' << e.kl << ','
         << e.top1 << '\n'
         << std::flush;
    jsonl_ << nlohmann::json{{"kind", "eval"},        {"step", e.step},     {"student_ppl", e.student_ppl},
                             {"teacher_ppl", e.teacher_ppl}, {"kl_tau1", e.kl}, {"top1", e.top1},
                             {"student_ce", e.student_ce},   {"teacher_ce", e.teacher_ce}}
                  .dump()
           << '\n'
           << std::flush;
  }

 private:
  std::ofstream csv_, jsonl_;
};

}  // namespace distilx

namespace distilx {

/// Stops training when the student's held-out perplexity has not improved by at least
/// `min_delta` (relative) for `patience` consecutive evaluations.
class EarlyStopping : public DistillerCallback {
 public:
  explicit EarlyStopping(index_t patience, double min_delta = 0.0) : patience_(patience), min_delta_(min_delta) {}
  void on_eval(const EvalReport& e) override {
    if (e.student_ppl < best_ * (1.0 - min_delta_)) {
      best_ = e.student_ppl;
      bad_ = 0;
    } else {
      ++bad_;
    }
  }
  bool stop_requested() override { return bad_ >= patience_; }
  double best() const { return best_; }

 private:
  index_t patience_;
  double min_delta_;
  double best_ = 1e300;
  index_t bad_ = 0;
};

}  // namespace distilx
