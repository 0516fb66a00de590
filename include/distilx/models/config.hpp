// Student configuration: the fields of NX-AI's xLSTMLMModelConfig that the
// xLSTM block stack uses (spec-xlstm.md §8), with JSON in and out. The JSON
// keys are distilx's flat names; export maps them onto NX-AI's nested config.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/core/error.hpp"

namespace distilx {

struct StudentConfig {
  index_t vocab_size = -1;
  index_t embedding_dim = 128;
  index_t num_blocks = 1;
  std::vector<index_t> slstm_at;  // global block indices that are sLSTM blocks
  index_t context_length = -1;    // NX-AI's cap for the parallel mLSTM form; -1 = no cap in distilx
  bool tie_weights = false;
  bool add_post_blocks_norm = true;
  // mLSTM layer
  index_t mlstm_num_heads = 4;
  index_t mlstm_qkv_proj_blocksize = 4;
  double mlstm_proj_factor = 2.0;
  index_t mlstm_conv1d_kernel_size = 4;
  index_t mlstm_chunk_size = 64;  // distilx: chunkwise form for S > chunk size
  // sLSTM layer
  index_t slstm_num_heads = 4;
  index_t slstm_conv1d_kernel_size = 4;
  std::string slstm_bias_init = "powerlaw_blockdependent";
  // gated feed-forward of the sLSTM block
  double ffn_proj_factor = 1.3;
  std::string ffn_act = "gelu";
  double norm_eps = 1e-5;

  /// NX-AI's UpProjConfigMixin: ceil(factor * d / 64) * 64 (spec §2.5).
  static index_t round_up_proj(double factor, index_t d) {
    return static_cast<index_t>(std::ceil(factor * static_cast<double>(d) / 64.0 - 1e-9)) * 64;
  }
  index_t mlstm_inner_dim() const { return round_up_proj(mlstm_proj_factor, embedding_dim); }
  index_t ffn_inner_dim() const { return round_up_proj(ffn_proj_factor, embedding_dim); }
  bool is_slstm(index_t block) const {
    return std::find(slstm_at.begin(), slstm_at.end(), block) != slstm_at.end();
  }

  /// The Distil-xLSTM paper student (spec §7): 6 blocks, sLSTM at 0,2,4, 16 heads,
  /// qkv block size 32, conv 4, FFN 1.7 GELU, mLSTM factor 2.0, untied.
  static StudentConfig paper(index_t vocab_size = 151936, index_t d = 1536) {
    StudentConfig c;
    c.vocab_size = vocab_size;
    c.embedding_dim = d;
    c.num_blocks = 6;
    c.slstm_at = {0, 2, 4};
    c.mlstm_num_heads = 16;
    c.slstm_num_heads = 16;
    c.mlstm_qkv_proj_blocksize = 32;
    c.ffn_proj_factor = 1.7;
    c.context_length = 512;
    return c;
  }

