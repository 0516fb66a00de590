// Hugging Face model directories as save_pretrained writes them: config.json of the Llama family
// (Qwen2ForCausalLM, LlamaForCausalLM, MistralForCausalLM; transformers 4.x fields and 5.x's
// rope_parameters / layer_types) and the weights, in one model.safetensors or sharded through
// model.safetensors.index.json (weight_map: tensor name -> shard file). Anything unsupported or
// inconsistent is refused with an exception naming the file, the field or tensor, and the expectation.
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/core/error.hpp"
#include "distilx/io/safetensors.hpp"
#include "distilx/ops/rope.hpp"

namespace distilx::io {

/// The fields of a Llama-family config.json that the teacher's forward pass depends on.
struct HfModelConfig {
  std::string source;        ///< path of the config.json it came from ("" when built in code)
  std::string architecture;  ///< "Qwen2ForCausalLM", "LlamaForCausalLM" or "MistralForCausalLM"
  std::string model_type;    ///< "qwen2", "llama" or "mistral"

  index_t vocab_size = 0;
  index_t hidden_size = 0;
  index_t intermediate_size = 0;
  index_t num_hidden_layers = 0;
  index_t num_attention_heads = 0;
  index_t num_key_value_heads = 0;
  index_t head_dim = 0;  ///< config's head_dim when present, else hidden_size / num_attention_heads
  index_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  ops::RopeSpec rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  ///< q/k/v projections have a bias (Qwen2 always; Llama with attention_bias)
  bool o_bias = false;    ///< o_proj has a bias (Llama with attention_bias; never Qwen2)
  bool mlp_bias = false;  ///< gate/up/down projections have a bias (Llama mlp_bias)
  /// Per layer: sliding-window size, 0 = full causal attention (Mistral's sliding_window, Qwen2's
  /// use_sliding_window with max_window_layers / layer_types).
  std::vector<index_t> sliding_window;
  std::optional<std::int64_t> bos_token_id, pad_token_id;
  std::vector<std::int64_t> eos_token_ids;
  std::string dtype;  ///< "dtype" / "torch_dtype" as written (informational; weights convert to T)

