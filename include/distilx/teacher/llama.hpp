// The frozen Llama-family teacher (Qwen2, Llama, Mistral), forward only, matching Hugging Face's
// *ForCausalLM in eager mode: embedding -> L x [x += o(attn(rope(q), rope(k), v)) on RMSNorm(x);
// x += down(silu(gate(n)) * up(n)) on n = RMSNorm(x)] -> final RMSNorm -> LM head (tied or not).
// Hidden states as output_hidden_states=True: L+1 entries, embeddings first, the last after the
// final norm (HF replaces the last layer's raw output by the normed one).
//
// Backends: cpu, and cuda when included through distilx/cuda.cuh. With the cuda backend the weights,
// activations, logits and hidden states live on the device; weights are read, converted and
// initialised on the host and uploaded (a cpu and a cuda teacher given the same Rng hold identical
// weights); tokens, attention_mask and position_ids stay host arrays and are staged by forward().
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "distilx/backend/cpu/blas.hpp"
#include "distilx/core/error.hpp"
#include "distilx/core/rng.hpp"
#include "distilx/io/hf_config.hpp"
#include "distilx/ops/activations.hpp"
#include "distilx/ops/attention.hpp"
#include "distilx/ops/elementwise.hpp"
#include "distilx/ops/embedding.hpp"
#include "distilx/ops/fused.hpp"
#include "distilx/ops/linear.hpp"
#include "distilx/ops/norm.hpp"
#include "distilx/ops/rope.hpp"
#include "distilx/teacher/teacher.hpp"
#include "distilx/tensor/tensor.hpp"

namespace distilx {

namespace ops {
/// dst[0, n) = host[0, n) for a backend's memory (the CUDA overload, in backend/cuda/teacher_ops.cuh,
/// is ordered on the current stream, so the host array may be reused as soon as it returns).
template <class T>
void copy_from_host(cpu, T* dst, const T* host, index_t n) {
  if (n > 0) std::memcpy(dst, host, sizeof(T) * static_cast<std::size_t>(n));
}
}  // namespace ops

/// Shape legend: B batch, S sequence, M = B*S rows, d hidden_size, NH query heads, NKV key/value
/// heads, DH head_dim, F intermediate_size, V vocab_size, L num_hidden_layers.
template <class T, class Backend = cpu>
class LlamaTeacher {
  static_assert(std::is_floating_point_v<T>, "LlamaTeacher: T must be float or double");
  static_assert(is_backend_v<Backend>, "LlamaTeacher: Backend must be distilx::cpu or distilx::cuda");
  static constexpr bool on_host = std::is_same_v<Backend, cpu>;

 public:
  using value_type = T;
  using backend_type = Backend;
  using TensorT = Tensor<T, Backend>;

  /// One decoder layer's weights, PyTorch layouts (out, in). Absent biases stay empty.
  struct Layer {
    TensorT input_norm;      // [d]
    TensorT wq, bq;          // [NH*DH, d], [NH*DH]
    TensorT wk, bk;          // [NKV*DH, d], [NKV*DH]
    TensorT wv, bv;          // [NKV*DH, d], [NKV*DH]
    TensorT wo, bo;          // [d, NH*DH], [d]
    TensorT post_norm;       // [d]
    TensorT w_gate, b_gate;  // [F, d], [F]
    TensorT w_up, b_up;      // [F, d], [F]
    TensorT w_down, b_down;  // [d, F], [d]
  };

  /// A model of the given configuration with zero weights and unit norms (see init_random, load_weights).
  explicit LlamaTeacher(io::HfModelConfig cfg) : cfg_(std::move(cfg)) {
    cfg_.validate();
    const index_t d = cfg_.hidden_size, V = cfg_.vocab_size, F = cfg_.intermediate_size;
    const index_t q = cfg_.num_attention_heads * cfg_.head_dim, kv = cfg_.num_key_value_heads * cfg_.head_dim;
    embed_.resize({V, d});
    if (!cfg_.tie_word_embeddings) lm_head_.resize({V, d});
    final_norm_.resize({d});
    layers_.resize(static_cast<std::size_t>(cfg_.num_hidden_layers));
    for (Layer& ly : layers_) {
      ly.input_norm.resize({d});
      ly.post_norm.resize({d});
      ly.wq.resize({q, d});
      ly.wk.resize({kv, d});
      ly.wv.resize({kv, d});
      ly.wo.resize({d, q});
      if (cfg_.qkv_bias) {
        ly.bq.resize({q});
        ly.bk.resize({kv});
        ly.bv.resize({kv});
      }
      if (cfg_.o_bias) ly.bo.resize({d});
      ly.w_gate.resize({F, d});
      ly.w_up.resize({F, d});
      ly.w_down.resize({d, F});
      if (cfg_.mlp_bias) {
        ly.b_gate.resize({F});
        ly.b_up.resize({F});
        ly.b_down.resize({d});
      }
      fill_(ly.input_norm, T(1));
      fill_(ly.post_norm, T(1));
    }
    fill_(final_norm_, T(1));
    inv_freq_ = ops::rope_inverse_frequencies(cfg_.rope, cfg_.head_dim);
    if constexpr (!on_host) {
      inv_freq_dev_.resize({static_cast<index_t>(inv_freq_.size())});
      upload(inv_freq_dev_.buffer(), 0, inv_freq_.data(), inv_freq_dev_.size());
    }
  }

