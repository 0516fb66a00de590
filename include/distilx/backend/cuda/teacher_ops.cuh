// CUDA overloads of the teacher's ops (ops/rope.hpp, ops/attention.hpp, ops/fused.hpp): the RoPE
// tables and rotation, a fused causal grouped-query attention in the flash-attention style, and
// the layer's projections with 16-bit activations between them.
//
// Same names, arguments and semantics as the CPU ops; every pointer is a device pointer (the
// positions and inverse frequencies of rope_cos_sin and the key mask of the attention included).
//
// Attention. One thread block owns a tile of query rows of one (batch, head); tiles of keys and
// values are streamed through shared memory and every row keeps a running maximum and sum (online
// softmax, fp32 or the compute type), so no S x S score matrix ever reaches global memory and no
// scratch is needed. Tiles entirely above the diagonal (or left of the sliding window) are never
// visited; element masks (causal, window, key padding, sequence end) are applied only on tiles
// that need them. Rows whose every key is masked produce zeros, as on the CPU. Two kernels:
//  - exact: T = float or double, products and softmax in T (float matches the CPU to ~1e-6).
//    Used in the fp32 and tf32 math modes, for double, and for head dims without a tensor-core
//    kernel. head_dim <= 256.
//  - tensor cores: float tensors in the bf16 / fp16 math modes, head_dim 64 or 128, compute
//    capability >= 8.0: Q, K, V are rounded to 16 bits as they are staged into shared memory,
//    QK^T and PV run on mma.sync m16n8k16 with fp32 accumulation, softmax in fp32 (P rounded to
//    16 bits for the PV product, as flash-attention does).
// Both are deterministic: no atomics, a fixed summation order for a given shape.
//
// Projections. qkv_forward (bf16 / fp16) converts the normed input to 16 bits once for its three
// products (the generic path would convert it per product). gated_mlp_forward (bf16) writes the
// gate and up products in bf16 (fp32 accumulation; into the storage of the fp32 scratch the
// caller passes), applies bias, activation and product in fp32 in one pass that writes bf16
// back in place, and hands that to the down projection as its 16-bit operand: the [M, F]
// intermediate crosses memory three times in bf16 instead of five times in fp32 plus a
// conversion. fp16 keeps fp32 intermediates (they could overflow 65504); fp32 / tf32 and thin
// products run the CPU op's sequence.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "distilx/backend/cuda/blas.cuh"
#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/cuda/memory.cuh"
#include "distilx/backend/cuda/ops.cuh"
#include "distilx/backend/memory.hpp"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"
// CausalAttentionShape, RopeSpec; these headers call no op qualified, so including them here is safe.
#include "distilx/ops/attention.hpp"
#include "distilx/ops/fused.hpp"
#include "distilx/ops/rope.hpp"

namespace distilx::cuda_backend {

/// Which attention kernel causal_attention_forward(cuda, ...) runs for these arguments.
enum class AttentionKernel { exact, tensor_core_bf16, tensor_core_fp16 };

inline const char* to_string(AttentionKernel k) {
  switch (k) {
    case AttentionKernel::exact: return "exact";
    case AttentionKernel::tensor_core_bf16: return "tensor-core bf16";
    case AttentionKernel::tensor_core_fp16: return "tensor-core fp16";
  }
  return "?";
}

namespace detail {
inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }
}  // namespace detail

/// The kernel the attention op picks for element type T, the current math_mode() and these
/// pointers (the tensor-core kernel needs 16-byte aligned q, k, v, out).
template <class T>
AttentionKernel attention_kernel_for(const ops::CausalAttentionShape& s, const void* out = nullptr,
                                     const void* q = nullptr, const void* k = nullptr, const void* v = nullptr) {
  if constexpr (!std::is_same_v<T, float>) {
    return AttentionKernel::exact;
  } else {
    const MathMode m = math_mode();
    if (m != MathMode::bf16 && m != MathMode::fp16) return AttentionKernel::exact;
    if (s.DH != 64 && s.DH != 128) return AttentionKernel::exact;
    if (!detail::aligned16(out) || !detail::aligned16(q) || !detail::aligned16(k) || !detail::aligned16(v))
      return AttentionKernel::exact;
    if (detail::device_cc_major() < 8) return AttentionKernel::exact;
    return m == MathMode::bf16 ? AttentionKernel::tensor_core_bf16 : AttentionKernel::tensor_core_fp16;
  }
}

namespace kernels {

// ---- RoPE -------------------------------------------------------------------------------

/// angle = float(pos) * f (one float32 product, as HF), cos/sin in double rounded to T (as the CPU).
template <class T>
__global__ void rope_cos_sin_kernel(T* cos_out, T* sin_out, const std::int32_t* positions, const float* inv_freq,
                                    index_t M, index_t half) {
  for (index_t i = global_id(); i < M * half; i += global_stride()) {
    const index_t m = i / half, f = i - m * half;
    const float a = __fmul_rn(static_cast<float>(positions[m]), inv_freq[f]);
    double s, c;
    sincos(static_cast<double>(a), &s, &c);
    cos_out[i] = static_cast<T>(c);
    sin_out[i] = static_cast<T>(s);
  }
}

/// x [M, H, D] (row stride ld) rotated in place; sign = +1 forward, -1 for the transpose (backward).
template <class T>
__global__ void rope_rotate_kernel(T* x, const T* cos_t, const T* sin_t, index_t M, index_t H, index_t D, index_t ld,
                                   T sign) {
  const index_t half = D / 2, n = M * H * half;
  for (index_t i = global_id(); i < n; i += global_stride()) {
    const index_t f = i % half, mh = i / half, h = mh % H, m = mh / H;
    T* x1 = x + m * ld + h * D + f;
    T* x2 = x1 + half;
    const T c = cos_t[m * half + f], s = sign * sin_t[m * half + f];
    const T a = *x1, b = *x2;
    *x1 = a * c - b * s;
    *x2 = b * c + a * s;
  }
}

// ---- attention: shared pieces -------------------------------------------------------------

/// Arguments of both attention kernels. Positions are index_t; heads and dims fit in int.
struct AttentionArgs {
  index_t S = 0;
  index_t window = 0;  // 0 = unlimited
  int NH = 0, NKV = 0, DH = 0, group = 1;
  int num_q_tiles = 0;
};

/// The block's (batch, head, first query row); heavier tiles (later rows, more keys) first.
template <int BQ>
__device__ inline void attention_block_coords(const AttentionArgs& a, index_t& b, int& h, index_t& i0) {
  const int t = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.num_q_tiles));
  const index_t bh = blockIdx.x / static_cast<unsigned>(a.num_q_tiles);
  b = bh / a.NH;
  h = static_cast<int>(bh % a.NH);
  i0 = static_cast<index_t>(a.num_q_tiles - 1 - t) * BQ;
}