  /// Throws config_error naming the first inconsistent field.
  void validate() const {
    DISTILX_REQUIRE(config_error, vocab_size > 0, "student config: vocab_size must be > 0 (got ", vocab_size, ")");
    DISTILX_REQUIRE(config_error, embedding_dim > 0, "student config: embedding_dim must be > 0");
    DISTILX_REQUIRE(config_error, num_blocks > 0, "student config: num_blocks must be > 0");
    for (index_t b : slstm_at)
      DISTILX_REQUIRE(config_error, b >= 0 && b < num_blocks, "student config: slstm_at entry ", b,
                      " is outside [0, num_blocks=", num_blocks, ")");
    const index_t D = mlstm_inner_dim();
    const bool any_m = static_cast<index_t>(slstm_at.size()) < num_blocks;
    if (any_m) {
      DISTILX_REQUIRE(config_error, D % mlstm_num_heads == 0, "student config: mLSTM inner dim ", D,
                      " is not divisible by mlstm_num_heads=", mlstm_num_heads);
      DISTILX_REQUIRE(config_error, D % mlstm_qkv_proj_blocksize == 0, "student config: mLSTM inner dim ", D,
                      " is not divisible by mlstm_qkv_proj_blocksize=", mlstm_qkv_proj_blocksize);
      DISTILX_REQUIRE(config_error, mlstm_conv1d_kernel_size >= 1, "student config: mlstm_conv1d_kernel_size must be >= 1");
      DISTILX_REQUIRE(config_error, mlstm_chunk_size >= 1, "student config: mlstm_chunk_size must be >= 1");
    }
    if (!slstm_at.empty()) {
      DISTILX_REQUIRE(config_error, embedding_dim % slstm_num_heads == 0, "student config: embedding_dim ",
                      embedding_dim, " is not divisible by slstm_num_heads=", slstm_num_heads);
      DISTILX_REQUIRE(config_error, slstm_conv1d_kernel_size >= 0, "student config: slstm_conv1d_kernel_size must be >= 0");
      DISTILX_REQUIRE(config_error, ffn_act == "gelu",
                      "student config: ffn_act '", ffn_act, "' is not supported (supported: gelu)");
      DISTILX_REQUIRE(config_error,
                      slstm_bias_init == "powerlaw_blockdependent" || slstm_bias_init == "small_init" ||
                          slstm_bias_init == "standard" || slstm_bias_init == "zeros",
                      "student config: slstm_bias_init '", slstm_bias_init,
                      "' is unknown (expected powerlaw_blockdependent, small_init, standard or zeros)");
    }
  }
};

inline void to_json(nlohmann::json& j, const StudentConfig& c) {
  j = nlohmann::json{{"vocab_size", c.vocab_size},
                     {"embedding_dim", c.embedding_dim},
                     {"num_blocks", c.num_blocks},
                     {"slstm_at", c.slstm_at},
                     {"context_length", c.context_length},
                     {"tie_weights", c.tie_weights},
                     {"add_post_blocks_norm", c.add_post_blocks_norm},
                     {"mlstm_num_heads", c.mlstm_num_heads},
                     {"mlstm_qkv_proj_blocksize", c.mlstm_qkv_proj_blocksize},
                     {"mlstm_proj_factor", c.mlstm_proj_factor},
                     {"mlstm_conv1d_kernel_size", c.mlstm_conv1d_kernel_size},
                     {"mlstm_chunk_size", c.mlstm_chunk_size},
                     {"slstm_num_heads", c.slstm_num_heads},
                     {"slstm_conv1d_kernel_size", c.slstm_conv1d_kernel_size},
                     {"slstm_bias_init", c.slstm_bias_init},
                     {"ffn_proj_factor", c.ffn_proj_factor},
                     {"ffn_act", c.ffn_act},
                     {"norm_eps", c.norm_eps}};
}

/// Unknown keys are an error (a typo must not silently fall back to a default).
inline void from_json(const nlohmann::json& j, StudentConfig& c) {
  DISTILX_REQUIRE(config_error, j.is_object(), "student config: expected a JSON object");
  nlohmann::json known;
  to_json(known, StudentConfig{});
  for (auto it = j.begin(); it != j.end(); ++it)
    DISTILX_REQUIRE(config_error, known.contains(it.key()) || it.key() == "model_type" || it.key() == "format_version",
                    "student config: unknown key '", it.key(), "'");
  auto get = [&](const char* k, auto& v) {
    if (j.contains(k)) {
      try {
        j.at(k).get_to(v);
      } catch (const nlohmann::json::exception& e) {
        throw config_error(detail::concat("student config: key '", k, "' has the wrong type (", e.what(), ")"));
      }
    }
  };
  get("vocab_size", c.vocab_size);
  get("embedding_dim", c.embedding_dim);
  get("num_blocks", c.num_blocks);
  get("slstm_at", c.slstm_at);
  get("context_length", c.context_length);
  get("tie_weights", c.tie_weights);
  get("add_post_blocks_norm", c.add_post_blocks_norm);
  get("mlstm_num_heads", c.mlstm_num_heads);
  get("mlstm_qkv_proj_blocksize", c.mlstm_qkv_proj_blocksize);
  get("mlstm_proj_factor", c.mlstm_proj_factor);
  get("mlstm_conv1d_kernel_size", c.mlstm_conv1d_kernel_size);
  get("mlstm_chunk_size", c.mlstm_chunk_size);
  get("slstm_num_heads", c.slstm_num_heads);
  get("slstm_conv1d_kernel_size", c.slstm_conv1d_kernel_size);
  get("slstm_bias_init", c.slstm_bias_init);
  get("ffn_proj_factor", c.ffn_proj_factor);
  get("ffn_act", c.ffn_act);
  get("norm_eps", c.norm_eps);
}

}  // namespace distilx