  /// Loads a Hugging Face model directory as save_pretrained wrote it (config.json plus
  /// model.safetensors or model.safetensors.index.json and its shards). Throws distilx::error
  /// subclasses naming the file, field or tensor on any bad input; never returns a partial model.
  static LlamaTeacher from_pretrained(const std::string& dir) {
    LlamaTeacher t(io::load_hf_config(dir));
    const io::HfWeights weights(dir);
    t.load_weights(weights);
    return t;
  }

  /// Reads every parameter (HF names) from `w`, converting to T.
  /// With the cuda backend each tensor is read on the host and uploaded.
  void load_weights(const io::HfWeights& w) {
    if constexpr (on_host) {
      for_each_parameter([&](const std::string& name, TensorT& t) { w.read<T>(name, t.data(), t.shape()); });
    } else {
      std::vector<T> host;
      for_each_parameter([&](const std::string& name, TensorT& t) {
        host.resize(static_cast<std::size_t>(t.size()));
        w.read<T>(name, host.data(), t.shape());
        upload(t.buffer(), 0, host.data(), t.size());
      });
    }
  }

  /// Random weights for tests and benchmarks: embeddings N(0,1), matrices N(0, 1/fan_in),
  /// biases N(0, 0.1^2), norm weights 1 + N(0, 0.1^2). The draws are the same on every backend
  /// (the cuda teacher draws on the host and uploads).
  void init_random(Rng& rng) {
    std::vector<T> host;
    for_each_parameter([&](const std::string& name, TensorT& t) {
      const bool is_norm = name.size() > 11 && name.compare(name.size() - 11, 11, "norm.weight") == 0;
      const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
      const bool is_embed = name == "model.embed_tokens.weight";
      const double sd = is_norm || is_bias ? 0.1 : is_embed ? 1.0 : 1.0 / std::sqrt(double(t.dim(1)));
      if constexpr (on_host) {
        for (index_t i = 0; i < t.size(); ++i) t[i] = static_cast<T>((is_norm ? 1.0 : 0.0) + sd * rng.normal());
      } else {
        host.resize(static_cast<std::size_t>(t.size()));
        for (T& x : host) x = static_cast<T>((is_norm ? 1.0 : 0.0) + sd * rng.normal());
        upload(t.buffer(), 0, host.data(), t.size());
      }
    });
  }

  /// Calls f(hf_name, tensor) for every parameter, in state_dict order. The tied head is not listed.
  template <class Fn>
  void for_each_parameter(Fn&& f) {
    visit_(*this, f);
  }
  template <class Fn>
  void for_each_parameter(Fn&& f) const {
    visit_(*this, f);
  }

  const io::HfModelConfig& config() const { return cfg_; }
  index_t vocab_size() const { return cfg_.vocab_size; }
  index_t hidden_size() const { return cfg_.hidden_size; }
  index_t num_layers() const { return cfg_.num_hidden_layers; }
  /// L + 1: the length of the hidden-state list forward() fills.
  index_t num_hidden_states() const { return cfg_.num_hidden_layers + 1; }
  /// [V, d] input embedding (the student's frozen embedding is a copy of it).
  const TensorT& embedding() const { return embed_; }
  /// [V, d] LM head: the embedding again when the model ties them.
  const TensorT& lm_head() const { return cfg_.tie_word_embeddings ? embed_ : lm_head_; }
  const TensorT& final_norm() const { return final_norm_; }
  const std::vector<Layer>& layers() const { return layers_; }
  std::size_t num_parameters() const {
    std::size_t n = 0;
    for_each_parameter([&](const std::string&, const TensorT& t) { n += static_cast<std::size_t>(t.size()); });
    return n;
  }