  /// Throws config_error when the sizes are inconsistent (for configs built in code).
  void validate() const {
    const std::string where = source.empty() ? std::string("HfModelConfig") : source;
    auto positive = [&](index_t v, const char* name) {
      DISTILX_REQUIRE(config_error, v > 0, where, ": ", name, " must be a positive integer, got ", v);
    };
    positive(vocab_size, "vocab_size");
    positive(hidden_size, "hidden_size");
    positive(intermediate_size, "intermediate_size");
    positive(num_hidden_layers, "num_hidden_layers");
    positive(num_attention_heads, "num_attention_heads");
    positive(num_key_value_heads, "num_key_value_heads");
    positive(head_dim, "head_dim");
    DISTILX_REQUIRE(config_error, num_attention_heads % num_key_value_heads == 0, where,
                    ": num_attention_heads (", num_attention_heads, ") must be a multiple of num_key_value_heads (",
                    num_key_value_heads, ")");
    DISTILX_REQUIRE(config_error, head_dim % 2 == 0, where, ": head_dim must be even for RoPE, got ", head_dim);
    DISTILX_REQUIRE(config_error, rms_norm_eps > 0, where, ": rms_norm_eps must be positive, got ", rms_norm_eps);
    DISTILX_REQUIRE(config_error, rope.theta > 0, where, ": rope_theta must be positive, got ", rope.theta);
    DISTILX_REQUIRE(config_error, static_cast<index_t>(sliding_window.size()) == num_hidden_layers, where,
                    ": sliding_window holds ", sliding_window.size(), " entries, expected one per layer (",
                    num_hidden_layers, ")");
    for (index_t w : sliding_window)
      DISTILX_REQUIRE(config_error, w >= 0, where, ": sliding_window must be non-negative, got ", w);
  }
};

namespace hf_detail {

using nlohmann::json;
using ::distilx::detail::concat;

inline std::string read_text_file(const std::filesystem::path& p, const char* what) {
  std::error_code ec;
  if (!std::filesystem::exists(p, ec))
    throw io_error(concat(what, " '", p.string(), "' does not exist"));
  if (!std::filesystem::is_regular_file(p, ec)) throw io_error(concat(what, " '", p.string(), "' is not a file"));
  std::ifstream in(p, std::ios::binary);
  if (!in) throw io_error(concat(what, " '", p.string(), "' cannot be opened for reading"));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline json parse_json_file(const std::filesystem::path& p, const char* what) {
  const std::string text = read_text_file(p, what);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw io_error(concat(what, " '", p.string(), "' is not valid JSON: ", e.what()));
  }
}

/// Field access with messages that name the file and the field.
class ConfigReader {
 public:
  ConfigReader(const json& j, std::string source) : j_(j), src_(std::move(source)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  const json& at(const char* key) const { return j_.at(key); }

  index_t integer(const char* key) const {
    if (!has(key)) fail(key, "is missing; expected a positive integer");
    return as_int(j_.at(key), key);
  }
  index_t integer_or(const char* key, index_t fallback) const { return has(key) ? as_int(j_.at(key), key) : fallback; }
  double number_or(const char* key, double fallback) const { return has(key) ? as_number(j_.at(key), key) : fallback; }
  bool boolean_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    if (!v.is_boolean()) fail(key, concat("must be true or false, found ", v.dump()));
    return v.get<bool>();
  }
  std::string string_or(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    const json& v = j_.at(key);
    if (!v.is_string()) fail(key, concat("must be a string, found ", v.dump()));
    return v.get<std::string>();
  }

  index_t as_int(const json& v, const std::string& key) const {
    if (v.is_number_integer()) return v.get<index_t>();
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (d == static_cast<double>(static_cast<index_t>(d))) return static_cast<index_t>(d);
    }
    fail(key, concat("must be an integer, found ", v.dump()));
  }
  double as_number(const json& v, const std::string& key) const {
    if (!v.is_number()) fail(key, concat("must be a number, found ", v.dump()));
    return v.get<double>();
  }

  [[noreturn]] void fail(const std::string& key, const std::string& msg) const {
    throw config_error(concat(src_, ": field '", key, "' ", msg));
  }
  const std::string& source() const { return src_; }

