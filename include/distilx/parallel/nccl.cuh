// The NCCL communicator of a data-parallel job: one process per GPU, rank / world size / local
// rank from the launcher's environment (env.hpp), the NCCL unique id handed from rank 0 to the
// others through a file written atomically (or MPI_Bcast when built with DISTILX_HAS_MPI).
//
// Faults never hang a rank. The communicator is created non-blocking, and every wait for NCCL
// work polls the work's event together with ncclCommGetAsyncError under a deadline
// (DISTILX_NCCL_TIMEOUT seconds, default 600): an NCCL error or a deadline that passes aborts the
// communicator (ncclCommAbort, which also stops its kernels) and throws nccl_error naming the rank,
// host and GPU. A watchdog thread applies the same rules to work nobody is waiting on (e.g. the
// compute stream blocked behind a gradient reduction); if the process is still stuck after the
// abort it ends it with exit code kNcclAbortExitCode. Launchers (mpirun, srun, launch_local) then
// end the other ranks.
#pragma once

#include <nccl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>

#include "distilx/backend/cuda/check.cuh"
#include "distilx/parallel/env.hpp"

#if defined(DISTILX_HAS_MPI)
#include <mpi.h>
#endif

namespace distilx {

/// An NCCL call failed, a collective timed out, or another rank failed.
class nccl_error : public cuda_error {
 public:
  using cuda_error::cuda_error;
};

namespace detail {
[[noreturn]] inline void nccl_fail(ncclResult_t r, const char* expr, const char* file, int line) {
  throw nccl_error(concat("NCCL error ", ncclGetErrorString(r), " in ", expr, " at ", file, ":", line, ": ",
                          ncclGetLastError(nullptr)));
}
}  // namespace detail

}  // namespace distilx