  /// Queries per attention tile (scratch per thread: q_tile x S scores). Default 64.
  void set_attention_tile(index_t q_tile) {
    DISTILX_REQUIRE(error, q_tile > 0, "attention tile must be positive, got ", q_tile);
    q_tile_ = q_tile;
  }

  /// Which of the L+1 hidden states forward() keeps when asked for them (e.g. only those an
  /// alignment policy reads); `keep` has L+1 entries, or none for all (the default). Entries not
  /// kept are resized to empty tensors and cost neither memory nor a copy.
  void keep_hidden_states(std::vector<bool> keep) {
    DISTILX_REQUIRE(error, keep.empty() || static_cast<index_t>(keep.size()) == num_hidden_states(),
                    "keep_hidden_states: expected ", num_hidden_states(), " flags (L + 1) or none, got ", keep.size());
    keep_hidden_ = std::move(keep);
  }

  /// Forward pass for tokens [B, S].
  ///  attention_mask [B, S]: 1 = real token, 0 = padding (left or right); null = no padding. As in HF,
  ///    padding keys are masked for every query; outputs at padding positions are not meaningful
  ///    (fully masked left-padding queries get a zero attention output here, an arbitrary mix in HF).
  ///  position_ids [B, S]: RoPE positions; null = 0..S-1 for every row, which is what HF's forward
  ///    does when none are given, also for padded batches (generate() instead passes cumsum(mask)-1,
  ///    see hf_generate_position_ids).
  ///  logits [B, S, V] may be null. hidden_states may be null; otherwise it is resized to L+1 tensors
  ///    [B, S, d] in HF's output_hidden_states order (existing tensors of the right shape are reused;
  ///    see keep_hidden_states).
  ///  With the cuda backend tokens, attention_mask and position_ids are host arrays; logits is device
  ///  memory and the hidden states are device tensors.
  void forward(const std::int32_t* tokens, index_t B, index_t S, const std::uint8_t* attention_mask, T* logits,
               std::vector<TensorT>* hidden_states, const std::int32_t* position_ids = nullptr) {
    DISTILX_REQUIRE(shape_error, B > 0 && S > 0, "teacher forward: batch and sequence length must be positive, got B ",
                    B, ", S ", S);
    DISTILX_REQUIRE(error, tokens != nullptr, "teacher forward: tokens is null");
    Backend be{};
    const index_t M = B * S, d = cfg_.hidden_size, V = cfg_.vocab_size, F = cfg_.intermediate_size;
    const index_t NH = cfg_.num_attention_heads, NKV = cfg_.num_key_value_heads, DH = cfg_.head_dim;
    const index_t L = cfg_.num_hidden_layers, half = DH / 2;
    const T eps = static_cast<T>(cfg_.rms_norm_eps);
    ensure_workspace_(B, S);

    for (index_t m = 0; m < M; ++m) pos_[static_cast<std::size_t>(m)] = position_ids ? position_ids[m] : std::int32_t(m % S);
    const std::uint8_t* key_mask = attention_mask;  // where the attention op reads it
    if constexpr (on_host) {
      ops::rope_cos_sin(be, cos_.data(), sin_.data(), pos_.data(), inv_freq_.data(), M, half);
    } else {
      ops::copy_from_host(be, pos_dev_.data(), pos_.data(), M);
      ops::rope_cos_sin(be, cos_.data(), sin_.data(), pos_dev_.data(), inv_freq_dev_.data(), M, half);
      if (attention_mask) {
        ops::copy_from_host(be, mask_dev_.data(), attention_mask, M);
        key_mask = mask_dev_.data();
      }
    }

    ops::embedding_forward(be, x_.data(), tokens, embed_.data(), M, d, V);  // [M, d]
    auto kept = [&](index_t i) { return keep_hidden_.empty() || keep_hidden_[static_cast<std::size_t>(i)]; };
    if (hidden_states) {
      hidden_states->resize(static_cast<std::size_t>(L + 1));
      for (index_t i = 0; i <= L; ++i) {
        TensorT& h = (*hidden_states)[static_cast<std::size_t>(i)];
        const Shape want = kept(i) ? Shape{B, S, d} : Shape{0};
        if (h.shape() != want) h.resize(want);
      }
      if (kept(0)) ops::copy(be, (*hidden_states)[0].data(), x_.data(), M * d);
    }

    ops::CausalAttentionShape ash;
    ash.B = B;
    ash.S = S;
    ash.NH = NH;
    ash.NKV = NKV;
    ash.DH = DH;
    ash.q_tile = q_tile_;
    ash.rope = true;
    const ops::AttentionRope<T> rope{cos_.data(), sin_.data()};
    const index_t scratch_needed = ops::causal_attention_scratch_size(be, ash);
    if (scratch_.size() < scratch_needed) scratch_.resize({scratch_needed});
    const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(DH)));  // HF: head_dim ** -0.5

