// Student weights in and out as safetensors with NX-AI xLSTMLMModel
// state_dict names and shapes (spec-xlstm.md §7, §3.3, §11). Load accepts both
// sLSTM recurrent-kernel layouts (detected from R's shape; the bias follows)
// and the key prefixes of the Distil-xLSTM code versions; save writes the
// "cuda" layout (NX-AI's default) and both head keys when tied.
#pragma once

#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/io/safetensors.hpp"
#include "distilx/models/student.hpp"

namespace distilx::io {

struct StudentLoadOptions {
  /// Keys starting with one of these are ignored (e.g. "grad." in test fixtures).
  std::vector<std::string> ignore_prefixes;
  /// Unknown keys are an error unless this is false.
  bool strict = true;
  /// Load token_embedding.weight / lm_head.weight too (they are frozen in distilx).
  bool load_frozen = true;
};

namespace detail {
/// Maps the Distil-xLSTM key spellings (Mar 2025, Oct 2025) onto xLSTMLMModel's.
inline std::string canonical_key(const std::string& k) {
  auto starts = [&](const char* p) { return k.rfind(p, 0) == 0; };
  if (starts("xlstm.embedding.")) return "token_embedding." + k.substr(16);
  if (starts("xlstm.backbone.out_norm.")) return "xlstm_block_stack.post_blocks_norm." + k.substr(24);
  if (starts("xlstm.backbone.")) return "xlstm_block_stack." + k.substr(15);
  if (starts("maybe_lm_head.")) return "lm_head." + k.substr(14);
  return k;
}
inline bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}
}  // namespace detail

/// Loads weights into `student` from a safetensors file. Every trainable tensor must be
/// present with its exact shape; errors name the key, the expected and the found shape.
template <class T, class Backend>
void load_student(Student<T, Backend>& student, const std::string& path, const StudentLoadOptions& opt = {}) {
  SafetensorsFile f(path);
  const StudentConfig& c = student.config();
  std::map<std::string, std::string> by_canonical;  // canonical -> file key
  for (const auto& k : f.names()) {
    bool ignored = false;
    for (const auto& p : opt.ignore_prefixes) ignored = ignored || k.rfind(p, 0) == 0;
    if (ignored) continue;
    by_canonical[detail::canonical_key(k)] = k;
  }
  std::set<std::string> used;
  auto require = [&](const std::string& name) -> const std::string& {
    auto it = by_canonical.find(name);
    DISTILX_REQUIRE(io_error, it != by_canonical.end(), path, ": missing tensor '", name, "'");
    used.insert(name);
    return it->second;
  };
  const index_t NHs = c.slstm_num_heads, DHs = c.embedding_dim / std::max<index_t>(NHs, 1);
  std::vector<T> tmp;
  std::set<std::string> converted_bias;
  // Everything is assembled on the host and uploaded once (device backends), so a failed load
  // leaves the student unchanged.
  std::vector<T> host(static_cast<std::size_t>(student.flat_size()), T(0));
  for (const ParamInfo& p : student.layout().infos()) {
    if (converted_bias.count(p.name)) continue;  // converted together with its R below
    const std::string& key = require(p.name);
    const TensorInfo& ti = f.info(key);
    T* dst = host.data() + p.offset;
    if (detail::ends_with(p.name, "slstm_cell._recurrent_kernel_")) {
      const Shape vanilla{NHs, 4 * DHs, DHs};
      if (ti.shape == vanilla && ti.shape != p.shape) {
        tmp.resize(static_cast<std::size_t>(p.size));
        f.read(key, tmp.data(), vanilla);
        slstm_r_from_vanilla(dst, tmp.data(), NHs, DHs);
        // The bias of a vanilla-layout checkpoint is ordered [g][h][j]: convert it too.
        const std::string bname = p.name.substr(0, p.name.size() - std::string("_recurrent_kernel_").size()) + "_bias_";
        const ParamInfo& bp = student.info(bname);
        const std::string& bkey = require(bname);
        tmp.resize(static_cast<std::size_t>(bp.size));
        f.read(bkey, tmp.data(), bp.shape);
        slstm_bias_from_vanilla(host.data() + bp.offset, tmp.data(), NHs, DHs);
        converted_bias.insert(bname);
        continue;
      }
    }
    DISTILX_REQUIRE(io_error, ti.shape == p.shape, path, ": tensor '", key, "' has shape ",
                    distilx::detail::shape_string(ti.shape), " but the student config expects ",
                    distilx::detail::shape_string(p.shape));
    f.read(key, dst, p.shape);
  }
  const index_t V = c.vocab_size, d = c.embedding_dim;
  std::vector<T> emb, head;
  if (opt.load_frozen) {
    const std::string& ek = require("token_embedding.weight");
    emb.resize(static_cast<std::size_t>(V * d));
    f.read(ek, emb.data(), Shape{V, d});
    if (!c.tie_weights) {
      const std::string& hk = require("lm_head.weight");
      head.resize(static_cast<std::size_t>(V * d));
      f.read(hk, head.data(), Shape{V, d});
    } else if (by_canonical.count("lm_head.weight")) {
      used.insert("lm_head.weight");  // tied: NX-AI writes both keys with the same data
    }
  } else {
    used.insert("token_embedding.weight");
    used.insert("lm_head.weight");
  }
  if (opt.strict) {
    std::string extra;
    for (const auto& kv : by_canonical)
      if (!used.count(kv.first)) extra += (extra.empty() ? "" : ", ") + kv.second;
    DISTILX_REQUIRE(io_error, extra.empty(), path, ": unexpected tensor(s) not in the student config: ", extra,
                    " (was it saved from a different configuration?)");
  }
  student.set_params(host.data());
  if (!emb.empty()) student.set_embedding(emb.data());
  if (!head.empty()) student.set_head(head.data());
}