/// Checks an NCCL call made outside a communicator (ncclGetUniqueId, ncclGetVersion). Calls on a
/// communicator go through parallel::Communicator::check (DISTILX_NCCL_COMM_CHECK), which also
/// handles non-blocking completion and names the rank.
#define DISTILX_NCCL_CHECK(expr)                                                                            \
  do {                                                                                                      \
    const ncclResult_t distilx_r_ = (expr);                                                                 \
    if (distilx_r_ != ncclSuccess) ::distilx::detail::nccl_fail(distilx_r_, #expr, __FILE__, __LINE__);     \
  } while (0)

#define DISTILX_NCCL_COMM_CHECK(comm, expr) (comm).check((expr), #expr, __FILE__, __LINE__)

namespace distilx::parallel {

/// Exit code of a process the watchdog ends after an abort the main thread did not act on.
constexpr int kNcclAbortExitCode = 86;

template <class T>
ncclDataType_t nccl_type() {
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<T, double>) return ncclFloat64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return ncclInt32;
  else if constexpr (std::is_same_v<T, std::int64_t>) return ncclInt64;
  else if constexpr (std::is_same_v<T, std::uint64_t>) return ncclUint64;
  else if constexpr (std::is_same_v<T, std::uint8_t>) return ncclUint8;
  else static_assert(sizeof(T) == 0, "nccl_type: unsupported element type");
}

struct CommOptions {
  double timeout_s = -1;     ///< deadline of every wait; < 0: DISTILX_NCCL_TIMEOUT or 600 s
  int device = -1;           ///< CUDA device; < 0: the local rank (or 0 when one GPU is visible)
  bool watchdog = true;      ///< background checks of async errors and overdue work
  double abort_grace_s = -1; ///< after a watchdog abort, seconds before the process is ended; < 0: DISTILX_NCCL_ABORT_GRACE or 30 s
};

class Communicator {
 public:
  /// Reads the launcher's environment, selects this rank's GPU, exchanges the unique id and
  /// creates the communicator. Every rank of the job must call it.
  static std::shared_ptr<Communicator> from_environment(CommOptions opt = {}) {
    return std::make_shared<Communicator>(detect_env(), opt);
  }

  Communicator(const DistEnv& env, CommOptions opt) : env_(env), opt_(opt) {
    if (opt_.timeout_s < 0) opt_.timeout_s = nccl_timeout_s();
    if (opt_.abort_grace_s < 0) opt_.abort_grace_s = nccl_abort_grace_s();
    char host[256] = {0};
    if (::gethostname(host, sizeof host - 1) == 0) host_ = host;
    select_device_();
    DISTILX_CUDA_CHECK(cudaSetDevice(device_));
    int lo = 0, hi = 0;
    DISTILX_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&lo, &hi));
    DISTILX_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, hi));
    const ncclUniqueId id = exchange_id_();
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;  // every call returns at once; completion is polled under the deadline
    deadline_start_();
    ncclResult_t r = ncclCommInitRankConfig(&comm_, env_.world_size, id, env_.rank, &cfg);
    if (r == ncclInProgress || r == ncclSuccess) r = poll_async_("ncclCommInitRankConfig (waiting for every rank)");
    if (r != ncclSuccess) {
      const std::string msg = concat(where(), ": creating the NCCL communicator failed: ", ncclGetErrorString(r), ": ",
                                     ncclGetLastError(comm_), hint_(r));
      if (comm_) ncclCommAbort(comm_);
      comm_ = nullptr;
      cudaStreamDestroy(stream_);
      throw nccl_error(msg);
    }
    if (env_.rank == 0 && !id_file_.empty()) ::unlink(id_file_.c_str());  // every rank has joined: no longer needed
    if (opt_.watchdog) {
      beat_ns_.store(now_ns_());
      watchdog_ = std::thread([this] { watchdog_loop_(); });
      reaper_ = std::thread([this] { reaper_loop_(); });
    }
  }

  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  ~Communicator() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    reaper_stop_.store(true);
    if (reaper_.joinable()) reaper_.join();
    if (comm_ && !aborted_) {
      // Flush outstanding work, then free; a peer that is gone makes this time out and abort.
      try {
        deadline_start_();
        ncclResult_t r = ncclCommFinalize(comm_);
        if (r == ncclInProgress || r == ncclSuccess) r = poll_async_("ncclCommFinalize");
        if (r == ncclSuccess) ncclCommDestroy(comm_);
        else abort_(concat(where(), ": finalising the communicator failed: ", ncclGetErrorString(r)));
      } catch (const std::exception& e) {
        std::fprintf(stderr, "distilx %s\n", e.what());
      }
    }
    for (auto& p : pending_) cudaEventDestroy(p.ev);
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const { return env_.rank; }
  int world_size() const { return env_.world_size; }
  int local_rank() const { return env_.local_rank; }
  int device() const { return device_; }
  const DistEnv& env() const { return env_; }
  double timeout_s() const { return opt_.timeout_s; }
  ncclComm_t get() const { return comm_; }
  /// The communication stream (non-blocking w.r.t. the legacy default stream, highest priority).
  cudaStream_t stream() const { return stream_; }
  /// "rank 1 of 2 (host gpu07, GPU 1)": the prefix of every message.
  std::string where() const {
    return concat("rank ", env_.rank, " of ", env_.world_size, " (host ", host_, ", GPU ", device_, ")");
  }
  bool aborted() const { return aborted_; }

  /// Completes a call on this communicator: waits for a non-blocking call in progress (under the
  /// deadline), and on failure aborts the communicator and throws nccl_error naming this rank.
  void check(ncclResult_t r, const char* expr, const char* file, int line) {
    if (r == ncclSuccess && group_depth_ > 0) return;  // queued in a group: completes at group_end
    if (r == ncclSuccess || r == ncclInProgress) {
      deadline_start_();
      r = poll_async_(expr);
      if (r == ncclSuccess) return;
    }
    fail_(concat(where(), ": NCCL error ", ncclGetErrorString(r), " in ", expr, " at ", file, ":", line, ": ",
                 last_error_(), hint_(r)));
  }

  // ---- collectives on a stream (default: the communication stream) ----
  void group_start() {
    DISTILX_NCCL_COMM_CHECK(*this, call_([] { return ncclGroupStart(); }));
    ++group_depth_;
  }
  void group_end() {
    --group_depth_;
    DISTILX_NCCL_COMM_CHECK(*this, call_([] { return ncclGroupEnd(); }));
  }
  template <class T>
  void all_reduce(const T* send, T* recv, std::size_t count, ncclRedOp_t op, cudaStream_t s = nullptr) {
    DISTILX_NCCL_COMM_CHECK(*this, call_([&] { return ncclAllReduce(send, recv, count, nccl_type<T>(), op, comm_, s ? s : stream_); }));
  }
  template <class T>
  void reduce(const T* send, T* recv, std::size_t count, ncclRedOp_t op, int root, cudaStream_t s = nullptr) {
    DISTILX_NCCL_COMM_CHECK(*this, call_([&] { return ncclReduce(send, recv, count, nccl_type<T>(), op, root, comm_, s ? s : stream_); }));
  }
  template <class T>
  void broadcast(const T* send, T* recv, std::size_t count, int root, cudaStream_t s = nullptr) {
    DISTILX_NCCL_COMM_CHECK(*this, call_([&] { return ncclBroadcast(send, recv, count, nccl_type<T>(), root, comm_, s ? s : stream_); }));
  }
  /// recv holds world_size * count; in place when send == recv + rank * count.
  template <class T>
  void all_gather(const T* send, T* recv, std::size_t count, cudaStream_t s = nullptr) {
    DISTILX_NCCL_COMM_CHECK(*this, call_([&] { return ncclAllGather(send, recv, count, nccl_type<T>(), comm_, s ? s : stream_); }));
  }
  /// send holds world_size * count; in place when recv == send + rank * count.
  template <class T>
  void reduce_scatter(const T* send, T* recv, std::size_t count, ncclRedOp_t op, cudaStream_t s = nullptr) {
    DISTILX_NCCL_COMM_CHECK(*this, call_([&] { return ncclReduceScatter(send, recv, count, nccl_type<T>(), op, comm_, s ? s : stream_); }));
  }

  // ---- waiting, with the deadline and error polling ----
  /// Blocks until `ev` completes; NCCL errors, the watchdog's abort or the deadline throw nccl_error.
  void wait(cudaEvent_t ev, const std::string& what) {
    deadline_start_();
    auto sleep = std::chrono::microseconds(20);
    for (;;) {
      const cudaError_t e = cudaEventQuery(ev);
      if (e == cudaSuccess) {
        throw_if_aborted_();  // an abort completes the stream's work early: never trust it
        return;
      }
      if (e != cudaErrorNotReady) DISTILX_CUDA_CHECK(e);
      const ncclResult_t a = async_state_();
      if (a != ncclSuccess && a != ncclInProgress)
        fail_(concat(where(), ": NCCL error ", ncclGetErrorString(a), " while waiting for ", what, ": ",
                     last_error_(), hint_(a)));
      if (elapsed_() > opt_.timeout_s)
        fail_(concat(where(), ": ", what, " did not complete within ", opt_.timeout_s,
                     " s (DISTILX_NCCL_TIMEOUT): another rank has probably died, hung or is running a different "
                     "sequence of collectives; aborting the communicator"));
      std::this_thread::sleep_for(sleep);
      if (sleep < std::chrono::microseconds(2000)) sleep *= 2;
    }
  }
  /// Waits for everything enqueued so far on the communication stream.
  void synchronize(const std::string& what) {
    cudaEvent_t ev = make_event_();
    DISTILX_CUDA_CHECK(cudaEventRecord(ev, stream_));
    try {
      wait(ev, what);
    } catch (...) {
      cudaEventDestroy(ev);
      throw;
    }
    cudaEventDestroy(ev);
  }
  /// Hands the work enqueued so far on the communication stream to the watchdog (it checks it
  /// against the deadline without anyone blocking); with `waiter`, that stream first waits for
  /// the work on the device (e.g. the compute stream before it reads reduced gradients).
  void track(const std::string& what, const cudaStream_t* waiter = nullptr) {
    throw_if_aborted_();
    cudaEvent_t ev = make_event_();
    DISTILX_CUDA_CHECK(cudaEventRecord(ev, stream_));
    if (waiter) DISTILX_CUDA_CHECK(cudaStreamWaitEvent(*waiter, ev, 0));
    if (!opt_.watchdog) {  // nobody would release it; the next wait() covers the work anyway
      DISTILX_CUDA_CHECK(cudaEventDestroy(ev));
      return;
    }
    std::lock_guard<std::mutex> lk(mu_);
    pending_.push_back({ev, std::chrono::steady_clock::now(), what});
  }
  /// Makes the communication stream wait (on the device) for the work enqueued so far on `s`.
  void stream_wait_for(cudaStream_t s) {
    cudaEvent_t ev = make_event_();
    DISTILX_CUDA_CHECK(cudaEventRecord(ev, s));
    DISTILX_CUDA_CHECK(cudaStreamWaitEvent(stream_, ev, 0));
    DISTILX_CUDA_CHECK(cudaEventDestroy(ev));  // released once the wait is satisfied
  }

  /// Aborts the communicator (all ranks' collectives with this one fail or time out); later calls
  /// throw nccl_error with `reason`.
  void abort(const std::string& reason) { abort_(reason); }

 private:
  struct Pending {
    cudaEvent_t ev;
    std::chrono::steady_clock::time_point t0;
    std::string what;
  };
  template <class... A>
  static std::string concat(const A&... a) {
    return ::distilx::detail::concat(a...);
  }

  static cudaEvent_t make_event_() {
    cudaEvent_t ev = nullptr;
    DISTILX_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    return ev;
  }

  void select_device_() {
    int n = 0;
    const cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      throw cuda_error(concat("distilx rank ", env_.rank, " of ", env_.world_size, " (host ", host_, ", local rank ",
                              env_.local_rank, "): no usable CUDA device: ", cudaGetErrorName(e), " (",
                              cudaGetErrorString(e), ")"));
    }
    if (opt_.device >= 0) device_ = opt_.device;
    else if (n == 1) device_ = 0;  // e.g. srun --gpus-per-task=1: each rank sees only its GPU
    else device_ = env_.local_rank;
    DISTILX_REQUIRE(config_error, device_ < n, "distilx rank ", env_.rank, " of ", env_.world_size, " (host ", host_,
                    ", local rank ", env_.local_rank, "): needs GPU ", device_, " but only ", n,
                    " are visible (one process per GPU: start at most as many ranks per node as GPUs)");
  }

  ncclUniqueId exchange_id_() {
    ncclUniqueId id;
    std::memset(&id, 0, sizeof id);
    if (env_.world_size == 1) {
      DISTILX_NCCL_CHECK(ncclGetUniqueId(&id));
      return id;
    }
#if defined(DISTILX_HAS_MPI)
    if (!detail::getenv_nonempty("DISTILX_NCCL_ID_FILE") && env_.launcher != Launcher::env) {
      int inited = 0;
      MPI_Initialized(&inited);
      if (!inited) MPI_Init(nullptr, nullptr);
      int r = -1, w = -1;
      MPI_Comm_rank(MPI_COMM_WORLD, &r);
      MPI_Comm_size(MPI_COMM_WORLD, &w);
      DISTILX_REQUIRE(config_error, r == env_.rank && w == env_.world_size, where(), ": MPI says rank ", r, " of ", w,
                      " but the launcher's environment says rank ", env_.rank, " of ", env_.world_size);
      if (env_.rank == 0) DISTILX_NCCL_CHECK(ncclGetUniqueId(&id));
      DISTILX_REQUIRE(nccl_error, MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD) == MPI_SUCCESS, where(),
                      ": MPI_Bcast of the NCCL unique id failed");
      return id;
    }
