// The xLSTM student (NX-AI xLSTMLMModel, spec-xlstm.md §1, §6):
//   logits = head(post_norm(block_{L-1}(... block_0(E[tokens]))))
// with a frozen embedding E [V,d] and frozen head [V,d] (the same tensor when
// tied) outside the flat trainable buffer. Per-block outputs (after the
// residuals, before post_norm) are exposed for hidden-state alignment.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "distilx/blocks/mlstm_block.hpp"
#include "distilx/blocks/slstm_block.hpp"
#include "distilx/ops/embedding.hpp"

namespace distilx {

template <class T, class Backend = cpu>
class Student {
 public:
  using value_type = T;
  using backend_type = Backend;
  using MBlock = MLSTMBlock<T, Backend>;
  using SBlock = SLSTMBlock<T, Backend>;
  using Block = std::variant<std::unique_ptr<MBlock>, std::unique_ptr<SBlock>>;

  /// Builds the block stack and allocates parameters (zero) and frozen tensors.
  /// Call init() (or load weights) before use.
  explicit Student(StudentConfig c) : Student(std::move(c), true) {}

  /// Parameter counts of a configuration without allocating anything.
  struct Counts {
    index_t trainable = 0;  // blocks + post norm
    index_t frozen = 0;     // embedding (+ head when untied)
    index_t total() const { return trainable + frozen; }
  };
  static Counts count(const StudentConfig& c) {
    Student s(c, false);
    Counts r;
    r.trainable = s.layout_.count();
    r.frozen = c.vocab_size * c.embedding_dim * (c.tie_weights ? 1 : 2);
    return r;
  }

  const StudentConfig& config() const { return cfg_; }
  const ParamLayout& layout() const { return layout_; }
  T* params() { return params_.data(); }
  const T* params() const { return params_.data(); }
  T* grads() { return grads_.data(); }
  const T* grads() const { return grads_.data(); }
  /// Length of the flat buffers (with alignment padding; padding entries stay zero).
  index_t flat_size() const { return layout_.total(); }
  T* param(const std::string& name) { return params_.data() + info(name).offset; }
  T* grad(const std::string& name) { return grads_.data() + info(name).offset; }
  const ParamInfo& info(const std::string& name) const {
    const ParamInfo* p = layout_.find(name);
    DISTILX_REQUIRE(error, p != nullptr, "the student has no parameter named '", name, "'");
    return *p;
  }
  /// Frozen token embedding [V, d] and LM head [V, d] (the same storage when tied).
  T* embedding() { return embedding_.data(); }
  const T* embedding() const { return embedding_.data(); }
  T* head() { return cfg_.tie_weights ? embedding_.data() : head_.data(); }
  const T* head() const { return cfg_.tie_weights ? embedding_.data() : head_.data(); }
  index_t num_blocks() const { return cfg_.num_blocks; }

  /// NX-AI initialisation of every block and the post norm; the embedding and head
  /// get small_init(d) (they are normally overwritten with the teacher's).
  void init(std::uint64_t seed) {
    Rng rng(seed);
    // Initialised on the host and uploaded once, so the same code serves every backend.
    std::vector<T> host(static_cast<std::size_t>(layout_.total()), T(0));
    for (auto& b : blocks_) std::visit([&](auto& blk) { blk->init(host.data(), rng); }, b);
    if (post_norm_ >= 0) init::constant(host.data() + layout_[post_norm_].offset, cfg_.embedding_dim, 0.0);
    set_params(host.data());
    const index_t n = cfg_.vocab_size * cfg_.embedding_dim;
    host.assign(static_cast<std::size_t>(n), T(0));
    init::normal(host.data(), n, init::small_init_std(cfg_.embedding_dim), rng);
    set_embedding(host.data());
    if (!cfg_.tie_weights) {
      init::normal(host.data(), n, init::small_init_std(cfg_.embedding_dim), rng);
      set_head(host.data());
    }
  }

