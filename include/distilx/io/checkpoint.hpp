// Training checkpoints: versioned, self-describing, checksummed files written
// atomically. Payload (cereal portable binary): magic, format version, a JSON
// document (configuration, counters, schedule/loader/RNG state) and named
// binary blobs (flat parameters, optimizer moments). A trailer holds the
// FNV-1a-64 checksum of the payload, so truncation and corruption are detected
// before anything is deserialised.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include <cereal/archives/portable_binary.hpp>
#include <cereal/types/map.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>
#include <nlohmann/json.hpp>

#include "distilx/core/error.hpp"

namespace distilx::io {

inline constexpr std::uint32_t kCheckpointVersion = 1;
inline constexpr char kCheckpointMagic[9] = "DISTILXC";
inline constexpr char kCheckpointTrailer[9] = "DXCKPEND";

struct Checkpoint {
  nlohmann::json meta;                                 // configuration, step, epoch, states
  std::map<std::string, std::vector<char>> blobs;      // raw little-endian arrays

  template <class T>
  void put(const std::string& name, const T* data, std::size_t n) {
    auto& b = blobs[name];
    b.resize(n * sizeof(T));
    if (n) std::memcpy(b.data(), data, n * sizeof(T));
  }
  /// Copies blob `name` into dst; the element count must match exactly.
  template <class T>
  void get(const std::string& name, T* dst, std::size_t n, const std::string& origin = "checkpoint") const {
    auto it = blobs.find(name);
    DISTILX_REQUIRE(io_error, it != blobs.end(), origin, ": missing array '", name, "'");
    DISTILX_REQUIRE(io_error, it->second.size() == n * sizeof(T), origin, ": array '", name, "' holds ",
                    it->second.size(), " bytes, expected ", n * sizeof(T), " (", n, " elements of ", sizeof(T),
                    " bytes)");
    if (n) std::memcpy(dst, it->second.data(), n * sizeof(T));
  }
};

namespace detail {
inline std::uint64_t fnv1a64(const char* p, std::size_t n, std::uint64_t h = 0xcbf29ce484222325ull) {
  for (std::size_t i = 0; i < n; ++i) {
    h ^= static_cast<unsigned char>(p[i]);
    h *= 0x100000001b3ull;
  }
  return h;
}
}  // namespace detail

/// Writes to `path + ".tmp"`, fsyncs, renames. On failure (e.g. disk full) the temp file
/// is removed, an existing file at `path` is untouched, and io_error says why.
inline void save_checkpoint(const Checkpoint& ck, const std::string& path) {
  std::ostringstream os(std::ios::binary);
  {
    cereal::PortableBinaryOutputArchive ar(os);
    std::string magic(kCheckpointMagic);
    std::uint32_t version = kCheckpointVersion;
    std::string meta = ck.meta.dump();
    ar(magic, version, meta, ck.blobs);
  }
  std::string bytes = os.str();
  const std::uint64_t sum = detail::fnv1a64(bytes.data(), bytes.size());
  char trailer[16];
  for (int i = 0; i < 8; ++i) trailer[i] = static_cast<char>((sum >> (8 * i)) & 0xff);
  std::memcpy(trailer + 8, kCheckpointTrailer, 8);
  bytes.append(trailer, 16);

  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  DISTILX_REQUIRE(io_error, fd >= 0, "cannot create checkpoint file ", tmp, ": ", std::strerror(errno));
  std::size_t off = 0;
  int err = 0;
  while (off < bytes.size()) {
    const ssize_t w = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (w < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    off += static_cast<std::size_t>(w);
  }
  if (!err && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && !err) err = errno;
  if (err) {
    ::unlink(tmp.c_str());
    throw io_error(distilx::detail::concat("writing checkpoint ", path, " failed: ", std::strerror(err),
                                           " (the previous checkpoint, if any, is intact)"));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    err = errno;
    ::unlink(tmp.c_str());
    throw io_error(distilx::detail::concat("cannot move checkpoint into place at ", path, ": ", std::strerror(err)));
  }
}

inline Checkpoint load_checkpoint(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DISTILX_REQUIRE(io_error, in.good(), "cannot open checkpoint ", path, ": ", std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  DISTILX_REQUIRE(io_error, bytes.size() >= 16 + 8, "checkpoint ", path, " is truncated (", bytes.size(),
                  " bytes); use an earlier checkpoint");
  DISTILX_REQUIRE(io_error, std::memcmp(bytes.data() + bytes.size() - 8, kCheckpointTrailer, 8) == 0,
                  "checkpoint ", path, " is truncated or not a distilx checkpoint (no end marker); use an earlier checkpoint");
  std::uint64_t stored = 0;
  for (int i = 0; i < 8; ++i)
    stored |= std::uint64_t(static_cast<unsigned char>(bytes[bytes.size() - 16 + static_cast<std::size_t>(i)])) << (8 * i);
  const std::size_t payload = bytes.size() - 16;
  DISTILX_REQUIRE(io_error, detail::fnv1a64(bytes.data(), payload) == stored, "checkpoint ", path,
                  " is corrupted (checksum mismatch); use an earlier checkpoint");
  Checkpoint ck;
  try {
    std::istringstream is(bytes.substr(0, payload), std::ios::binary);
    cereal::PortableBinaryInputArchive ar(is);
    std::string magic, meta;
    std::uint32_t version = 0;
    ar(magic, version);
    DISTILX_REQUIRE(io_error, magic == kCheckpointMagic, "file ", path, " is not a distilx checkpoint");
    DISTILX_REQUIRE(io_error, version <= kCheckpointVersion, "checkpoint ", path, " has format version ", version,
                    " but this distilx reads versions up to ", kCheckpointVersion, "; upgrade distilx");
    ar(meta, ck.blobs);
    ck.meta = nlohmann::json::parse(meta);
  } catch (const io_error&) {
    throw;
  } catch (const std::exception& e) {
    throw io_error(distilx::detail::concat("checkpoint ", path, " could not be decoded: ", e.what()));
  }
  return ck;
}

/// Lists the differences between two JSON configurations as "key: a -> b" lines
/// (nested keys joined by '.'), so a resume with another configuration can say what differs.
inline std::vector<std::string> config_differences(const nlohmann::json& a, const nlohmann::json& b,
                                                   const std::string& prefix = "") {
  std::vector<std::string> out;
  if (a.is_object() && b.is_object()) {
    for (auto it = a.begin(); it != a.end(); ++it) {
      const std::string k = prefix + it.key();
      if (!b.contains(it.key()))
        out.push_back(k + ": " + it.value().dump() + " -> (absent)");
      else {
        auto sub = config_differences(it.value(), b.at(it.key()), k + ".");
        out.insert(out.end(), sub.begin(), sub.end());
      }
    }
    for (auto it = b.begin(); it != b.end(); ++it)
      if (!a.contains(it.key())) out.push_back(prefix + it.key() + ": (absent) -> " + it.value().dump());
  } else if (a != b) {
    out.push_back((prefix.empty() ? std::string("value") : prefix.substr(0, prefix.size() - 1)) + ": " + a.dump() +
                  " -> " + b.dump());
  }
  return out;
}

/// Checkpoint files in `dir` named `ckpt_<step>.dxc`, sorted by step (ascending).
inline std::vector<std::pair<long long, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<long long, std::string>> out;
  namespace fs = std::filesystem;
  if (!fs::exists(dir)) return out;
  const std::regex re("ckpt_([0-9]+)\\.dxc");
  for (const auto& e : fs::directory_iterator(dir)) {
    std::smatch m;
    const std::string name = e.path().filename().string();
    if (std::regex_match(name, m, re)) out.emplace_back(std::stoll(m[1]), e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

/// Removes all but the newest `keep` checkpoints in `dir`.
inline void prune_checkpoints(const std::string& dir, std::size_t keep) {
  auto all = list_checkpoints(dir);
  while (all.size() > keep) {
    std::filesystem::remove(all.front().second);
    all.erase(all.begin());
  }
}

}  // namespace distilx::io
