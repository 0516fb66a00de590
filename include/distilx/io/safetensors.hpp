// safetensors reading and writing: SafetensorsFile memory-maps a file, validates
// its header completely up front and converts tensors into caller buffers;
// SafetensorsWriter collects tensors and writes a Python-compatible file atomically.
// Format: u64 LE header length N, N bytes of JSON, then little-endian row-major data.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "distilx/core/error.hpp"
#include "distilx/io/dtype.hpp"
#include "distilx/tensor/tensor.hpp"

namespace distilx::io {

/// Header entry of one tensor. begin/end are absolute byte offsets in the file (not
/// relative to the data section as in the JSON), so raw access needs no further arithmetic.
struct TensorInfo {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  std::uint64_t begin = 0, end = 0;
  index_t numel() const { return ::distilx::numel(shape); }
};

namespace detail {

/// Headers above this are rejected before parsing (same limit as the reference implementation),
/// so a corrupt length field cannot make us parse gigabytes of garbage.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

inline constexpr bool kLittleEndianHost = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;

template <class U>
U byteswap_uint(U v) {
  U r = 0;
  for (std::size_t i = 0; i < sizeof(U); ++i) r = static_cast<U>((r << 8) | ((v >> (8 * i)) & 0xFF));
  return r;
}

/// Unsigned integer of the given byte width, for bit-level loads and stores.
template <std::size_t N>
using uint_of_size = std::conditional_t<
    N == 1, std::uint8_t,
    std::conditional_t<N == 2, std::uint16_t, std::conditional_t<N == 4, std::uint32_t, std::uint64_t>>>;

/// Reads a little-endian V from possibly unaligned memory (headers of arbitrary length leave
/// the data section unaligned in files not written by HF tools).
template <class V>
V load_le(const unsigned char* p) {
  using U = uint_of_size<sizeof(V)>;
  U u;
  std::memcpy(&u, p, sizeof(U));
  if constexpr (!kLittleEndianHost) u = byteswap_uint(u);
  V v;
  std::memcpy(&v, &u, sizeof(V));
  return v;
}

template <class V>
void store_le(unsigned char* p, V v) {
  using U = uint_of_size<sizeof(V)>;
  U u;
  std::memcpy(&u, &v, sizeof(U));
  if constexpr (!kLittleEndianHost) u = byteswap_uint(u);
  std::memcpy(p, &u, sizeof(U));
}

/// a * b, or false on uint64 overflow (shapes come from untrusted files).
inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  return !__builtin_mul_overflow(a, b, &out);
}

inline std::string range_string(std::uint64_t b, std::uint64_t e) {
  return ::distilx::detail::concat('[', b, ", ", e, ']');
}

}  // namespace detail

