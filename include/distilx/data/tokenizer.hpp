// Hugging Face `tokenizer.json` tokenizer of the byte-level BPE kind (GPT-2, Qwen2/2.5/3,
// Llama-3, SmolLM2) in native C++: added/special tokens, NFC/NFD normalizers, Split /
// ByteLevel / Digits pre-tokenizers (PCRE2 with Unicode properties), BPE merges by rank with
// ignore_merges, the ByteLevel decoder and the TemplateProcessing post-processor. It follows
// the Rust `tokenizers` library step by step so that ids match; see docs/tokenizer.md.
#pragma once

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <sstream>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "distilx/core/error.hpp"
#include "distilx/data/detail/unicode.hpp"

namespace distilx {

namespace detail::tok {

/// A compiled PCRE2 pattern (UTF + UCP, JIT when available); matching is thread-safe.
class Regex {
 public:
  /// `literal`: the pattern is a plain string (tokenizer.json `{"String": ...}`).
  Regex(const std::string& pattern, bool literal, const std::string& where) {
    int err = 0;
    PCRE2_SIZE off = 0;
    const std::string translated = literal ? pattern : translate(pattern);
    // PCRE2 rejects UCP together with LITERAL (and a literal needs no character classes).
    const std::uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated.data()), translated.size(), opts, &err,
                                     &off, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof msg);
      throw config_error(detail::concat(where, ": cannot compile regex '", pattern, "' at offset ", off, ": ",
                                        reinterpret_cast<const char*>(msg)));
    }
    // JIT is an optimisation only: if it is unavailable pcre2_match interprets the pattern.
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    code_.reset(code, pcre2_code_free);
  }

  /// Calls f(begin, end) for each successive non-overlapping match in valid UTF-8 `s`.
  template <class F>
  void for_each_match(std::string_view s, F&& f) const {
    MatchState& st = match_state();
    std::size_t pos = 0;
    while (pos <= s.size()) {
      // Input is valid UTF-8 (sanitised in encode), so the per-call UTF check is skipped.
      const int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), pos,
                                 PCRE2_NO_UTF_CHECK, st.data.get(), st.context.get());
      if (rc == PCRE2_ERROR_NOMATCH) return;
      if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof msg);
        throw error(detail::concat("tokenizer: regex match failed: ", reinterpret_cast<const char*>(msg)));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(st.data.get());
      const std::size_t b = ov[0], e = ov[1];
      f(b, e);
      if (e > b) {
        pos = e;
      } else {  // empty match: step over one character, as Rust's find_iter does
        if (b >= s.size()) return;
        std::size_t i = b;
        unicode::next_code_point(s, i);
        pos = i;
      }
    }
  }

  /// Rust's regex and Oniguruma (which HF uses) read \s as Unicode White_Space and \w as
  /// letters/marks/numbers/connectors; PCRE2's UCP classes differ slightly, so spell them out.
  static std::string translate(const std::string& p) {
    std::string out;
    out.reserve(p.size() + 16);
    int class_depth = 0;
    for (std::size_t i = 0; i < p.size(); ++i) {
      const char c = p[i];
      if (c == '\\' && i + 1 < p.size()) {
        const char n = p[++i];
        if (n == 's') {
          out += "\\p{White_Space}";
        } else if (n == 'S') {
          out += "\\P{White_Space}";
        } else if (n == 'w') {
          out += class_depth ? "\\p{L}\\p{M}\\p{N}\\p{Pc}" : "[\\p{L}\\p{M}\\p{N}\\p{Pc}]";
        } else if (n == 'W' && !class_depth) {
          out += "[^\\p{L}\\p{M}\\p{N}\\p{Pc}]";
        } else {
          out += c;
          out += n;
        }
        continue;
      }
      if (c == '[') {
        ++class_depth;
        out += c;
        // A ']' right after '[' or '[^' is a literal member, not the end of the class.
        if (i + 1 < p.size() && p[i + 1] == '^') out += p[++i];
        if (i + 1 < p.size() && p[i + 1] == ']') out += p[++i];
        continue;
      }
      if (c == ']' && class_depth > 0) --class_depth;
      out += c;
    }
    return out;
  }

 private:
  struct MatchState {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data{
        pcre2_match_data_create(16, nullptr), pcre2_match_data_free};
    std::unique_ptr<pcre2_jit_stack, decltype(&pcre2_jit_stack_free)> stack{
        pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, nullptr), pcre2_jit_stack_free};
    std::unique_ptr<pcre2_match_context, decltype(&pcre2_match_context_free)> context{
        pcre2_match_context_create(nullptr), pcre2_match_context_free};
    MatchState() {
      // The default 32 KiB JIT stack overflows on long whitespace runs; allow up to 64 MiB.
      if (stack && context) pcre2_jit_stack_assign(context.get(), nullptr, stack.get());
    }
  };
  // One match block per thread keeps const matching lock-free; the ovector (16 pairs) only
  // needs the whole-match pair, and PCRE2 reports a match even if groups do not fit.
  static MatchState& match_state() {
    thread_local MatchState st;
    return st;
  }

  std::shared_ptr<pcre2_code> code_;
};

/// Byte-level BPE's reversible byte -> printable character map (GPT-2's bytes_to_unicode).
struct ByteMap {
  std::array<char32_t, 256> byte_to_cp{};
  std::array<std::string, 256> byte_to_utf8;
  std::array<int, 0x200> cp_to_byte{};  // every mapped code point is below U+0144

  ByteMap() {
    cp_to_byte.fill(-1);
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_cp[static_cast<std::size_t>(b)] = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
    }
    for (int b = 0; b < 256; ++b) {
      const char32_t cp = byte_to_cp[static_cast<std::size_t>(b)];
      unicode::append_utf8(byte_to_utf8[static_cast<std::size_t>(b)], cp);
      cp_to_byte[cp] = b;
    }
  }
  static const ByteMap& get() {
    static const ByteMap m;
    return m;
  }
};

