// Element types of the safetensors format (DType), their names and sizes,
// the C++ type -> DType mapping, and exact bit-level conversions between
// float and the two 16-bit float formats (bfloat16, IEEE binary16).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "distilx/core/error.hpp"

namespace distilx::io {

enum class DType { f64, f32, f16, bf16, i64, i32, u32, i16, u16, i8, u8, boolean };

/// Bytes per element.
inline std::size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64:
    case DType::i64: return 8;
    case DType::f32:
    case DType::i32:
    case DType::u32: return 4;
    case DType::f16:
    case DType::bf16:
    case DType::i16:
    case DType::u16: return 2;
    case DType::i8:
    case DType::u8:
    case DType::boolean: return 1;
  }
  throw io_error("dtype_size: invalid DType value");
}

/// The name used in safetensors headers ("F32", "BF16", "BOOL", ...).
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f64: return "F64";
    case DType::f32: return "F32";
    case DType::f16: return "F16";
    case DType::bf16: return "BF16";
    case DType::i64: return "I64";
    case DType::i32: return "I32";
    case DType::u32: return "U32";
    case DType::i16: return "I16";
    case DType::u16: return "U16";
    case DType::i8: return "I8";
    case DType::u8: return "U8";
    case DType::boolean: return "BOOL";
  }
  return "?";
}

/// Inverse of dtype_name; throws io_error naming the unknown string.
inline DType dtype_from_name(const std::string& s) {
  static constexpr DType all[] = {DType::f64, DType::f32, DType::f16, DType::bf16, DType::i64, DType::i32,
                                  DType::u32, DType::i16, DType::u16, DType::i8,   DType::u8,  DType::boolean};
  for (DType t : all)
    if (s == dtype_name(t)) return t;
  throw io_error(::distilx::detail::concat("unknown safetensors dtype \"", s,
                                "\" (expected one of F64, F32, F16, BF16, I64, I32, U32, I16, U16, I8, U8, BOOL)"));
}

inline bool dtype_is_floating(DType t) {
  return t == DType::f64 || t == DType::f32 || t == DType::f16 || t == DType::bf16;
}

/// DType used to store a C++ element type. Integers map by width and signedness so that
/// `long` and `long long` both map to i64; unsupported types fail at compile time.
template <class T>
constexpr DType dtype_of() {
  using U = std::remove_cv_t<T>;
  static_assert(std::is_arithmetic_v<U>, "dtype_of: T must be an arithmetic type");
  if constexpr (std::is_same_v<U, bool>) {
    return DType::boolean;
  } else if constexpr (std::is_same_v<U, double>) {
    return DType::f64;
  } else if constexpr (std::is_same_v<U, float>) {
    return DType::f32;
  } else if constexpr (std::is_integral_v<U> && std::is_signed_v<U>) {
    static_assert(sizeof(U) == 1 || sizeof(U) == 2 || sizeof(U) == 4 || sizeof(U) == 8, "unsupported int width");
    if constexpr (sizeof(U) == 8) return DType::i64;
    else if constexpr (sizeof(U) == 4) return DType::i32;
    else if constexpr (sizeof(U) == 2) return DType::i16;
    else return DType::i8;
  } else if constexpr (std::is_integral_v<U>) {
    // safetensors has U64 but this library does not store it: reject at compile time.
    static_assert(sizeof(U) == 1 || sizeof(U) == 2 || sizeof(U) == 4, "dtype_of: no 64-bit unsigned dtype");
    if constexpr (sizeof(U) == 4) return DType::u32;
    else if constexpr (sizeof(U) == 2) return DType::u16;
    else return DType::u8;
  } else {
    static_assert(!std::is_floating_point_v<U>, "dtype_of: long double has no safetensors dtype");
    return DType::f64;
  }
}

/// True when dtype_of<T>() compiles, i.e. T has a stored safetensors representation here.
template <class T>
inline constexpr bool has_dtype_v =
    std::is_arithmetic_v<T> && !std::is_same_v<std::remove_cv_t<T>, long double> &&
    !(std::is_integral_v<T> && std::is_unsigned_v<T> && !std::is_same_v<std::remove_cv_t<T>, bool> && sizeof(T) > 4);

