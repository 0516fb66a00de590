// Error handling in three tiers (architecture.md §3.7): static_assert for type
// misuse, DISTILX_ASSERT for internal invariants, exceptions derived from
// distilx::error for bad input, with messages that say what was expected.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "distilx/core/config.hpp"

namespace distilx {

/// Base class of every exception distilx throws for bad input.
class error : public std::runtime_error {
 public:
  explicit error(const std::string& what) : std::runtime_error(what) {}
};

/// A tensor or configuration has the wrong shape or size.
class shape_error : public error {
 public:
  using error::error;
};

/// A file is missing, unreadable, truncated or malformed.
class io_error : public error {
 public:
  using error::error;
};

/// A configuration value is invalid or unsupported.
class config_error : public error {
 public:
  using error::error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

inline std::string shape_string(const std::vector<index_t>& s) {
  std::ostringstream os;
  os << '[';
  for (std::size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line, const std::string& msg) {
  throw std::logic_error(concat("distilx internal assertion failed: ", expr, " at ", file, ":", line,
                                msg.empty() ? "" : " — ", msg));
}
}  // namespace detail

}  // namespace distilx

/// Internal invariant; users may redefine it before including distilx (e.g. to abort()).
#ifndef DISTILX_ASSERT
#define DISTILX_ASSERT(expr, ...)                                                              \
  do {                                                                                       \
    if (!(expr)) ::distilx::detail::assert_fail(#expr, __FILE__, __LINE__, ::distilx::detail::concat("" __VA_ARGS__)); \
  } while (0)
#endif

/// Input validation: throws ExcType with the streamed message when expr is false.
#define DISTILX_REQUIRE(ExcType, expr, ...)                              \
  do {                                                                   \
    if (!(expr)) throw ExcType(::distilx::detail::concat(__VA_ARGS__)); \
  } while (0)
