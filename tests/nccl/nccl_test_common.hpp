// Shared by the NCCL test translation units: command-line options and a small check recorder
// that prints one line per check, prefixed with the rank.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>

namespace nccl_test {

/// A shared_ptr to an object the caller owns (the cases get main's communicator by reference;
/// the policies take shared ownership).
template <class C>
std::shared_ptr<C> borrow(C& c) {
  return std::shared_ptr<C>(&c, [](C*) {});
}

struct Args {
  std::string case_name = "collectives";
  int gpus = 2;
  bool device_count = false;
  // bench
  long long batch = 16, seq = 512;
  int steps = 10, warmup = 3;
  bool zero1 = false, overlap = true, tf32 = false;
  double bucket_mb = 32;
  std::string precision = "bf16";  ///< distill-bench: bf16, fp16, tf32 or fp32
  // distiller
  std::string out, reference, run_dir, resume;
  int max_steps = 20;
  long long rank_batch = 0;  ///< distiller: rows per rank (0: the global batch of 4 split over the ranks)
  int stop_at = -1;  ///< stop (and checkpoint) after this many steps; -1: max_steps
  double tolerance = 1e-5;
};

inline Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    const auto eq = s.find('=');
    const std::string k = s.substr(0, eq), v = eq == std::string::npos ? "" : s.substr(eq + 1);
    auto need = [&] {
      if (eq == std::string::npos) throw std::invalid_argument("option " + k + " needs =VALUE");
      return v;
    };
    if (k == "--case") a.case_name = need();
    else if (k == "--gpus") a.gpus = std::atoi(need().c_str());
    else if (k == "--device-count") a.device_count = true;
    else if (k == "--batch") a.batch = std::atoll(need().c_str());
    else if (k == "--seq") a.seq = std::atoll(need().c_str());
    else if (k == "--steps") a.steps = std::atoi(need().c_str());
    else if (k == "--warmup") a.warmup = std::atoi(need().c_str());
    else if (k == "--zero1") a.zero1 = need() != "0";
    else if (k == "--overlap") a.overlap = need() != "0";
    else if (k == "--tf32") a.tf32 = need() != "0";
    else if (k == "--bucket-mb") a.bucket_mb = std::atof(need().c_str());
    else if (k == "--precision") a.precision = need();
    else if (k == "--out") a.out = need();
    else if (k == "--reference") a.reference = need();
    else if (k == "--run-dir") a.run_dir = need();
    else if (k == "--resume") a.resume = need();
    else if (k == "--max-steps") a.max_steps = std::atoi(need().c_str());
    else if (k == "--rank-batch") a.rank_batch = std::atoll(need().c_str());
    else if (k == "--stop-at") a.stop_at = std::atoi(need().c_str());
    else if (k == "--tolerance") a.tolerance = std::atof(need().c_str());
    else throw std::invalid_argument("unknown option '" + s + "'");
  }
  if (a.gpus < 1) throw std::invalid_argument("--gpus must be >= 1");
  return a;
}

class Checker {
 public:
  Checker(int rank, int world, std::string name) : rank_(rank), world_(world), name_(std::move(name)) {}
  void expect(const std::string& what, bool ok) {
    std::printf("[rank %d/%d] %s: %-4s %s\n", rank_, world_, name_.c_str(), ok ? "ok" : "FAIL", what.c_str());
    std::fflush(stdout);
    failures_ += ok ? 0 : 1;
  }
  void expect_le(const std::string& what, double value, double bound) {
    char buf[96];
    std::snprintf(buf, sizeof buf, " (%.3g <= %.3g)", value, bound);
    expect(what + buf, value <= bound);
  }
  int failures() const { return failures_; }
  /// Exit code of the rank: 0 when every check passed.
  int finish() const {
    std::printf("[rank %d/%d] %s: %s (%d failed)\n", rank_, world_, name_.c_str(), failures_ ? "FAILED" : "PASSED",
                failures_);
    return failures_ ? 1 : 0;
  }

 private:
  int rank_, world_;
  std::string name_;
  int failures_ = 0;
};

}  // namespace nccl_test