enum class SplitBehavior { Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous };

struct PreTokenizerStep {
  enum class Kind { Split, ByteLevel } kind = Kind::Split;
  std::shared_ptr<const Regex> regex;  // null for ByteLevel with use_regex = false
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel only
};

struct AddedToken {
  std::string content;
  std::int32_t id = 0;
  bool single_word = false, lstrip = false, rstrip = false, normalized = false, special = false;
};

/// Byte trie over added-token contents, for leftmost-longest matching (as HF's Aho-Corasick).
class AddedTokenTrie {
 public:
  void add(std::string_view s, std::size_t token_index) {
    std::size_t node = 0;
    for (char ch : s) {
      const auto b = static_cast<unsigned char>(ch);
      first_byte_[b] = true;
      auto& kids = nodes_[node].children;
      auto it = std::find_if(kids.begin(), kids.end(), [&](const auto& k) { return k.first == b; });
      if (it == kids.end()) {
        nodes_.push_back({});
        nodes_[node].children.emplace_back(b, nodes_.size() - 1);
        node = nodes_.size() - 1;
      } else {
        node = it->second;
      }
    }
    if (node != 0 && nodes_[node].token < 0) nodes_[node].token = static_cast<std::ptrdiff_t>(token_index);
  }
  bool empty() const { return nodes_.size() == 1; }
  /// Leftmost-longest match in s starting at or after `from`: {begin, end, token index}.
  bool find(std::string_view s, std::size_t from, std::size_t& b, std::size_t& e, std::size_t& tok) const {
    const int single = single_first_byte();
    for (std::size_t i = from; i < s.size(); ++i) {
      if (single >= 0) {  // typical: every special token starts with '<'
        const void* p = std::memchr(s.data() + i, single, s.size() - i);
        if (p == nullptr) return false;
        i = static_cast<std::size_t>(static_cast<const char*>(p) - s.data());
      } else if (!first_byte_[static_cast<unsigned char>(s[i])]) {
        continue;
      }
      std::size_t node = 0;
      std::ptrdiff_t best = -1;
      std::size_t best_end = 0;
      for (std::size_t j = i; j < s.size(); ++j) {
        const auto ch = static_cast<unsigned char>(s[j]);
        const auto& kids = nodes_[node].children;
        auto it = std::find_if(kids.begin(), kids.end(), [&](const auto& k) { return k.first == ch; });
        if (it == kids.end()) break;
        node = it->second;
        if (nodes_[node].token >= 0) {
          best = nodes_[node].token;
          best_end = j + 1;
        }
      }
      if (best >= 0) {
        b = i;
        e = best_end;
        tok = static_cast<std::size_t>(best);
        return true;
      }
    }
    return false;
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, std::size_t>> children;
    std::ptrdiff_t token = -1;
  };
  /// The only byte that starts a token, or -1 if several do.
  int single_first_byte() const {
    const auto& kids = nodes_[0].children;
    return kids.size() == 1 ? static_cast<int>(kids[0].first) : -1;
  }

  std::vector<Node> nodes_{Node{}};
  std::array<bool, 256> first_byte_{};
};

/// A piece of the input on its way through the pipeline: text, or an added token already resolved.
struct Segment {
  std::string_view text;
  std::int32_t added_id = -1;
};

}  // namespace detail::tok

/// A Hugging Face tokenizer.json tokenizer (byte-level BPE family). Cheap to copy (shared,
/// immutable state); every const method may be called from many threads at once.
class Tokenizer {
 public:
  /// Loads tokenizer.json; a tokenizer_config.json beside it, if any, supplies bos/eos names.
  /// Throws io_error (missing/unreadable/malformed file) or config_error (unsupported
  /// component); both messages name the file and what is wrong.
  static Tokenizer from_file(const std::string& tokenizer_json_path) {
    auto impl = std::make_shared<Impl>();
    impl->load(read_file(tokenizer_json_path), tokenizer_json_path);
    // Config conventions: transformers keeps bos/eos names in tokenizer_config.json.
    const std::size_t slash = tokenizer_json_path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? std::string() : tokenizer_json_path.substr(0, slash + 1);
    const std::string cfg_path = dir + "tokenizer_config.json";
    std::ifstream probe(cfg_path);
    if (probe) {
      probe.close();
      impl->load_config(read_file(cfg_path), cfg_path);
    }
    Tokenizer t;
    t.impl_ = std::move(impl);
    return t;
  }

  /// Parses tokenizer.json text; `origin` names it in error messages.
  static Tokenizer from_json(const std::string& json_text, const std::string& origin = "<tokenizer json>") {
    auto impl = std::make_shared<Impl>();
    impl->load(json_text, origin);
    Tokenizer t;
    t.impl_ = std::move(impl);
    return t;
  }

  /// Token ids of `text`. Ill-formed UTF-8 is first replaced by U+FFFD (maximal subparts), as a
  /// caller of HF tokenizers must do to obtain a string. `add_special_tokens` applies the
  /// post-processor (e.g. Llama-3's <|begin_of_text|>; Qwen's ByteLevel adds nothing).
  std::vector<std::int32_t> encode(std::string_view text, bool add_special_tokens = false) const {
    return impl().encode(text, add_special_tokens);
  }

  /// Text of `ids`; bytes that do not form UTF-8 become U+FFFD as HF's decode does. Unknown
  /// ids are skipped (as HF does).
  std::string decode(const std::vector<std::int32_t>& ids, bool skip_special_tokens = false) const {
    return impl().decode(ids, skip_special_tokens);
  }