/// First key tile start for query rows from i0: the window's left edge rounded down to BK.
template <int BK>
__device__ inline index_t attention_first_key(const AttentionArgs& a, index_t i0) {
  if (a.window <= 0) return 0;
  const index_t lo = i0 - a.window + 1;
  return lo <= 0 ? 0 : (lo / BK) * BK;
}

/// Whether any element of the key tile [j0, j0 + BK) x rows [i0, i0 + BQ) can be masked.
template <int BQ, int BK>
__device__ inline bool attention_tile_needs_mask(const AttentionArgs& a, index_t i0, index_t j0, bool has_key_mask) {
  return has_key_mask || j0 + BK - 1 > i0 || j0 + BK > a.S || (a.window > 0 && i0 + BQ - 1 - j0 >= a.window);
}

__device__ inline bool attention_visible(const AttentionArgs& a, index_t i, index_t j) {
  return j <= i && (a.window <= 0 || i - j < a.window);
}

template <class T>
__device__ inline T dev_exp(T x);
template <>
__device__ inline float dev_exp<float>(float x) {
  return expf(x);
}
template <>
__device__ inline double dev_exp<double>(double x) {
  return exp(x);
}

template <class T>
__device__ inline T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---- attention: exact kernel ---------------------------------------------------------------
// 4 warps, R query rows per warp (BQ = 4R), key tiles of 32. Lane j scores key j of the tile for
// all R rows (K rows padded to an odd pitch: conflict-free); for P V, lane owns dims lane + 32c.

constexpr int kExactWarps = 4;
constexpr int kExactBK = 32;

template <class T>
struct ExactCfg {
  static constexpr int R = std::is_same_v<T, float> ? 8 : 4;  // query rows per warp
  static constexpr int BQ = kExactWarps * R;
};

template <class T, int NC>
constexpr std::size_t exact_smem_bytes() {
  constexpr int DP = NC * 32, KP = DP + 1, BQ = ExactCfg<T>::BQ;
  return sizeof(T) * (static_cast<std::size_t>(BQ) * DP + static_cast<std::size_t>(kExactBK) * KP +
                      static_cast<std::size_t>(kExactBK) * DP);
}

/// Element d of a head vector rotated as rope_rotate_row does (c, s: the row's tables [DH / 2]).
template <class T>
__device__ inline T rope_element(const T* __restrict__ x, const T* __restrict__ c, const T* __restrict__ s, int d,
                                 int hd) {
  return d < hd ? x[d] * c[d] - x[d + hd] * s[d] : x[d] * c[d - hd] + x[d - hd] * s[d - hd];
}

template <class T, int NC>
__global__ void __launch_bounds__(kExactWarps * 32, 1)
    attention_exact_kernel(T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ k,
                           const T* __restrict__ v, const std::uint8_t* __restrict__ key_mask, AttentionArgs a,
                           T scale, const T* __restrict__ rope_cos, const T* __restrict__ rope_sin) {
  constexpr int R = ExactCfg<T>::R, BQ = ExactCfg<T>::BQ, BK = kExactBK;
  constexpr int DP = NC * 32, KP = DP + 1;
  extern __shared__ unsigned char exact_smem_raw[];
  T* Qs = reinterpret_cast<T*>(exact_smem_raw);  // [BQ][DP]
  T* Ks = Qs + BQ * DP;                          // [BK][KP]
  T* Vs = Ks + BK * KP;                          // [BK][DP]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  index_t b, i0;
  int h;
  attention_block_coords<BQ>(a, b, h, i0);
  const int g = h / a.group, DH = a.DH;
  const index_t S = a.S;
  const index_t ldq = static_cast<index_t>(a.NH) * DH, ldk = static_cast<index_t>(a.NKV) * DH;
  const std::uint8_t* mask = key_mask ? key_mask + b * S : nullptr;

  const int hd = DH / 2;  // rope table row length
  for (int e = tid; e < BQ * DP; e += kExactWarps * 32) {
    const int r = e / DP, d = e % DP;
    const index_t i = i0 + r;
    T x = T(0);
    if (i < S && d < DH) {
      const T* row = q + (b * S + i) * ldq + static_cast<index_t>(h) * DH;
      x = rope_cos ? rope_element(row, rope_cos + (b * S + i) * hd, rope_sin + (b * S + i) * hd, d, hd) : row[d];
    }
    Qs[e] = x;
  }

  T m[R], l[R], acc[R][NC];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -std::numeric_limits<T>::infinity();
    l[r] = T(0);
#pragma unroll
    for (int c = 0; c < NC; ++c) acc[r][c] = T(0);
  }

  const index_t i_end = i0 + BQ < S ? i0 + BQ : S;
  const index_t row0 = i0 + warp * R;
  for (index_t j0 = attention_first_key<BK>(a, i0); j0 < i_end; j0 += BK) {
    __syncthreads();  // the previous tile is consumed (and, first time, Qs is written)
    for (int e = tid; e < BK * DP; e += kExactWarps * 32) {
      const int r = e / DP, d = e % DP;
      const index_t j = j0 + r;
      const bool in = j < S && d < DH;
      const index_t off = (b * S + j) * ldk + static_cast<index_t>(g) * DH;
      T kx = T(0);
      if (in)
        kx = rope_cos ? rope_element(k + off, rope_cos + (b * S + j) * hd, rope_sin + (b * S + j) * hd, d, hd)
                      : k[off + d];
      Ks[r * KP + d] = kx;
      Vs[r * DP + d] = in ? v[off + d] : T(0);
    }
    __syncthreads();

    // Scores of key j = j0 + lane for the warp's R rows.
    T s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = T(0);
    const T* kr = Ks + lane * KP;
    const T* qw = Qs + warp * R * DP;
    for (int d = 0; d < DH; ++d) {
      const T kd = kr[d];
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] += qw[r * DP + d] * kd;
    }
    const index_t j = j0 + lane;
    const bool key_ok = j < S && (!mask || mask[j] != 0);
    T p[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool ok = key_ok && attention_visible(a, row0 + r, j);
      const T sc = ok ? s[r] * scale : -std::numeric_limits<T>::infinity();
      const T m_new = fmax(m[r], warp_max(sc));
      // All keys so far masked: keep p = 0 and alpha = 0 instead of exp(-inf - -inf).
      const T m_use = m_new == -std::numeric_limits<T>::infinity() ? T(0) : m_new;
      p[r] = ok ? dev_exp(sc - m_use) : T(0);
      const T alpha = dev_exp(m[r] - m_use);
      l[r] = l[r] * alpha + warp_sum(p[r]);
      m[r] = m_new;
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[r][c] *= alpha;
    }
    // acc[r][c] += sum_jj p[r](lane jj) * V[jj][lane + 32c]
    const int kmax = static_cast<int>(i_end - j0 < BK ? i_end - j0 : BK);  // keys >= i_end are masked for all rows