/// Read-only view of a safetensors file. The whole header is validated in the constructor,
/// so every later accessor can trust offsets and sizes.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path) : path_(path) {
    open_and_map_();
    try {
      parse_header_();
    } catch (...) {
      unmap_();
      throw;
    }
  }
  ~SafetensorsFile() { unmap_(); }

  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  SafetensorsFile(SafetensorsFile&& o) noexcept
      : path_(std::move(o.path_)),
        map_(std::exchange(o.map_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        tensors_(std::move(o.tensors_)),
        metadata_(std::move(o.metadata_)) {}
  SafetensorsFile& operator=(SafetensorsFile&& o) noexcept {
    if (this != &o) {
      unmap_();
      path_ = std::move(o.path_);
      map_ = std::exchange(o.map_, nullptr);
      size_ = std::exchange(o.size_, 0);
      tensors_ = std::move(o.tensors_);
      metadata_ = std::move(o.metadata_);
    }
    return *this;
  }

  const std::string& path() const { return path_; }
  /// Total file size in bytes.
  std::uint64_t file_size() const { return size_; }
  std::size_t size() const { return tensors_.size(); }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }

  const TensorInfo& info(const std::string& name) const {
    auto it = tensors_.find(name);
    if (it == tensors_.end())
      throw io_error(::distilx::detail::concat(where_(name), "no such tensor (the file holds ", tensors_.size(),
                                               " tensors)"));
    return it->second;
  }

  /// Tensor names in file order (by data offset; ties, i.e. empty tensors, by name).
  std::vector<std::string> names() const {
    std::vector<const TensorInfo*> v;
    v.reserve(tensors_.size());
    for (const auto& kv : tensors_) v.push_back(&kv.second);
    std::sort(v.begin(), v.end(), [](const TensorInfo* a, const TensorInfo* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->name < b->name;
    });
    std::vector<std::string> out;
    out.reserve(v.size());
    for (const TensorInfo* t : v) out.push_back(t->name);
    return out;
  }

  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  /// Pointer to the stored little-endian bytes (not necessarily aligned for the dtype).
  const void* raw(const std::string& name) const { return map_ + info(name).begin; }

  /// Converts the stored elements into dst[0..count). Floating dtypes read into floating T;
  /// integer and BOOL dtypes read into any arithmetic T (integer targets are range-checked).
  template <class T>
  void read(const std::string& name, T* dst, index_t count) const {
    const TensorInfo& ti = info(name);
    if (ti.numel() != count)
      throw io_error(::distilx::detail::concat(where_(name), "expected ", count, " elements, found shape ",
                                               ::distilx::detail::shape_string(ti.shape), " (", ti.numel(),
                                               " elements)"));
    convert_(ti, dst);
  }

  /// Same, and the stored shape must equal `expected` exactly.
  template <class T>
  void read(const std::string& name, T* dst, const Shape& expected) const {
    const TensorInfo& ti = info(name);
    if (ti.shape != expected)
      throw io_error(::distilx::detail::concat(where_(name), "expected shape ",
                                               ::distilx::detail::shape_string(expected), ", found shape ",
                                               ::distilx::detail::shape_string(ti.shape)));
    convert_(ti, dst);
  }

  template <class T>
  std::vector<T> read(const std::string& name) const {
    const TensorInfo& ti = info(name);
    if constexpr (std::is_same_v<T, bool>) {
      // std::vector<bool> has no contiguous storage to convert into.
      std::vector<unsigned char> tmp(static_cast<std::size_t>(ti.numel()));
      convert_(ti, tmp.data(), /*as_bool=*/true);
      return std::vector<bool>(tmp.begin(), tmp.end());
    } else {
      std::vector<T> out(static_cast<std::size_t>(ti.numel()));
      convert_(ti, out.data());
      return out;
    }
  }

 private:
  std::string where_(const std::string& tensor = std::string()) const {
    if (tensor.empty()) return ::distilx::detail::concat("safetensors file '", path_, "': ");
    return ::distilx::detail::concat("safetensors file '", path_, "', tensor '", tensor, "': ");
  }

  void open_and_map_() {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw io_error(::distilx::detail::concat(where_(), "cannot open: ", std::strerror(errno)));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw io_error(::distilx::detail::concat(where_(), "cannot stat: ", std::strerror(err)));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw io_error(::distilx::detail::concat(where_(), "not a regular file"));
    }
    const auto size = static_cast<std::uint64_t>(st.st_size);
    if (size < 8) {
      ::close(fd);
      throw io_error(::distilx::detail::concat(where_(), "file is ", size,
                                               " bytes, shorter than the 8-byte header length field"));
    }
    void* p = ::mmap(nullptr, static_cast<std::size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);  // the mapping keeps the file contents reachable
    if (p == MAP_FAILED) throw io_error(::distilx::detail::concat(where_(), "mmap failed: ", std::strerror(err)));
    map_ = static_cast<const unsigned char*>(p);
    size_ = size;
  }

  void unmap_() noexcept {
    if (map_) ::munmap(const_cast<unsigned char*>(map_), static_cast<std::size_t>(size_));
    map_ = nullptr;
    size_ = 0;
  }

  [[noreturn]] void fail_(const std::string& tensor, const std::string& msg) const {
    throw io_error(where_(tensor) + msg);
  }

  void parse_header_() {
    using nlohmann::json;
    using ::distilx::detail::concat;
    const std::uint64_t n = detail::load_le<std::uint64_t>(map_);
    if (n > detail::kMaxHeaderBytes)
      fail_({}, concat("header length ", n, " exceeds the limit of ", detail::kMaxHeaderBytes, " bytes"));
    if (n > size_ - 8)
      fail_({}, concat("header length ", n, " runs past the end of the file (", size_ - 8,
                       " bytes follow the length field)"));
    const auto* hb = reinterpret_cast<const char*>(map_ + 8);
    json header;
    try {
      header = json::parse(hb, hb + n);
    } catch (const json::exception& e) {
      fail_({}, concat("header is not valid JSON (", e.what(), ")"));
    }
    if (!header.is_object()) fail_({}, concat("header must be a JSON object, found ", header.type_name()));

    const std::uint64_t data_start = 8 + n;
    const std::uint64_t data_size = size_ - data_start;
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) fail_({}, concat("\"__metadata__\" must be an object of strings, found ", v.type_name()));
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string())
            fail_({}, concat("\"__metadata__\" must be an object of strings, but key '", m.key(), "' holds a ",
                             m.value().type_name()));
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      tensors_[name] = parse_entry_(name, v, data_start, data_size);
    }
    check_overlaps_();
  }

  TensorInfo parse_entry_(const std::string& name, const nlohmann::json& v, std::uint64_t data_start,
                          std::uint64_t data_size) const {
    using ::distilx::detail::concat;
    if (!v.is_object())
      fail_(name, concat("entry must be an object with dtype, shape and data_offsets, found ", v.type_name()));
    TensorInfo ti;
    ti.name = name;

    auto dt = v.find("dtype");
    if (dt == v.end() || !dt->is_string()) fail_(name, "missing or non-string \"dtype\"");
    try {
      ti.dtype = dtype_from_name(dt->get<std::string>());
    } catch (const io_error& e) {
      fail_(name, e.what());
    }

    auto sh = v.find("shape");
    if (sh == v.end() || !sh->is_array())
      fail_(name, concat("\"shape\" must be an array of non-negative integers, found ",
                         sh == v.end() ? "nothing" : sh->dump()));
    std::uint64_t count = 1;
    for (const auto& d : *sh) {
      // Non-negative JSON integers parse as unsigned; negative ones and floats are rejected.
      if (!d.is_number_unsigned() || d.get<std::uint64_t>() > std::uint64_t(std::numeric_limits<index_t>::max()))
        fail_(name, concat("\"shape\" must be an array of non-negative integers, found ", sh->dump()));
      const auto dim = d.get<std::uint64_t>();
      if (!detail::checked_mul(count, dim, count)) fail_(name, concat("shape ", sh->dump(), " overflows"));
      ti.shape.push_back(static_cast<index_t>(dim));
    }
    std::uint64_t nbytes = 0;
    if (count > std::uint64_t(std::numeric_limits<index_t>::max()) ||
        !detail::checked_mul(count, dtype_size(ti.dtype), nbytes))
      fail_(name, concat("shape ", sh->dump(), " overflows"));

    auto off = v.find("data_offsets");
    if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      fail_(name, concat("\"data_offsets\" must be [begin, end] with non-negative integers, found ",
                         off == v.end() ? "nothing" : off->dump()));
    const auto b = (*off)[0].get<std::uint64_t>();
    const auto e = (*off)[1].get<std::uint64_t>();
    if (b > e) fail_(name, concat("\"data_offsets\" ", detail::range_string(b, e), " has begin > end"));
    if (e - b != nbytes)
      fail_(name, concat("data_offsets ", detail::range_string(b, e), " span ", e - b, " bytes, but shape ",
                         ::distilx::detail::shape_string(ti.shape), " of ", dtype_name(ti.dtype), " needs ", count,
                         " x ", dtype_size(ti.dtype), " = ", nbytes, " bytes"));
    if (e > data_size)
      fail_(name, concat("data_offsets ", detail::range_string(b, e), " run past the end of the data section (",
                         data_size, " bytes; file is ", size_, " bytes)"));
    ti.begin = data_start + b;
    ti.end = data_start + e;
    return ti;
  }

  void check_overlaps_() const {
    std::vector<const TensorInfo*> v;
    for (const auto& kv : tensors_)
      if (kv.second.end > kv.second.begin) v.push_back(&kv.second);  // empty ranges cannot collide
    std::sort(v.begin(), v.end(), [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
    const TensorInfo* reach = nullptr;  // the tensor extending furthest so far
    for (const TensorInfo* t : v) {
      if (reach && t->begin < reach->end) {
        const std::uint64_t ds = 8 + detail::load_le<std::uint64_t>(map_);
        fail_({}, ::distilx::detail::concat("tensors '", reach->name, "' ",
                                            detail::range_string(reach->begin - ds, reach->end - ds), " and '",
                                            t->name, "' ", detail::range_string(t->begin - ds, t->end - ds),
                                            " overlap in the data section"));
      }
      if (!reach || t->end > reach->end) reach = t;
    }
  }

  // Element conversion. The dtype switch sits outside the loops so each loop is a tight
  // load/convert/store; a same-dtype read on a little-endian host is a plain memcpy.
  template <class T>
  void convert_(const TensorInfo& ti, T* dst, bool as_bool = false) const {
    static_assert(std::is_arithmetic_v<T>, "read: T must be an arithmetic type");
    const unsigned char* p = map_ + ti.begin;
    const auto n = static_cast<std::size_t>(ti.numel());
    if constexpr (!std::is_same_v<T, bool> && has_dtype_v<T>) {
      if (!as_bool && detail::kLittleEndianHost && dtype_of<T>() == ti.dtype && ti.dtype != DType::boolean) {
        if (n) std::memcpy(dst, p, n * sizeof(T));
        return;
      }
    }
    switch (ti.dtype) {
      case DType::f64: return from_float_<T, double>(ti, p, n, dst, [](double x) { return x; });
      case DType::f32: return from_float_<T, float>(ti, p, n, dst, [](float x) { return x; });
      case DType::f16: return from_float_<T, std::uint16_t>(ti, p, n, dst, f16_to_float);
      case DType::bf16: return from_float_<T, std::uint16_t>(ti, p, n, dst, bf16_to_float);
      case DType::i64: return from_int_<T, std::int64_t>(ti, p, n, dst, as_bool);
      case DType::i32: return from_int_<T, std::int32_t>(ti, p, n, dst, as_bool);
      case DType::u32: return from_int_<T, std::uint32_t>(ti, p, n, dst, as_bool);
      case DType::i16: return from_int_<T, std::int16_t>(ti, p, n, dst, as_bool);
      case DType::u16: return from_int_<T, std::uint16_t>(ti, p, n, dst, as_bool);
      case DType::i8: return from_int_<T, std::int8_t>(ti, p, n, dst, as_bool);
      case DType::u8:
      case DType::boolean: return from_int_<T, std::uint8_t>(ti, p, n, dst, as_bool);
    }
  }

  template <class T, class S, class F>
  void from_float_(const TensorInfo& ti, const unsigned char* p, std::size_t n, T* dst, F widen) const {
    if constexpr (std::is_floating_point_v<T>) {
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(widen(detail::load_le<S>(p + i * sizeof(S))));
    } else {
      // Silently truncating weights to integers is never what a caller wants.
      (void)p, (void)n, (void)dst, (void)widen;
      fail_(ti.name, ::distilx::detail::concat("stored as ", dtype_name(ti.dtype),
                                               ", which cannot be read into an integer type; read it as float or "
                                               "double"));
    }
  }

  template <class T, class S>
  void from_int_(const TensorInfo& ti, const unsigned char* p, std::size_t n, T* dst, bool as_bool) const {
    for (std::size_t i = 0; i < n; ++i) {
      const auto s = static_cast<std::int64_t>(detail::load_le<S>(p + i * sizeof(S)));
      if constexpr (std::is_floating_point_v<T>) {
        dst[i] = static_cast<T>(s);
      } else {
        // Range check so a narrowing read (I64 into int32, ...) cannot corrupt values silently.
        bool fits;
        if (as_bool || std::is_same_v<T, bool>) fits = s == 0 || s == 1;
        else if constexpr (std::is_signed_v<T>)
          fits = s >= std::int64_t(std::numeric_limits<T>::min()) && s <= std::int64_t(std::numeric_limits<T>::max());
        else
          fits = s >= 0 && std::uint64_t(s) <= std::uint64_t(std::numeric_limits<T>::max());
        if (!fits)
          fail_(ti.name, ::distilx::detail::concat("element ", i, " has value ", s,
                                                   ", which does not fit the requested ",
                                                   as_bool ? "bool" : "integer", " type"));
        dst[i] = static_cast<T>(s);
      }
    }
  }

  std::string path_;
  const unsigned char* map_ = nullptr;
  std::uint64_t size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

/// Collects tensors in memory and writes them as one safetensors file.
class SafetensorsWriter {
 public:
  /// Copies `data`, stored as dtype_of<T>() (bool as BOOL bytes 0/1).
  template <class T>
  void add(const std::string& name, const Shape& shape, const T* data) {
    static_assert(std::is_arithmetic_v<T>, "add: T must be an arithmetic type");
    Entry& e = new_entry_(name, dtype_of<T>(), shape);
    for (std::size_t i = 0; i < e.bytes.size() / sizeof(T); ++i) {
      if constexpr (std::is_same_v<T, bool>) e.bytes[i] = data[i] ? 1 : 0;
      else detail::store_le(e.bytes.data() + i * sizeof(T), data[i]);
    }
  }

  /// Stores already-encoded little-endian bytes; `bytes` must equal numel(shape) * dtype_size(dtype).
  void add_raw(const std::string& name, DType dtype, const Shape& shape, const void* data, std::size_t bytes) {
    check_shape_(name, shape);
    const std::uint64_t need = std::uint64_t(::distilx::numel(shape)) * dtype_size(dtype);
    if (bytes != need)
      throw shape_error(::distilx::detail::concat("SafetensorsWriter: tensor '", name, "': shape ",
                                                  ::distilx::detail::shape_string(shape), " of ", dtype_name(dtype),
                                                  " needs ", need, " bytes, got ", bytes));
    Entry& e = new_entry_(name, dtype, shape);
    if (bytes) std::memcpy(e.bytes.data(), data, bytes);
  }

  /// Stores arithmetic data converted to a floating dtype (F64, F32, F16, BF16), rounding to
  /// nearest-even (double sources are rounded once, not via float).
  template <class T>
  void add_as(const std::string& name, DType stored, const Shape& shape, const T* data) {
    static_assert(std::is_arithmetic_v<T>, "add_as: T must be an arithmetic type");
    if (!dtype_is_floating(stored))
      throw io_error(::distilx::detail::concat("SafetensorsWriter: tensor '", name, "': add_as stores F64, F32, F16 "
                                               "or BF16, not ",
                                               dtype_name(stored), "; use add() for integer data"));
    Entry& e = new_entry_(name, stored, shape);
    const std::size_t n = e.bytes.size() / dtype_size(stored);
    unsigned char* out = e.bytes.data();
    for (std::size_t i = 0; i < n; ++i) {
      const double x = static_cast<double>(data[i]);
      switch (stored) {
        case DType::f64: detail::store_le(out + 8 * i, x); break;
        case DType::f32: detail::store_le(out + 4 * i, static_cast<float>(x)); break;
        case DType::f16: detail::store_le(out + 2 * i, double_to_f16(x)); break;
        case DType::bf16: detail::store_le(out + 2 * i, double_to_bf16(x)); break;
        default: break;  // rejected above
      }
    }
  }

  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

  std::size_t size() const { return entries_.size(); }

  /// The complete file contents: length field, space-padded JSON header, then tensor data
  /// packed back to back in insertion order.
  std::vector<unsigned char> serialize() const {
    const std::string header = header_();
    std::uint64_t total = 8 + header.size();
    for (const Entry& e : entries_) total += e.bytes.size();
    std::vector<unsigned char> out;
    out.reserve(static_cast<std::size_t>(total));
    out.resize(8);
    detail::store_le(out.data(), std::uint64_t(header.size()));
    out.insert(out.end(), header.begin(), header.end());
    for (const Entry& e : entries_) out.insert(out.end(), e.bytes.begin(), e.bytes.end());
    return out;
  }

  /// Atomic write: data goes to path + ".tmp.<pid>", is fsynced, then renamed over path.
  /// On failure the temporary file is removed, an existing file at path is untouched, and
  /// io_error says why (with the errno text).
  void write(const std::string& path) const {
    using ::distilx::detail::concat;
    const std::string header = header_();
    unsigned char len[8];
    detail::store_le(len, std::uint64_t(header.size()));

    const std::string tmp = concat(path, ".tmp.", ::getpid());
    const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
      throw io_error(concat("safetensors: cannot write '", path, "': creating temporary file '", tmp,
                            "' failed: ", std::strerror(errno)));
    auto fail = [&](const char* step, int err, bool fd_open) {
      if (fd_open) ::close(fd);
      ::unlink(tmp.c_str());
      throw io_error(concat("safetensors: cannot write '", path, "': ", step, " failed: ", std::strerror(err)));
    };
    auto put = [&](const void* buf, std::size_t n) {
      const char* c = static_cast<const char*>(buf);
      while (n > 0) {
        const ::ssize_t w = ::write(fd, c, n);
        if (w < 0) {
          if (errno == EINTR) continue;
          fail("write", errno, true);
        }
        if (w == 0) fail("write", EIO, true);
        c += w;
        n -= static_cast<std::size_t>(w);
      }
    };
    put(len, 8);
    put(header.data(), header.size());
    for (const Entry& e : entries_) put(e.bytes.data(), e.bytes.size());
    if (::fsync(fd) != 0) fail("fsync", errno, true);
    if (::close(fd) != 0) fail("close", errno, false);
    if (::rename(tmp.c_str(), path.c_str()) != 0) fail("rename of the temporary file", errno, false);
    sync_parent_dir_(path);
  }

 private:
  struct Entry {
    std::string name;
    DType dtype;
    Shape shape;
    std::vector<unsigned char> bytes;
  };

  static void check_shape_(const std::string& name, const Shape& shape) {
    for (index_t d : shape)
      if (d < 0)
        throw shape_error(::distilx::detail::concat("SafetensorsWriter: tensor '", name, "': negative dimension in shape ",
                                                    ::distilx::detail::shape_string(shape)));
  }

  Entry& new_entry_(const std::string& name, DType dtype, const Shape& shape) {
    check_shape_(name, shape);
    if (name == "__metadata__")
      throw io_error("SafetensorsWriter: \"__metadata__\" is reserved and cannot name a tensor");
    for (const Entry& e : entries_)
      if (e.name == name) throw io_error(::distilx::detail::concat("SafetensorsWriter: duplicate tensor '", name, "'"));
    Entry e{name, dtype, shape, {}};
    e.bytes.resize(static_cast<std::size_t>(::distilx::numel(shape)) * dtype_size(dtype));
    entries_.push_back(std::move(e));
    return entries_.back();
  }

  // Same layout as the Python library: compact JSON, "__metadata__" first, keys
  // dtype/shape/data_offsets, data offsets contiguous from 0 (the Python loader rejects gaps),
  // padded with spaces so the data section starts 8-byte aligned.
  std::string header_() const {
    nlohmann::ordered_json h = nlohmann::ordered_json::object();
    if (!metadata_.empty()) h["__metadata__"] = metadata_;
    std::uint64_t off = 0;
    for (const Entry& e : entries_) {
      nlohmann::ordered_json t;
      t["dtype"] = dtype_name(e.dtype);
      t["shape"] = e.shape;
      t["data_offsets"] = {off, off + e.bytes.size()};
      off += e.bytes.size();
      h[e.name] = std::move(t);
    }
    std::string s;
    try {
      s = h.dump();
    } catch (const nlohmann::json::exception& ex) {
      throw io_error(::distilx::detail::concat("SafetensorsWriter: cannot encode header (", ex.what(),
                                               "); tensor names and metadata must be valid UTF-8"));
    }
    s.append((8 - s.size() % 8) % 8, ' ');
    return s;
  }

  static void sync_parent_dir_(const std::string& path) {
    // Makes the rename itself durable; best effort, since some filesystems refuse it.
    const auto slash = path.find_last_of('/');
    const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      (void)::fsync(dfd);
      ::close(dfd);
    }
  }

  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace distilx::io
