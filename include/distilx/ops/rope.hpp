// Rotary position embedding (Su et al. 2021, RoFormer) in Hugging Face's "rotate_half" layout:
// the head vector is split into halves x1 = x[:D/2], x2 = x[D/2:], and with angle a_i = pos * f_i
//   y[i] = x1[i] cos a_i - x2[i] sin a_i,   y[i + D/2] = x2[i] cos a_i + x1[i] sin a_i
// (HF's q * cos + rotate_half(q) * sin with cos = cat(cos a, cos a)). Frequencies and angles are
// float32 as in HF's LlamaRotaryEmbedding; llama3 scaling follows HF's _compute_llama3_parameters.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"

namespace distilx::ops {

/// RoPE variants: plain (HF "default") and Llama 3.1 frequency scaling (HF "llama3").
enum class RopeKind { standard, llama3 };

/// RoPE frequency parameters (HF `rope_parameters`).
struct RopeSpec {
  double theta = 10000.0;
  RopeKind kind = RopeKind::standard;
  // llama3 only:
  double factor = 8.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  double original_max_position_embeddings = 8192.0;
};

/// Inverse frequencies f_i, i < D/2, as float32 (HF computes and stores inv_freq in float32).
inline std::vector<float> rope_inverse_frequencies(const RopeSpec& spec, index_t head_dim) {
  DISTILX_REQUIRE(config_error, head_dim > 0 && head_dim % 2 == 0, "RoPE: head_dim must be a positive even number, got ",
                  head_dim);
  const index_t half = head_dim / 2;
  std::vector<float> inv(static_cast<std::size_t>(half));
  for (index_t i = 0; i < half; ++i) {
    // HF: 1 / base ** (arange(0, D, 2).float() / D), exponent and power in float32.
    const float e = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[static_cast<std::size_t>(i)] = 1.0f / std::pow(static_cast<float>(spec.theta), e);
  }
  if (spec.kind == RopeKind::llama3) {
    DISTILX_REQUIRE(config_error, spec.factor > 0 && spec.high_freq_factor > spec.low_freq_factor,
                    "RoPE llama3: need factor > 0 and high_freq_factor > low_freq_factor, got factor ", spec.factor,
                    ", low_freq_factor ", spec.low_freq_factor, ", high_freq_factor ", spec.high_freq_factor);
    const double pi = 3.14159265358979323846;
    const double old_len = spec.original_max_position_embeddings;
    const double low_wavelen = old_len / spec.low_freq_factor;    // longer waves: divided by factor
    const double high_wavelen = old_len / spec.high_freq_factor;  // shorter waves: kept
    for (auto& f : inv) {
      const double fi = f;
      const double wavelen = 2 * pi / fi;
      double g = wavelen > low_wavelen ? fi / spec.factor : fi;
      if (!(wavelen < high_wavelen) && !(wavelen > low_wavelen)) {
        // Medium band: interpolate between the scaled and the original frequency.
        const double s = (old_len / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor);
        g = (1 - s) * g / spec.factor + s * g;
      }
      f = static_cast<float>(g);
    }
  }
  return inv;
}

/// cos/sin tables [M, D/2] for the M positions in `positions`: angle = float(pos) * f_i in float32
/// (as HF's inv_freq @ position_ids), then cos/sin rounded to T.
template <class T>
void rope_cos_sin(cpu, T* cos_out, T* sin_out, const std::int32_t* positions, const float* inv_freq, index_t M,
                  index_t half) {
#pragma omp parallel for if (M * half > 65536)
  for (index_t m = 0; m < M; ++m) {
    const float p = static_cast<float>(positions[m]);
    for (index_t i = 0; i < half; ++i) {
      const float a = p * inv_freq[i];
      cos_out[m * half + i] = static_cast<T>(std::cos(static_cast<double>(a)));
      sin_out[m * half + i] = static_cast<T>(std::sin(static_cast<double>(a)));
    }
  }
}

/// One head vector's rotation, dst = R(a) src (dst may be src): the arithmetic every RoPE path
/// (rope_forward, the attention op's in-kernel rotation) shares, so they round alike.
template <class T>
inline void rope_rotate_row(T* dst, const T* src, const T* c, const T* s, index_t half) {
  for (index_t i = 0; i < half; ++i) {
    const T a = src[i], b = src[i + half];
    dst[i] = a * c[i] - b * s[i];
    dst[i + half] = b * c[i] + a * s[i];
  }
}

/// In-place rotation of x [M, H, D] (row stride ld >= H*D elements between consecutive m) with the
/// tables of rope_cos_sin: every one of the H heads of row m uses row m of cos/sin.
template <class T>
void rope_forward(cpu, T* x, const T* cos_t, const T* sin_t, index_t M, index_t H, index_t D, index_t ld) {
  const index_t half = D / 2;
#pragma omp parallel for if (M * H * D > 65536)
  for (index_t m = 0; m < M; ++m) {
    const T* c = cos_t + m * half;
    const T* s = sin_t + m * half;
    for (index_t h = 0; h < H; ++h) {
      T* row = x + m * ld + h * D;
      rope_rotate_row(row, row, c, s, half);
    }
  }
}
template <class T>
void rope_forward(cpu be, T* x, const T* cos_t, const T* sin_t, index_t M, index_t H, index_t D) {
  rope_forward(be, x, cos_t, sin_t, M, H, D, H * D);
}

/// Input gradient, in place on dy [M, H, D]: the rotation is orthogonal, so dx = R(-a) dy.
template <class T>
void rope_backward(cpu, T* dy, const T* cos_t, const T* sin_t, index_t M, index_t H, index_t D, index_t ld) {
  const index_t half = D / 2;
#pragma omp parallel for if (M * H * D > 65536)
  for (index_t m = 0; m < M; ++m) {
    const T* c = cos_t + m * half;
    const T* s = sin_t + m * half;
    for (index_t h = 0; h < H; ++h) {
      T* g1 = dy + m * ld + h * D;
      T* g2 = g1 + half;
      for (index_t i = 0; i < half; ++i) {
        const T a = g1[i], b = g2[i];
        g1[i] = a * c[i] + b * s[i];
        g2[i] = b * c[i] - a * s[i];
      }
    }
  }
}
template <class T>
void rope_backward(cpu be, T* dy, const T* cos_t, const T* sin_t, index_t M, index_t H, index_t D) {
  rope_backward(be, dy, cos_t, sin_t, M, H, D, H * D);
}

}  // namespace distilx::ops
