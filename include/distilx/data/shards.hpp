// Token shard files in llm.c's layout: a header of 256 little-endian int32 (magic, version,
// token count, zeros) followed by the tokens as uint32 (magic 20240801, version 7, the
// "llama-3" variant) or uint16 (magic 20240520, version 1, the "gpt-2" variant).
// ShardWriter streams tokens into a temporary file and renames it into place atomically;
// ShardReader validates the header against the file size and memory-maps the tokens; a JSON
// manifest lists a dataset's shards with their token counts, vocab size and EOS id.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"

namespace distilx::data {

/// Width of the stored tokens. u32 is the default: vocabularies of current teachers
/// (Llama-3: 128k, Qwen: 152k) do not fit 16 bits.
enum class ShardFormat { u16, u32 };

inline constexpr std::int32_t kShardMagicU16 = 20240520;
inline constexpr std::int32_t kShardVersionU16 = 1;
inline constexpr std::int32_t kShardMagicU32 = 20240801;
inline constexpr std::int32_t kShardVersionU32 = 7;
inline constexpr std::size_t kShardHeaderInts = 256;
inline constexpr std::size_t kShardHeaderBytes = kShardHeaderInts * 4;
/// The header stores the count as int32, so one shard holds at most 2^31 - 1 tokens.
inline constexpr index_t kShardMaxTokens = std::numeric_limits<std::int32_t>::max();

inline std::size_t shard_token_bytes(ShardFormat f) { return f == ShardFormat::u16 ? 2 : 4; }
inline const char* shard_format_name(ShardFormat f) { return f == ShardFormat::u16 ? "uint16" : "uint32"; }

namespace detail {

// Byte-wise little-endian access: correct on any host and for any alignment; compilers turn
// it into a single load/store on little-endian machines.
inline std::uint32_t load_u32le(const unsigned char* p) {
  return std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8 | std::uint32_t(p[2]) << 16 | std::uint32_t(p[3]) << 24;
}
inline std::uint32_t load_u16le(const unsigned char* p) { return std::uint32_t(p[0]) | std::uint32_t(p[1]) << 8; }
inline void store_u32le(unsigned char* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
inline void store_u16le(unsigned char* p, std::uint32_t v) {
  p[0] = static_cast<unsigned char>(v);
  p[1] = static_cast<unsigned char>(v >> 8);
}

/// write(2) until done, retrying on EINTR; returns 0 or the errno.
inline int write_all(int fd, const unsigned char* p, std::size_t n) {
  while (n > 0) {
    const ::ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (w == 0) return EIO;
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return 0;
}

/// fsync of the directory holding `path`, so that a rename into it survives a crash. Best
/// effort: some filesystems refuse fsync on directories.
inline void sync_parent_dir(const std::string& path) {
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename); `what` names the file
/// kind in error messages.
inline void write_file_atomic(const std::string& path, const std::string& bytes, const char* what) {
  using ::distilx::detail::concat;
  const std::string tmp = concat(path, ".tmp.", ::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw io_error(concat(what, ": cannot write '", path, "': creating '", tmp, "' failed: ", std::strerror(errno)));
  int err = write_all(fd, reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  const char* step = "write";
  if (!err && ::fsync(fd) != 0) err = errno, step = "fsync";
  if (::close(fd) != 0 && !err) err = errno, step = "close";
  if (!err && ::rename(tmp.c_str(), path.c_str()) != 0) err = errno, step = "rename";
  if (err) {
    ::unlink(tmp.c_str());
    throw io_error(concat(what, ": cannot write '", path, "': ", step, " failed: ", std::strerror(err)));
  }
  sync_parent_dir(path);
}

}  // namespace detail

/// Streams tokens into one shard. Data goes to `path.tmp.<pid>`; finish() writes the header,
/// fsyncs and renames over `path`, so readers never see a partial shard. A writer destroyed
/// (or abandon()ed) before finish() removes its temporary file and leaves `path` untouched.
class ShardWriter {
 public:
  explicit ShardWriter(std::string path, ShardFormat format = ShardFormat::u32)
      : path_(std::move(path)), tmp_(::distilx::detail::concat(path_, ".tmp.", ::getpid())), format_(format) {
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) fail_(::distilx::detail::concat("creating the temporary file '", tmp_, "' failed"), errno);
    // Placeholder header; the real one (with the count) is written by finish().
    buf_.reserve(kFlushBytes + 4);
    buf_.assign(kShardHeaderBytes, 0);
  }
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;
  ~ShardWriter() { abandon(); }

  /// Appends tokens; each must fit the format (0 <= t < 2^16 for u16, t >= 0 for u32).
  void append(const std::int32_t* tokens, std::size_t n) {
    DISTILX_REQUIRE(io_error, fd_ >= 0, "shard '", path_, "': append after finish() or abandon()");
    if (static_cast<index_t>(n) > kShardMaxTokens - count_)
      throw io_error(::distilx::detail::concat("shard '", path_, "': more than ", kShardMaxTokens,
                                               " tokens (the header stores the count as int32)"));
    const std::uint32_t limit = format_ == ShardFormat::u16 ? 0xFFFFu : 0x7FFFFFFFu;
    const std::size_t tb = shard_token_bytes(format_);
    for (std::size_t i = 0; i < n; ++i) {
      const std::int32_t t = tokens[i];
      if (t < 0 || static_cast<std::uint32_t>(t) > limit) {
        const std::string msg = ::distilx::detail::concat("shard '", path_, "': token ", t, " at offset ",
                                                          count_ + static_cast<index_t>(i), " does not fit ",
                                                          shard_format_name(format_));
        abandon();
        throw io_error(msg);
      }
      const std::size_t at = buf_.size();
      buf_.resize(at + tb);
      if (format_ == ShardFormat::u16) detail::store_u16le(buf_.data() + at, static_cast<std::uint32_t>(t));
      else detail::store_u32le(buf_.data() + at, static_cast<std::uint32_t>(t));
      if (buf_.size() >= kFlushBytes) flush_();
    }
    count_ += static_cast<index_t>(n);
  }
  void append(const std::vector<std::int32_t>& tokens) { append(tokens.data(), tokens.size()); }

  /// Tokens appended so far.
  index_t size() const { return count_; }
  const std::string& path() const { return path_; }

  /// Writes the header, fsyncs, renames the temporary file over path() and syncs the directory.
  void finish() {
    DISTILX_REQUIRE(io_error, fd_ >= 0, "shard '", path_, "': finish() called twice or after abandon()");
    flush_();
    unsigned char header[kShardHeaderBytes] = {};
    const bool u16 = format_ == ShardFormat::u16;
    detail::store_u32le(header + 0, static_cast<std::uint32_t>(u16 ? kShardMagicU16 : kShardMagicU32));
    detail::store_u32le(header + 4, static_cast<std::uint32_t>(u16 ? kShardVersionU16 : kShardVersionU32));
    detail::store_u32le(header + 8, static_cast<std::uint32_t>(count_));
    if (::lseek(fd_, 0, SEEK_SET) != 0) fail_("seek to the header", errno);
    if (const int err = detail::write_all(fd_, header, sizeof header)) fail_("writing the header", err);
    if (::fsync(fd_) != 0) fail_("fsync", errno);
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) fail_("close", errno);
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) fail_("rename of the temporary file", errno);
    detail::sync_parent_dir(path_);
  }

  /// Drops the shard: closes and removes the temporary file. Safe to call repeatedly.
  void abandon() noexcept {
    if (fd_ >= 0) {
      ::close(fd_);
      fd_ = -1;
      ::unlink(tmp_.c_str());
    }
  }

 private:
  static constexpr std::size_t kFlushBytes = 1u << 20;

  void flush_() {
    if (const int err = detail::write_all(fd_, buf_.data(), buf_.size())) fail_("write", err);
    buf_.clear();
  }

  [[noreturn]] void fail_(const std::string& step, int err) {
    abandon();
    ::unlink(tmp_.c_str());
    throw io_error(::distilx::detail::concat("shard: cannot write '", path_, "': ", step, " failed: ", std::strerror(err)));
  }

  std::string path_;
  std::string tmp_;
  ShardFormat format_;
  int fd_ = -1;
  index_t count_ = 0;
  std::vector<unsigned char> buf_;
};

/// Writes one complete shard atomically.
inline void write_shard(const std::string& path, const std::int32_t* tokens, std::size_t n,
                        ShardFormat format = ShardFormat::u32) {
  ShardWriter w(path, format);
  w.append(tokens, n);
  w.finish();
}
inline void write_shard(const std::string& path, const std::vector<std::int32_t>& tokens,
                        ShardFormat format = ShardFormat::u32) {
  write_shard(path, tokens.data(), tokens.size(), format);
}

/// A validated, memory-mapped, read-only shard. Move-only; the mapping lives as long as the
/// reader. Pages are read on demand, so opening thousands of large shards costs no I/O.
class ShardReader {
 public:
  ShardReader() = default;
  explicit ShardReader(std::string path) : path_(std::move(path)) { open_(); }
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;
  ShardReader(ShardReader&& o) noexcept { swap_(o); }
  ShardReader& operator=(ShardReader&& o) noexcept {
    if (this != &o) {
      unmap_();
      swap_(o);
    }
    return *this;
  }
  ~ShardReader() { unmap_(); }