  /// One more than the largest id of the model vocabulary and the added tokens.
  std::int32_t vocab_size() const { return impl().vocab_size_; }
  std::optional<std::int32_t> token_to_id(std::string_view token) const { return impl().token_to_id(token); }
  /// Token string of an id (byte-level form, e.g. "Ġthe"); throws distilx::error if unknown.
  std::string id_to_token(std::int32_t id) const {
    const std::string* s = impl().id_to_token(id);
    DISTILX_REQUIRE(error, s != nullptr, "tokenizer: id ", id, " is not in the vocabulary");
    return *s;
  }
  /// Beginning/end-of-sequence ids: from the post-processor template, else tokenizer_config.json,
  /// else the conventional added tokens (<|begin_of_text|>, <s>, ... / <|endoftext|>, </s>, ...).
  std::optional<std::int32_t> bos_id() const { return impl().bos_; }
  std::optional<std::int32_t> eos_id() const { return impl().eos_; }
  /// Whether `id` is an added token marked special (what decode's skip_special_tokens drops).
  bool is_special(std::int32_t id) const {
    auto it = impl().added_by_id_.find(id);
    return it != impl().added_by_id_.end() && impl().added_[it->second].special;
  }

 private:
  using Segment = detail::tok::Segment;

  struct Impl {
    // ---- configuration -------------------------------------------------------------------
    enum class Norm { NFC, NFD };
    std::vector<Norm> normalizers_;
    std::vector<detail::tok::PreTokenizerStep> pre_;
    bool byte_level_ = false;  // the model sees GPT-2 byte characters
    bool byte_level_decoder_ = false;
    bool has_decoder_ = false;

    std::unordered_map<std::string, std::int32_t> vocab_;
    std::vector<std::string> id_to_vocab_;  // empty string where the id has no model token
    std::vector<char> has_vocab_id_;
    std::unordered_map<std::uint64_t, std::pair<std::int32_t, std::int32_t>> merges_;  // (a,b) -> (rank, new)
    std::array<std::int32_t, 256> byte_ids_{};  // id of each byte's character, -1 if absent
    bool ignore_merges_ = false, byte_fallback_ = false, fuse_unk_ = false;
    std::optional<std::int32_t> unk_id_;
    std::string prefix_, suffix_;  // continuing_subword_prefix, end_of_word_suffix

    std::vector<detail::tok::AddedToken> added_;
    std::unordered_map<std::int32_t, std::size_t> added_by_id_;
    std::unordered_map<std::string, std::size_t> added_by_content_;
    detail::tok::AddedTokenTrie raw_trie_, normalized_trie_;
    std::vector<std::string> normalized_content_;  // per added token, matching form

    std::vector<std::int32_t> prefix_ids_, suffix_ids_;  // post-processor, single sequence
    std::optional<std::int32_t> bos_, eos_;
    bool bos_from_template_ = false, eos_from_template_ = false;
    std::int32_t vocab_size_ = 0;
    std::string origin_;

    // ---- word cache ------------------------------------------------------------------------
    // Each thread keeps its own cache of word -> ids (as HF's BPE does): threads never contend,
    // and a shared map's locks cost more than they save on two cores. Caches are keyed by a
    // never-reused instance number, so a destroyed tokenizer's entries cannot leak into another.
    static constexpr std::size_t kCacheCapacity = 32768, kMaxCachedWord = 256, kCachesPerThread = 4;
    struct WordCache {
      std::uint64_t owner = 0;
      std::unordered_map<std::string, std::vector<std::int32_t>> map;
    };
    const std::uint64_t instance_ = next_instance();
    static std::uint64_t next_instance() {
      static std::atomic<std::uint64_t> counter{0};
      return ++counter;
    }
    WordCache& local_cache() const {
      thread_local std::array<WordCache, kCachesPerThread> caches;
      thread_local std::size_t victim = 0;
      for (auto& c : caches)
        if (c.owner == instance_) return c;
      WordCache& c = caches[victim++ % kCachesPerThread];  // round-robin reuse of a slot
      c.owner = instance_;
      c.map.clear();
      return c;
    }

    // ---- loading -------------------------------------------------------------------------
    [[noreturn]] void fail_config(const std::string& what) const {
      throw config_error(detail::concat("tokenizer: ", origin_, ": ", what));
    }
    [[noreturn]] void fail_io(const std::string& what) const {
      throw io_error(detail::concat("tokenizer: ", origin_, ": ", what));
    }

    static std::string type_of(const nlohmann::json& j) {
      auto it = j.find("type");
      return (it != j.end() && it->is_string()) ? it->get<std::string>() : std::string();
    }

    void load(const std::string& text, const std::string& origin) {
      origin_ = origin;
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(text);
      } catch (const nlohmann::json::parse_error& e) {
        fail_io(detail::concat("malformed JSON: ", e.what()));
      }
      if (!j.is_object()) fail_io("malformed tokenizer.json: the top level is not an object");
      try {
        load_model(j);
        load_added_tokens(j);
        load_normalizer(j);
        load_pre_tokenizer(j);
        load_post_processor(j);
        load_decoder(j);
      } catch (const nlohmann::json::exception& e) {
        fail_io(detail::concat("malformed tokenizer.json: ", e.what()));
      }
      finish_added_tokens();
      default_special_ids();
    }