#pragma unroll 4
    for (int jj = 0; jj < kmax; ++jj) {
      T vv[NC];
#pragma unroll
      for (int c = 0; c < NC; ++c) vv[c] = Vs[jj * DP + c * 32 + lane];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const T pj = __shfl_sync(0xffffffffu, p[r], jj);
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[r][c] += pj * vv[c];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const index_t i = row0 + r;
    if (i >= S) continue;
    const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
    T* o = out + (b * S + i) * ldq + static_cast<index_t>(h) * DH;
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int d = c * 32 + lane;
      if (d < DH) o[d] = acc[r][c] * inv;
    }
  }
}

// ---- attention: tensor-core kernel --------------------------------------------------------
// 4 warps x 16 query rows (BQ 64), key tiles of 64. Shared memory holds two [64][DH + 8] 16-bit
// tiles (the pad keeps ldmatrix conflict-free): first Q, then K and V. Each warp keeps its Q
// fragments, its 16 x 64 score tile and its 16 x DH output in registers (mma.sync m16n8k16).

constexpr int kMmaWarps = 4;
constexpr int kMmaBQ = 64;
constexpr int kMmaBK = 64;

template <class H>
__device__ inline std::uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<H, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const std::uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const std::uint32_t*>(&v);
  }
}

/// d += a b for one m16n8k16 tile (row-major A, column-major B, fp32 accumulators).
template <class H>
__device__ inline void mma16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<H, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // the host side never selects this kernel below compute capability 8.0
#endif
}

/// ldmatrix .x4 of 16-bit tiles from shared memory (TRANS: the .trans form, for the V operand).
template <bool TRANS = false>
__device__ inline void ldsm_x4(std::uint32_t& r0, std::uint32_t& r1, std::uint32_t& r2, std::uint32_t& r3,
                               const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr)
                 : "memory");
#else
  __trap();
#endif
}

/// Rows [r0, r0 + 64) of a [S, ld] float tensor (columns col0 .. col0 + DH) into a 16-bit tile
/// with pitch DH + 8; rows at or past S become zeros. With RoPE tables (cos, sin: [S, DH / 2],
/// row r0 + r for tile row r) each row is rotated on the way, as rope_rotate_row does.
template <class H, int DH>
__device__ inline void stage_tile(H* dst, const float* __restrict__ src, index_t ld, index_t col0, index_t r0,
                                  index_t rows_left, const float* __restrict__ cos_t = nullptr,
                                  const float* __restrict__ sin_t = nullptr) {
  // Batches of 8 float4 loads in flight per thread: enough to cover latency without spilling
  // next to the output accumulators that stay live across the staging.
  constexpr int LD = DH + 8, C4 = DH / 4, N = kMmaBK * C4 / (kMmaWarps * 32), NB = N < 8 ? N : 8;
  static_assert(N % NB == 0, "stage_tile: tile size");
  if (cos_t) {
    // Four float4 loads per item (the value, its rotation partner, cos and sin): two items at a time.
    constexpr int HALF = DH / 2;
#pragma unroll 1
    for (int it0 = 0; it0 < N; it0 += 2) {
      float4 x[2], p[2], c[2], sn[2];
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        const int e = (it0 + it) * kMmaWarps * 32 + static_cast<int>(threadIdx.x);
        const int r = e / C4, col = (e % C4) * 4;
        const int i = col < HALF ? col : col - HALF, partner = col < HALF ? col + HALF : col - HALF;
        const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
        const bool in = r < rows_left;
        const float* row = src + (r0 + r) * ld + col0;
        x[it] = in ? __ldg(reinterpret_cast<const float4*>(row + col)) : z;
        p[it] = in ? __ldg(reinterpret_cast<const float4*>(row + partner)) : z;
        c[it] = in ? __ldg(reinterpret_cast<const float4*>(cos_t + (r0 + r) * HALF + i)) : z;
        sn[it] = in ? __ldg(reinterpret_cast<const float4*>(sin_t + (r0 + r) * HALF + i)) : z;
      }
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        const int e = (it0 + it) * kMmaWarps * 32 + static_cast<int>(threadIdx.x);
        const int r = e / C4, col = (e % C4) * 4;
        // First half: x c - x2 s; second half: x c + x1 s (the partner is x2 resp. x1).
        const float sg = col < HALF ? -1.f : 1.f;
        uint2 u;
        u.x = pack2<H>(x[it].x * c[it].x + sg * (p[it].x * sn[it].x), x[it].y * c[it].y + sg * (p[it].y * sn[it].y));
        u.y = pack2<H>(x[it].z * c[it].z + sg * (p[it].z * sn[it].z), x[it].w * c[it].w + sg * (p[it].w * sn[it].w));
        *reinterpret_cast<uint2*>(dst + r * LD + col) = u;
      }
    }
    return;
  }
#pragma unroll 1
  for (int it0 = 0; it0 < N; it0 += NB) {
    float4 x[NB];
#pragma unroll
    for (int it = 0; it < NB; ++it) {
      const int e = (it0 + it) * kMmaWarps * 32 + static_cast<int>(threadIdx.x);
      const int r = e / C4, c = (e % C4) * 4;
      x[it] = r < rows_left ? __ldg(reinterpret_cast<const float4*>(src + (r0 + r) * ld + col0 + c))
                            : make_float4(0.f, 0.f, 0.f, 0.f);
    }
#pragma unroll
    for (int it = 0; it < NB; ++it) {
      const int e = (it0 + it) * kMmaWarps * 32 + static_cast<int>(threadIdx.x);
      const int r = e / C4, c = (e % C4) * 4;
      uint2 u;
      u.x = pack2<H>(x[it].x, x[it].y);
      u.y = pack2<H>(x[it].z, x[it].w);
      *reinterpret_cast<uint2*>(dst + r * LD + c) = u;
    }
  }
}