  const std::string& path() const { return path_; }
  ShardFormat format() const { return format_; }
  /// Number of tokens.
  index_t size() const { return count_; }

  /// Raw stored value of token i (no range checks beyond a debug assertion on i).
  std::uint32_t raw(index_t i) const {
    DISTILX_ASSERT(i >= 0 && i < count_, "token index ", i, " of ", count_);
    const unsigned char* p = map_ + kShardHeaderBytes;
    return format_ == ShardFormat::u16 ? detail::load_u16le(p + 2 * i) : detail::load_u32le(p + 4 * i);
  }

  /// Copies tokens [begin, begin + count) to out. With vocab_size > 0 every token must lie in
  /// [0, vocab_size); any token must fit int32. Violations throw io_error naming the shard and
  /// the token offset.
  void read(index_t begin, index_t count, std::int32_t* out, std::int32_t vocab_size = 0) const {
    DISTILX_REQUIRE(io_error, begin >= 0 && count >= 0 && begin <= count_ - count, "token shard '", path_,
                    "': read of tokens [", begin, ", ", begin + count, ") outside [0, ", count_, ")");
    const std::uint32_t limit =
        vocab_size > 0 ? static_cast<std::uint32_t>(vocab_size) : 0x80000000u;  // exclusive bound
    const unsigned char* p = map_ + kShardHeaderBytes;
    std::uint32_t bad = 0;
    if (format_ == ShardFormat::u16) {
      for (index_t i = 0; i < count; ++i) {
        const std::uint32_t t = detail::load_u16le(p + 2 * (begin + i));
        bad |= static_cast<std::uint32_t>(t >= limit);
        out[i] = static_cast<std::int32_t>(t);
      }
    } else {
      for (index_t i = 0; i < count; ++i) {
        const std::uint32_t t = detail::load_u32le(p + 4 * (begin + i));
        bad |= static_cast<std::uint32_t>(t >= limit);
        out[i] = static_cast<std::int32_t>(t);
      }
    }
    // The copy loop only accumulates a flag (keeps it branch-free); locate the culprit on failure.
    if (bad) {
      for (index_t i = begin; i < begin + count; ++i)
        if (raw(i) >= limit) fail_range_(i, vocab_size);
    }
  }