 private:
  const json& j_;
  std::string src_;
};

inline std::vector<std::int64_t> token_ids(const ConfigReader& r, const char* key) {
  std::vector<std::int64_t> out;
  if (!r.has(key)) return out;
  const json& v = r.at(key);
  if (v.is_array()) {
    for (const auto& e : v) out.push_back(r.as_int(e, key));
  } else {
    out.push_back(r.as_int(v, key));
  }
  return out;
}

/// Reads HF's RoPE description: transformers 5 `rope_parameters` (possibly one dict per layer type),
/// or 4.x `rope_theta` + `rope_scaling`.
inline ops::RopeSpec parse_rope(const ConfigReader& r, index_t max_position_embeddings,
                                const std::vector<std::string>& layer_types) {
  ops::RopeSpec spec;
  spec.theta = r.number_or("rope_theta", 10000.0);
  const json* params = nullptr;
  std::string field;
  if (r.has("rope_parameters")) {
    params = &r.at("rope_parameters");
    field = "rope_parameters";
  } else if (r.has("rope_scaling")) {
    params = &r.at("rope_scaling");
    field = "rope_scaling";
  }
  const double top_prf = r.number_or("partial_rotary_factor", 1.0);
  if (top_prf != 1.0)
    r.fail("partial_rotary_factor", concat("is ", top_prf, "; distilx supports only 1.0 (RoPE on the whole head)"));
  if (!params) return spec;
  if (!params->is_object()) r.fail(field, concat("must be an object, found ", params->dump()));
  // Per-layer-type form {"full_attention": {...}, "sliding_attention": {...}}: every layer type the
  // model uses must have the same RoPE (one table is shared by all layers here).
  const json* p = params;
  bool per_type = !params->empty();
  for (auto it = params->begin(); it != params->end(); ++it)
    if (!(it.key() == "full_attention" || it.key() == "sliding_attention") || !it.value().is_object()) per_type = false;
  if (per_type) {
    p = nullptr;
    for (const auto& lt : layer_types) {
      if (!params->contains(lt)) r.fail(field, concat("has no entry for layer type '", lt, "'"));
      const json& e = params->at(lt);
      if (p && *p != e)
        r.fail(field, "differs between layer types; distilx supports one RoPE configuration for all layers");
      p = &e;
    }
    if (!p) p = &params->begin().value();
    field += "." + (layer_types.empty() ? params->begin().key() : layer_types.front());
  }
  auto num = [&](const char* key, double fallback) {
    if (!p->contains(key) || p->at(key).is_null()) return fallback;
    return r.as_number(p->at(key), field + "." + key);
  };
  spec.theta = num("rope_theta", spec.theta);
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (p->contains(key) && !p->at(key).is_null()) {
      if (!p->at(key).is_string()) r.fail(field + "." + key, concat("must be a string, found ", p->at(key).dump()));
      type = p->at(key).get<std::string>();
      break;
    }
  }
  const double prf = num("partial_rotary_factor", 1.0);
  if (prf != 1.0)
    r.fail(field + ".partial_rotary_factor", concat("is ", prf, "; distilx supports only 1.0 (RoPE on the whole head)"));
  if (type == "default") {
    spec.kind = ops::RopeKind::standard;
  } else if (type == "llama3") {
    spec.kind = ops::RopeKind::llama3;
    for (const char* key : {"factor", "low_freq_factor", "high_freq_factor"})
      if (!p->contains(key) || p->at(key).is_null())
        r.fail(field + "." + key, "is missing; rope type 'llama3' needs factor, low_freq_factor and high_freq_factor");
    spec.factor = num("factor", 8.0);
    spec.low_freq_factor = num("low_freq_factor", 1.0);
    spec.high_freq_factor = num("high_freq_factor", 4.0);
    spec.original_max_position_embeddings =
        num("original_max_position_embeddings", static_cast<double>(max_position_embeddings));
    if (!(spec.factor > 0 && spec.high_freq_factor > spec.low_freq_factor && spec.low_freq_factor > 0 &&
          spec.original_max_position_embeddings > 0))
      r.fail(field, concat("llama3 needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                           "original_max_position_embeddings > 0, found ",
                           p->dump()));
  } else {
    r.fail(field + ".rope_type", concat("is '", type, "'; supported rope types: 'default' and 'llama3'"));
  }
  return spec;
}

}  // namespace hf_detail

