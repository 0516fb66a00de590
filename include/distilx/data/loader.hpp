// Batch loader over memory-mapped token shards. The concatenated token stream is cut into
// non-overlapping windows of T+1 tokens (inputs = first T, targets = last T); the last
// windows form the validation split; training windows are reshuffled every epoch from the
// seed and dealt round-robin to ranks. State (seed, epoch, position) resumes a run exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"
#include "distilx/core/rng.hpp"
#include "distilx/data/shards.hpp"

namespace distilx::data {

struct LoaderOptions {
  index_t seq_len = 0;     ///< T: tokens per row of a batch
  index_t batch_size = 0;  ///< B: rows per batch on this rank
  std::uint64_t seed = 0;  ///< shuffle seed
  int world_size = 1;      ///< W: data-parallel ranks
  int rank = 0;            ///< this rank, in [0, W)
  /// Tokens must lie in [0, vocab_size). 0: the manifest's vocab_size (from_manifest), or
  /// only "fits int32" when opened from shard paths.
  std::int32_t vocab_size = 0;
  /// Validation windows: val_windows if >= 0, else ceil(val_fraction * windows).
  double val_fraction = 0.0;
  index_t val_windows = -1;
  /// Scan every token against vocab_size when opening (reads all shards once) instead of
  /// checking each window as a batch reads it.
  bool check_tokens_on_open = false;
};

/// Where a run stands. epoch/position/seed define the next batch; the other fields are the
/// geometry the state was taken under and are checked on restore, so a state is never
/// silently applied to a differently configured loader. Identical on all ranks.
struct LoaderState {
  std::uint64_t seed = 0;
  index_t epoch = 0;
  index_t position = 0;  ///< batches already taken in this epoch
  index_t train_windows = 0;
  index_t seq_len = 0;
  index_t batch_size = 0;
  int world_size = 1;

  std::string to_json() const {
    nlohmann::ordered_json j;
    j["seed"] = seed;
    j["epoch"] = epoch;
    j["position"] = position;
    j["train_windows"] = train_windows;
    j["seq_len"] = seq_len;
    j["batch_size"] = batch_size;
    j["world_size"] = world_size;
    return j.dump();
  }

  static LoaderState from_json(const std::string& text) {
    LoaderState s;
    try {
      const auto j = nlohmann::json::parse(text);
      s.seed = j.at("seed").get<std::uint64_t>();
      s.epoch = j.at("epoch").get<index_t>();
      s.position = j.at("position").get<index_t>();
      s.train_windows = j.at("train_windows").get<index_t>();
      s.seq_len = j.at("seq_len").get<index_t>();
      s.batch_size = j.at("batch_size").get<index_t>();
      s.world_size = j.at("world_size").get<int>();
    } catch (const nlohmann::json::exception& e) {
      throw io_error(::distilx::detail::concat("LoaderState: malformed state JSON (", e.what(), "): ", text));
    }
    return s;
  }

  bool operator==(const LoaderState& o) const {
    return seed == o.seed && epoch == o.epoch && position == o.position && train_windows == o.train_windows &&
           seq_len == o.seq_len && batch_size == o.batch_size && world_size == o.world_size;
  }
  bool operator!=(const LoaderState& o) const { return !(*this == o); }
};

/// Iterates [B, T] input/target batches. Not thread-safe (one loader per rank); the const
/// accessors (read_window, val_batch) may run concurrently with each other.
class TokenLoader {
 public:
  TokenLoader(const std::vector<std::string>& shard_paths, const LoaderOptions& opt) : opt_(opt) {
    using ::distilx::detail::concat;
    DISTILX_REQUIRE(config_error, opt.seq_len > 0, "TokenLoader: seq_len must be positive, got ", opt.seq_len);
    DISTILX_REQUIRE(config_error, opt.batch_size > 0, "TokenLoader: batch_size must be positive, got ", opt.batch_size);
    DISTILX_REQUIRE(config_error, opt.world_size > 0 && opt.rank >= 0 && opt.rank < opt.world_size,
                    "TokenLoader: rank ", opt.rank, " is not in [0, world_size = ", opt.world_size, ")");
    DISTILX_REQUIRE(config_error, opt.vocab_size >= 0, "TokenLoader: negative vocab_size ", opt.vocab_size);
    DISTILX_REQUIRE(config_error, opt.val_fraction >= 0.0 && opt.val_fraction < 1.0,
                    "TokenLoader: val_fraction must be in [0, 1), got ", opt.val_fraction);
    DISTILX_REQUIRE(config_error, !shard_paths.empty(), "TokenLoader: no shard files");

    offsets_.push_back(0);
    for (const auto& p : shard_paths) {
      shards_.emplace_back(p);
      if (opt.check_tokens_on_open) shards_.back().check_tokens(opt.vocab_size);
      offsets_.push_back(offsets_.back() + shards_.back().size());
    }
    const index_t tokens = offsets_.back();
    const index_t win = opt.seq_len + 1;
    windows_ = tokens / win;
    val_ = opt.val_windows >= 0 ? opt.val_windows
                                : static_cast<index_t>(std::ceil(opt.val_fraction * static_cast<double>(windows_)));
    train_ = windows_ - val_;
    const index_t step = opt.batch_size * opt.world_size;
    DISTILX_REQUIRE(config_error, train_ >= step, "TokenLoader: ", tokens, " tokens give ", windows_,
                    " windows of seq_len + 1 = ", win, " tokens; after ", val_, " validation windows, ", train_,
                    " training windows are fewer than one step of batch_size * world_size = ", step);
    DISTILX_REQUIRE(config_error, val_ == 0 || val_ >= step, "TokenLoader: ", val_,
                    " validation windows are fewer than one batch on every rank (batch_size * world_size = ", step,
                    ")");
    DISTILX_REQUIRE(config_error, train_ <= static_cast<index_t>(std::numeric_limits<std::uint32_t>::max()),
                    "TokenLoader: ", train_, " training windows exceed 2^32 - 1 (use a longer seq_len)");
    seed_ = opt.seed;
    shuffle_();
  }

