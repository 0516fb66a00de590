// NcclDataParallel<T>: the DataParallel policy (distill/data_parallel.hpp) over an NCCL
// communicator, one process per GPU.
//
// Gradients. The flat gradient buffer is averaged over ranks in buckets on the communicator's
// stream. With attach(student), the student reports each block's gradient range as soon as its
// backward has queued it (blocks come in reverse order, so the ranges arrive from the top of the
// buffer down); the policy gathers consecutive ranges into buckets of about bucket_bytes and
// starts reducing a bucket once the compute stream has produced it, while the backward of the
// lower blocks goes on. Only the last micro-batch of an optimizer step (begin_step tells how many
// there are) is reduced. Whatever the hooks did not cover is reduced in reduce_gradients.
//
// Modes.
//   replicate: an all-reduce (mean) of every bucket: each rank holds the whole mean gradient and
//              runs the usual AdamW over the whole buffer (the Distiller's optimizer).
//   zero1:     the buffer is cut into world_size contiguous shards; each bucket is reduced (mean)
//              only to the rank(s) whose shard it covers (a reduce-scatter made of grouped
//              ncclReduce calls, which lets shards be uneven and buckets cross shard borders);
//              each rank keeps the AdamW moments of its shard only (memory / world_size) and
//              updates its shard of the weights, which are then all-gathered (grouped
//              ncclBroadcast from every owner). With fp32 weights these are the master weights.
//
// Ordering. Every reduction waits on the device for the compute stream's work that produced its
// gradients, and the compute stream waits for the whole reduction before the next thing it runs
// after the backward (averaging, clipping, the update). Every host wait goes through the
// communicator's deadline, so a dead or diverging rank ends with an nccl_error naming the rank.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "distilx/cuda.cuh"
#include "distilx/distill/data_parallel.hpp"
#include "distilx/parallel/nccl.cuh"

namespace distilx::parallel {

enum class ShardingMode { replicate, zero1 };

inline const char* to_string(ShardingMode m) { return m == ShardingMode::zero1 ? "zero1" : "replicate"; }

struct DataParallelOptions {
  ShardingMode mode = ShardingMode::replicate;
  /// Target bucket size of the overlapped gradient reduction (whole blocks are never split).
  std::size_t bucket_bytes = std::size_t(32) << 20;
  /// Reduce buckets during the backward (needs attach(student)); off: all in reduce_gradients.
  bool overlap = true;
  /// zero1 only: the optimizer the policy runs over its shard (the Distiller's own is unused).
  AdamWConfig adamw;
};

/// FNV-1a over bytes: fingerprints for check_same_on_all_ranks.
inline std::uint64_t fingerprint(const void* data, std::size_t bytes, std::uint64_t h = 1469598103934665603ull) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (std::size_t i = 0; i < bytes; ++i) h = (h ^ p[i]) * 1099511628211ull;
  return h;
}
inline std::uint64_t fingerprint(const std::string& s, std::uint64_t h = 1469598103934665603ull) {
  return fingerprint(s.data(), s.size(), h);
}

