// Corpus preparation: splits text files and JSON-lines files into documents, tokenizes them
// on N threads, appends EOS after every document and writes the token stream as shards
// `<prefix>_000000.bin`, ... plus a manifest `<prefix>.json`. The output depends only on the
// inputs and options, never on the thread count: work is claimed in document order and
// written back in that order.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"
#include "distilx/data/shards.hpp"
#include "distilx/data/tokenizer.hpp"

namespace distilx::data {

/// How an input file is read. auto_detect: `.jsonl` / `.ndjson` are JSON lines, the rest text.
enum class InputKind { auto_detect, text, jsonl };

/// How a text file is divided into documents.
enum class TextSplit {
  file,       ///< the whole file is one document
  paragraph,  ///< documents are separated by one or more blank (whitespace-only) lines
  line,       ///< every non-blank line is a document (a trailing '\r' is dropped)
};

/// What to do with ill-formed UTF-8 in the inputs.
enum class InvalidUtf8 {
  error,    ///< io_error naming the file and byte offset
  replace,  ///< each maximal ill-formed subpart becomes U+FFFD (as the Unicode standard recommends)
};

/// One input file; converts implicitly from a path so `{"a.txt", "b.jsonl"}` works.
struct CorpusInput {
  std::string path;
  InputKind kind = InputKind::auto_detect;
  CorpusInput(std::string p, InputKind k = InputKind::auto_detect) : path(std::move(p)), kind(k) {}
  CorpusInput(const char* p, InputKind k = InputKind::auto_detect) : path(p), kind(k) {}
};

struct CorpusOptions {
  /// Output path prefix: shards `<prefix>_000000.bin`, ..., manifest `<prefix>.json`. Parent
  /// directories are created.
  std::string output_prefix;
  /// Maximum tokens per shard (at most 2^31 - 1, the header's limit).
  index_t shard_tokens = 100'000'000;
  /// Tokenizer threads; 0 means std::thread::hardware_concurrency().
  int threads = 1;
  TextSplit text_split = TextSplit::file;
  /// JSON-lines: the string field holding a document's text.
  std::string json_field = "text";
  /// Appended after every document. Required (>= 0) with a callable tokenizer; the Tokenizer
  /// overload uses the tokenizer's EOS when this is negative.
  std::int32_t eos_id = -1;
  /// Every token, EOS included, must lie in [0, vocab_size). Required (> 0) with a callable;
  /// the Tokenizer overload uses Tokenizer::vocab_size() when this is 0.
  std::int32_t vocab_size = 0;
  ShardFormat format = ShardFormat::u32;
  InvalidUtf8 invalid_utf8 = InvalidUtf8::error;
  /// Text tokenized per parallel round; bounds the memory held for tokens in flight.
  std::size_t batch_bytes = std::size_t(32) << 20;
  /// Tokenizer overload only: apply the tokenizer's post-processor (e.g. a BOS) per document.
  bool add_special_tokens = false;
};

/// Any tokenizer: text in, ids out. Called concurrently from several threads.
using TokenizeFn = std::function<std::vector<std::int32_t>(std::string_view)>;

namespace detail {

/// Length of the UTF-8 unit starting at p[0] (n > 0 bytes available). Sets `valid`; when
/// invalid the length is that of the maximal ill-formed subpart (>= 1), so replacement and
/// validation agree with the Unicode standard's "maximal subpart" practice.
inline std::size_t utf8_unit(const unsigned char* p, std::size_t n, bool& valid) {
  const unsigned c = p[0];
  if (c < 0x80) {
    valid = true;
    return 1;
  }
  std::size_t need = 0;
  unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte (excludes overlongs, surrogates, > U+10FFFF)
  if (c >= 0xC2 && c <= 0xDF) need = 1;
  else if (c == 0xE0) need = 2, lo = 0xA0;
  else if (c >= 0xE1 && c <= 0xEC) need = 2;
  else if (c == 0xED) need = 2, hi = 0x9F;
  else if (c >= 0xEE && c <= 0xEF) need = 2;
  else if (c == 0xF0) need = 3, lo = 0x90;
  else if (c >= 0xF1 && c <= 0xF3) need = 3;
  else if (c == 0xF4) need = 3, hi = 0x8F;
  else {
    valid = false;
    return 1;
  }
  for (std::size_t i = 1; i <= need; ++i) {
    if (i >= n || p[i] < lo || p[i] > hi) {
      valid = false;
      return i;
    }
    lo = 0x80, hi = 0xBF;
  }
  valid = true;
  return need + 1;
}

/// Offset of the first ill-formed byte of s, or npos when s is valid UTF-8.
inline std::size_t utf8_find_invalid(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  std::size_t i = 0;
  while (i < s.size()) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    bool ok = false;
    const std::size_t len = utf8_unit(p + i, s.size() - i, ok);
    if (!ok) return i;
    i += len;
  }
  return std::string_view::npos;
}

/// s with every maximal ill-formed subpart replaced by U+FFFD.
inline std::string utf8_replace_invalid(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  std::string out;
  out.reserve(s.size() + 8);
  std::size_t i = 0;
  while (i < s.size()) {
    bool ok = false;
    const std::size_t len = utf8_unit(p + i, s.size() - i, ok);
    if (ok) out.append(s.data() + i, len);
    else out.append("\xEF\xBF\xBD");
    i += len;
  }
  return out;
}

/// A read-only mapping of one input file (empty files have no mapping).
class MappedInput {
 public:
  explicit MappedInput(std::string path) : path_(std::move(path)) {
    using ::distilx::detail::concat;
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw io_error(concat("corpus: cannot open '", path_, "': ", std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      throw io_error(concat("corpus: '", path_, "' is not a readable regular file"));
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int err = errno;
      ::close(fd);
      if (p == MAP_FAILED) throw io_error(concat("corpus: cannot mmap '", path_, "': ", std::strerror(err)));
      data_ = static_cast<const char*>(p);
    } else {
      ::close(fd);
    }
  }
  MappedInput(const MappedInput&) = delete;
  MappedInput& operator=(const MappedInput&) = delete;
  ~MappedInput() {
    if (data_) ::munmap(const_cast<char*>(data_), size_);
  }
  std::string_view bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const char* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A document before tokenization: bytes inside a mapped input plus where they came from.
struct RawDoc {
  const MappedInput* file;
  std::string_view bytes;
  std::size_t offset;  ///< of bytes[0] in the file
  index_t line;        ///< 1-based line (JSON lines and line mode); 0 otherwise
  bool json;
};

inline bool is_blank(std::string_view line) {
  for (char c : line)
    if (c != ' ' && c != '\t' && c != '\r' && c != '\f' && c != '\v') return false;
  return true;
}

/// Calls emit(RawDoc) for every document of a file, in file order.
template <class Emit>
void split_documents(const MappedInput& f, bool json, TextSplit split, Emit&& emit) {
  const std::string_view all = f.bytes();
  if (all.empty()) return;
  if (!json && split == TextSplit::file) {
    emit(RawDoc{&f, all, 0, 0, false});
    return;
  }
  std::size_t pos = 0;
  index_t line_no = 0;
  std::size_t para_begin = std::string_view::npos, para_end = 0;  // paragraph under construction
  while (pos < all.size()) {
    const std::size_t nl = all.find('\n', pos);
    const std::size_t end = nl == std::string_view::npos ? all.size() : nl;
    std::string_view line = all.substr(pos, end - pos);
    ++line_no;
    const bool blank = is_blank(line);
    if (json || split == TextSplit::line) {
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      if (!blank) emit(RawDoc{&f, line, pos, line_no, json});
    } else if (blank) {
      if (para_begin != std::string_view::npos) emit(RawDoc{&f, all.substr(para_begin, para_end - para_begin), para_begin, 0, false});
      para_begin = std::string_view::npos;
    } else {
      if (para_begin == std::string_view::npos) para_begin = pos;
      para_end = end;
    }
    pos = end + 1;
  }
  if (para_begin != std::string_view::npos) emit(RawDoc{&f, all.substr(para_begin, para_end - para_begin), para_begin, 0, false});
}

inline std::string doc_where(const RawDoc& d) {
  if (d.line > 0) return ::distilx::detail::concat("'", d.file->path(), "' line ", d.line);
  return ::distilx::detail::concat("'", d.file->path(), "' (document at byte ", d.offset, ")");
}

/// Writes a token stream as consecutive shards of at most shard_tokens tokens, opening a
/// shard only when a token arrives (so there are never empty shards).
class ShardSink {
 public:
  ShardSink(std::string prefix, index_t shard_tokens, ShardFormat format)
      : prefix_(std::move(prefix)), cap_(shard_tokens), format_(format) {}

  void push(const std::int32_t* t, std::size_t n) {
    while (n > 0) {
      if (!cur_) {
        char suffix[32];
        std::snprintf(suffix, sizeof suffix, "_%06zu.bin", paths_.size());
        cur_ = std::make_unique<ShardWriter>(prefix_ + suffix, format_);
      }
      const auto take = static_cast<std::size_t>(std::min<index_t>(static_cast<index_t>(n), cap_ - cur_->size()));
      cur_->append(t, take);
      t += take;
      n -= take;
      if (cur_->size() == cap_) close_current_();
    }
  }

  void finish() {
    if (cur_) close_current_();
  }

  /// Removes the current temporary file and every shard this sink completed.
  void discard() noexcept {
    cur_.reset();
    for (const auto& p : paths_) ::unlink(p.c_str());
  }

  const std::vector<std::string>& paths() const { return paths_; }
  const std::vector<index_t>& counts() const { return counts_; }

 private:
  void close_current_() {
    cur_->finish();
    paths_.push_back(cur_->path());
    counts_.push_back(cur_->size());
    cur_.reset();
  }

  std::string prefix_;
  index_t cap_;
  ShardFormat format_;
  std::unique_ptr<ShardWriter> cur_;
  std::vector<std::string> paths_;
  std::vector<index_t> counts_;
};

}  // namespace detail

/// Tokenizes `inputs` with `tokenize` and writes shards and the manifest (see CorpusOptions).
/// Documents: text files per options.text_split; JSON lines: every non-blank line is an object
/// whose `json_field` string is one document. Empty documents are skipped; every other
/// document's tokens are followed by eos_id. Throws io_error for unreadable inputs, invalid
/// JSON or a missing field (file and line), ill-formed UTF-8 (file and byte offset) and for
/// inputs without any token; config_error for bad options. On error no shard is left behind.
inline CorpusManifest build_corpus(const std::vector<CorpusInput>& inputs, const TokenizeFn& tokenize,
                                   const CorpusOptions& opt) {
  using ::distilx::detail::concat;
  DISTILX_REQUIRE(config_error, !opt.output_prefix.empty(), "build_corpus: output_prefix is empty");
  DISTILX_REQUIRE(config_error, opt.shard_tokens > 0 && opt.shard_tokens <= kShardMaxTokens,
                  "build_corpus: shard_tokens must be in [1, ", kShardMaxTokens, "], got ", opt.shard_tokens);
  DISTILX_REQUIRE(config_error, opt.vocab_size > 0, "build_corpus: vocab_size must be positive, got ", opt.vocab_size);
  DISTILX_REQUIRE(config_error, opt.format == ShardFormat::u32 || opt.vocab_size <= 65536,
                  "build_corpus: vocab_size ", opt.vocab_size, " does not fit uint16 shards; use ShardFormat::u32");
  DISTILX_REQUIRE(config_error, opt.eos_id >= 0 && opt.eos_id < opt.vocab_size, "build_corpus: eos_id ", opt.eos_id,
                  " is not in [0, vocab_size = ", opt.vocab_size, ")");
  DISTILX_REQUIRE(config_error, opt.threads >= 0, "build_corpus: threads must be >= 0, got ", opt.threads);
  DISTILX_REQUIRE(config_error, !inputs.empty(), "build_corpus: no input files");
  DISTILX_REQUIRE(config_error, static_cast<bool>(tokenize), "build_corpus: empty tokenizer function");
  const int threads =
      opt.threads > 0 ? opt.threads : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));