  // ---- host-side access (uploads/downloads on device backends) ----
  /// Copies flat_size() values from the host into the parameter buffer.
  void set_params(const T* host) { upload(params_, 0, host, layout_.total()); }
  /// The flat parameters (or gradients) as a host vector of flat_size() values.
  std::vector<T> params_to_host() const {
    std::vector<T> h(static_cast<std::size_t>(layout_.total()));
    download(params_, 0, h.data(), layout_.total());
    return h;
  }
  std::vector<T> grads_to_host() const {
    std::vector<T> h(static_cast<std::size_t>(layout_.total()));
    download(grads_, 0, h.data(), layout_.total());
    return h;
  }
  /// Frozen embedding / head [V, d] from host memory (e.g. the teacher's weights).
  void set_embedding(const T* host) { upload(embedding_, 0, host, cfg_.vocab_size * cfg_.embedding_dim); }
  void set_head(const T* host) {
    if (cfg_.tie_weights) set_embedding(host);
    else upload(head_, 0, host, cfg_.vocab_size * cfg_.embedding_dim);
  }
  std::vector<T> embedding_to_host() const {
    std::vector<T> h(static_cast<std::size_t>(cfg_.vocab_size * cfg_.embedding_dim));
    download(embedding_, 0, h.data(), static_cast<index_t>(h.size()));
    return h;
  }
  std::vector<T> head_to_host() const {
    if (cfg_.tie_weights) return embedding_to_host();
    std::vector<T> h(static_cast<std::size_t>(cfg_.vocab_size * cfg_.embedding_dim));
    download(head_, 0, h.data(), static_cast<index_t>(h.size()));
    return h;
  }

  void zero_grad() { grads_.zero(); }

  /// Called during backward() as soon as a block's parameter gradients are final (blocks in
  /// reverse order) with the block index and the range [offset, offset + count) of the flat
  /// gradient buffer it owns; the top block's range also covers the post-blocks norm. The ranges
  /// are contiguous and together cover [0, flat_size()). Gradients are final on the device when
  /// the work queued so far on the backend's stream completes, so a data-parallel policy can
  /// start reducing them on another stream while the backward goes on. Unset (the default), it
  /// costs one branch per block.
  using GradReadyHook = std::function<void(index_t block, index_t offset, index_t count)>;
  void set_grad_ready_hook(GradReadyHook hook) { grad_ready_ = std::move(hook); }
  /// First flat-buffer element of block i's parameters (flat_size() for i == num_blocks()).
  index_t block_param_offset(index_t i) const {
    DISTILX_ASSERT(i >= 0 && i <= cfg_.num_blocks);
    return i == cfg_.num_blocks ? layout_.total() : block_offsets_[static_cast<std::size_t>(i)];
  }

  /// Forward over tokens [B, S] (ids validated against V). Afterwards hidden() is the
  /// post-norm state [B,S,d] and block_output(i) the output of block i.
  template <class Tok>
  void forward(const Tok* tokens, index_t B, index_t S) {
    resize(B, S);
    Backend be{};
    const index_t M = B * S, d = cfg_.embedding_dim;
    ops::embedding_forward(be, xs_[0].data(), tokens, embedding_.data(), M, d, cfg_.vocab_size);
    for (index_t i = 0; i < cfg_.num_blocks; ++i)
      std::visit([&](auto& blk) { blk->forward(xs_[i + 1].data(), xs_[i].data(), params_.data(), B, S); },
                 blocks_[static_cast<std::size_t>(i)]);
    if (post_norm_ >= 0)
      ops::layernorm_forward(be, hidden_.data(), pn_mean_.data(), pn_rstd_.data(), xs_.back().data(),
                             params_.data() + layout_[post_norm_].offset, M, d, static_cast<T>(cfg_.norm_eps));
    else
      ops::copy(be, hidden_.data(), xs_.back().data(), M * d);
  }