#endif
    id_file_ = id_file_path(env_);
    if (env_.rank == 0) {
      DISTILX_NCCL_CHECK(ncclGetUniqueId(&id));
      publish_rendezvous(id_file_, std::string(reinterpret_cast<const char*>(&id), sizeof id), env_.world_size);
    } else {
      const std::string b = await_rendezvous(id_file_, sizeof id, env_.rank, env_.world_size, opt_.timeout_s);
      std::memcpy(&id, b.data(), sizeof id);
    }
    return id;
  }

  static const char* hint_(ncclResult_t r) {
    switch (r) {
      case ncclRemoteError: return " (a remote rank failed or exited; see its log)";
      case ncclSystemError: return " (a system call or the network failed; NCCL_DEBUG=WARN tells more)";
      case ncclInvalidUsage: return " (the ranks disagree on the collectives, or two ranks share a GPU)";
      case ncclUnhandledCudaError: return " (a CUDA call inside NCCL failed)";
      default: return "";
    }
  }

  void deadline_start_() { t0_ = std::chrono::steady_clock::now(); }
  double elapsed_() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count(); }

  // Polls a non-blocking communicator until its state leaves ncclInProgress, under the deadline.
  ncclResult_t poll_async_(const char* what) {
    auto sleep = std::chrono::microseconds(10);
    for (;;) {
      const ncclResult_t a = async_state_();
      if (a != ncclInProgress) return a;
      if (elapsed_() > opt_.timeout_s) {
        fail_(concat(where(), ": ", what, " did not complete within ", opt_.timeout_s,
                     " s (DISTILX_NCCL_TIMEOUT): is every rank running? aborting the communicator"));
      }
      std::this_thread::sleep_for(sleep);
      if (sleep < std::chrono::microseconds(2000)) sleep *= 2;
    }
  }

  // Every NCCL call of the main thread runs under abort_mu_, so the watchdog never frees the
  // communicator (ncclCommAbort) in the middle of one; calls on a non-blocking communicator return
  // at once, so the lock is held only briefly.
  template <class F>
  ncclResult_t call_(F&& f) {
    std::lock_guard<std::mutex> g(abort_mu_);
    throw_if_aborted_();
    return f();
  }
  ncclResult_t async_state_() {
    std::lock_guard<std::mutex> g(abort_mu_);
    throw_if_aborted_();
    ncclResult_t a = ncclSuccess;
    const ncclResult_t q = ncclCommGetAsyncError(comm_, &a);
    return q != ncclSuccess ? q : a;
  }
  std::string last_error_() {
    std::lock_guard<std::mutex> g(abort_mu_);
    const char* m = aborted_ || !comm_ ? "" : ncclGetLastError(comm_);
    return m ? m : "";
  }

  // reason_ is written once, before aborted_ becomes true, and read only after seeing it true.
  void throw_if_aborted_() {
    if (aborted_) {
      acknowledged_ = true;
      throw nccl_error(reason_);
    }
  }
  [[noreturn]] void fail_(const std::string& msg) {
    abort_(msg);
    acknowledged_ = true;
    throw nccl_error(reason_);
  }
  void abort_(const std::string& reason) {
    std::lock_guard<std::mutex> lk(abort_mu_);
    if (aborted_) return;
    reason_ = reason;
    if (comm_) ncclCommAbort(comm_);
    aborted_ = true;
  }

  static std::int64_t now_ns_() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  // The watchdog's own CUDA and NCCL calls can block (a driver lock held by a thread stuck in a
  // synchronous copy behind NCCL work, an abort that does not return). The reaper makes no such
  // call: if the watchdog has not come round its loop for the deadline plus the abort grace, it
  // ends the process with the watchdog's exit code, naming the rank.
  void reaper_loop_() {
    while (!reaper_stop_.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
      const double stale = double(now_ns_() - beat_ns_.load()) * 1e-9;
      if (stale > opt_.timeout_s + opt_.abort_grace_s && !reaper_stop_.load()) {
        std::fprintf(stderr,
                     "distilx %s: the NCCL watchdog has been blocked in a CUDA or NCCL call for %.0f s (work of this "
                     "process is stuck behind a collective another rank never joined); exiting with code %d\n",
                     where().c_str(), stale, kNcclAbortExitCode);
        std::fflush(stderr);
        std::_Exit(kNcclAbortExitCode);
      }
    }
  }

  void watchdog_loop_() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lk(mu_);
    while (!stop_) {
      beat_ns_.store(now_ns_());
      cv_.wait_for(lk, std::chrono::milliseconds(200));
      beat_ns_.store(now_ns_());
      if (stop_ || aborted_) continue;
      // Completed work leaves the queue; the oldest unfinished one is checked against the deadline.
      while (!pending_.empty() && cudaEventQuery(pending_.front().ev) == cudaSuccess) {
        cudaEventDestroy(pending_.front().ev);
        pending_.pop_front();
      }
      (void)cudaGetLastError();
      std::string problem;
      ncclResult_t a = ncclSuccess;
      {
        std::lock_guard<std::mutex> g(abort_mu_);
        if (aborted_) continue;
        const ncclResult_t q = ncclCommGetAsyncError(comm_, &a);
        if (q != ncclSuccess) a = q;
        if (a != ncclSuccess && a != ncclInProgress)
          problem = concat(where(), ": NCCL error ", ncclGetErrorString(a), " (detected by the watchdog): ",
                           ncclGetLastError(comm_), hint_(a));
      }
      if (problem.empty() && !pending_.empty()) {
        const double age =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - pending_.front().t0).count();
        if (age > opt_.timeout_s)
          problem = concat(where(), ": ", pending_.front().what, " did not complete within ", opt_.timeout_s,
                           " s (DISTILX_NCCL_TIMEOUT; detected by the watchdog): another rank has probably died or "
                           "hung; aborting the communicator");
      }
      if (problem.empty()) continue;
      lk.unlock();
      std::fprintf(stderr, "distilx %s\n", problem.c_str());
      std::fflush(stderr);
      abort_(problem);
      // The abort releases streams blocked behind NCCL kernels; the main thread's next call into
      // this communicator throws. If it never comes (stuck elsewhere), end the process.
      const auto t_abort = std::chrono::steady_clock::now();
      lk.lock();
      beat_ns_.store(now_ns_());  // the abort returned
      while (!stop_ && !acknowledged_ &&
             std::chrono::duration<double>(std::chrono::steady_clock::now() - t_abort).count() < opt_.abort_grace_s) {
        cv_.wait_for(lk, std::chrono::milliseconds(200));
        beat_ns_.store(now_ns_());
      }
      if (!stop_ && !acknowledged_) {
        std::fprintf(stderr, "distilx %s: still stuck %.0f s after aborting NCCL; exiting with code %d\n",
                     where().c_str(), opt_.abort_grace_s, kNcclAbortExitCode);
        std::fflush(stderr);
        std::_Exit(kNcclAbortExitCode);
      }
    }
  }

  DistEnv env_;
  CommOptions opt_;
  std::string host_ = "?";
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  ncclComm_t comm_ = nullptr;
  std::string id_file_;
  int group_depth_ = 0;
  std::chrono::steady_clock::time_point t0_;

  std::mutex mu_;        // guards pending_ and stop_ (taken before abort_mu_, never after)
  std::mutex abort_mu_;  // held around every NCCL call on comm_ and by abort_
  std::condition_variable cv_;
  std::deque<Pending> pending_;
  std::string reason_;
  bool stop_ = false;
  std::atomic<bool> aborted_{false};
  std::atomic<bool> acknowledged_{false};
  std::thread watchdog_;
  std::thread reaper_;
  std::atomic<std::int64_t> beat_ns_{0};  // the watchdog's last pass round its loop
  std::atomic<bool> reaper_stop_{false};
};

}  // namespace distilx::parallel
