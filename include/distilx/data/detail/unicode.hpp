// UTF-8 helpers and canonical Unicode normalization (NFC, NFD) for the tokenizer:
// decoding/encoding code points, replacing ill-formed UTF-8 with U+FFFD the way Rust's
// String::from_utf8_lossy and WHATWG TextDecoder do, and the UAX #15 algorithms driven by
// tables generated from the UCD (unicode_tables.hpp, scripts/gen_unicode_tables.py).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "distilx/data/detail/unicode_tables.hpp"

namespace distilx::detail::unicode {

inline constexpr char32_t kReplacement = 0xFFFD;

inline void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

/// Length of the well-formed UTF-8 sequence starting at s[i] (Unicode Table 3-7), or 0 if
/// ill-formed; in that case `bad_len` is the length of the maximal subpart to replace by one U+FFFD.
inline std::size_t utf8_sequence_length(std::string_view s, std::size_t i, std::size_t& bad_len) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  bad_len = 1;
  if (b0 < 0x80) return 1;
  std::size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    if (b0 == 0xE0) lo = 0xA0;  // no overlongs
    if (b0 == 0xED) hi = 0x9F;  // no surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return 0;
  }
  for (std::size_t k = 1; k <= need; ++k) {
    if (i + k >= s.size()) return 0;
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = (k == 1) ? lo : 0x80, h = (k == 1) ? hi : 0xBF;
    if (b < l || b > h) return 0;
    bad_len = k + 1;
  }
  return need + 1;
}

inline bool is_valid_utf8(std::string_view s) {
  std::size_t i = 0, bad = 0;
  while (i < s.size()) {
    // ASCII fast path: most tokenizer input is ASCII-heavy.
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    const std::size_t n = utf8_sequence_length(s, i, bad);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

/// Replaces every maximal ill-formed subpart with U+FFFD (Unicode "substitution of maximal
/// subparts", as Rust's from_utf8_lossy and WHATWG TextDecoder do).
inline std::string sanitize_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 8);
  std::size_t i = 0, bad = 0;
  while (i < s.size()) {
    const std::size_t n = utf8_sequence_length(s, i, bad);
    if (n == 0) {
      append_utf8(out, kReplacement);
      i += bad;
    } else {
      out.append(s.data() + i, n);
      i += n;
    }
  }
  return out;
}