  /// Scans every token against [0, vocab_size) (touches the whole file; used when a caller
  /// wants bad data rejected up front rather than when a batch reaches it).
  void check_tokens(std::int32_t vocab_size) const {
    std::vector<std::int32_t> chunk(1 << 16);
    for (index_t b = 0; b < count_; b += static_cast<index_t>(chunk.size()))
      read(b, std::min<index_t>(static_cast<index_t>(chunk.size()), count_ - b), chunk.data(), vocab_size);
  }

 private:
  [[noreturn]] void fail_range_(index_t i, std::int32_t vocab_size) const {
    const index_t byte = static_cast<index_t>(kShardHeaderBytes) + i * static_cast<index_t>(shard_token_bytes(format_));
    if (vocab_size > 0)
      throw io_error(::distilx::detail::concat("token shard '", path_, "': token ", raw(i), " at token offset ", i,
                                               " (byte ", byte, ") is outside the vocabulary [0, ", vocab_size, ")"));
    throw io_error(::distilx::detail::concat("token shard '", path_, "': token ", raw(i), " at token offset ", i,
                                             " (byte ", byte, ") does not fit int32"));
  }

  [[noreturn]] void fail_(const std::string& msg) const {
    throw io_error(::distilx::detail::concat("token shard '", path_, "': ", msg));
  }