  {
    const std::filesystem::path parent = std::filesystem::path(opt.output_prefix).parent_path();
    std::error_code ec;
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
    if (ec) throw io_error(concat("build_corpus: cannot create directory '", parent.string(), "': ", ec.message()));
  }

  CorpusManifest man;
  man.vocab_size = opt.vocab_size;
  man.eos_id = opt.eos_id;
  man.format = opt.format;
  for (const auto& in : inputs) man.sources.push_back(in.path);

  // Tokenizes one document into `out` (tokens then EOS; nothing for an empty document).
  auto tokenize_doc = [&](const detail::RawDoc& d, std::vector<std::int32_t>& out, index_t& docs) {
    std::string fixed;  // replacement text, when InvalidUtf8::replace had to change something
    std::string_view text = d.bytes;
    const std::size_t bad = detail::utf8_find_invalid(text);
    if (bad != std::string_view::npos) {
      if (opt.invalid_utf8 == InvalidUtf8::error)
        throw io_error(concat("corpus: '", d.file->path(), "'", d.line > 0 ? concat(" line ", d.line) : std::string(),
                              ": ill-formed UTF-8 at byte offset ", d.offset + bad,
                              " (use InvalidUtf8::replace to substitute U+FFFD)"));
      fixed = detail::utf8_replace_invalid(text);
      text = fixed;
    }
    std::string field;  // JSON-decoded text
    if (d.json) {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(text);
      } catch (const nlohmann::json::exception& e) {
        throw io_error(concat("corpus: ", detail::doc_where(d), ": invalid JSON (", e.what(), ")"));
      }
      if (!j.is_object()) throw io_error(concat("corpus: ", detail::doc_where(d), ": not a JSON object"));
      const auto it = j.find(opt.json_field);
      if (it == j.end())
        throw io_error(concat("corpus: ", detail::doc_where(d), ": no field \"", opt.json_field, "\""));
      if (!it->is_string())
        throw io_error(concat("corpus: ", detail::doc_where(d), ": field \"", opt.json_field, "\" is a ",
                              it->type_name(), ", expected a string"));
      field = it->get<std::string>();
      text = field;
    }
    if (text.empty()) return;
    std::vector<std::int32_t> ids;
    try {
      ids = tokenize(text);
    } catch (const std::exception& e) {
      throw error(concat("corpus: ", detail::doc_where(d), ": tokenizer failed: ", e.what()));
    }
    if (ids.empty()) return;
    for (std::int32_t t : ids)
      if (t < 0 || t >= opt.vocab_size)
        throw error(concat("corpus: ", detail::doc_where(d), ": tokenizer returned id ", t,
                           " outside [0, vocab_size = ", opt.vocab_size, ")"));
    out.insert(out.end(), ids.begin(), ids.end());
    out.push_back(opt.eos_id);
    ++docs;
  };

  detail::ShardSink sink(opt.output_prefix, opt.shard_tokens, opt.format);
  std::vector<std::shared_ptr<detail::MappedInput>> open_files;  // kept alive while their docs are in flight
  std::vector<detail::RawDoc> batch;
  std::size_t batch_bytes = 0;

  // Tokenizes `batch` on the worker threads and streams the result to the sink. Chunks are
  // claimed in increasing order, so every chunk before a failing one has been processed and
  // the reported error is the first in document order, whatever the thread count.
  auto run_batch = [&]() {
    if (batch.empty()) return;
    const std::size_t chunk_bytes = std::max<std::size_t>(1, batch_bytes / (static_cast<std::size_t>(threads) * 4));
    std::vector<std::size_t> bounds{0};
    for (std::size_t i = 0, acc = 0; i < batch.size(); ++i) {
      acc += batch[i].bytes.size() + 1;
      if (acc >= chunk_bytes || i + 1 == batch.size()) {
        bounds.push_back(i + 1);
        acc = 0;
      }
    }
    const std::size_t nchunks = bounds.size() - 1;
    std::vector<std::vector<std::int32_t>> out(nchunks);
    std::vector<index_t> docs(nchunks, 0);
    std::vector<std::exception_ptr> errs(nchunks);
    std::atomic<std::size_t> next{0};
    std::atomic<bool> failed{false};
    auto worker = [&]() {
      for (;;) {
        if (failed.load(std::memory_order_relaxed)) return;
        const std::size_t c = next.fetch_add(1);
        if (c >= nchunks) return;
        try {
          for (std::size_t i = bounds[c]; i < bounds[c + 1]; ++i) tokenize_doc(batch[i], out[c], docs[c]);
        } catch (...) {
          errs[c] = std::current_exception();
          failed.store(true);
          return;
        }
      }
    };
    const int nthreads = static_cast<int>(std::min<std::size_t>(static_cast<std::size_t>(threads), nchunks));
    if (nthreads <= 1) {
      worker();
    } else {
      std::vector<std::thread> pool;
      pool.reserve(static_cast<std::size_t>(nthreads));
      for (int t = 0; t < nthreads; ++t) pool.emplace_back(worker);
      for (auto& th : pool) th.join();
    }
    for (std::size_t c = 0; c < nchunks; ++c)
      if (errs[c]) std::rethrow_exception(errs[c]);
    for (std::size_t c = 0; c < nchunks; ++c) {
      sink.push(out[c].data(), out[c].size());
      man.total_tokens += static_cast<index_t>(out[c].size());
      man.documents += docs[c];
    }
    batch.clear();
    batch_bytes = 0;
    open_files.clear();
  };

  try {
    for (const auto& in : inputs) {
      bool json = in.kind == InputKind::jsonl;
      if (in.kind == InputKind::auto_detect) {
        const std::string& p = in.path;
        auto ends_with = [&](const char* s) {
          const std::size_t n = std::strlen(s);
          return p.size() >= n && p.compare(p.size() - n, n, s) == 0;
        };
        json = ends_with(".jsonl") || ends_with(".ndjson");
      }
      auto file = std::make_shared<detail::MappedInput>(in.path);
      open_files.push_back(file);
      detail::split_documents(*file, json, opt.text_split, [&](const detail::RawDoc& d) {
        batch.push_back(d);
        batch_bytes += d.bytes.size();
        if (batch_bytes >= opt.batch_bytes) {
          run_batch();
          open_files.push_back(file);  // the file is still being split
        }
      });
    }
    run_batch();
    if (man.total_tokens == 0)
      throw io_error(concat("build_corpus: the ", inputs.size(), " input file(s) produced no tokens (",
                            "all empty or blank); nothing to write"));
    sink.finish();
    man.shard_paths = sink.paths();
    man.shard_tokens = sink.counts();
    write_manifest(detail::manifest_path_for(opt.output_prefix), man);
  } catch (...) {
    sink.discard();
    throw;
  }
  return man;
}

/// build_corpus with a distilx::Tokenizer: eos_id and vocab_size default to the tokenizer's.
inline CorpusManifest build_corpus(const std::vector<CorpusInput>& inputs, const Tokenizer& tokenizer,
                                   CorpusOptions opt) {
  if (opt.eos_id < 0) {
    const auto eos = tokenizer.eos_id();
    DISTILX_REQUIRE(config_error, eos.has_value(),
                    "build_corpus: the tokenizer has no EOS token; set CorpusOptions::eos_id");
    opt.eos_id = *eos;
  }
  if (opt.vocab_size <= 0) opt.vocab_size = tokenizer.vocab_size();
  const bool add_special = opt.add_special_tokens;
  return build_corpus(
      inputs, [&tokenizer, add_special](std::string_view text) { return tokenizer.encode(text, add_special); }, opt);
}

}  // namespace distilx::data