/// Decodes the code point at s[i] of *valid* UTF-8 and advances i.
inline char32_t next_code_point(std::string_view s, std::size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  if (b0 < 0x80) {
    ++i;
    return b0;
  }
  int n = b0 >= 0xF0 ? 3 : b0 >= 0xE0 ? 2 : 1;
  char32_t cp = b0 & (0x3F >> n);
  for (int k = 1; k <= n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += static_cast<std::size_t>(n) + 1;
  return cp;
}

/// Decodes the last code point of non-empty valid UTF-8.
inline char32_t last_code_point(std::string_view s) {
  std::size_t i = s.size() - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return next_code_point(s, i);
}

/// Unicode White_Space (what Rust's regex and Oniguruma mean by \s).
inline bool is_white_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// ---- normalization ---------------------------------------------------------------------

namespace hangul {
inline constexpr char32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
inline constexpr char32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount,
                          kSCount = kLCount * kNCount;
}  // namespace hangul

inline std::uint8_t combining_class(char32_t c) {
  if (c < 0x300) return 0;
  const auto& t = unicode_tables::kCcc;
  auto it = std::upper_bound(std::begin(t), std::end(t), c,
                             [](char32_t v, const unicode_tables::CccRange& r) { return v < r.first; });
  if (it == std::begin(t)) return 0;
  --it;
  return c <= it->last ? it->ccc : 0;
}

/// True if c may change under NFC (NFC_Quick_Check No/Maybe) or has a non-zero combining
/// class (whose order the algorithm may change). Code points without either property are
/// "boundaries": NFC never joins what precedes them with what follows.
inline bool nfc_sensitive_slow(char32_t c) {
  if (c < 0x300) return false;
  const auto& t = unicode_tables::kNfcQcNoMaybe;
  auto it = std::upper_bound(std::begin(t), std::end(t), c,
                             [](char32_t v, const unicode_tables::CpRange& r) { return v < r.first; });
  if (it != std::begin(t) && c <= std::prev(it)->last) return true;
  return combining_class(c) != 0;
}

inline bool nfc_sensitive(char32_t c) {
  // A bitmap of the BMP keeps the check off the binary searches for CJK and other scripts.
  static const std::vector<bool> bmp = [] {
    std::vector<bool> b(0x10000);
    for (char32_t cp = 0x300; cp < 0x10000; ++cp) b[cp] = nfc_sensitive_slow(cp);
    return b;
  }();
  return c < 0x10000 ? bmp[c] : nfc_sensitive_slow(c);
}

inline void decompose(char32_t c, std::vector<char32_t>& out) {
  using namespace hangul;
  if (c >= kSBase && c < kSBase + kSCount) {
    const char32_t s = c - kSBase;
    out.push_back(kLBase + s / kNCount);
    out.push_back(kVBase + (s % kNCount) / kTCount);
    if (s % kTCount != 0) out.push_back(kTBase + s % kTCount);
    return;
  }
  if (c >= 0xC0) {
    const auto& t = unicode_tables::kDecomp;
    auto it = std::lower_bound(std::begin(t), std::end(t), c,
                               [](const unicode_tables::Decomposition& d, char32_t v) { return d.cp < v; });
    if (it != std::end(t) && it->cp == c) {
      decompose(it->first, out);  // the table is one level deep: recurse for the full mapping
      if (it->second != 0) decompose(it->second, out);
      return;
    }
  }
  out.push_back(c);
}

/// Composite of a starter and the following character, or 0 if they do not compose.
inline char32_t compose_pair(char32_t a, char32_t b) {
  using namespace hangul;
  if (a >= kLBase && a < kLBase + kLCount && b >= kVBase && b < kVBase + kVCount)
    return kSBase + ((a - kLBase) * kVCount + (b - kVBase)) * kTCount;
  if (a >= kSBase && a < kSBase + kSCount && (a - kSBase) % kTCount == 0 && b > kTBase && b < kTBase + kTCount)
    return a + (b - kTBase);
  const auto& t = unicode_tables::kComp;
  auto it = std::lower_bound(std::begin(t), std::end(t), std::make_pair(a, b),
                             [](const unicode_tables::Composition& x, const std::pair<char32_t, char32_t>& v) {
                               return x.first < v.first || (x.first == v.first && x.second < v.second);
                             });
  return (it != std::end(t) && it->first == a && it->second == b) ? it->composite : 0;
}

/// Canonical decomposition followed by the canonical ordering algorithm (NFD), on code points.
inline std::vector<char32_t> canonical_decompose(std::string_view s) {
  std::vector<char32_t> cps;
  cps.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) decompose(next_code_point(s, i), cps);
  // Stable insertion sort of each run of non-starters by combining class.
  for (std::size_t i = 1; i < cps.size(); ++i) {
    const std::uint8_t cc = combining_class(cps[i]);
    if (cc == 0) continue;
    std::size_t j = i;
    while (j > 0) {
      const std::uint8_t prev = combining_class(cps[j - 1]);
      if (prev == 0 || prev <= cc) break;
      std::swap(cps[j], cps[j - 1]);
      --j;
    }
  }
  return cps;
}

inline std::string nfd(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : canonical_decompose(s)) append_utf8(out, c);
  return out;
}

/// NFC of a span of valid UTF-8 (UAX #15: canonical decomposition, ordering, composition).
inline void nfc_span(std::string_view s, std::string& res) {
  std::vector<char32_t> cps = canonical_decompose(s);
  std::vector<char32_t> out;
  out.reserve(cps.size());
  std::ptrdiff_t starter = -1;  // index in out of the last starter that may still compose
  std::uint8_t last_cc = 0;     // combining class of the last character appended after it
  for (char32_t c : cps) {
    const std::uint8_t cc = combining_class(c);
    if (starter >= 0) {
      const bool adjacent = static_cast<std::ptrdiff_t>(out.size()) - 1 == starter;
      const bool blocked = !adjacent && (last_cc == 0 || last_cc >= cc);
      if (!blocked) {
        if (char32_t comp = compose_pair(out[static_cast<std::size_t>(starter)], c)) {
          out[static_cast<std::size_t>(starter)] = comp;
          continue;
        }
      }
    }
    if (cc == 0) starter = static_cast<std::ptrdiff_t>(out.size());
    last_cc = cc;
    out.push_back(c);
  }
  for (char32_t c : out) append_utf8(res, c);
}

/// NFC of valid UTF-8. Only the spans around characters that NFC may change are normalized:
/// each span runs from the last boundary character before them to the next boundary.
inline std::string nfc(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::size_t copied = 0;        // s[0, copied) is already in out
  std::size_t region = 0;        // offset of the last boundary character
  bool dirty = false;            // a sensitive character follows `region`
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t at = i;
    const bool boundary = static_cast<unsigned char>(s[i]) < 0x80 ? (++i, true) : !nfc_sensitive(next_code_point(s, i));
    if (boundary) {
      if (dirty) {
        nfc_span(s.substr(region, at - region), out);
        copied = at;
        dirty = false;
      }
      region = at;
    } else if (!dirty) {
      out.append(s, copied, region - copied);
      dirty = true;
    }
  }
  if (dirty)
    nfc_span(s.substr(region), out);
  else
    out.append(s, copied, std::string_view::npos);
  return out;
}

}  // namespace distilx::detail::unicode