enum class SLSTMLayout { cuda, vanilla };

/// Saves trainable weights and the frozen embedding/head under NX-AI names, plus the
/// distilx config as JSON metadata ("config"). Written atomically (temp file + rename).
template <class T, class Backend>
void save_student(const Student<T, Backend>& student, const std::string& path, SLSTMLayout layout = SLSTMLayout::cuda) {
  SafetensorsWriter w;
  const StudentConfig& c = student.config();
  const index_t NHs = c.slstm_num_heads, DHs = c.embedding_dim / std::max<index_t>(NHs, 1);
  std::vector<T> tmp;
  const std::vector<T> host = student.params_to_host();
  for (const ParamInfo& p : student.layout().infos()) {
    const T* src = host.data() + p.offset;
    if (layout == SLSTMLayout::vanilla && detail::ends_with(p.name, "slstm_cell._recurrent_kernel_")) {
      tmp.resize(static_cast<std::size_t>(p.size));
      slstm_r_to_vanilla(tmp.data(), src, NHs, DHs);
      w.add(p.name, Shape{NHs, 4 * DHs, DHs}, tmp.data());
    } else if (layout == SLSTMLayout::vanilla && detail::ends_with(p.name, "slstm_cell._bias_")) {
      tmp.resize(static_cast<std::size_t>(p.size));
      slstm_bias_to_vanilla(tmp.data(), src, NHs, DHs);
      w.add(p.name, p.shape, tmp.data());
    } else {
      w.add(p.name, p.shape, src);
    }
  }
  const Shape vd{c.vocab_size, c.embedding_dim};
  const std::vector<T> emb = student.embedding_to_host();
  w.add("token_embedding.weight", vd, emb.data());
  if (c.tie_weights) w.add("lm_head.weight", vd, emb.data());
  else w.add("lm_head.weight", vd, student.head_to_host().data());
  nlohmann::json j = c;
  w.set_metadata("config", j.dump());
  w.set_metadata("format", "distilx-student");
  w.set_metadata("slstm_layout", layout == SLSTMLayout::cuda ? "cuda" : "vanilla");
  w.write(path);
}

}  // namespace distilx::io