  /// Opens the shards listed in a corpus manifest (checking their token counts against it);
  /// vocab_size defaults to the manifest's.
  static TokenLoader from_manifest(const std::string& manifest_path, LoaderOptions opt) {
    const CorpusManifest m = read_manifest(manifest_path);
    if (opt.vocab_size == 0) opt.vocab_size = m.vocab_size;
    TokenLoader l(m.shard_paths, opt);
    for (std::size_t i = 0; i < m.shard_paths.size(); ++i)
      DISTILX_REQUIRE(io_error, l.shards_[i].size() == m.shard_tokens[i], "manifest '", manifest_path, "': shard '",
                      m.shard_paths[i], "' has ", l.shards_[i].size(), " tokens, the manifest says ",
                      m.shard_tokens[i], " (stale or mixed-up shard)");
    return l;
  }

  /// Fills inputs and targets (each [B, T], row-major) with the next training batch of this
  /// rank and returns true; at the end of an epoch returns false without writing and moves
  /// to the next epoch (reshuffled), whose first batch the following call returns.
  bool next(std::int32_t* inputs, std::int32_t* targets) {
    if (position_ >= batches_per_epoch()) {
      ++epoch_;
      position_ = 0;
      shuffle_();
      return false;
    }
    const index_t T = opt_.seq_len;
    for (index_t b = 0; b < opt_.batch_size; ++b)
      read_window(train_window(position_, b), inputs + b * T, targets + b * T);
    ++position_;
    return true;
  }

  /// Window index (into the whole stream) of row b of batch k of the current epoch on this
  /// rank: position (k·B + b)·W + rank of the shuffled order.
  index_t train_window(index_t k, index_t b) const {
    DISTILX_REQUIRE(config_error, k >= 0 && k < batches_per_epoch() && b >= 0 && b < opt_.batch_size,
                    "TokenLoader: batch ", k, " row ", b, " outside ", batches_per_epoch(), " x ", opt_.batch_size);
    return perm_[static_cast<std::size_t>((k * opt_.batch_size + b) * opt_.world_size + opt_.rank)];
  }

  /// Window w of the stream: inputs = tokens [w(T+1), w(T+1)+T), targets shifted by one.
  void read_window(index_t w, std::int32_t* inputs, std::int32_t* targets) const {
    DISTILX_REQUIRE(config_error, w >= 0 && w < windows_, "TokenLoader: window ", w, " outside [0, ", windows_, ")");
    const index_t T = opt_.seq_len;
    const index_t start = w * (T + 1);
    read_tokens_(start, T, inputs);
    if (T > 1) std::memcpy(targets, inputs + 1, static_cast<std::size_t>(T - 1) * sizeof(std::int32_t));
    read_tokens_(start + T, 1, targets + T - 1);
  }

  /// Validation batches per rank (the split's remainder beyond a multiple of B·W is unused).
  index_t val_batches() const { return val_ / (opt_.batch_size * opt_.world_size); }
  /// Validation batch k of this rank: windows train + (k·B + b)·W + rank, in stream order.
  void val_batch(index_t k, std::int32_t* inputs, std::int32_t* targets) const {
    DISTILX_REQUIRE(config_error, k >= 0 && k < val_batches(), "TokenLoader: validation batch ", k, " outside [0, ",
                    val_batches(), ")");
    const index_t T = opt_.seq_len;
    for (index_t b = 0; b < opt_.batch_size; ++b)
      read_window(val_window(k, b), inputs + b * T, targets + b * T);
  }
  index_t val_window(index_t k, index_t b) const { return train_ + (k * opt_.batch_size + b) * opt_.world_size + opt_.rank; }