template <class H, int DH>
__global__ void __launch_bounds__(kMmaWarps * 32)
    attention_mma_kernel(float* __restrict__ out, const float* __restrict__ q, const float* __restrict__ k,
                         const float* __restrict__ v, const std::uint8_t* __restrict__ key_mask, AttentionArgs a,
                         float scale_log2, const float* __restrict__ rope_cos, const float* __restrict__ rope_sin) {
  constexpr int BQ = kMmaBQ, BK = kMmaBK, LD = DH + 8, KS = DH / 16, NT = BK / 8, DT = DH / 8;
  __shared__ __align__(16) H As[BK * LD];  // Q, then K
  __shared__ __align__(16) H Bs[BK * LD];  // V
  __shared__ bool key_ok[BK];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int gq = lane / 4, tq = lane % 4;  // fragment row group and column pair
  index_t b, i0;
  int h;
  attention_block_coords<BQ>(a, b, h, i0);
  const int g = h / a.group;
  const index_t S = a.S;
  const index_t ldq = static_cast<index_t>(a.NH) * DH, ldk = static_cast<index_t>(a.NKV) * DH;
  const std::uint8_t* mask = key_mask ? key_mask + b * S : nullptr;

  // Q fragments of the warp's 16 rows.
  const float* rc = rope_cos ? rope_cos + b * S * (DH / 2) : nullptr;  // this sequence's tables
  const float* rs = rope_cos ? rope_sin + b * S * (DH / 2) : nullptr;
  stage_tile<H, DH>(As, q + b * S * ldq, ldq, static_cast<index_t>(h) * DH, i0, S - i0, rc, rs);
  __syncthreads();
  std::uint32_t qf[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks)
    ldsm_x4(qf[ks][0], qf[ks][1], qf[ks][2], qf[ks][3], As + (warp * 16 + (lane & 15)) * LD + ks * 16 + (lane >> 4) * 8);

  float o[DT][4];
#pragma unroll
  for (int n = 0; n < DT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  const index_t row[2] = {i0 + warp * 16 + gq, i0 + warp * 16 + gq + 8};

  const index_t i_end = i0 + BQ < S ? i0 + BQ : S;
  for (index_t j0 = attention_first_key<BK>(a, i0); j0 < i_end; j0 += BK) {
    __syncthreads();  // previous tile (or the Q tile) fully read
    stage_tile<H, DH>(As, k + b * S * ldk, ldk, static_cast<index_t>(g) * DH, j0, S - j0, rc, rs);
    stage_tile<H, DH>(Bs, v + b * S * ldk, ldk, static_cast<index_t>(g) * DH, j0, S - j0);
    if (tid < BK) key_ok[tid] = j0 + tid < S && (!mask || mask[j0 + tid] != 0);
    __syncthreads();

    // S = Q K^T for the warp's 16 rows and the tile's 64 keys.
    float sc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        std::uint32_t b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3,
                As + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + ks * 16 + ((lane >> 3) & 1) * 8);
        mma16816<H>(sc[2 * np], qf[ks], b0, b1);
        mma16816<H>(sc[2 * np + 1], qf[ks], b2, b3);
      }
    }

    // Scale into the exp2 domain, mask, and update the running max / sum of both rows.
    const bool need_mask = attention_tile_needs_mask<BQ, BK>(a, i0, j0, mask != nullptr);
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = sc[n][e] * scale_log2;
        if (need_mask) {
          const int jj = n * 8 + 2 * tq + (e & 1);
          if (!key_ok[jj] || !attention_visible(a, row[e >> 1], j0 + jj)) x = -INFINITY;
        }
        sc[n][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    float alpha[2], m_use[2];
#pragma unroll
    for (int rr = 0; rr < 2; ++rr) {
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 1));
      mx[rr] = fmaxf(mx[rr], __shfl_xor_sync(0xffffffffu, mx[rr], 2));
      const float m_new = fmaxf(m_run[rr], mx[rr]);
      m_use[rr] = m_new == -INFINITY ? 0.f : m_new;
      alpha[rr] = exp2f(m_run[rr] - m_use[rr]);
      m_run[rr] = m_new;
      l_run[rr] *= alpha[rr];
    }
#pragma unroll
    for (int n = 0; n < DT; ++n) {
      o[n][0] *= alpha[0];
      o[n][1] *= alpha[0];
      o[n][2] *= alpha[1];
      o[n][3] *= alpha[1];
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(sc[n][e] - m_use[e >> 1]);  // exp2(-inf) = 0 for masked keys
        sc[n][e] = p;
        l_run[e >> 1] += p;
      }

    // O += P V: the score accumulators of key blocks 2kk, 2kk+1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      const std::uint32_t pa[4] = {pack2<H>(sc[2 * kk][0], sc[2 * kk][1]), pack2<H>(sc[2 * kk][2], sc[2 * kk][3]),
                                   pack2<H>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                   pack2<H>(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        std::uint32_t b0, b1, b2, b3;
        ldsm_x4<true>(b0, b1, b2, b3,
                      Bs + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
        mma16816<H>(o[2 * dp], pa, b0, b1);
        mma16816<H>(o[2 * dp + 1], pa, b2, b3);
      }
    }
  }

  // Row sums are spread over the 4 lanes of a quad: a fixed butterfly, then normalise and store.
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    l_run[rr] += __shfl_xor_sync(0xffffffffu, l_run[rr], 1);
    l_run[rr] += __shfl_xor_sync(0xffffffffu, l_run[rr], 2);
  }
#pragma unroll
  for (int rr = 0; rr < 2; ++rr) {
    if (row[rr] >= S) continue;
    const float inv = l_run[rr] > 0.f ? 1.f / l_run[rr] : 0.f;
    float* dst = out + (b * S + row[rr]) * ldq + static_cast<index_t>(h) * DH + 2 * tq;
#pragma unroll
    for (int n = 0; n < DT; ++n)
      *reinterpret_cast<float2*>(dst + n * 8) = make_float2(o[n][2 * rr] * inv, o[n][2 * rr + 1] * inv);
  }
}

/// Launches the exact kernel for head dims up to 32 * NC.
template <class T, int NC>
void launch_attention_exact(T* out, const T* q, const T* k, const T* v, const std::uint8_t* mask, AttentionArgs a,
                            index_t B, T scale, const T* rope_cos, const T* rope_sin) {
  constexpr std::size_t smem = exact_smem_bytes<T, NC>();
  // Above 48 KiB dynamic shared memory is opt-in; set on every call (cheap) so any device works.
  if (smem > 48 * 1024)
    DISTILX_CUDA_CHECK(cudaFuncSetAttribute(attention_exact_kernel<T, NC>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)));
  a.num_q_tiles = static_cast<int>((a.S + ExactCfg<T>::BQ - 1) / ExactCfg<T>::BQ);
  const index_t blocks = B * a.NH * a.num_q_tiles;
  DISTILX_REQUIRE(shape_error, blocks <= index_t(0x7fffffff), "attention: B * NH * ceil(S / ", ExactCfg<T>::BQ,
                  ") = ", blocks, " thread blocks exceeds the grid limit; split the batch");
  attention_exact_kernel<T, NC><<<static_cast<unsigned>(blocks), kExactWarps * 32, smem, stream()>>>(
      out, q, k, v, mask, a, scale, rope_cos, rope_sin);
  DISTILX_CUDA_LAUNCH_CHECK();
}