/// Parses a config.json already read into JSON; `source` names it in messages.
inline HfModelConfig parse_hf_config(const nlohmann::json& j, const std::string& source) {
  using ::distilx::detail::concat;
  if (!j.is_object()) throw config_error(concat(source, ": expected a JSON object, found ", j.type_name()));
  hf_detail::ConfigReader r(j, source);
  HfModelConfig c;
  c.source = source;

  // Architecture: the first entry of "architectures", else model_type.
  static const std::map<std::string, std::string> kArch = {
      {"Qwen2ForCausalLM", "qwen2"}, {"LlamaForCausalLM", "llama"}, {"MistralForCausalLM", "mistral"}};
  c.model_type = r.string_or("model_type", "");
  if (r.has("architectures")) {
    const auto& a = r.at("architectures");
    if (!a.is_array() || a.empty() || !a[0].is_string())
      r.fail("architectures", concat("must be a non-empty array of strings, found ", a.dump()));
    if (a.size() > 1) r.fail("architectures", concat("lists several architectures ", a.dump(), "; expected one"));
    c.architecture = a[0].get<std::string>();
    auto it = kArch.find(c.architecture);
    if (it == kArch.end())
      r.fail("architectures", concat("names '", c.architecture,
                                     "', which distilx does not support; supported: Qwen2ForCausalLM, "
                                     "LlamaForCausalLM, MistralForCausalLM"));
    if (c.model_type.empty()) c.model_type = it->second;
    if (c.model_type != it->second)
      r.fail("model_type", concat("is '", c.model_type, "' but architectures names ", c.architecture,
                                  " (model_type '", it->second, "')"));
  } else {
    for (const auto& kv : kArch)
      if (kv.second == c.model_type) c.architecture = kv.first;
    if (c.architecture.empty())
      r.fail("model_type", concat("is '", c.model_type,
                                  "' and there is no 'architectures' field; supported: qwen2, llama, mistral"));
  }

  // Features of relatives that share these architectures' field names but not their computation.
  for (const char* moe : {"num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size",
                          "num_experts_per_tok"}) {
    if (r.has(moe)) {
      const auto& v = r.at(moe);
      if (!(v.is_number() && v.get<double>() == 0))
        r.fail(moe, concat("is ", v.dump(), ": mixture-of-experts models are not supported"));
    }
  }
  const std::string act = r.string_or("hidden_act", "silu");
  if (act != "silu") r.fail("hidden_act", concat("is '", act, "'; only 'silu' (SwiGLU MLP) is supported"));

  c.vocab_size = r.integer("vocab_size");
  c.hidden_size = r.integer("hidden_size");
  c.intermediate_size = r.integer("intermediate_size");
  c.num_hidden_layers = r.integer("num_hidden_layers");
  c.num_attention_heads = r.integer("num_attention_heads");
  c.num_key_value_heads = r.integer_or("num_key_value_heads", c.num_attention_heads);
  if (c.num_attention_heads <= 0) r.fail("num_attention_heads", concat("must be positive, found ", c.num_attention_heads));
  c.head_dim = r.integer_or("head_dim", c.hidden_size / c.num_attention_heads);
  if (!r.has("head_dim") && c.hidden_size % c.num_attention_heads != 0)
    r.fail("hidden_size", concat("(", c.hidden_size, ") is not a multiple of num_attention_heads (",
                                 c.num_attention_heads, ") and head_dim is not given"));
  c.max_position_embeddings = r.integer_or("max_position_embeddings", 2048);
  c.rms_norm_eps = r.number_or("rms_norm_eps", 1e-6);
  c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
  c.dtype = r.string_or("dtype", r.string_or("torch_dtype", ""));
  if (r.has("bos_token_id")) c.bos_token_id = r.as_int(r.at("bos_token_id"), "bos_token_id");
  if (r.has("pad_token_id")) c.pad_token_id = r.as_int(r.at("pad_token_id"), "pad_token_id");
  c.eos_token_ids = hf_detail::token_ids(r, "eos_token_id");

  if (c.model_type == "qwen2") {
    c.qkv_bias = true;  // Qwen2Attention: q/k/v bias=True, o_proj bias=False
    c.o_bias = false;
    c.mlp_bias = false;
  } else if (c.model_type == "llama") {
    c.qkv_bias = c.o_bias = r.boolean_or("attention_bias", false);
    c.mlp_bias = r.boolean_or("mlp_bias", false);
  } else {  // mistral: no bias anywhere
    c.qkv_bias = c.o_bias = c.mlp_bias = false;
  }

  // Layer types and sliding windows, as HF derives them.
  const index_t L = c.num_hidden_layers;
  std::vector<std::string> layer_types;
  if (r.has("layer_types")) {
    const auto& lt = r.at("layer_types");
    if (!lt.is_array() || static_cast<index_t>(lt.size()) != L)
      r.fail("layer_types", concat("must list one type per layer (", L, "), found ", lt.dump()));
    for (const auto& e : lt) {
      if (!e.is_string() || (e.get<std::string>() != "full_attention" && e.get<std::string>() != "sliding_attention"))
        r.fail("layer_types", concat("holds ", e.dump(), "; supported: 'full_attention', 'sliding_attention'"));
      layer_types.push_back(e.get<std::string>());
    }
  }
  c.sliding_window.assign(static_cast<std::size_t>(std::max<index_t>(L, 0)), 0);
  if (c.model_type == "mistral") {
    // MistralAttention applies config.sliding_window to every layer when it is set.
    const index_t w = r.integer_or("sliding_window", 0);
    if (w < 0) r.fail("sliding_window", concat("must be positive or null, found ", w));
    for (auto& x : c.sliding_window) x = w;
    if (layer_types.empty()) layer_types.assign(static_cast<std::size_t>(L), w > 0 ? "sliding_attention" : "full_attention");
  } else if (c.model_type == "qwen2") {
    // Qwen2Config: sliding_window counts only with use_sliding_window; layers from max_window_layers
    // on slide unless layer_types says otherwise.
    const bool use = r.boolean_or("use_sliding_window", false);
    const index_t w = use ? r.integer_or("sliding_window", 0) : 0;
    if (use && w <= 0) r.fail("sliding_window", "must be a positive integer when use_sliding_window is true");
    if (layer_types.empty()) {
      const index_t from = r.integer_or("max_window_layers", 28);  // Qwen2Config's default
      for (index_t i = 0; i < L; ++i) layer_types.push_back(w > 0 && i >= from ? "sliding_attention" : "full_attention");
    }
    for (index_t i = 0; i < L; ++i)
      c.sliding_window[static_cast<std::size_t>(i)] = layer_types[static_cast<std::size_t>(i)] == "sliding_attention" ? w : 0;
  } else {
    for (const auto& t : layer_types)
      if (t != "full_attention")
        r.fail("layer_types", concat("holds '", t, "', but LlamaForCausalLM has no sliding-window attention"));
    if (layer_types.empty()) layer_types.assign(static_cast<std::size_t>(L), "full_attention");
  }
  {
    std::vector<std::string> used(layer_types.begin(), layer_types.end());
    std::sort(used.begin(), used.end());
    used.erase(std::unique(used.begin(), used.end()), used.end());
    c.rope = hf_detail::parse_rope(r, c.max_position_embeddings, used);
  }
  c.validate();
  return c;
}