  const T* hidden() const { return hidden_.data(); }
  const T* block_output(index_t i) const { return xs_[static_cast<std::size_t>(i + 1)].data(); }
  index_t batch() const { return B_; }
  index_t seq_len() const { return S_; }

  /// Full logits [B, S, V] from the last forward (for tests and small vocabularies; the
  /// distillation loss computes the head in chunks instead).
  void logits(T* out) const {
    ops::lm_head_forward(Backend{}, out, hidden_.data(), head(), B_ * S_, cfg_.embedding_dim, cfg_.vocab_size);
  }

  /// Backward from the gradient w.r.t. hidden() [B,S,d] and optionally extra gradients
  /// w.r.t. each block output (alignment losses; null entries are skipped). Parameter
  /// gradients ACCUMULATE into grads() (call zero_grad() between steps).
  void backward(const T* d_hidden, const std::vector<const T*>* d_block_outputs = nullptr) {
    Backend be{};
    const index_t M = B_ * S_, d = cfg_.embedding_dim;
    T* cur = dbuf_a_.data();
    T* nxt = dbuf_b_.data();
    if (post_norm_ >= 0)
      ops::layernorm_backward(be, cur, grads_.data() + layout_[post_norm_].offset, d_hidden, xs_.back().data(),
                              params_.data() + layout_[post_norm_].offset, pn_mean_.data(), pn_rstd_.data(), M, d);
    else
      ops::copy(be, cur, d_hidden, M * d);
    for (index_t i = cfg_.num_blocks - 1; i >= 0; --i) {
      if (d_block_outputs && (*d_block_outputs)[static_cast<std::size_t>(i)])
        ops::add_inplace(be, cur, (*d_block_outputs)[static_cast<std::size_t>(i)], M * d);
      std::visit([&](auto& blk) { blk->backward(nxt, grads_.data(), cur, xs_[i].data(), params_.data(), B_, S_); },
                 blocks_[static_cast<std::size_t>(i)]);
      if (grad_ready_) {
        const index_t lo = block_offsets_[static_cast<std::size_t>(i)];
        const index_t hi = i + 1 == cfg_.num_blocks ? layout_.total() : block_offsets_[static_cast<std::size_t>(i + 1)];
        grad_ready_(i, lo, hi - lo);
      }
      std::swap(cur, nxt);
    }
    // cur now holds d(embedding output); the embedding is frozen, so it is dropped.
  }

  /// Backward from full logits' gradient [B,S,V] through the frozen head (input gradient only).
  void backward_from_logits(const T* dlogits, const std::vector<const T*>* d_block_outputs = nullptr) {
    ops::lm_head_backward(Backend{}, dhid_.data(), dlogits, head(), B_ * S_, cfg_.embedding_dim, cfg_.vocab_size);
    backward(dhid_.data(), d_block_outputs);
  }

