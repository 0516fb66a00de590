// The data-parallel policy the Distiller talks to (architecture.md §1): one process per GPU, each
// with its own loader slice, a replicated teacher and a replicated student. The Distiller calls
// the hooks below at fixed points of a step; an implementation over NCCL lives in
// distilx/parallel/ (plain all-reduce, or ZeRO-1 with sharded optimizer state). Without a policy
// the Distiller trains on one device.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "distilx/core/config.hpp"

namespace distilx {

template <class T>
class DataParallel {
 public:
  virtual ~DataParallel() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  bool is_root() const { return rank() == 0; }

  /// Start-up check: throws distilx::config_error naming `what` and the ranks that differ when
  /// `fingerprint` is not the same on every rank (e.g. a hash of the run configuration).
  virtual void check_same_on_all_ranks(const std::string& what, std::uint64_t fingerprint) = 0;

  /// Called once per optimizer step before the first micro-batch (e.g. to arm bucket reductions
  /// that overlap the backward pass of the last micro-batch).
  virtual void begin_step(index_t /*grad_accum*/) {}

  /// After the last micro-batch's backward (and the accumulation average): afterwards `grads`
  /// holds the mean over ranks, all of it, or with owns_update() at least this rank's shard.
  virtual void reduce_gradients(T* grads, index_t n) = 0;

  /// Sum over ranks of the squared entries of the reduced gradient this rank is responsible
  /// for (the whole buffer counted once): the global norm is its square root. NaN or Inf on
  /// any rank makes it non-finite on every rank, so all ranks skip the same steps.
  virtual double grad_sum_squares(const T* grads, index_t n) = 0;

  /// values[i] = sum over ranks of values[i] (metrics, token counts).
  virtual void all_reduce_sum(double* values, int count) = 0;

  /// ZeRO-1: true when this policy updates the parameters itself (each rank updates its shard of
  /// the master weights with its shard of the AdamW state, then the parameters are all-gathered);
  /// the Distiller then calls update() instead of its own optimizer.
  virtual bool owns_update() const { return false; }
  virtual void update(T* /*params*/, const T* /*grads*/, index_t /*n*/, double /*lr*/) {}

  /// With owns_update(): the full AdamW state (exp_avg, exp_avg_sq, each n values on the host,
  /// gathered from all shards) and its step count, for checkpoints; and the way back.
  virtual void get_optimizer_state(std::vector<T>& /*m*/, std::vector<T>& /*v*/, index_t& /*step*/) {}
  virtual void set_optimizer_state(const T* /*m*/, const T* /*v*/, index_t /*n*/, index_t /*step*/) {}

  virtual void barrier() = 0;
};

}  // namespace distilx