/// Reads `path`: a config.json file, or a model directory holding one.
inline HfModelConfig load_hf_config(const std::string& path) {
  namespace fs = std::filesystem;
  fs::path p(path);
  std::error_code ec;
  if (fs::is_directory(p, ec)) p /= "config.json";
  return parse_hf_config(hf_detail::parse_json_file(p, "model config"), p.string());
}

/// The weights of a HF model directory: model.safetensors, else the shards that
/// model.safetensors.index.json maps tensor names to. Every listed shard is opened (and its header
/// validated) up front, so a missing or truncated shard fails before any tensor is read.
class HfWeights {
 public:
  explicit HfWeights(const std::string& dir) : dir_(dir) {
    namespace fs = std::filesystem;
    using ::distilx::detail::concat;
    std::error_code ec;
    if (!fs::is_directory(dir_, ec)) throw io_error(concat("model directory '", dir, "' does not exist"));
    const fs::path index = dir_ / "model.safetensors.index.json";
    const fs::path single = dir_ / "model.safetensors";
    // Like HF from_pretrained: a single model.safetensors wins over an index.
    if (fs::exists(single, ec)) {
      files_.push_back(std::make_unique<SafetensorsFile>(single.string()));
      for (const auto& name : files_[0]->names()) where_[name] = 0;
    } else if (fs::exists(index, ec)) {
      index_path_ = index.string();
      const nlohmann::json j = hf_detail::parse_json_file(index, "safetensors index");
      if (!j.is_object() || !j.contains("weight_map") || !j.at("weight_map").is_object())
        throw io_error(concat("safetensors index '", index_path_,
                              "' has no \"weight_map\" object (expected {\"weight_map\": {tensor: shard file}})"));
      std::map<std::string, std::size_t> shard_ids;
      for (auto it = j.at("weight_map").begin(); it != j.at("weight_map").end(); ++it) {
        if (!it.value().is_string())
          throw io_error(concat("safetensors index '", index_path_, "': weight_map entry for tensor '", it.key(),
                                "' must be a file name, found ", it.value().dump()));
        const std::string shard = it.value().get<std::string>();
        if (shard.empty() || fs::path(shard).has_parent_path() || shard == "." || shard == "..")
          throw io_error(concat("safetensors index '", index_path_, "': tensor '", it.key(), "' maps to '", shard,
                                "'; expected a file name inside the model directory"));
        auto [pos, inserted] = shard_ids.emplace(shard, files_.size());
        if (inserted) {
          const fs::path sp = dir_ / shard;
          if (!fs::exists(sp, ec))
            throw io_error(concat("safetensors index '", index_path_, "' lists shard '", shard, "' (holding tensor '",
                                  it.key(), "'), but '", sp.string(), "' does not exist"));
          files_.push_back(std::make_unique<SafetensorsFile>(sp.string()));
        }
        where_[it.key()] = pos->second;
      }
      for (const auto& [name, id] : where_)
        if (!files_[id]->contains(name))
          throw io_error(concat("safetensors index '", index_path_, "' maps tensor '", name, "' to '",
                                files_[id]->path(), "', which does not hold it"));
    } else {
      throw io_error(concat("model directory '", dir, "' holds neither model.safetensors nor "
                            "model.safetensors.index.json"));
    }
  }

  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  std::vector<std::string> names() const {
    std::vector<std::string> v;
    for (const auto& kv : where_) v.push_back(kv.first);
    return v;
  }
  /// The file that holds `name` (for messages).
  const std::string& file_of(const std::string& name) const { return files_.at(where_.at(name))->path(); }
  const TensorInfo& info(const std::string& name) const { return file(name).info(name); }
  std::size_t num_files() const { return files_.size(); }