template <class T>
class NcclDataParallel final : public DataParallel<T> {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "NcclDataParallel: float or double");

 public:
  /// `layout` is the student's parameter layout (the same on every rank: checked here, as are the
  /// mode and the optimizer settings). Collective: every rank constructs its policy together.
  NcclDataParallel(std::shared_ptr<Communicator> comm, const ParamLayout& layout, DataParallelOptions opt = {})
      : comm_(std::move(comm)), opt_(opt), n_(layout.total()) {
    DISTILX_REQUIRE(config_error, comm_ != nullptr, "NcclDataParallel: no communicator");
    const int W = comm_->world_size();
    // Shards of equal length (a multiple of 64 elements), the last one shorter.
    const index_t chunk = ((n_ + W - 1) / W + 63) / 64 * 64;
    bounds_.resize(static_cast<std::size_t>(W) + 1);
    for (int r = 0; r <= W; ++r) bounds_[static_cast<std::size_t>(r)] = std::min<index_t>(n_, chunk * r);
    bounds_.back() = n_;
    bucket_elems_ = std::max<index_t>(1, static_cast<index_t>(opt_.bucket_bytes / sizeof(T)));

    std::string desc = detail_layout_string_(layout);
    check_same_on_all_ranks("student parameter layout (model configuration)", fingerprint(desc));
    const double cfgv[6] = {opt_.adamw.lr, opt_.adamw.beta1, opt_.adamw.beta2, opt_.adamw.eps,
                            opt_.adamw.weight_decay, double(sizeof(T))};
    // The bucket plan decides the sequence of collectives, which must be the same on every rank.
    const std::uint64_t plan[2] = {static_cast<std::uint64_t>(bucket_elems_), opt_.overlap ? 1u : 0u};
    std::uint64_t h = fingerprint(std::string(to_string(opt_.mode)));
    h = fingerprint(plan, sizeof plan, h);
    if (opt_.mode == ShardingMode::zero1) h = fingerprint(cfgv, sizeof cfgv, h);
    else h = fingerprint(cfgv + 5, sizeof(double), h);
    check_same_on_all_ranks("data-parallel mode, bucket size, optimizer settings and compute type", h);

    if (opt_.mode == ShardingMode::zero1) {
      const index_t lo = shard_begin(), hi = shard_end();
      std::vector<ParamRange> mine;
      for (const ParamRange& r : param_ranges(layout)) {
        const index_t a = std::max(lo, r.offset), b = std::min(hi, r.offset + r.size);
        if (a < b) mine.push_back({a - lo, b - a, r.decay});
      }
      shard_opt_ = std::make_unique<AdamW<T, cuda>>(std::move(mine), hi - lo, opt_.adamw);
    }
    reset_overlap_();
  }

  /// Same, and attach(student).
  template <class Backend>
  NcclDataParallel(std::shared_ptr<Communicator> comm, Student<T, Backend>& student, DataParallelOptions opt = {})
      : NcclDataParallel(std::move(comm), student.layout(), opt) {
    attach(student);
  }

  ~NcclDataParallel() override {
    if (student_detach_) student_detach_();
  }

  /// Connects to the student's gradient-ready hook so reductions overlap its backward. The
  /// student must outlive the policy or be detached (attach to another one) first.
  template <class Backend>
  void attach(Student<T, Backend>& student) {
    static_assert(std::is_same_v<Backend, cuda>, "NcclDataParallel: the student must live on the GPU");
    DISTILX_REQUIRE(config_error, student.flat_size() == n_, comm_->where(), ": attach: the student's flat buffer has ",
                    student.flat_size(), " elements, the policy was built for ", n_);
    if (student_detach_) student_detach_();
    grads_ = student.grads();
    student.set_grad_ready_hook([this](index_t block, index_t offset, index_t count) { on_grad_ready_(block, offset, count); });
    student_detach_ = [&student] { student.set_grad_ready_hook({}); };
  }

  // ---- DataParallel<T> ----
  int rank() const override { return comm_->rank(); }
  int world_size() const override { return comm_->world_size(); }

  void check_same_on_all_ranks(const std::string& what, std::uint64_t fp) override {
    const int W = world_size();
    ensure_(u64_, W);
    std::vector<std::uint64_t> all(static_cast<std::size_t>(W));
    all[static_cast<std::size_t>(rank())] = fp;
    DISTILX_CUDA_CHECK(cudaMemcpy(u64_.data() + rank(), &fp, sizeof fp, cudaMemcpyHostToDevice));
    comm_->all_gather(u64_.data() + rank(), u64_.data(), 1);
    comm_->synchronize("start-up check of " + what);
    DISTILX_CUDA_CHECK(cudaMemcpy(all.data(), u64_.data(), sizeof(std::uint64_t) * W, cudaMemcpyDeviceToHost));
    bool same = true;
    for (int r = 1; r < W; ++r) same = same && all[static_cast<std::size_t>(r)] == all[0];
    if (same) return;
    std::string msg = ::distilx::detail::concat("ranks disagree on the ", what, ":");
    for (int r = 0; r < W; ++r) {
      char buf[32];
      std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(all[static_cast<std::size_t>(r)]));
      msg += ::distilx::detail::concat(" rank ", r, " has ", buf,
                                       all[static_cast<std::size_t>(r)] == all[0] ? "" : " (differs from rank 0)",
                                       r + 1 < W ? ";" : "");
    }
    throw config_error(msg + ". Every rank must run the same configuration (same flags, config file and binary).");
  }

  void begin_step(index_t grad_accum) override {
    accum_ = grad_accum;
    seen_ = 0;
    reset_overlap_();
  }

  void reduce_gradients(T* g, index_t n) override {
    DISTILX_REQUIRE(config_error, n == n_, comm_->where(), ": reduce_gradients over ", n,
                    " elements; the policy was built for ", n_);
    // The hooks reduced [launched_lo_, n) already when they ran on this very buffer.
    const index_t todo = g == grads_ ? launched_lo_ : n_;
    if (todo > 0) {
      launch_(g, 0, todo);
      comm_->track("gradient reduction", &compute_stream_());
    }
    comm_->synchronize("the gradient reduction");
    ++reductions_;
    seen_ = 0;
    reset_overlap_();
  }

  double grad_sum_squares(const T* g, index_t n) override {
    DISTILX_REQUIRE(config_error, n == n_, comm_->where(), ": grad_sum_squares over ", n, " elements; expected ", n_);
    double s = ops::sum_squares(cuda{}, g + shard_begin(), shard_end() - shard_begin());
    all_reduce_sum(&s, 1);
    return s;
  }

  void all_reduce_sum(double* values, int count) override {
    if (count <= 0) return;
    ensure_(f64_, count);
    DISTILX_CUDA_CHECK(cudaMemcpy(f64_.data(), values, sizeof(double) * count, cudaMemcpyHostToDevice));
    comm_->all_reduce(f64_.data(), f64_.data(), static_cast<std::size_t>(count), ncclSum);
    comm_->synchronize("an all-reduce of metrics");
    DISTILX_CUDA_CHECK(cudaMemcpy(values, f64_.data(), sizeof(double) * count, cudaMemcpyDeviceToHost));
  }

  bool owns_update() const override { return opt_.mode == ShardingMode::zero1; }

  void update(T* params, const T* grads, index_t n, double lr) override {
    DISTILX_REQUIRE(config_error, owns_update(), comm_->where(), ": update() needs ZeRO-1 mode");
    DISTILX_REQUIRE(config_error, n == n_, comm_->where(), ": update over ", n, " elements; expected ", n_);
    const index_t lo = shard_begin();
    shard_opt_->step(params + lo, grads + lo, lr);
    comm_->stream_wait_for(compute_stream_());
    all_gather_shards_(params);
    comm_->track("the parameter all-gather", &compute_stream_());
  }

  void get_optimizer_state(std::vector<T>& m, std::vector<T>& v, index_t& step) override {
    if (!owns_update()) return;
    Buffer<T, cuda> full(n_);
    const index_t lo = shard_begin(), len = shard_end() - lo;
    m.resize(static_cast<std::size_t>(n_));
    v.resize(static_cast<std::size_t>(n_));
    for (int k = 0; k < 2; ++k) {
      const Buffer<T, cuda>& src = k == 0 ? shard_opt_->exp_avg() : shard_opt_->exp_avg_sq();
      if (len > 0)
        DISTILX_CUDA_CHECK(cudaMemcpyAsync(full.data() + lo, src.data(), sizeof(T) * len, cudaMemcpyDeviceToDevice,
                                           compute_stream_()));
      comm_->stream_wait_for(compute_stream_());
      all_gather_shards_(full.data());
      comm_->synchronize("the optimizer-state gather");
      full.copy_to_host(k == 0 ? m.data() : v.data(), n_);
    }
    step = shard_opt_->step_count();
  }

  void set_optimizer_state(const T* m, const T* v, index_t n, index_t step) override {
    if (!owns_update()) return;
    DISTILX_REQUIRE(config_error, n == n_, comm_->where(), ": optimizer state of ", n, " elements; expected ", n_);
    const index_t lo = shard_begin(), len = shard_end() - lo;
    upload(shard_opt_->exp_avg(), 0, m + lo, len);
    upload(shard_opt_->exp_avg_sq(), 0, v + lo, len);
    shard_opt_->set_step_count(step);
  }

  void barrier() override {
    ensure_(i32_, 1);
    comm_->all_reduce(i32_.data(), i32_.data(), 1, ncclSum);
    comm_->synchronize("a barrier");
  }

  // ---- beyond the interface ----
  /// Copies `data` (n device elements) from `root` to every rank, e.g. the initial parameters,
  /// so replicas start identical whatever each rank initialised. Collective.
  void broadcast(T* data, index_t n, int root = 0) {
    comm_->stream_wait_for(compute_stream_());
    comm_->broadcast(data, data, static_cast<std::size_t>(n), root);
    comm_->track("a broadcast", &compute_stream_());
    comm_->synchronize("a broadcast");
  }

  Communicator& communicator() { return *comm_; }
  ShardingMode mode() const { return opt_.mode; }
  /// This rank's shard [shard_begin, shard_end) of the flat buffer (zero1: its optimizer state).
  index_t shard_begin() const { return bounds_[static_cast<std::size_t>(rank())]; }
  index_t shard_end() const { return bounds_[static_cast<std::size_t>(rank()) + 1]; }
  index_t shard_begin(int r) const { return bounds_[static_cast<std::size_t>(r)]; }
  /// The shard's optimizer (zero1; null otherwise).
  AdamW<T, cuda>* shard_optimizer() { return shard_opt_.get(); }
  /// Statistics for tests and logs: buckets launched from the backward hooks since construction,
  /// and reduce_gradients calls.
  index_t overlapped_buckets() const { return overlapped_buckets_; }
  index_t reductions() const { return reductions_; }

 private:
  static std::string detail_layout_string_(const ParamLayout& layout) {
    std::string s = ::distilx::detail::concat("total ", layout.total(), ";");
    for (const ParamInfo& p : layout.infos()) s += ::distilx::detail::concat(p.name, "@", p.offset, "+", p.size, ";");
    return s;
  }

  static cudaStream_t& compute_stream_() { return cuda_backend::current_stream(); }

  // Grows a scratch buffer; Buffer zeroes on the compute stream, so finish that before the
  // synchronous host copies and the communication stream use it.
  template <class U>
  static void ensure_(Buffer<U, cuda>& b, index_t n) {
    if (b.size() >= n) return;
    b.resize(n);
    DISTILX_CUDA_CHECK(cudaStreamSynchronize(compute_stream_()));
  }

  // Mean over ranks of g[lo, hi): all of it on every rank (replicate), or each part to the rank
  // whose shard holds it (zero1). The communication stream first waits for the compute stream.
  void launch_(T* g, index_t lo, index_t hi) {
    if (hi <= lo) return;
    comm_->stream_wait_for(compute_stream_());
    if (opt_.mode == ShardingMode::replicate) {
      comm_->all_reduce(g + lo, g + lo, static_cast<std::size_t>(hi - lo), ncclAvg);
      return;
    }
    comm_->group_start();
    for (int r = 0; r < world_size(); ++r) {
      const index_t a = std::max(lo, shard_begin(r)), b = std::min(hi, shard_begin(r + 1));
      if (a < b) comm_->reduce(g + a, g + a, static_cast<std::size_t>(b - a), ncclAvg, r);
    }
    comm_->group_end();
  }

  // Every rank's shard of x to every rank (all-gather with uneven shards, in place).
  void all_gather_shards_(T* x) {
    comm_->group_start();
    for (int r = 0; r < world_size(); ++r) {
      const index_t a = shard_begin(r), b = shard_begin(r + 1);
      if (a < b) comm_->broadcast(x + a, x + a, static_cast<std::size_t>(b - a), r);
    }
    comm_->group_end();
  }

  void reset_overlap_() {
    armed_ = false;
    ready_lo_ = launched_lo_ = n_;
  }

  void on_grad_ready_(index_t /*block*/, index_t offset, index_t count) {
    if (!opt_.overlap || accum_ <= 0) return;
    if (offset + count == n_) {  // the top block: a new backward pass begins
      ++seen_;
      reset_overlap_();
      armed_ = seen_ == accum_;  // only the last micro-batch's gradients are final
    }
    if (!armed_) return;
    if (offset + count != ready_lo_) {
      // Not the contiguous continuation: stop overlapping this pass; reduce_gradients does the rest.
      // The compute stream must not touch what is in flight, so it waits for it now.
      armed_ = false;
      if (launched_lo_ < n_) comm_->track("a gradient bucket", &compute_stream_());
      return;
    }
    ready_lo_ = offset;
    if (launched_lo_ - ready_lo_ >= bucket_elems_ || ready_lo_ == 0) {
      launch_(grads_, ready_lo_, launched_lo_);
      launched_lo_ = ready_lo_;
      ++overlapped_buckets_;
      // The watchdog checks every bucket in flight against the deadline, also when the pass
      // stops before the last one (nobody may ever wait for these).
      if (ready_lo_ != 0) comm_->track("a gradient bucket");
    }
    if (ready_lo_ == 0) {
      // Whole buffer in flight: what the compute stream runs next (averaging, clipping) waits for it.
      comm_->track("the overlapped gradient reduction", &compute_stream_());
      armed_ = false;
    }
  }

  std::shared_ptr<Communicator> comm_;
  DataParallelOptions opt_;
  index_t n_ = 0;
  std::vector<index_t> bounds_;
  index_t bucket_elems_ = 1;
  std::unique_ptr<AdamW<T, cuda>> shard_opt_;
  Buffer<std::uint64_t, cuda> u64_;
  Buffer<double, cuda> f64_;
  Buffer<std::int32_t, cuda> i32_;

  // Overlap state.
  T* grads_ = nullptr;
  std::function<void()> student_detach_;
  index_t accum_ = 0, seen_ = 0;
  bool armed_ = false;
  index_t ready_lo_ = 0, launched_lo_ = 0;  // [ready_lo_, n) produced; [launched_lo_, n) being reduced
  index_t overlapped_buckets_ = 0, reductions_ = 0;
};

}  // namespace distilx::parallel