template <class H, int DH>
void launch_attention_mma(float* out, const float* q, const float* k, const float* v, const std::uint8_t* mask,
                          AttentionArgs a, index_t B, float scale, const float* rope_cos, const float* rope_sin) {
  a.num_q_tiles = static_cast<int>((a.S + kMmaBQ - 1) / kMmaBQ);
  const index_t blocks = B * a.NH * a.num_q_tiles;
  DISTILX_REQUIRE(shape_error, blocks <= index_t(0x7fffffff), "attention: B * NH * ceil(S / ", kMmaBQ, ") = ", blocks,
                  " thread blocks exceeds the grid limit; split the batch");
  const float scale_log2 = scale * 1.4426950408889634f;
  attention_mma_kernel<H, DH><<<static_cast<unsigned>(blocks), kMmaWarps * 32, 0, stream()>>>(
      out, q, k, v, mask, a, scale_log2, rope_cos, rope_sin);
  DISTILX_CUDA_LAUNCH_CHECK();
}

// ---- gated MLP: bias + activation + product on 16-bit storage ------------------------------

/// g[i] = Act(g[i] + bg[i % F]) * (u[i] + bu[i % F]) over [M, F] bf16 values, in fp32, in place
/// on g; bg, bu may be null. VEC elements per thread step (VEC 8 needs F % 8 == 0 and 16-byte
/// aligned rows: one uint4 load of each operand).
template <class Act, int VEC>
__global__ void gated_bias_bf16_kernel(__nv_bfloat16* __restrict__ g, const __nv_bfloat16* __restrict__ u,
                                       const float* __restrict__ bg, const float* __restrict__ bu, index_t M,
                                       index_t F) {
  using H = __nv_bfloat16;
  const index_t n = M * F / VEC;
  for (index_t i = global_id(); i < n; i += global_stride()) {
    H gv[VEC], uv[VEC];
    if constexpr (VEC == 8) {
      *reinterpret_cast<uint4*>(gv) = reinterpret_cast<const uint4*>(g)[i];
      *reinterpret_cast<uint4*>(uv) = reinterpret_cast<const uint4*>(u)[i];
    } else {
      gv[0] = g[i];
      uv[0] = u[i];
    }
    const index_t c0 = (i * VEC) % F;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float a = __bfloat162float(gv[e]) + (bg ? bg[c0 + e] : 0.f);
      const float b = __bfloat162float(uv[e]) + (bu ? bu[c0 + e] : 0.f);
      gv[e] = ::distilx::cuda_backend::detail::to_half<H>(Act::f(a) * b);
    }
    if constexpr (VEC == 8) reinterpret_cast<uint4*>(g)[i] = *reinterpret_cast<const uint4*>(gv);
    else g[i] = gv[0];
  }
}

/// RMSNorm of float rows written as 16-bit values (H = bf16 / fp16) for the products that read
/// them: y = half((x * rs) * w), rs = 1 / sqrt(mean(x^2) + eps), as the float kernel computes it
/// except for the order of the sum of squares (float4 pieces per lane), so rs can differ by an
/// ulp. One warp per row; the row stays in registers between the sum and the scaling (one read of
/// x): C % 128 == 0, C <= 128 * MAXV, x and w 16-byte aligned.
template <class H, int MAXV>
__global__ void rmsnorm_half_kernel(H* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w,
                                    index_t M, index_t C, float eps) {
  const int lane = threadIdx.x % 32;
  const int nv = static_cast<int>(C / 128);  // float4 per lane
  const float4* w4 = reinterpret_cast<const float4*>(w);
  for (index_t r = blockIdx.x * static_cast<index_t>(kRowWarps) + threadIdx.x / 32; r < M;
       r += static_cast<index_t>(gridDim.x) * kRowWarps) {
    const float4* xr = reinterpret_cast<const float4*>(x + r * C);
    float4 v[MAXV];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < MAXV; ++i)
      if (i < nv) {
        v[i] = xr[lane + 32 * i];
        ss += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
      }
    const float rs = 1.f / dev_sqrt(warp_sum(ss) / float(C) + eps);
#pragma unroll
    for (int i = 0; i < MAXV; ++i)
      if (i < nv) {
        const float4 g = w4[lane + 32 * i];
        const float4 o = make_float4((v[i].x * rs) * g.x, (v[i].y * rs) * g.y, (v[i].z * rs) * g.z, (v[i].w * rs) * g.w);
        detail::store4(y + r * C + 4 * (lane + 32 * i), o);
      }
  }
}
/// Any width: the float kernel's two passes over the row, written as 16-bit values.
template <class H>
__global__ void rmsnorm_half_rows_kernel(H* __restrict__ y, const float* __restrict__ x, const float* __restrict__ w,
                                         index_t M, index_t C, float eps) {
  const int lane = threadIdx.x % 32;
  for (index_t r = blockIdx.x * static_cast<index_t>(kRowWarps) + threadIdx.x / 32; r < M;
       r += static_cast<index_t>(gridDim.x) * kRowWarps) {
    const float* xr = x + r * C;
    float ss = 0.f;
    for (index_t c = lane; c < C; c += 32) ss += xr[c] * xr[c];
    const float rs = 1.f / dev_sqrt(warp_sum(ss) / float(C) + eps);
    for (index_t c = lane; c < C; c += 32) y[r * C + c] = detail::to_half<H>((xr[c] * rs) * w[c]);
  }
}

}  // namespace kernels

