// distilx core configuration: version, index type, host/device macros.
// Everything else in the library includes this header first.
#pragma once

#include <cstddef>
#include <cstdint>

#define DISTILX_VERSION_MAJOR 0
#define DISTILX_VERSION_MINOR 1
#define DISTILX_VERSION_PATCH 0
#define DISTILX_VERSION_STRING "0.1.0"

#if defined(__CUDACC__)
#define DISTILX_HOST_DEVICE __host__ __device__
#define DISTILX_DEVICE __device__
#else
#define DISTILX_HOST_DEVICE
#define DISTILX_DEVICE
#endif

#if defined(__GNUC__) || defined(__clang__)
#define DISTILX_RESTRICT __restrict__
#else
#define DISTILX_RESTRICT
#endif

namespace distilx {

/// Signed index type used for every shape and loop bound.
using index_t = std::int64_t;

inline constexpr const char* version_string() { return DISTILX_VERSION_STRING; }

}  // namespace distilx