  // ---- generation with the recurrent state (memory constant in the context length) ----
  struct State {
    index_t batch = 0;
    std::vector<std::variant<typename MBlock::State, typename SBlock::State>> blocks;
  };
  State make_state(index_t B) const {
    State s;
    s.batch = B;
    for (const auto& b : blocks_) {
      if (std::holds_alternative<std::unique_ptr<MBlock>>(b)) {
        typename MBlock::State st;
        std::get<std::unique_ptr<MBlock>>(b)->init_state(st, B);
        s.blocks.emplace_back(std::move(st));
      } else {
        typename SBlock::State st;
        std::get<std::unique_ptr<SBlock>>(b)->init_state(st, B);
        s.blocks.emplace_back(std::move(st));
      }
    }
    return s;
  }
  /// Feeds one token per sequence (tokens [B]); writes logits [B, V] if non-null and
  /// leaves the post-norm hidden state [B, d] in step_hidden().
  template <class Tok>
  void step(const Tok* tokens, State& s, T* logits_out) {
    Backend be{};
    const index_t B = s.batch, d = cfg_.embedding_dim;
    if (step_x_.size() != 2 * B * d) step_x_.resize(2 * B * d);
    if (step_h_.size() != B * d + 2 * B) step_h_.resize(B * d + 2 * B);
    T* x = step_x_.data();
    T* y = x + B * d;
    ops::embedding_forward(be, x, tokens, embedding_.data(), B, d, cfg_.vocab_size);
    for (std::size_t i = 0; i < blocks_.size(); ++i) {
      if (std::holds_alternative<std::unique_ptr<MBlock>>(blocks_[i]))
        std::get<std::unique_ptr<MBlock>>(blocks_[i])->step(y, x, std::get<typename MBlock::State>(s.blocks[i]),
                                                            params_.data(), B);
      else
        std::get<std::unique_ptr<SBlock>>(blocks_[i])->step(y, x, std::get<typename SBlock::State>(s.blocks[i]),
                                                            params_.data(), B);
      std::swap(x, y);
    }
    T* h = step_h_.data();
    if (post_norm_ >= 0)
      ops::layernorm_forward(be, h, h + B * d, h + B * d + B, x, params_.data() + layout_[post_norm_].offset, B, d,
                             static_cast<T>(cfg_.norm_eps));
    else
      ops::copy(be, h, x, B * d);
    if (logits_out) ops::lm_head_forward(be, logits_out, h, head(), B, d, cfg_.vocab_size);
  }
  const T* step_hidden() const { return step_h_.data(); }

 private:
  Student(StudentConfig c, bool allocate) : cfg_(std::move(c)) {
    cfg_.validate();
    for (index_t i = 0; i < cfg_.num_blocks; ++i) {
      const std::string prefix = "xlstm_block_stack.blocks." + std::to_string(i) + ".";
      block_offsets_.push_back(layout_.total());
      if (cfg_.is_slstm(i))
        blocks_.emplace_back(std::make_unique<SBlock>(cfg_, i, layout_, prefix));
      else
        blocks_.emplace_back(std::make_unique<MBlock>(cfg_, i, layout_, prefix));
    }
    if (cfg_.add_post_blocks_norm) post_norm_ = layout_.add("xlstm_block_stack.post_blocks_norm.weight", {cfg_.embedding_dim});
    if (allocate) {
      params_.resize(layout_.total());
      grads_.resize(layout_.total());
      embedding_.resize(cfg_.vocab_size * cfg_.embedding_dim);
      if (!cfg_.tie_weights) head_.resize(cfg_.vocab_size * cfg_.embedding_dim);
    }
  }

  void resize(index_t B, index_t S) {
    if (B == B_ && S == S_) return;
    DISTILX_REQUIRE(shape_error, B > 0 && S > 0, "student forward: batch and length must be positive (got B=", B,
                    ", S=", S, ")");
    B_ = B;
    S_ = S;
    const index_t M = B * S, d = cfg_.embedding_dim;
    xs_.resize(static_cast<std::size_t>(cfg_.num_blocks + 1));
    for (auto& x : xs_) x.resize(M * d);
    for (auto* t : {&hidden_, &dbuf_a_, &dbuf_b_, &dhid_}) t->resize(M * d);
    pn_mean_.resize(M);
    pn_rstd_.resize(M);
  }

  StudentConfig cfg_;
  ParamLayout layout_;
  std::vector<Block> blocks_;
  std::vector<index_t> block_offsets_;  // first flat element of each block's parameters
  GradReadyHook grad_ready_;
  index_t post_norm_ = -1;
  Buffer<T, Backend> params_, grads_, embedding_, head_;
  index_t B_ = -1, S_ = -1;
  std::vector<Buffer<T, Backend>> xs_;  // residual stream: xs_[0] embedding, xs_[i+1] block i output
  Buffer<T, Backend> hidden_, pn_mean_, pn_rstd_, dbuf_a_, dbuf_b_, dhid_, step_x_, step_h_;
};

}  // namespace distilx