namespace detail {
/// y[M, N] (type ty, row pitch ldy) = alpha a[M, K] w[N, K]^T + beta y for 16-bit operands a and w
/// (row pitches in the HalfOperands), fp32 accumulation.
inline void half_gemm_nt(index_t M, index_t N, index_t K, const HalfOperand& a, const HalfOperand& w, cudaDataType_t t16,
                         float beta, void* y, cudaDataType_t ty, index_t ldy) {
  const float alpha = 1.0f;
  DISTILX_CUBLAS_CHECK(cublasGemmEx_64(cublas_handle(true), CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, w.p, t16, w.ld,
                                       a.p, t16, a.ld, &beta, y, ty, ldy, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}
/// y[M, N] (fp32, row pitch ldy) = a[M, K] w[N, K]^T + b[N] for 16-bit a and w, the bias added in
/// the product's epilogue (cuBLASLt), so y is written once instead of written and then read and
/// written again by a bias pass. A plan (descriptors and the heuristic's algorithm) is kept per
/// shape, pointer alignment and thread (at most kMaxPlans, then the cache starts over); the
/// workspace is per-thread, per-stream scratch. Returns false, doing nothing, when cuBLASLt
/// offers no algorithm for the call (the caller then adds the bias itself).
class LtBiasGemm {
 public:
  LtBiasGemm(const LtBiasGemm&) = delete;
  LtBiasGemm& operator=(const LtBiasGemm&) = delete;
  static LtBiasGemm& for_this_thread() {
    thread_local LtBiasGemm g;
    return g;
  }
  bool run(index_t M, index_t N, index_t K, const HalfOperand& a, const HalfOperand& w, cudaDataType_t t16,
           const float* bias, float* y, index_t ldy) {
    // The heuristic must know how the pointers are aligned (its default assumes 256 bytes).
    const Align al{alignment(a.p), alignment(w.p), alignment(y), alignment(bias)};
    Plan& p = plan(M, N, K, a.ld, w.ld, ldy, t16, al);
    if (!p.found) return false;
    DISTILX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    ++runs_;
    void* ws = p.ws_bytes ? ws_.get(0, p.ws_bytes) : nullptr;
    const float alpha = 1.0f, beta = 0.0f;
    // Column-major view, as half_gemm_nt: y^T [N, M] = (w stored [K, N])^T (a stored [K, M]).
    DISTILX_CUBLAS_CHECK(cublasLtMatmul(handle(), p.op, &alpha, w.p, p.A, a.p, p.B, &beta, y, p.C, y, p.C, &p.algo, ws,
                                        p.ws_bytes, current_stream()));
    return true;
  }
  /// Products this thread ran with the bias in the epilogue (tests check the path with it).
  std::uint64_t runs() const { return runs_; }

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t A = nullptr, B = nullptr, C = nullptr;
    cublasLtMatmulAlgo_t algo{};
    std::size_t ws_bytes = 0;
    bool found = false;
  };
  static constexpr std::size_t kMaxWorkspace = std::size_t(32) << 20;
  static constexpr std::size_t kMaxPlans = 64;
  struct Align {
    std::uint32_t a, w, y, bias;
  };
  static std::uint32_t alignment(const void* p) {  // largest power of two dividing p, at most 256
    const auto v = reinterpret_cast<std::uintptr_t>(p);
    std::uint32_t al = 256;
    while (al > 1 && v % al != 0) al /= 2;
    return al;
  }
  static void destroy(Plan& p) {
    if (p.A) (void)cublasLtMatrixLayoutDestroy(p.A);
    if (p.B) (void)cublasLtMatrixLayoutDestroy(p.B);
    if (p.C) (void)cublasLtMatrixLayoutDestroy(p.C);
    if (p.op) (void)cublasLtMatmulDescDestroy(p.op);
    p = Plan{};
  }
  LtBiasGemm() = default;
  ~LtBiasGemm() {  // at thread exit: errors ignored
    for (auto& kv : plans_) destroy(kv.second);
    if (lt_) (void)cublasLtDestroy(lt_);
  }
  cublasLtHandle_t handle() {
    if (!lt_) DISTILX_CUBLAS_CHECK(cublasLtCreate(&lt_));
    return lt_;
  }
  Plan& plan(index_t M, index_t N, index_t K, index_t lda, index_t ldw, index_t ldy, cudaDataType_t t16,
             const Align& al) {
    const auto key = std::make_tuple(M, N, K, lda, ldw, ldy, static_cast<int>(t16), al.a, al.w, al.y, al.bias);
    auto it = plans_.find(key);
    if (it != plans_.end()) return it->second;
    if (plans_.size() >= kMaxPlans) {  // e.g. evaluation at many lengths: start over
      DISTILX_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
      for (auto& kv : plans_) destroy(kv.second);
      plans_.clear();
    }
    Plan& p = plans_[key];
    DISTILX_CUBLAS_CHECK(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = CUDA_R_32F;
    DISTILX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    DISTILX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    DISTILX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
    DISTILX_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
    DISTILX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.A, t16, static_cast<std::uint64_t>(K), static_cast<std::uint64_t>(N), ldw));
    DISTILX_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p.B, t16, static_cast<std::uint64_t>(K), static_cast<std::uint64_t>(M), lda));
    DISTILX_CUBLAS_CHECK(
        cublasLtMatrixLayoutCreate(&p.C, CUDA_R_32F, static_cast<std::uint64_t>(N), static_cast<std::uint64_t>(M), ldy));
    cublasLtMatmulPreference_t pref = nullptr;
    DISTILX_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const std::size_t ws = kMaxWorkspace;
    DISTILX_CUBLAS_CHECK(
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    // Operand A of the column-major call is w, B is a; C and D are y.
    const std::pair<cublasLtMatmulPreferenceAttributes_t, std::uint32_t> aligns[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al.w},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al.a},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al.y},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al.y}};
    for (const auto& [attr, v] : aligns)
      DISTILX_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof(v)));
    (void)al.bias;  // cuBLASLt has no alignment preference for the bias; it is part of the key
    cublasLtMatmulHeuristicResult_t res{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle(), p.op, p.A, p.B, p.C, p.C, pref, 1, &res, &found);
    (void)cublasLtMatmulPreferenceDestroy(pref);
    if (st == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS) {
      p.algo = res.algo;
      p.ws_bytes = res.workspaceSize;
      p.found = true;
    }
    return p;
  }
  cublasLtHandle_t lt_ = nullptr;
  std::map<std::tuple<index_t, index_t, index_t, index_t, index_t, index_t, int, std::uint32_t, std::uint32_t,
                      std::uint32_t, std::uint32_t>,
           Plan>
      plans_;
  SlotScratch<1> ws_;
  std::uint64_t runs_ = 0;
};

/// Whether a layer's projections of M rows from width d to the given output widths take the
/// 16-bit path: a half math mode and no thin product (all of M, d and the widths above kThinDim).
inline bool fused_half_path(MathMode mode, index_t M, index_t d, std::initializer_list<index_t> widths) {
  if (!is_half_mode(mode) || M <= kThinDim || d <= kThinDim) return false;
  for (index_t n : widths)
    if (n <= kThinDim) return false;
  return true;
}
}  // namespace detail
}  // namespace distilx::cuda_backend