    for (index_t l = 0; l < L; ++l) {
      const Layer& ly = layers_[static_cast<std::size_t>(l)];
      // Attention block.
      {
        // xn is read by the q, k, v products only (16 bits straight from the norm on the GPU).
        const auto xn = ops::rmsnorm_forward_for_products(be, xn_.data(), x_.data(), ly.input_norm.data(), M, d, eps);
        // q [M, NH, DH]; k, v [M, NKV, DH]
        ops::qkv_forward(be, q_.data(), k_.data(), v_.data(), xn_.data(), ly.wq.data(), bias_(ly.bq), ly.wk.data(),
                         bias_(ly.bk), ly.wv.data(), bias_(ly.bv), M, d, NH * DH, NKV * DH);
      }
      ash.window = cfg_.sliding_window[static_cast<std::size_t>(l)];
      // RoPE is applied inside the attention op, to q and k as it reads them.
      ops::causal_attention_forward(be, att_.data(), q_.data(), k_.data(), v_.data(), key_mask, ash, scale,
                                    scratch_.data(), scratch_.size(), rope);  // [M, NH, DH]
      // x += att Wo^T (+ bo): the residual add is folded into the GEMM (beta = 1).
      ops::gemm(be, ops::Trans::no, ops::Trans::yes, M, d, NH * DH, T(1), att_.data(), NH * DH, ly.wo.data(),
                NH * DH, T(1), x_.data(), d);
      if (cfg_.o_bias) ops::add_row_vector(be, x_.data(), ly.bo.data(), M, d);
      // SwiGLU MLP block.
      {
        const auto xn = ops::rmsnorm_forward_for_products(be, xn_.data(), x_.data(), ly.post_norm.data(), M, d, eps);
        // x += down(silu(gate(xn)) * up(xn)); gate_ and up_ are its [M, F] scratch.
        ops::gated_mlp_forward<ops::Silu>(be, x_.data(), xn_.data(), ly.w_gate.data(), bias_(ly.b_gate),
                                          ly.w_up.data(), bias_(ly.b_up), ly.w_down.data(), M, d, F, gate_.data(),
                                          up_.data());
      }
      if (cfg_.mlp_bias) ops::add_row_vector(be, x_.data(), ly.b_down.data(), M, d);
      if (hidden_states && l + 1 < L && kept(l + 1))
        ops::copy(be, (*hidden_states)[static_cast<std::size_t>(l + 1)].data(), x_.data(), M * d);
    }