namespace detail {
inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace detail

/// bfloat16 is the top half of a float, so widening is a shift and is exact.
inline float bf16_to_float(std::uint16_t h) { return detail::bits_float(std::uint32_t(h) << 16); }

/// Round-to-nearest-even; NaNs stay NaN (the quiet bit is forced so that truncating a
/// signalling NaN whose payload lives in the low bits cannot turn it into infinity).
inline std::uint16_t float_to_bf16(float f) {
  const std::uint32_t u = detail::float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  // Adding 0x7FFF plus the lsb of the kept part rounds halves towards the even result;
  // a carry out of the mantissa correctly bumps the exponent (up to infinity).
  const std::uint32_t lsb = (u >> 16) & 1u;
  return static_cast<std::uint16_t>((u + 0x7FFFu + lsb) >> 16);
}

/// IEEE binary16 -> float; exact for every input (subnormals, infinities, NaN payloads).
inline float f16_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1Fu;
  const std::uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    // Zero or subnormal: value = mant * 2^-24, exactly representable as a float.
    const float mag = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -mag : mag;
  }
  if (exp == 31) return detail::bits_float(sign | 0x7F800000u | (mant << 13));
  return detail::bits_float(sign | ((exp + 112u) << 23) | (mant << 13));  // rebias 15 -> 127
}

/// float -> IEEE binary16 with round-to-nearest-even, overflow to infinity, gradual underflow
/// to subnormals; NaNs stay NaN (quiet bit forced, sign and top payload bits kept).
inline std::uint16_t float_to_f16(float f) {
  const std::uint32_t u = detail::float_bits(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  if (a == 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7C00u);
  const int e = static_cast<int>(a >> 23) - 127;
  const std::uint32_t mant = a & 0x7FFFFFu;
  if (e > 15) return static_cast<std::uint16_t>(sign | 0x7C00u);
  if (e >= -14) {
    // Normal half: keep 10 of 23 mantissa bits; the discarded 13 decide the rounding.
    std::uint32_t h = (std::uint32_t(e + 15) << 10) | (mant >> 13);
    const std::uint32_t rem = mant & 0x1FFFu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // carry may give 0x7C00 = inf
    return static_cast<std::uint16_t>(sign | h);
  }
  // Subnormal half: the value in units of 2^-24 is m * 2^(e+1) with m the 24-bit significand.
  const int shift = -e - 1;  // >= 14
  if (shift > 24) return sign;  // below half the smallest subnormal (also float subnormals)
  const std::uint32_t m = mant | 0x800000u;
  std::uint32_t q = m >> shift;
  const std::uint32_t rem = m & ((1u << shift) - 1u);
  const std::uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;  // q == 0x400 is the smallest normal: still right
  return static_cast<std::uint16_t>(sign | q);
}

namespace detail {
/// double -> float rounding to odd: an inexact result gets an odd last bit. Rounding that
/// float again to a format with at least two fewer mantissa bits then gives the same result
/// as rounding the double directly, so the double -> 16-bit paths avoid double-rounding errors.
inline float double_to_float_odd(double d) {
  float f = static_cast<float>(d);
  if (std::isnan(d) || static_cast<double>(f) == d) return f;
  if ((float_bits(f) & 1u) == 0) f = std::nextafter(f, static_cast<float>(d > f ? INFINITY : -INFINITY));
  return f;
}
}  // namespace detail

/// Correctly rounded (nearest-even) double -> bfloat16.
inline std::uint16_t double_to_bf16(double d) { return float_to_bf16(detail::double_to_float_odd(d)); }
/// Correctly rounded (nearest-even) double -> IEEE binary16.
inline std::uint16_t double_to_f16(double d) { return float_to_f16(detail::double_to_float_odd(d)); }

}  // namespace distilx::io