  index_t epoch() const { return epoch_; }
  /// Batches already taken in the current epoch.
  index_t position() const { return position_; }
  /// Batches per epoch, the same on every rank (training windows beyond a multiple of B·W
  /// are dropped, a different subset each epoch).
  index_t batches_per_epoch() const { return train_ / (opt_.batch_size * opt_.world_size); }
  index_t num_tokens() const { return offsets_.back(); }
  index_t num_windows() const { return windows_; }
  index_t num_train_windows() const { return train_; }
  index_t num_val_windows() const { return val_; }
  const LoaderOptions& options() const { return opt_; }

  LoaderState state() const {
    LoaderState s;
    s.seed = seed_;
    s.epoch = epoch_;
    s.position = position_;
    s.train_windows = train_;
    s.seq_len = opt_.seq_len;
    s.batch_size = opt_.batch_size;
    s.world_size = opt_.world_size;
    return s;
  }

  /// Restores a state from state(); the next batch is then the one an uninterrupted run
  /// would have produced. A state taken on W ranks with B rows each also restores on W' ranks
  /// with B' rows when the global batch is the same (B·W == B'·W'): every step then reads the
  /// same windows, split differently among the ranks, so a data-parallel run resumes on another
  /// number of GPUs. More generally the windows already taken (position·B·W) must be a whole
  /// number of this loader's global batches. Throws config_error otherwise, or if the data
  /// (training windows, seq_len) differ.
  void set_state(const LoaderState& s) {
    const index_t global = opt_.batch_size * opt_.world_size;
    const index_t taken = s.position * s.batch_size * s.world_size;  // windows of the epoch already read
    DISTILX_REQUIRE(config_error,
                    s.train_windows == train_ && s.seq_len == opt_.seq_len && s.batch_size > 0 && s.world_size > 0 &&
                        taken % global == 0,
                    "TokenLoader::set_state: state was taken with ", s.train_windows, " training windows, seq_len ",
                    s.seq_len, ", batch_size ", s.batch_size, ", world_size ", s.world_size, " (", taken,
                    " windows of the epoch read); this loader has ", train_, ", ", opt_.seq_len, ", ", opt_.batch_size,
                    ", ", opt_.world_size, (s.train_windows == train_ && s.seq_len == opt_.seq_len
                                                ? " and cannot continue after a partial global batch (keep "
                                                  "batch_size * world_size the same)"
                                                : ""));
    const index_t position = taken / global;
    DISTILX_REQUIRE(config_error, s.epoch >= 0 && s.position >= 0 && position <= batches_per_epoch(),
                    "TokenLoader::set_state: epoch ", s.epoch, " / position ", s.position, " outside [0, ",
                    batches_per_epoch(), "]");
    seed_ = s.seed;
    epoch_ = s.epoch;
    position_ = position;
    shuffle_();
  }

 private:
  // Fisher–Yates over the training windows with an Rng seeded from (seed, epoch), so any
  // epoch's order can be rebuilt directly on resume.
  void shuffle_() {
    perm_.resize(static_cast<std::size_t>(train_));
    for (std::size_t i = 0; i < perm_.size(); ++i) perm_[i] = static_cast<std::uint32_t>(i);
    Rng mix(seed_ ^ (0xD1B54A32D192ED03ull * static_cast<std::uint64_t>(epoch_ + 1)));
    Rng rng(mix.next_u64());
    for (std::size_t i = perm_.size(); i > 1; --i) {
      const auto j = static_cast<std::size_t>(rng.below(i));
      std::swap(perm_[i - 1], perm_[j]);
    }
  }

  // Copies stream tokens [start, start + n), possibly spanning shards.
  void read_tokens_(index_t start, index_t n, std::int32_t* out) const {
    auto it = std::upper_bound(offsets_.begin(), offsets_.end(), start);
    std::size_t s = static_cast<std::size_t>(it - offsets_.begin()) - 1;
    while (n > 0) {
      const index_t local = start - offsets_[s];
      const index_t take = std::min(n, shards_[s].size() - local);
      if (take > 0) shards_[s].read(local, take, out, opt_.vocab_size);
      out += take;
      start += take;
      n -= take;
      ++s;
    }
  }

  LoaderOptions opt_;
  std::vector<ShardReader> shards_;
  std::vector<index_t> offsets_;  // prefix sums of shard sizes; offsets_[i] = first token of shard i
  index_t windows_ = 0, train_ = 0, val_ = 0;
  std::uint64_t seed_ = 0;
  index_t epoch_ = 0, position_ = 0;
  std::vector<std::uint32_t> perm_;
};

}  // namespace distilx::data