  void open_() {
    using ::distilx::detail::concat;
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail_(concat("cannot open: ", std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      fail_(concat("cannot stat: ", std::strerror(err)));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      fail_("not a regular file");
    }
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size < kShardHeaderBytes) {
      ::close(fd);
      fail_(concat("file is ", size, " bytes, shorter than the ", kShardHeaderBytes, "-byte header (truncated?)"));
    }
    void* p = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_SHARED, fd, 0);
    const int err = errno;
    ::close(fd);  // the mapping keeps the contents reachable
    if (p == MAP_FAILED) fail_(concat("mmap failed: ", std::strerror(err)));
    map_ = static_cast<const unsigned char*>(p);
    map_size_ = static_cast<std::size_t>(size);

    const auto magic = static_cast<std::int32_t>(detail::load_u32le(map_));
    const auto version = static_cast<std::int32_t>(detail::load_u32le(map_ + 4));
    const auto count = static_cast<std::int32_t>(detail::load_u32le(map_ + 8));
    if (magic == kShardMagicU32) {
      format_ = ShardFormat::u32;
      if (version != kShardVersionU32)
        fail_(concat("unsupported version ", version, " for magic ", magic, " (uint32 tokens); expected ",
                     kShardVersionU32));
    } else if (magic == kShardMagicU16) {
      format_ = ShardFormat::u16;
      if (version != kShardVersionU16)
        fail_(concat("unsupported version ", version, " for magic ", magic, " (uint16 tokens); expected ",
                     kShardVersionU16));
    } else {
      fail_(concat("bad magic ", magic, "; expected ", kShardMagicU32, " (uint32 tokens) or ", kShardMagicU16,
                   " (uint16 tokens) — not a token shard"));
    }
    if (count < 0) fail_(concat("negative token count ", count, " in the header"));
    const std::uint64_t expected = kShardHeaderBytes + std::uint64_t(count) * shard_token_bytes(format_);
    if (size != expected)
      fail_(concat("header says ", count, " ", shard_format_name(format_), " tokens, so the file should be ",
                   expected, " bytes, but it is ", size, " bytes (", size < expected ? "truncated" : "trailing data",
                   ")"));
    count_ = count;
  }

  void unmap_() noexcept {
    if (map_) ::munmap(const_cast<unsigned char*>(map_), map_size_);
    map_ = nullptr;
    map_size_ = 0;
  }

  void swap_(ShardReader& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(format_, o.format_);
    std::swap(count_, o.count_);
    std::swap(map_, o.map_);
    std::swap(map_size_, o.map_size_);
  }