    ops::rmsnorm_forward(be, xn_.data(), static_cast<T*>(nullptr), x_.data(), final_norm_.data(), M, d, eps);
    if (hidden_states && kept(L)) ops::copy(be, (*hidden_states)[static_cast<std::size_t>(L)].data(), xn_.data(), M * d);
    if (logits) ops::lm_head_forward(be, logits, xn_.data(), lm_head().data(), M, d, V);  // [M, V]
  }

 private:
  // Shared by the const and non-const for_each_parameter (Self = [const] LlamaTeacher).
  template <class Self, class Fn>
  static void visit_(Self& self, Fn& f) {
    f("model.embed_tokens.weight", self.embed_);
    for (std::size_t i = 0; i < self.layers_.size(); ++i) {
      auto& ly = self.layers_[i];
      const std::string p = "model.layers." + std::to_string(i) + ".";
      const io::HfModelConfig& c = self.cfg_;
      f(p + "input_layernorm.weight", ly.input_norm);
      f(p + "self_attn.q_proj.weight", ly.wq);
      if (c.qkv_bias) f(p + "self_attn.q_proj.bias", ly.bq);
      f(p + "self_attn.k_proj.weight", ly.wk);
      if (c.qkv_bias) f(p + "self_attn.k_proj.bias", ly.bk);
      f(p + "self_attn.v_proj.weight", ly.wv);
      if (c.qkv_bias) f(p + "self_attn.v_proj.bias", ly.bv);
      f(p + "self_attn.o_proj.weight", ly.wo);
      if (c.o_bias) f(p + "self_attn.o_proj.bias", ly.bo);
      f(p + "post_attention_layernorm.weight", ly.post_norm);
      f(p + "mlp.gate_proj.weight", ly.w_gate);
      if (c.mlp_bias) f(p + "mlp.gate_proj.bias", ly.b_gate);
      f(p + "mlp.up_proj.weight", ly.w_up);
      if (c.mlp_bias) f(p + "mlp.up_proj.bias", ly.b_up);
      f(p + "mlp.down_proj.weight", ly.w_down);
      if (c.mlp_bias) f(p + "mlp.down_proj.bias", ly.b_down);
    }
    f("model.norm.weight", self.final_norm_);
    if (!self.cfg_.tie_word_embeddings) f("lm_head.weight", self.lm_head_);
  }

  static const T* bias_(const TensorT& b) { return b.size() ? b.data() : nullptr; }
  static void fill_(TensorT& t, T v) {
    if constexpr (on_host) {
      for (index_t i = 0; i < t.size(); ++i) t[i] = v;
    } else {
      const std::vector<T> host(static_cast<std::size_t>(t.size()), v);
      upload(t.buffer(), 0, host.data(), t.size());
    }
  }

  void ensure_workspace_(index_t B, index_t S) {
    if (B == ws_B_ && S == ws_S_) return;
    const index_t M = B * S, d = cfg_.hidden_size, F = cfg_.intermediate_size, DH = cfg_.head_dim;
    const index_t q = cfg_.num_attention_heads * DH, kv = cfg_.num_key_value_heads * DH;
    x_.resize({M, d});
    xn_.resize({M, d});
    q_.resize({M, q});
    k_.resize({M, kv});
    v_.resize({M, kv});
    att_.resize({M, q});
    gate_.resize({M, F});
    up_.resize({M, F});
    cos_.resize({M, DH / 2});
    sin_.resize({M, DH / 2});
    pos_.assign(static_cast<std::size_t>(M), 0);
    if constexpr (!on_host) {
      pos_dev_.resize({M});
      mask_dev_.resize({M});
    }
    ws_B_ = B;
    ws_S_ = S;
  }

  io::HfModelConfig cfg_;
  TensorT embed_;       // [V, d]
  TensorT lm_head_;     // [V, d], empty when tied
  TensorT final_norm_;  // [d]
  std::vector<Layer> layers_;
  std::vector<float> inv_freq_;  // [DH/2], float32 as in HF
  Tensor<float, Backend> inv_freq_dev_;  // its device copy (cuda only)
  index_t q_tile_ = 64;
  std::vector<bool> keep_hidden_;  // empty = all

  // Workspace, sized per (B, S) and reused across calls.
  index_t ws_B_ = -1, ws_S_ = -1;
  TensorT x_, xn_;            // [M, d] residual stream, normed input
  TensorT q_, att_;           // [M, NH*DH]
  TensorT k_, v_;             // [M, NKV*DH]
  TensorT gate_, up_;         // [M, F]
  TensorT cos_, sin_;         // [M, DH/2]
  TensorT scratch_;           // attention score tiles
  std::vector<std::int32_t> pos_;  // [M]
  Tensor<std::int32_t, Backend> pos_dev_;   // [M] staged positions (cuda only)
  Tensor<std::uint8_t, Backend> mask_dev_;  // [M] staged attention mask (cuda only)
};

static_assert(is_teacher_v<LlamaTeacher<float>>, "LlamaTeacher must model the Teacher concept");

/// Position ids as HF's generate() builds them for a padded batch: cumsum(mask) - 1, and 1 at
/// padding positions. positions [B, S].
inline void hf_generate_position_ids(const std::uint8_t* attention_mask, index_t B, index_t S, std::int32_t* positions) {
  for (index_t b = 0; b < B; ++b) {
    std::int32_t c = 0;
    for (index_t s = 0; s < S; ++s) {
      const bool real = attention_mask[b * S + s] != 0;
      c += real ? 1 : 0;
      positions[b * S + s] = real ? c - 1 : 1;
    }
  }
}

}  // namespace distilx