namespace distilx::ops {

// ---- projections (ops/fused.hpp) ----------------------------------------------------------------

/// q, k, v = x W^T (+ b) for the three weights; in bf16 / fp16 x is converted to 16 bits once.
template <class T>
void qkv_forward(cuda be, T* q, T* k, T* v, const T* x, const T* wq, const T* bq, const T* wk, const T* bk,
                 const T* wv, const T* bv, index_t M, index_t d, index_t nq, index_t nkv) {
  namespace cd = ::distilx::cuda_backend::detail;
  if constexpr (std::is_same_v<T, float>) {
    const auto mode = ::distilx::cuda_backend::math_mode();
    if (cd::fused_half_path(mode, M, d, {nq, nkv})) {
      const cd::HalfOperand a = cd::half_operand(cd::Operand{x, M, d, d, 0, 1}, mode, 0);
      const cudaDataType_t t16 = cd::half_type(mode);
      const T* ws[3] = {wq, wk, wv};
      const T* bs[3] = {bq, bk, bv};
      T* ys[3] = {q, k, v};
      const index_t ns[3] = {nq, nkv, nkv};
      for (int i = 0; i < 3; ++i) {
        const cd::HalfOperand w = cd::half_operand(cd::Operand{ws[i], ns[i], d, d, 0, 1}, mode, 1);
        if (bs[i] && cd::LtBiasGemm::for_this_thread().run(M, ns[i], d, a, w, t16, bs[i], ys[i], ns[i])) continue;
        cd::half_gemm_nt(M, ns[i], d, a, w, t16, 0.0f, ys[i], CUDA_R_32F, ns[i]);
        if (bs[i]) add_row_vector(be, ys[i], bs[i], M, ns[i]);
      }
      return;
    }
  }
  detail::qkv_forward_unfused(be, q, k, v, x, wq, bq, wk, bk, wv, bv, M, d, nq, nkv);
}

/// x += (Act(xn Wg^T + bg) * (xn Wu^T + bu)) Wd^T. In bf16 the [M, F] intermediate lives in 16 bits
/// inside the gate / up scratch (see the top of this file).
template <class Act, class T>
void gated_mlp_forward(cuda be, T* x, const T* xn, const T* wg, const T* bg, const T* wu, const T* bu, const T* wd,
                       index_t M, index_t d, index_t F, T* gate, T* up) {
  namespace cd = ::distilx::cuda_backend::detail;
  namespace k = ::distilx::cuda_backend::kernels;
  if constexpr (std::is_same_v<T, float>) {
    // bf16 only: in fp16 the intermediate could overflow (65504) where the fp32 one does not.
    const auto mode = ::distilx::cuda_backend::math_mode();
    if (mode == ::distilx::cuda_backend::MathMode::bf16 && cd::fused_half_path(mode, M, d, {F})) {
      const cudaDataType_t t16 = cd::half_type(mode);
      const cd::HalfOperand a = cd::half_operand(cd::Operand{xn, M, d, d, 0, 1}, mode, 0);
      const cd::HalfOperand w_g = cd::half_operand(cd::Operand{wg, F, d, d, 0, 1}, mode, 1);
      cd::half_gemm_nt(M, F, d, a, w_g, t16, 0.0f, gate, t16, F);
      const cd::HalfOperand w_u = cd::half_operand(cd::Operand{wu, F, d, d, 0, 1}, mode, 1);
      cd::half_gemm_nt(M, F, d, a, w_u, t16, 0.0f, up, t16, F);
      const bool vec = F % 8 == 0;
      const index_t items = vec ? M * F / 8 : M * F;
      using H = __nv_bfloat16;
      H* g16 = reinterpret_cast<H*>(gate);
      const H* u16 = reinterpret_cast<const H*>(up);
      if (vec)
        k::gated_bias_bf16_kernel<Act, 8><<<k::grid_for(items), k::kBlock, 0, k::stream()>>>(g16, u16, bg, bu, M, F);
      else
        k::gated_bias_bf16_kernel<Act, 1><<<k::grid_for(items), k::kBlock, 0, k::stream()>>>(g16, u16, bg, bu, M, F);
      DISTILX_CUDA_LAUNCH_CHECK();
      const cd::HalfOperand h{gate, F, 0};
      const cd::HalfOperand w_d = cd::half_operand(cd::Operand{wd, d, F, F, 0, 1}, mode, 1);
      cd::half_gemm_nt(M, d, F, h, w_d, t16, 1.0f, x, CUDA_R_32F, d);
      return;
    }
  }
  detail::gated_mlp_forward_unfused<Act>(be, x, xn, wg, bg, wu, bu, wd, M, d, F, gate, up);
}

/// RMSNorm for products (ops/norm.hpp). In bf16 / fp16 the rows are written straight as the
/// products' 16-bit operand and staged (blas.cuh: stage_half_image) until the returned object
/// goes: a half-size write instead of a float write that the products' operand conversion reads
/// again, and one read of x where the row fits in registers (C % 128 == 0, C <= 2048; two reads
/// otherwise). Outside bf16 / fp16 the float rmsnorm_forward.
template <class T>
OperandRegistration rmsnorm_forward_for_products(cuda be, T* y, const T* x, const T* w, index_t M, index_t C, T eps) {
  namespace cd = ::distilx::cuda_backend::detail;
  namespace k = ::distilx::cuda_backend::kernels;
  if constexpr (std::is_same_v<T, float>) {
    const auto mode = ::distilx::cuda_backend::math_mode();
    if (::distilx::cuda_backend::is_half_mode(mode) && M > 0 && C > 0) {
      void* img = cd::operand_scratch(cd::kStagedImageSlot, 2 * static_cast<std::size_t>(M * C));
      const bool bf16 = mode == ::distilx::cuda_backend::MathMode::bf16;
      const bool vec = C % 128 == 0 && C <= 128 * 16 && reinterpret_cast<std::uintptr_t>(x) % 16 == 0 &&
                       reinterpret_cast<std::uintptr_t>(w) % 16 == 0;
      const int grid = k::row_grid(M), block = 32 * k::kRowWarps;
      if (vec && bf16)
        k::rmsnorm_half_kernel<__nv_bfloat16, 16><<<grid, block, 0, k::stream()>>>(static_cast<__nv_bfloat16*>(img), x, w, M, C, eps);
      else if (vec)
        k::rmsnorm_half_kernel<__half, 16><<<grid, block, 0, k::stream()>>>(static_cast<__half*>(img), x, w, M, C, eps);
      else if (bf16)
        k::rmsnorm_half_rows_kernel<__nv_bfloat16><<<grid, block, 0, k::stream()>>>(static_cast<__nv_bfloat16*>(img), x, w, M, C, eps);
      else
        k::rmsnorm_half_rows_kernel<__half><<<grid, block, 0, k::stream()>>>(static_cast<__half*>(img), x, w, M, C, eps);
      DISTILX_CUDA_LAUNCH_CHECK();
      cd::stage_half_image(y, M * C, img, mode);
      return OperandRegistration([y] {
        if (cd::staged_image().p == y) cd::drop_staged_image();
      });
    }
  }
  rmsnorm_forward(be, y, static_cast<T*>(nullptr), x, w, M, C, eps);
  return {};
}

/// dst[0, n) (device) = host[0, n), ordered on the current stream; from pageable memory the call
/// returns once the host array is staged, so the caller may reuse it at once.
template <class T>
void copy_from_host(cuda, T* dst, const T* host, index_t n) {
  if (n <= 0) return;
  DISTILX_CUDA_CHECK(cudaMemcpyAsync(dst, host, sizeof(T) * static_cast<std::size_t>(n), cudaMemcpyHostToDevice,
                                     ::distilx::cuda_backend::current_stream()));
}

// ---- RoPE -------------------------------------------------------------------------------

/// cos/sin tables [M, half] (device) for positions [M] (device int32) and inv_freq [half] (device
/// float32), with the CPU op's rounding: float32 angle, double cos/sin rounded to T.
template <class T>
void rope_cos_sin(cuda, T* cos_out, T* sin_out, const std::int32_t* positions, const float* inv_freq, index_t M,
                  index_t half) {
  if (M <= 0 || half <= 0) return;
  namespace k = ::distilx::cuda_backend::kernels;
  k::rope_cos_sin_kernel<<<k::grid_for(M * half), k::kBlock, 0, k::stream()>>>(cos_out, sin_out, positions, inv_freq,
                                                                                M, half);
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// In-place rotation of x [M, H, D] (row stride ld) with the tables of rope_cos_sin.
template <class T>
void rope_forward(cuda, T* x, const T* cos_t, const T* sin_t, index_t M, index_t H, index_t D, index_t ld) {
  DISTILX_REQUIRE(shape_error, D % 2 == 0 && ld >= H * D, "rope_forward: need an even head dim and ld >= H * D, got D ",
                  D, ", H ", H, ", ld ", ld);
  if (M <= 0 || H <= 0 || D <= 0) return;
  namespace k = ::distilx::cuda_backend::kernels;
  k::rope_rotate_kernel<<<k::grid_for(M * H * (D / 2)), k::kBlock, 0, k::stream()>>>(x, cos_t, sin_t, M, H, D, ld, T(1));
  DISTILX_CUDA_LAUNCH_CHECK();
}
template <class T>
void rope_forward(cuda be, T* x, const T* cos_t, const T* sin_t, index_t M, index_t H, index_t D) {
  rope_forward(be, x, cos_t, sin_t, M, H, D, H * D);
}

/// Input gradient in place on dy [M, H, D]: the inverse rotation.
template <class T>
void rope_backward(cuda, T* dy, const T* cos_t, const T* sin_t, index_t M, index_t H, index_t D, index_t ld) {
  DISTILX_REQUIRE(shape_error, D % 2 == 0 && ld >= H * D, "rope_backward: need an even head dim and ld >= H * D, got D ",
                  D, ", H ", H, ", ld ", ld);
  if (M <= 0 || H <= 0 || D <= 0) return;
  namespace k = ::distilx::cuda_backend::kernels;
  k::rope_rotate_kernel<<<k::grid_for(M * H * (D / 2)), k::kBlock, 0, k::stream()>>>(dy, cos_t, sin_t, M, H, D, ld,
                                                                                     T(-1));
  DISTILX_CUDA_LAUNCH_CHECK();
}
template <class T>
void rope_backward(cuda be, T* dy, const T* cos_t, const T* sin_t, index_t M, index_t H, index_t D) {
  rope_backward(be, dy, cos_t, sin_t, M, H, D, H * D);
}

// ---- attention ----------------------------------------------------------------------------

/// The fused kernels need no scratch (q_tile is a CPU tuning knob and is ignored here).
inline index_t causal_attention_scratch_size(cuda, const CausalAttentionShape&) { return 0; }

/// out = causal GQA attention(q, k, v), the CPU op's semantics; key_mask [B, S] is a device array
/// or null. The kernel follows cuda_backend::math_mode() (see attention_kernel_for); scratch is
/// unused and may be null.
template <class T>
void causal_attention_forward(cuda, T* out, const T* q, const T* k, const T* v, const std::uint8_t* key_mask,
                              const CausalAttentionShape& s, T scale, T* scratch, index_t scratch_size,
                              AttentionRope<T> rope = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "causal_attention_forward(cuda): float or double");
  (void)scratch;
  (void)scratch_size;
  namespace kn = ::distilx::cuda_backend::kernels;
  using ::distilx::cuda_backend::AttentionKernel;
  DISTILX_REQUIRE(shape_error, s.B >= 0 && s.S >= 0 && s.NH >= 0 && s.DH > 0 && s.window >= 0,
                  "attention: need B, S, NH >= 0, DH > 0 and window >= 0, got B ", s.B, ", S ", s.S, ", NH ", s.NH,
                  ", DH ", s.DH, ", window ", s.window);
  DISTILX_REQUIRE(shape_error, s.NKV > 0 && s.NH % s.NKV == 0, "attention: num_attention_heads (", s.NH,
                  ") must be a multiple of num_key_value_heads (", s.NKV, ")");
  DISTILX_REQUIRE(shape_error, s.DH <= 256, "attention(cuda): head_dim ", s.DH,
                  " is not supported; the fused kernels handle head_dim <= 256");
  DISTILX_REQUIRE(shape_error, s.NH <= 65535 && s.NH * s.DH <= index_t(1) << 30, "attention(cuda): ", s.NH,
                  " heads of ", s.DH, " is out of range");
  DISTILX_REQUIRE(shape_error, !rope || (s.DH % 2 == 0 && rope.sin != nullptr),
                  "attention: RoPE tables need both cos and sin and an even head dim, got DH ", s.DH);
  if (s.B == 0 || s.S == 0 || s.NH == 0) return;
  const T* rc = rope.cos;
  const T* rs = rope.sin;
  kn::AttentionArgs a;
  a.S = s.S;
  a.window = s.window;
  a.NH = static_cast<int>(s.NH);
  a.NKV = static_cast<int>(s.NKV);
  a.DH = static_cast<int>(s.DH);
  a.group = static_cast<int>(s.NH / s.NKV);
  AttentionKernel which = ::distilx::cuda_backend::attention_kernel_for<T>(s, out, q, k, v);
  namespace cd = ::distilx::cuda_backend::detail;
  if (rope && (!cd::aligned16(rc) || !cd::aligned16(rs))) which = AttentionKernel::exact;  // float4 table reads
  if constexpr (std::is_same_v<T, float>) {
    if (which != AttentionKernel::exact) {
      const bool bf = which == AttentionKernel::tensor_core_bf16;
      if (s.DH == 64) {
        if (bf) kn::launch_attention_mma<__nv_bfloat16, 64>(out, q, k, v, key_mask, a, s.B, scale, rc, rs);
        else kn::launch_attention_mma<__half, 64>(out, q, k, v, key_mask, a, s.B, scale, rc, rs);
      } else {
        if (bf) kn::launch_attention_mma<__nv_bfloat16, 128>(out, q, k, v, key_mask, a, s.B, scale, rc, rs);
        else kn::launch_attention_mma<__half, 128>(out, q, k, v, key_mask, a, s.B, scale, rc, rs);
      }
      return;
    }
  }
  if (s.DH <= 32) kn::launch_attention_exact<T, 1>(out, q, k, v, key_mask, a, s.B, scale, rc, rs);
  else if (s.DH <= 64) kn::launch_attention_exact<T, 2>(out, q, k, v, key_mask, a, s.B, scale, rc, rs);
  else if (s.DH <= 128) kn::launch_attention_exact<T, 4>(out, q, k, v, key_mask, a, s.B, scale, rc, rs);
  else kn::launch_attention_exact<T, 8>(out, q, k, v, key_mask, a, s.B, scale, rc, rs);
}

}  // namespace distilx::ops