  std::string path_;
  ShardFormat format_ = ShardFormat::u32;
  index_t count_ = 0;
  const unsigned char* map_ = nullptr;
  std::size_t map_size_ = 0;
};

/// A dataset of shards, as build_corpus produces it and `<prefix>.json` records it.
struct CorpusManifest {
  std::int32_t vocab_size = 0;
  std::int32_t eos_id = -1;
  ShardFormat format = ShardFormat::u32;
  std::vector<std::string> shard_paths;  ///< usable paths (the JSON stores file names relative to itself)
  std::vector<index_t> shard_tokens;     ///< token count of each shard
  index_t total_tokens = 0;
  index_t documents = 0;
  std::vector<std::string> sources;  ///< input paths as given
};

namespace detail {

inline std::string manifest_path_for(const std::string& prefix) { return prefix + ".json"; }

inline std::string file_name_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace detail

/// Writes `m` as JSON to `path` atomically; shard paths are stored by file name, relative to
/// the manifest's directory, so the dataset directory can be moved as a whole.
inline void write_manifest(const std::string& path, const CorpusManifest& m) {
  nlohmann::ordered_json j;
  j["format"] = "distilx.token_shards";
  j["version"] = 1;
  j["token_dtype"] = shard_format_name(m.format);
  j["vocab_size"] = m.vocab_size;
  j["eos_id"] = m.eos_id;
  j["total_tokens"] = m.total_tokens;
  j["documents"] = m.documents;
  j["shards"] = nlohmann::ordered_json::array();
  for (std::size_t i = 0; i < m.shard_paths.size(); ++i)
    j["shards"].push_back({{"file", detail::file_name_of(m.shard_paths[i])}, {"tokens", m.shard_tokens[i]}});
  j["sources"] = m.sources;
  std::string text;
  try {
    text = j.dump(1) + "\n";
  } catch (const nlohmann::json::exception& e) {
    throw io_error(::distilx::detail::concat("manifest '", path, "': cannot encode (", e.what(),
                                             "); source paths must be valid UTF-8"));
  }
  detail::write_file_atomic(path, text, "manifest");
}

/// Reads a manifest; shard paths come back resolved against the manifest's directory.
inline CorpusManifest read_manifest(const std::string& path) {
  using ::distilx::detail::concat;
  std::ifstream in(path, std::ios::binary);
  if (!in) throw io_error(concat("manifest '", path, "': cannot open: ", std::strerror(errno)));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CorpusManifest m;
  try {
    const auto j = nlohmann::json::parse(text);
    if (j.value("format", std::string()) != "distilx.token_shards")
      throw io_error(concat("manifest '", path, "': \"format\" is not \"distilx.token_shards\""));
    const std::string dtype = j.at("token_dtype").get<std::string>();
    if (dtype == "uint32") m.format = ShardFormat::u32;
    else if (dtype == "uint16") m.format = ShardFormat::u16;
    else throw io_error(concat("manifest '", path, "': unknown token_dtype \"", dtype, "\""));
    m.vocab_size = j.at("vocab_size").get<std::int32_t>();
    m.eos_id = j.at("eos_id").get<std::int32_t>();
    m.total_tokens = j.at("total_tokens").get<index_t>();
    m.documents = j.value("documents", index_t(0));
    const auto slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
    index_t sum = 0;
    for (const auto& s : j.at("shards")) {
      const std::string file = s.at("file").get<std::string>();
      m.shard_paths.push_back(!file.empty() && file[0] == '/' ? file : dir + file);
      m.shard_tokens.push_back(s.at("tokens").get<index_t>());
      sum += m.shard_tokens.back();
    }
    if (j.contains("sources")) m.sources = j.at("sources").get<std::vector<std::string>>();
    if (sum != m.total_tokens)
      throw io_error(concat("manifest '", path, "': shard token counts sum to ", sum, " but total_tokens is ",
                            m.total_tokens));
  } catch (const nlohmann::json::exception& e) {
    throw io_error(concat("manifest '", path, "': malformed (", e.what(), ")"));
  }
  return m;
}

}  // namespace distilx::data