  /// Reads tensor `name` into dst, converting F32/F16/BF16/F64 to T. Throws io_error naming the file,
  /// the tensor and the expectation when it is missing, has another shape, or is not floating point.
  template <class T>
  void read(const std::string& name, T* dst, const Shape& expected) const {
    using ::distilx::detail::concat;
    const SafetensorsFile& f = file(name);
    const TensorInfo& ti = f.info(name);
    if (!dtype_is_floating(ti.dtype))
      throw io_error(concat("safetensors file '", f.path(), "', tensor '", name, "': stored as ", dtype_name(ti.dtype),
                            "; expected a floating-point weight (F32, F16, BF16 or F64) of shape ",
                            ::distilx::detail::shape_string(expected)));
    f.read<T>(name, dst, expected);
  }

  std::string directory() const { return dir_.string(); }

 private:
  const SafetensorsFile& file(const std::string& name) const {
    using ::distilx::detail::concat;
    auto it = where_.find(name);
    if (it == where_.end()) {
      std::string files;
      for (const auto& f : files_) files += (files.empty() ? "'" : ", '") + f->path() + "'";
      throw io_error(concat("tensor '", name, "' is missing from the weights of '", dir_.string(), "' (",
                            index_path_.empty() ? std::string("file ") : concat("index '", index_path_, "', files "),
                            files, ")"));
    }
    return *files_[it->second];
  }

  std::filesystem::path dir_;
  std::string index_path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::size_t> where_;
};

}  // namespace distilx::io