    void load_model(const nlohmann::json& j) {
      auto mit = j.find("model");
      if (mit == j.end() || !mit->is_object()) fail_io("malformed tokenizer.json: no \"model\" object");
      const nlohmann::json& m = *mit;
      std::string type = type_of(m);
      // Old files omit the type; HF then infers it from the fields, BPE having "merges".
      if (type.empty() && m.contains("merges")) type = "BPE";
      if (type != "BPE")
        fail_config(detail::concat("unsupported model type '", type.empty() ? std::string("(none)") : type,
                                   "'; only byte-level BPE tokenizers are supported"));
      if (m.contains("dropout") && !m["dropout"].is_null() && m["dropout"].get<double>() != 0.0)
        fail_config("BPE dropout is not supported (it makes encoding random)");
      auto vit = m.find("vocab");
      if (vit == m.end() || !vit->is_object()) fail_io("malformed tokenizer.json: model.vocab is not an object");
      vocab_.reserve(vit->size() * 2);
      std::int32_t max_id = -1;
      for (auto it = vit->begin(); it != vit->end(); ++it) {
        const auto id = it.value().get<std::int32_t>();
        if (id < 0) fail_io(detail::concat("malformed tokenizer.json: negative id for token '", it.key(), "'"));
        vocab_[it.key()] = id;
        max_id = std::max(max_id, id);
      }
      id_to_vocab_.assign(static_cast<std::size_t>(max_id + 1), std::string());
      has_vocab_id_.assign(static_cast<std::size_t>(max_id + 1), 0);
      for (const auto& [tok, id] : vocab_) {
        id_to_vocab_[static_cast<std::size_t>(id)] = tok;
        has_vocab_id_[static_cast<std::size_t>(id)] = 1;
      }
      vocab_size_ = max_id + 1;

      auto str_or_empty = [&](const char* key) {
        auto it = m.find(key);
        return (it != m.end() && it->is_string()) ? it->get<std::string>() : std::string();
      };
      prefix_ = str_or_empty("continuing_subword_prefix");
      suffix_ = str_or_empty("end_of_word_suffix");
      ignore_merges_ = m.value("ignore_merges", false);
      byte_fallback_ = m.value("byte_fallback", false);
      fuse_unk_ = m.value("fuse_unk", false);
      const std::string unk = str_or_empty("unk_token");
      if (!unk.empty()) {
        auto it = vocab_.find(unk);
        if (it == vocab_.end()) fail_io(detail::concat("unk_token '", unk, "' is not in the vocabulary"));
        unk_id_ = it->second;
      }

      auto merges_it = m.find("merges");
      if (merges_it == m.end() || !merges_it->is_array()) fail_io("malformed tokenizer.json: model.merges is not an array");
      merges_.reserve(merges_it->size() * 2);
      std::int32_t rank = 0;
      std::string a, b;
      for (const auto& e : *merges_it) {
        if (e.is_string()) {  // legacy "a b" form: exactly one space
          const std::string& s = e.get_ref<const std::string&>();
          if (s.rfind("#version", 0) == 0) continue;
          const std::size_t sp = s.find(' ');
          if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
            fail_io(detail::concat("malformed merge #", rank + 1, " '", s, "': expected two tokens separated by one space"));
          a = s.substr(0, sp);
          b = s.substr(sp + 1);
        } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
          a = e[0].get<std::string>();
          b = e[1].get<std::string>();
        } else {
          fail_io(detail::concat("malformed merge #", rank + 1, ": expected \"a b\" or [a, b]"));
        }
        auto ia = vocab_.find(a), ib = vocab_.find(b);
        if (ia == vocab_.end() || ib == vocab_.end())
          fail_io(detail::concat("merge #", rank + 1, " uses a token that is not in the vocabulary: '",
                                 ia == vocab_.end() ? a : b, "'"));
        if (b.size() < prefix_.size()) fail_io(detail::concat("merge #", rank + 1, " is shorter than the subword prefix"));
        auto in = vocab_.find(a + b.substr(prefix_.size()));
        if (in == vocab_.end())
          fail_io(detail::concat("merge #", rank + 1, " produces '", a + b.substr(prefix_.size()),
                                 "', which is not in the vocabulary"));
        // Like HF's map built from the list, a repeated pair keeps its last rank.
        merges_[pair_key(ia->second, ib->second)] = {rank, in->second};
        ++rank;
      }
    }

    void load_added_tokens(const nlohmann::json& j) {
      auto it = j.find("added_tokens");
      if (it == j.end() || it->is_null()) return;
      if (!it->is_array()) fail_io("malformed tokenizer.json: added_tokens is not an array");
      for (const auto& e : *it) {
        detail::tok::AddedToken t;
        t.content = e.at("content").get<std::string>();
        t.id = e.at("id").get<std::int32_t>();
        t.single_word = e.value("single_word", false);
        t.lstrip = e.value("lstrip", false);
        t.rstrip = e.value("rstrip", false);
        t.special = e.value("special", false);
        t.normalized = e.value("normalized", !t.special);
        if (t.content.empty()) fail_io(detail::concat("added token ", t.id, " has empty content"));
        if (!detail::unicode::is_valid_utf8(t.content)) fail_io(detail::concat("added token ", t.id, " is not UTF-8"));
        added_by_id_[t.id] = added_.size();
        added_by_content_[t.content] = added_.size();
        vocab_size_ = std::max(vocab_size_, t.id + 1);
        added_.push_back(std::move(t));
      }
    }

    void parse_normalizer(const nlohmann::json& n) {
      if (n.is_null()) return;
      const std::string type = type_of(n);
      if (type == "NFC") {
        normalizers_.push_back(Norm::NFC);
      } else if (type == "NFD") {
        normalizers_.push_back(Norm::NFD);
      } else if (type == "Sequence") {
        for (const auto& s : n.at("normalizers")) parse_normalizer(s);
      } else {
        fail_config(detail::concat("unsupported normalizer type '", type, "' (supported: NFC, NFD, Sequence)"));
      }
    }
    void load_normalizer(const nlohmann::json& j) {
      auto it = j.find("normalizer");
      if (it != j.end()) parse_normalizer(*it);
    }

    static detail::tok::SplitBehavior parse_behavior(const std::string& b, const Impl& self) {
      using B = detail::tok::SplitBehavior;
      if (b == "Removed") return B::Removed;
      if (b == "Isolated") return B::Isolated;
      if (b == "MergedWithPrevious") return B::MergedWithPrevious;
      if (b == "MergedWithNext") return B::MergedWithNext;
      if (b == "Contiguous") return B::Contiguous;
      self.fail_config(detail::concat("unsupported Split behavior '", b, "'"));
    }

    void parse_pre_tokenizer(const nlohmann::json& p) {
      if (p.is_null()) return;
      const std::string type = type_of(p);
      using Step = detail::tok::PreTokenizerStep;
      if (byte_level_ && type != "Sequence")
        fail_config(detail::concat("pre-tokenizer '", type, "' after ByteLevel is not supported"));
      if (type == "Sequence") {
        for (const auto& s : p.at("pretokenizers")) parse_pre_tokenizer(s);
      } else if (type == "Split") {
        Step s;
        const auto& pat = p.at("pattern");
        const bool literal = pat.contains("String");
        const std::string text = literal ? pat.at("String").get<std::string>() : pat.at("Regex").get<std::string>();
        s.regex = std::make_shared<const detail::tok::Regex>(text, literal, "tokenizer: " + origin_ + ": Split pattern");
        s.behavior = parse_behavior(p.at("behavior").get<std::string>(), *this);
        s.invert = p.value("invert", false);
        pre_.push_back(std::move(s));
      } else if (type == "Digits") {
        Step s;
        // Rust's char::is_numeric is the N categories; runs stay together unless individual.
        const bool individual = p.value("individual_digits", false);
        s.regex = std::make_shared<const detail::tok::Regex>(individual ? "\\p{N}" : "\\p{N}+", false,
                                                             "tokenizer: Digits");
        s.behavior = detail::tok::SplitBehavior::Isolated;
        pre_.push_back(std::move(s));
      } else if (type == "ByteLevel") {
        Step s;
        s.kind = Step::Kind::ByteLevel;
        s.add_prefix_space = p.value("add_prefix_space", true);
        if (p.value("use_regex", true)) s.regex = gpt2_regex();
        pre_.push_back(std::move(s));
        byte_level_ = true;
      } else {
        fail_config(detail::concat("unsupported pre_tokenizer type '", type, "' (supported: Sequence, Split, ByteLevel, Digits)"));
      }
    }
    void load_pre_tokenizer(const nlohmann::json& j) {
      auto it = j.find("pre_tokenizer");
      if (it != j.end()) parse_pre_tokenizer(*it);
    }

    static std::shared_ptr<const detail::tok::Regex> gpt2_regex() {
      static const auto re = std::make_shared<const detail::tok::Regex>(
          R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", false,
          "tokenizer: ByteLevel");
      return re;
    }

    std::int32_t special_token_id(const nlohmann::json& special_tokens, const std::string& name) const {
      auto it = special_tokens.find(name);
      if (it == special_tokens.end() || !it->contains("ids") || it->at("ids").empty())
        fail_io(detail::concat("post_processor template names special token '", name, "' without ids"));
      return it->at("ids")[0].get<std::int32_t>();
    }

    void parse_post_processor(const nlohmann::json& p) {
      if (p.is_null()) return;
      const std::string type = type_of(p);
      if (type == "ByteLevel") return;  // only trims offsets
      if (type == "Sequence") {
        for (const auto& s : p.at("processors")) parse_post_processor(s);
      } else if (type == "TemplateProcessing") {
        const auto& specials = p.contains("special_tokens") ? p.at("special_tokens") : nlohmann::json::object();
        bool seen_sequence = false;
        std::vector<std::int32_t> pre, post;
        for (const auto& item : p.at("single")) {
          if (item.contains("Sequence")) {
            seen_sequence = true;
          } else if (item.contains("SpecialToken")) {
            const std::string name = item.at("SpecialToken").at("id").get<std::string>();
            auto it = specials.find(name);
            if (it == specials.end()) fail_io(detail::concat("post_processor template uses unknown special token '", name, "'"));
            for (const auto& id : it->at("ids")) (seen_sequence ? post : pre).push_back(id.get<std::int32_t>());
          }
        }
        if (!pre.empty() && !bos_from_template_) {
          bos_ = pre.front();
          bos_from_template_ = true;
        }
        if (!post.empty()) {
          eos_ = post.back();
          eos_from_template_ = true;
        }
        prefix_ids_.insert(prefix_ids_.end(), pre.begin(), pre.end());
        suffix_ids_.insert(suffix_ids_.end(), post.begin(), post.end());
      } else if (type == "RobertaProcessing" || type == "BertProcessing") {
        // {"cls": [token, id], "sep": [token, id]}: <cls> A <sep>
        const auto cls = p.at("cls").at(1).get<std::int32_t>(), sep = p.at("sep").at(1).get<std::int32_t>();
        prefix_ids_.push_back(cls);
        suffix_ids_.push_back(sep);
        bos_ = cls;
        eos_ = sep;
        bos_from_template_ = eos_from_template_ = true;
      } else {
        fail_config(detail::concat("unsupported post_processor type '", type,
                                   "' (supported: ByteLevel, TemplateProcessing, RobertaProcessing, BertProcessing, Sequence)"));
      }
    }
    void load_post_processor(const nlohmann::json& j) {
      auto it = j.find("post_processor");
      if (it != j.end()) parse_post_processor(*it);
    }

    void parse_decoder(const nlohmann::json& d) {
      const std::string type = type_of(d);
      if (type == "ByteLevel") {
        byte_level_decoder_ = true;
      } else if (type == "Sequence") {
        for (const auto& s : d.at("decoders")) parse_decoder(s);
      } else {
        fail_config(detail::concat("unsupported decoder type '", type, "' (supported: ByteLevel)"));
      }
    }
    void load_decoder(const nlohmann::json& j) {
      auto it = j.find("decoder");
      if (it == j.end() || it->is_null()) return;
      has_decoder_ = true;
      parse_decoder(*it);
    }

    void finish_added_tokens() {
      for (std::size_t i = 0; i < added_.size(); ++i) {
        const auto& t = added_[i];
        // Normalized tokens are looked for in normalized text, so match their normalized form.
        normalized_content_.push_back(t.normalized ? normalize(t.content) : t.content);
        (t.normalized ? normalized_trie_ : raw_trie_).add(normalized_content_.back(), i);
      }
      if (byte_level_) {
        const auto& bm = detail::tok::ByteMap::get();
        for (int b = 0; b < 256; ++b) {
          auto it = vocab_.find(bm.byte_to_utf8[static_cast<std::size_t>(b)]);
          byte_ids_[static_cast<std::size_t>(b)] = it == vocab_.end() ? -1 : it->second;
        }
      }
    }

    void default_special_ids() {
      auto first_present = [&](std::initializer_list<const char*> names) -> std::optional<std::int32_t> {
        for (const char* n : names) {
          auto it = added_by_content_.find(n);
          if (it != added_by_content_.end()) return added_[it->second].id;
        }
        return std::nullopt;
      };
      if (!bos_) bos_ = first_present({"<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "[CLS]"});
      if (!eos_) eos_ = first_present({"<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]"});
    }

    /// tokenizer_config.json: "bos_token"/"eos_token" as strings or {"content": ...}.
    void load_config(const std::string& text, const std::string& path) {
      nlohmann::json c;
      try {
        c = nlohmann::json::parse(text);
      } catch (const nlohmann::json::parse_error& e) {
        throw io_error(detail::concat("tokenizer: ", path, ": malformed JSON: ", e.what()));
      }
      auto name_of = [&](const char* key) -> std::optional<std::string> {
        auto it = c.find(key);
        if (it == c.end()) return std::nullopt;
        if (it->is_string()) return it->get<std::string>();
        if (it->is_object() && it->contains("content") && it->at("content").is_string())
          return it->at("content").get<std::string>();
        return std::nullopt;
      };
      if (!c.is_object()) return;
      if (auto b = name_of("bos_token"); b && !bos_from_template_) {
        if (auto id = token_to_id(*b)) bos_ = id;
      } else if (c.contains("bos_token") && c["bos_token"].is_null() && !bos_from_template_) {
        bos_.reset();  // the model explicitly has no BOS (Qwen)
      }
      if (auto e = name_of("eos_token"); e && !eos_from_template_) {
        if (auto id = token_to_id(*e)) eos_ = id;
      }
    }

    // ---- lookups -------------------------------------------------------------------------
    static std::uint64_t pair_key(std::int32_t a, std::int32_t b) {
      return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << 32) | static_cast<std::uint32_t>(b);
    }
    std::optional<std::int32_t> token_to_id(std::string_view tok) const {
      const std::string key(tok);
      if (auto it = added_by_content_.find(key); it != added_by_content_.end()) return added_[it->second].id;
      if (auto it = vocab_.find(key); it != vocab_.end()) return it->second;
      return std::nullopt;
    }
    const std::string* id_to_token(std::int32_t id) const {
      if (auto it = added_by_id_.find(id); it != added_by_id_.end()) return &added_[it->second].content;
      if (id >= 0 && static_cast<std::size_t>(id) < id_to_vocab_.size() && has_vocab_id_[static_cast<std::size_t>(id)])
        return &id_to_vocab_[static_cast<std::size_t>(id)];
      return nullptr;
    }

    std::string normalize(std::string_view s) const {
      std::string cur(s);
      for (Norm n : normalizers_) cur = n == Norm::NFC ? detail::unicode::nfc(cur) : detail::unicode::nfd(cur);
      return cur;
    }

    // ---- encoding ------------------------------------------------------------------------
    /// HF AddedVocabulary::find_matches on one text segment: added tokens (with their
    /// single_word/lstrip/rstrip rules) become resolved segments, the rest stays text.
    void split_added(std::string_view s, const detail::tok::AddedTokenTrie& trie, std::vector<Segment>& out) const {
      if (trie.empty()) {
        if (!s.empty()) out.push_back({s, -1});
        return;
      }
      std::size_t start_offset = 0, search = 0, b = 0, e = 0, tok = 0;
      while (search < s.size() && trie.find(s, search, b, e, tok)) {
        const auto& t = added_[tok];
        search = e;
        if (t.single_word) {
          const bool start_space = b == 0 || !is_word_char(detail::unicode::last_code_point(s.substr(0, b)));
          std::size_t k = e;
          const bool stop_space = e == s.size() || !is_word_char(detail::unicode::next_code_point(s, k));
          if (!start_space || !stop_space) continue;
        }
        if (t.lstrip) {
          std::size_t nb = b;
          while (nb > 0) {
            std::size_t p = nb - 1;
            while (p > 0 && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
            std::size_t q = p;
            if (!detail::unicode::is_white_space(detail::unicode::next_code_point(s, q))) break;
            nb = p;
          }
          b = std::max(nb, start_offset);
        }
        if (t.rstrip) {
          while (e < s.size()) {
            std::size_t q = e;
            if (!detail::unicode::is_white_space(detail::unicode::next_code_point(s, q))) break;
            e = q;
          }
          search = e;
        }
        if (start_offset < b) out.push_back({s.substr(start_offset, b - start_offset), -1});
        out.push_back({s.substr(b, e - b), t.id});
        start_offset = e;
      }
      if (start_offset < s.size()) out.push_back({s.substr(start_offset), -1});
    }

    /// Rust regex's \w (Alphabetic, marks, decimal numbers, connector punctuation, join controls).
    static bool is_word_char(char32_t c) {
      static const detail::tok::Regex re(R"([\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}])", false,
                                         "tokenizer: word-character class");
      std::string u;
      detail::unicode::append_utf8(u, c);
      bool found = false;
      re.for_each_match(u, [&](std::size_t, std::size_t) { found = true; });
      return found;
    }

    /// HF NormalizedString::split: matches of `step.regex` and the text between them, combined
    /// according to the split behaviour.
    static void split_step(std::string_view s, const detail::tok::PreTokenizerStep& step,
                           std::vector<std::string_view>& out) {
      using B = detail::tok::SplitBehavior;
      struct Part {
        std::size_t b, e;
        bool match;
      };
      std::vector<Part> parts;
      std::size_t prev = 0;
      step.regex->for_each_match(s, [&](std::size_t b, std::size_t e) {
        if (prev != b) parts.push_back({prev, b, false});
        parts.push_back({b, e, true});
        prev = e;
      });
      if (prev != s.size()) parts.push_back({prev, s.size(), false});
      if (step.invert)
        for (auto& p : parts) p.match = !p.match;

      std::vector<Part> res;  // `match` now means "remove"
      switch (step.behavior) {
        case B::Isolated:
          for (const auto& p : parts) res.push_back({p.b, p.e, false});
          break;
        case B::Removed:
          res = parts;
          break;
        case B::Contiguous: {
          bool prev_match = false;
          for (const auto& p : parts) {
            if (p.match == prev_match && !res.empty())
              res.back().e = p.e;
            else
              res.push_back({p.b, p.e, false});
            prev_match = p.match;
          }
          break;
        }
        case B::MergedWithPrevious: {
          bool prev_match = false;
          for (const auto& p : parts) {
            if (p.match && !prev_match && !res.empty())
              res.back().e = p.e;
            else
              res.push_back({p.b, p.e, false});
            prev_match = p.match;
          }
          break;
        }
        case B::MergedWithNext: {
          bool prev_match = false;
          for (auto it = parts.rbegin(); it != parts.rend(); ++it) {
            if (it->match && !prev_match && !res.empty())
              res.back().b = it->b;
            else
              res.push_back({it->b, it->e, false});
            prev_match = it->match;
          }
          std::reverse(res.begin(), res.end());
          break;
        }
      }
      for (const auto& p : res)
        if (!p.match && p.e > p.b) out.push_back(s.substr(p.b, p.e - p.b));
    }

    void pre_tokenize(std::string_view text, std::deque<std::string>& arena, std::vector<std::string_view>& pieces) const {
      pieces.clear();
      pieces.push_back(text);
      std::vector<std::string_view> next;
      for (const auto& step : pre_) {
        next.clear();
        for (std::string_view p : pieces) {
          if (step.kind == detail::tok::PreTokenizerStep::Kind::ByteLevel) {
            if (step.add_prefix_space && (p.empty() || p.front() != ' ')) {
              arena.push_back(" " + std::string(p));
              p = arena.back();
            }
            if (!step.regex) {
              next.push_back(p);
              continue;
            }
          }
          split_step(p, step, next);
        }
        pieces.swap(next);
      }
    }

    /// Initial symbols of a word (HF BPE::merge_word before merging), appended to `ids`.
    void initial_symbols(std::string_view piece, std::vector<std::int32_t>& ids) const {
      if (byte_level_ && prefix_.empty() && suffix_.empty()) {
        bool all_known = true;
        for (char ch : piece) {
          const std::int32_t id = byte_ids_[static_cast<unsigned char>(ch)];
          if (id < 0) {
            all_known = false;
            break;
          }
          ids.push_back(id);
        }
        if (all_known) return;
        ids.clear();
      }
      // General path: one symbol per character of the model's view of the word.
      std::string word;
      if (byte_level_) {
        const auto& bm = detail::tok::ByteMap::get();
        for (char ch : piece) word += bm.byte_to_utf8[static_cast<unsigned char>(ch)];
      } else {
        word.assign(piece);
      }
      std::optional<std::int32_t> pending_unk;
      std::string sym;
      for (std::size_t i = 0; i < word.size();) {
        const std::size_t start = i;
        detail::unicode::next_code_point(word, i);
        sym.assign(start == 0 ? "" : prefix_);
        sym.append(word, start, i - start);
        if (i == word.size()) sym += suffix_;
        if (auto it = vocab_.find(sym); it != vocab_.end()) {
          if (pending_unk) ids.push_back(*pending_unk);
          pending_unk.reset();
          ids.push_back(it->second);
          continue;
        }
        if (byte_fallback_) {
          std::vector<std::int32_t> bytes;
          for (char ch : sym) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "<0x%02X>", static_cast<unsigned char>(ch));
            auto it = vocab_.find(buf);
            if (it == vocab_.end()) break;
            bytes.push_back(it->second);
          }
          if (bytes.size() == sym.size()) {
            ids.insert(ids.end(), bytes.begin(), bytes.end());
            continue;
          }
        }
        if (unk_id_) {
          // Consecutive unknowns become one <unk> only when fuse_unk is set.
          if (pending_unk && !fuse_unk_) ids.push_back(*pending_unk);
          pending_unk = unk_id_;
        }
        // Without unk_token HF silently drops the character.
      }
      if (pending_unk) ids.push_back(*pending_unk);
    }

    /// HF Word::merge_all: repeatedly apply the lowest-ranked merge (leftmost on ties).
    void merge_all(std::vector<std::int32_t>& ids) const {
      const std::size_t n = ids.size();
      if (n < 2) return;
      struct Sym {
        std::int32_t id;
        std::ptrdiff_t prev, next;
        bool alive;
      };
      std::vector<Sym> sym(n);
      for (std::size_t i = 0; i < n; ++i)
        sym[i] = {ids[i], static_cast<std::ptrdiff_t>(i) - 1, i + 1 < n ? static_cast<std::ptrdiff_t>(i + 1) : -1, true};
      struct Cand {
        std::int32_t rank;
        std::size_t pos;
        std::int32_t new_id;
        bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
      };
      std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> queue;
      auto push = [&](std::size_t pos, std::int32_t a, std::int32_t b) {
        auto it = merges_.find(pair_key(a, b));
        if (it != merges_.end()) queue.push({it->second.first, pos, it->second.second});
      };
      for (std::size_t i = 0; i + 1 < n; ++i) push(i, ids[i], ids[i + 1]);
      while (!queue.empty()) {
        const Cand top = queue.top();
        queue.pop();
        Sym& left = sym[top.pos];
        if (!left.alive || left.next < 0) continue;
        Sym& right = sym[static_cast<std::size_t>(left.next)];
        // Skip stale entries: the pair at this position changed since it was queued.
        auto it = merges_.find(pair_key(left.id, right.id));
        if (it == merges_.end() || it->second.second != top.new_id) continue;
        left.id = top.new_id;
        right.alive = false;
        left.next = right.next;
        if (right.next >= 0) sym[static_cast<std::size_t>(right.next)].prev = static_cast<std::ptrdiff_t>(top.pos);
        if (left.prev >= 0) push(static_cast<std::size_t>(left.prev), sym[static_cast<std::size_t>(left.prev)].id, left.id);
        if (left.next >= 0) push(top.pos, left.id, sym[static_cast<std::size_t>(left.next)].id);
      }
      ids.clear();
      for (const auto& s : sym)
        if (s.alive) ids.push_back(s.id);
    }

    /// BPE of one pre-tokenized word, through the per-thread cache.
    void model_tokenize(std::string_view piece, std::vector<std::int32_t>& out) const {
      if (piece.empty()) return;
      WordCache* cache = piece.size() < kMaxCachedWord ? &local_cache() : nullptr;
      std::string key;
      if (cache) {
        key.assign(piece);
        auto it = cache->map.find(key);
        if (it != cache->map.end()) {
          out.insert(out.end(), it->second.begin(), it->second.end());
          return;
        }
      }
      std::vector<std::int32_t> ids;
      bpe_word(piece, ids);
      out.insert(out.end(), ids.begin(), ids.end());
      // Like HF, a full cache stops growing rather than evicting.
      if (cache && cache->map.size() < kCacheCapacity) cache->map.emplace(std::move(key), std::move(ids));
    }

    void bpe_word(std::string_view piece, std::vector<std::int32_t>& ids) const {
      if (ignore_merges_) {
        // Llama-3: a word that is itself a token is taken whole, whatever the merges say.
        std::string word;
        if (byte_level_) {
          const auto& bm = detail::tok::ByteMap::get();
          for (char ch : piece) word += bm.byte_to_utf8[static_cast<unsigned char>(ch)];
        } else {
          word.assign(piece);
        }
        if (auto it = vocab_.find(word); it != vocab_.end()) {
          ids.push_back(it->second);
          return;
        }
      }
      ids.reserve(piece.size());
      initial_symbols(piece, ids);
      merge_all(ids);
    }

    std::vector<std::int32_t> encode(std::string_view input, bool add_special_tokens) const {
      std::string sanitized;
      std::string_view text = input;
      if (!detail::unicode::is_valid_utf8(input)) {
        sanitized = detail::unicode::sanitize_utf8(input);
        text = sanitized;
      }
      std::vector<std::int32_t> out;
      out.reserve(text.size() / 3 + 4 + prefix_ids_.size() + suffix_ids_.size());
      if (add_special_tokens) out.insert(out.end(), prefix_ids_.begin(), prefix_ids_.end());

      // 1. non-normalized added tokens on the raw text; 2. normalize the rest and find the
      // normalized added tokens in it (HF AddedVocabulary::extract_and_normalize).
      std::deque<std::string> arena;  // owns normalized/prefixed text; deque keeps views valid
      std::vector<Segment> raw, segs;
      split_added(text, raw_trie_, raw);
      for (const Segment& s : raw) {
        if (s.added_id >= 0) {
          segs.push_back(s);
          continue;
        }
        std::string_view t = s.text;
        if (!normalizers_.empty()) {
          arena.push_back(normalize(t));
          t = arena.back();
        }
        split_added(t, normalized_trie_, segs);
      }
      std::vector<std::string_view> pieces;
      for (const Segment& s : segs) {
        if (s.added_id >= 0) {
          out.push_back(s.added_id);
          continue;
        }
        pre_tokenize(s.text, arena, pieces);
        for (std::string_view p : pieces) model_tokenize(p, out);
      }
      if (add_special_tokens) out.insert(out.end(), suffix_ids_.begin(), suffix_ids_.end());
      return out;
    }

    // ---- decoding ------------------------------------------------------------------------
    std::string decode(const std::vector<std::int32_t>& ids, bool skip_special_tokens) const {
      std::vector<const std::string*> tokens;
      tokens.reserve(ids.size());
      for (std::int32_t id : ids) {
        const std::string* t = id_to_token(id);
        if (t == nullptr) continue;
        if (skip_special_tokens) {
          auto it = added_by_content_.find(*t);
          if (it != added_by_content_.end() && added_[it->second].special) continue;
        }
        tokens.push_back(t);
      }
      std::string out;
      if (!byte_level_decoder_) {
        // HF joins tokens with spaces when there is no decoder (and concatenates them when a
        // decoder Sequence is empty).
        for (std::size_t i = 0; i < tokens.size(); ++i) out += (i && !has_decoder_ ? " " : "") + *tokens[i];
        return out;
      }
      // ByteLevel decoder: each token's characters back to bytes (a token with a character
      // outside the byte map is taken as its own UTF-8), then lossy UTF-8 over everything.
      const auto& bm = detail::tok::ByteMap::get();
      std::string bytes, tok_bytes;
      for (const std::string* t : tokens) {
        tok_bytes.clear();
        bool mapped = true;
        for (std::size_t i = 0; i < t->size();) {
          const char32_t c = detail::unicode::next_code_point(*t, i);
          if (c >= bm.cp_to_byte.size() || bm.cp_to_byte[c] < 0) {
            mapped = false;
            break;
          }
          tok_bytes.push_back(static_cast<char>(bm.cp_to_byte[c]));
        }
        bytes += mapped ? tok_bytes : *t;
      }
      return detail::unicode::sanitize_utf8(bytes);
    }
  };

  static std::string read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw io_error(detail::concat("tokenizer: cannot open '", path, "': ", std::strerror(errno)));
    std::ostringstream ss;
    ss << in.rdbuf();
    if (in.bad()) throw io_error(detail::concat("tokenizer: error reading '", path, "'"));
    return ss.str();
  }

  const Impl& impl() const {
    DISTILX_ASSERT(impl_ != nullptr, "use of a default-constructed or moved-from Tokenizer");
    return *impl_;
  }

  std::shared_ptr<const Impl> impl_;
};

}  // namespace distilx
