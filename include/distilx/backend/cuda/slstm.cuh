// sLSTM recurrence on the GPU: SLSTMCell<T, cuda> (spec-xlstm.md §3.2-3.6, performance.md §2). Persistent fused
// kernels: one thread block owns one (head, batch tile) for the whole sequence, keeps the head's recurrent matrix
// R_h on chip (registers, else shared memory) for all S steps and runs recurrent product, gate math
// (SLSTMPointwise, the CPU cell's own code) and state update in the same kernel, forward and reversed backward.
// dR is a cuBLAS product per gate (ops::gemm_strided_batched over the heads, following the math mode) that
// reads y_{t-1} and the gate gradients in place; dbias a deterministic split reduction (no float atomics).
#pragma once

#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <type_traits>

#include "distilx/backend/cuda/blas.cuh"
#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/cuda/memory.cuh"
#include "distilx/cells/slstm.hpp"

namespace distilx {

/// Where the fused kernels keep R_h during the recurrence.
enum class SLSTMRPlace {
  automatic,  // registers when they fit (float, head_dim <= 96, batch tile <= 4), else shared, else global
  registers,  // each thread holds its slice of R_h (falls back to shared where not available)
  shared,     // R_h in shared memory (falls back to global where it does not fit)
  global      // R_h read from global memory (L2) every step
};
/// Which kernel family runs the recurrence.
enum class SLSTMKernel {
  automatic,  // quad for head_dim <= 128, else simple
  quad,       // four threads per unit (forward) / sixteen per k-quad (backward), R_h in registers if possible
  simple      // one thread per gate column, R_h in shared or global memory; any head_dim
};

/// Launch choices of SLSTMCell<T, cuda>; the defaults pick them from the shape and the device. Exposed for tests
/// and tuning. Within one kernel family results do not depend on the batch tile or on where R lives (each
/// batch row and unit runs the same instruction sequence on the same values); the two families sum the
/// recurrent product in different orders, so they agree to rounding only.
struct SLSTMCudaTuning {
  int batch_tile = 0;  // batch rows per thread block: 0 = auto, else 1, 2, 4 or 8
  SLSTMRPlace r_place = SLSTMRPlace::automatic;
  SLSTMKernel kernel = SLSTMKernel::automatic;
};

namespace cuda_backend::slstm_detail {

// Saved per (b, t) row and unit for the backward pass, layout [B, S, kSlots, H]. Slot kYPrev of row (b, t) holds
// y_{t-1} (the initial state's y at t = 0: zero in forward()), as in the CPU cell, so the rows of that slot form
// the dR product's left operand as they are: [B*S, H] with row pitch kSlots*H, no shifted copy and no special
// case at the sequence starts (their y_{-1} = 0 rows add nothing).
enum Slot : int { kYPrev = 0, kC, kN, kI, kF, kSigNF, kZ, kO, kSlots };
// The backward ring holds, per batch row, the 7 gate/state slots (c .. o) followed by dy: [ring][BT][8][DHp].
constexpr int kRingSlots = 8;
constexpr int kRingDy = 7;
constexpr int kFwdRing = 3;       // wx of steps t (in use), t+1 (landed), t+2 (in flight)
constexpr int kBwdRing = 4;       // steps t, t-1 (in use: c_{t-1}, n_{t-1}), t-2 (landed), t-3 (in flight)
constexpr int kMaxThreads = 512;  // 4*DH columns per block; larger heads loop (keeps <= 128 registers a thread)

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

/// Row stride (elements) of R in shared memory: at least roundup(4DH, 16) (the backward reads 16-column chunks,
/// zero padded) and an odd multiple of 64 bytes, so that the backward's 16-byte reads R[k][16c + 4p ..] by the
/// 8 threads of a quarter warp (two k, four p) hit 8 distinct bank groups. The forward reads whole rows and is
/// conflict-free with any stride.
template <class T>
__host__ __device__ constexpr int r_row_stride(int DH) {
  constexpr int e = 128 / static_cast<int>(sizeof(T));
  return round_up(round_up(4 * DH, 16), e) + e / 2;
}

/// Four consecutive shared-memory values with 16-byte loads (p 16-byte aligned).
template <class T>
__device__ __forceinline__ void lds4(const T* p, T (&v)[4]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  } else {
    const double2 x = *reinterpret_cast<const double2*>(p);
    const double2 y = *reinterpret_cast<const double2*>(p + 2);
    v[0] = x.x, v[1] = x.y, v[2] = y.x, v[3] = y.y;
  }
}

/// R_h resident in shared memory, [DHp][RS], rows k >= DH and columns q >= 4DH zero.
template <class T>
struct SmemR {
  const T* p;
  int rs;
  __device__ __forceinline__ T at(int k, int q) const { return p[k * rs + q]; }
  __device__ __forceinline__ void load4(int k, int q0, T (&v)[4]) const { lds4(p + k * rs + q0, v); }
};

/// Fallback when R_h does not fit in shared memory (e.g. fp32 with DH > ~115, fp64 with DH > ~80): R_h is read
/// from global memory on every step; at 4*DH*DH*sizeof(T) per head it stays in L2 (50 MB on an H100), so this
/// costs L2 bandwidth instead of HBM. Same values, same summation order as SmemR, so results are bit-identical.
template <class T>
struct GlobalR {
  const T* p;  // R_h, [DH][4DH]
  int DH, G;
  __device__ __forceinline__ T at(int k, int q) const {
    return k < DH ? __ldg(p + static_cast<index_t>(k) * G + q) : T(0);
  }
  __device__ __forceinline__ void load4(int k, int q0, T (&v)[4]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = q0 + i < G ? __ldg(p + static_cast<index_t>(k) * G + q0 + i) : T(0);
  }
};

/// acc[b] = sum_k y[b][k] R[k][q] for the BT rows of the tile, k ascending in two interleaved chains (even and
/// odd k, summed at the end) to halve the FMA dependency chain. y_s rows have DHp entries, zero beyond DH.
/// forward() and step() both run this exact sequence, so step() reproduces forward() bit for bit.
template <class T, int BT, class RV>
__device__ __forceinline__ void recurrent_dot(T (&acc)[BT], const T* y_s, int DHp, const RV& R, int q) {
  T a0[BT], a1[BT];
#pragma unroll
  for (int b = 0; b < BT; ++b) a0[b] = a1[b] = T(0);
#pragma unroll 2
  for (int k = 0; k < DHp; k += 4) {
    const T r0 = R.at(k, q), r1 = R.at(k + 1, q), r2 = R.at(k + 2, q), r3 = R.at(k + 3, q);
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      T yv[4];
      lds4(y_s + b * DHp + k, yv);
      a0[b] = fma(yv[0], r0, a0[b]);
      a1[b] = fma(yv[1], r1, a1[b]);
      a0[b] = fma(yv[2], r2, a0[b]);
      a1[b] = fma(yv[3], r3, a1[b]);
    }
  }
#pragma unroll
  for (int b = 0; b < BT; ++b) acc[b] = a0[b] + a1[b];
}

template <class T>
struct FwdArgs {
  T* y;           // [B, S, H]
  T* saved;       // [B, S, kSlots, H] or null (step)
  T* state;       // [4, B, H] (y, c, n, m) read at start and written at end, or null (zero initial state)
  const T* wx;    // [B, S, 4H] gate-major
  const T* R;     // [NH, DH, 4DH]
  const T* bias;  // [NH, 4DH]
  int B, S, NH, DH;
};

/// Shared-memory bytes of the forward kernel (the carve-up in slstm_forward_simple_kernel).
template <class T>
inline std::size_t forward_simple_smem(int DH, int BT, bool r_smem) {
  const int G = 4 * DH, DHp = round_up(DH, 4);
  const std::size_t n = (r_smem ? std::size_t(DHp) * r_row_stride<T>(DH) : 0) + G + std::size_t(BT) * DHp +
                        std::size_t(BT) * G + 3 * std::size_t(BT) * DHp + std::size_t(kFwdRing) * BT * G;
  return n * sizeof(T);
}

/// Simple forward (any head_dim): all S steps for head blockIdx.x and batch rows [blockIdx.y*BT, +BT). Per step: (1)
/// every thread owns gate columns q and computes pre[b][q] = (wx + y_{t-1} R_h) + bias; (2) every thread owns units (b,
/// j), applies SLSTMPointwise::forward with c, n, m kept in shared memory and writes y_t (into y_s for the next step, y
/// and saved). wx for step t+2 is prefetched with cp.async while step t computes, so global latency stays off the
/// sequential path.
template <class T, int BT, bool kRSmem>
__global__ void __launch_bounds__(kMaxThreads) slstm_forward_simple_kernel(FwdArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int DH = a.DH, G = 4 * DH, H = a.NH * DH, DHp = round_up(DH, 4), RS = r_row_stride<T>(DH);
  const int h = blockIdx.x, b0 = blockIdx.y * BT, nb = min(BT, a.B - b0);
  const int tid = threadIdx.x, nt = blockDim.x;
  // Carve-up: every piece a multiple of 4 elements, so each starts 16-byte aligned.
  T* R_s = reinterpret_cast<T*>(smem_raw);
  T* bias_s = R_s + (kRSmem ? DHp * RS : 0);
  T* y_s = bias_s + G;        // [BT][DHp]: y_{t-1}, zero beyond DH
  T* pre_s = y_s + BT * DHp;  // [BT][G]
  T* c_s = pre_s + BT * G;    // [BT][DHp]
  T* n_s = c_s + BT * DHp;
  T* m_s = n_s + BT * DHp;
  T* wx_s = m_s + BT * DHp;  // [kFwdRing][BT][G]
  const T* R_h = a.R + static_cast<index_t>(h) * DH * G;

  if constexpr (kRSmem) {
    for (int e = tid; e < DHp * RS; e += nt) {
      const int k = e / RS, q = e - k * RS;
      R_s[e] = k < DH && q < G ? R_h[static_cast<index_t>(k) * G + q] : T(0);
    }
  }
  for (int e = tid; e < G; e += nt) bias_s[e] = a.bias[static_cast<index_t>(h) * G + e];
  const index_t BH = static_cast<index_t>(a.B) * H;
  for (int e = tid; e < BT * DHp; e += nt) {
    const int b = e / DHp, j = e - b * DHp;
    T yv = T(0), cv = T(0), nv = T(0), mv = T(0);
    if (a.state && b < nb && j < DH) {
      const index_t o = static_cast<index_t>(b0 + b) * H + h * DH + j;
      yv = a.state[o], cv = a.state[BH + o], nv = a.state[2 * BH + o], mv = a.state[3 * BH + o];
    }
    y_s[e] = yv, c_s[e] = cv, n_s[e] = nv, m_s[e] = mv;
  }

  auto issue_wx = [&](int t) {
    if (t < a.S) {
      T* dst = wx_s + (t % kFwdRing) * BT * G;
      for (int e = tid; e < nb * G; e += nt) {
        const int b = e / G, q = e - b * G, g = q / DH, j = q - g * DH;
        const T* src = a.wx + (static_cast<index_t>(b0 + b) * a.S + t) * 4 * H + g * H + h * DH + j;
        __pipeline_memcpy_async(dst + e, src, sizeof(T));
      }
    }
    __pipeline_commit();  // also when empty, so the group count per step stays fixed
  };
  issue_wx(0);
  issue_wx(1);
  __pipeline_wait_prior(1);
  __syncthreads();

  for (int t = 0; t < a.S; ++t) {
    issue_wx(t + 2);  // its buffer held step t-1's wx, last read before the previous step's first barrier
    const T* wxt = wx_s + (t % kFwdRing) * BT * G;
    for (int q = tid; q < G; q += nt) {
      T acc[BT];
      if constexpr (kRSmem)
        recurrent_dot<T, BT>(acc, y_s, DHp, SmemR<T>{R_s, RS}, q);
      else
        recurrent_dot<T, BT>(acc, y_s, DHp, GlobalR<T>{R_h, DH, G}, q);
#pragma unroll
      for (int b = 0; b < BT; ++b)
        if (b < nb) pre_s[b * G + q] = (wxt[b * G + q] + acc[b]) + bias_s[q];  // CPU order: wx + Ry + b
    }
    __syncthreads();
    for (int u = tid; u < nb * DH; u += nt) {
      const int b = u / DH, j = u - b * DH, s = b * DHp + j;
      const T* pre = pre_s + b * G;
      T c, n, m, yv;
      SLSTMGates<T> gs;
      SLSTMPointwise::forward(pre[j], pre[DH + j], pre[2 * DH + j], pre[3 * DH + j], c_s[s], n_s[s], m_s[s], c, n, m,
                              yv, gs);
      const T y_prev = y_s[s];  // y_{t-1} of this unit (only this thread touches y_s[s] in this phase)
      c_s[s] = c, n_s[s] = n, m_s[s] = m, y_s[s] = yv;
      const index_t row = static_cast<index_t>(b0 + b) * a.S + t;
      a.y[row * H + h * DH + j] = yv;
      if (a.saved) {
        T* sv = a.saved + row * kSlots * H + h * DH + j;
        sv[kYPrev * H] = y_prev, sv[kC * H] = c, sv[kN * H] = n, sv[kI * H] = gs.i, sv[kF * H] = gs.f;
        sv[kSigNF * H] = gs.sig_nf, sv[kZ * H] = gs.z, sv[kO * H] = gs.o;
      }
    }
    __pipeline_wait_prior(1);  // this thread's copies for step t+1 have landed; the barrier publishes them
    __syncthreads();
  }

  if (a.state) {
    for (int u = tid; u < nb * DH; u += nt) {
      const int b = u / DH, j = u - b * DH, s = b * DHp + j;
      const index_t o = static_cast<index_t>(b0 + b) * H + h * DH + j;
      a.state[o] = y_s[s], a.state[BH + o] = c_s[s], a.state[2 * BH + o] = n_s[s], a.state[3 * BH + o] = m_s[s];
    }
  }
}

template <class T>
struct BwdArgs {
  T* dwx;          // [B, S, 4H], overwritten
  const T* saved;  // [B, S, kSlots, H]
  const T* dy;     // [B, S, H]
  const T* R;      // [NH, DH, 4DH]
  int B, S, NH, DH;
};

template <class T>
inline std::size_t backward_simple_smem(int DH, int BT, bool r_smem) {
  const int DHp = round_up(DH, 4), Q16 = round_up(4 * DH, 16);
  const std::size_t n = (r_smem ? std::size_t(DHp) * r_row_stride<T>(DH) : 0) + std::size_t(BT) * Q16 +
                        3 * std::size_t(BT) * DHp + std::size_t(kBwdRing) * BT * kRingSlots * DHp;
  return n * sizeof(T);
}

/// Simple reverse pass (spec §3.6, any head_dim) for head blockIdx.x and batch rows [blockIdx.y*BT, +BT), carrying
/// dy_rec, dc, dn in shared memory. Per step: (A) every thread owns units (b, j): SLSTMPointwise::backward -> dg
/// (written to dwx and dg_s); (B) dy_rec[b][k] = sum_q R[k][q] dg[b][q]: four consecutive lanes share k, each sums a
/// quarter of the q's (16-column chunks, 4 per lane), then two xor-shuffles add the quarters in a fixed order.
/// The saved rows and dy of step t-3 are prefetched with cp.async while step t computes.
template <class T, int BT, bool kRSmem>
__global__ void __launch_bounds__(kMaxThreads) slstm_backward_simple_kernel(BwdArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int DH = a.DH, G = 4 * DH, H = a.NH * DH, DHp = round_up(DH, 4), RS = r_row_stride<T>(DH);
  const int Q16 = round_up(G, 16);
  const int h = blockIdx.x, b0 = blockIdx.y * BT, nb = min(BT, a.B - b0);
  const int tid = threadIdx.x, nt = blockDim.x;
  T* R_s = reinterpret_cast<T*>(smem_raw);
  T* dg_s = R_s + (kRSmem ? DHp * RS : 0);  // [BT][Q16], zero beyond G and for rows >= nb
  T* dyrec_s = dg_s + BT * Q16;             // [BT][DHp]
  T* dc_s = dyrec_s + BT * DHp;
  T* dn_s = dc_s + BT * DHp;
  T* ring = dn_s + BT * DHp;  // [kBwdRing][BT][kRingSlots][DHp]
  const int ring_step = BT * kRingSlots * DHp;
  const T* R_h = a.R + static_cast<index_t>(h) * DH * G;

  if constexpr (kRSmem) {
    for (int e = tid; e < DHp * RS; e += nt) {
      const int k = e / RS, q = e - k * RS;
      R_s[e] = k < DH && q < G ? R_h[static_cast<index_t>(k) * G + q] : T(0);
    }
  }
  for (int e = tid; e < BT * Q16; e += nt) dg_s[e] = T(0);
  for (int e = tid; e < 3 * BT * DHp; e += nt) dyrec_s[e] = T(0);  // dyrec, dc, dn are contiguous

  auto issue = [&](int t) {
    if (t >= 0) {
      T* dst = ring + (t & (kBwdRing - 1)) * ring_step;
      const int per_b = kRingSlots * DH;
      for (int e = tid; e < nb * per_b; e += nt) {
        const int b = e / per_b, r = e - b * per_b, s = r / DH, j = r - s * DH;
        const index_t row = static_cast<index_t>(b0 + b) * a.S + t;
        const T* src = s < kRingDy ? a.saved + (row * kSlots + kC + s) * H + h * DH + j : a.dy + row * H + h * DH + j;
        __pipeline_memcpy_async(dst + (b * kRingSlots + s) * DHp + j, src, sizeof(T));
      }
    }
    __pipeline_commit();
  };
  issue(a.S - 1);
  issue(a.S - 2);
  issue(a.S - 3);
  __pipeline_wait_prior(1);
  __syncthreads();

  for (int t = a.S - 1; t >= 0; --t) {
    issue(t - 3);  // its buffer held step t+1, last read before the previous step's first barrier
    const T* cur = ring + (t & (kBwdRing - 1)) * ring_step;
    const T* prv = ring + ((t + kBwdRing - 1) & (kBwdRing - 1)) * ring_step;
    for (int u = tid; u < nb * DH; u += nt) {
      const int b = u / DH, j = u - b * DH, s = b * DHp + j;
      const T* cb = cur + b * kRingSlots * DHp + j;  // slot x at cb[(x - kC) * DHp]
      SLSTMGates<T> gs;
      gs.i = cb[(kI - kC) * DHp], gs.f = cb[(kF - kC) * DHp], gs.sig_nf = cb[(kSigNF - kC) * DHp];
      gs.z = cb[(kZ - kC) * DHp], gs.o = cb[(kO - kC) * DHp];
      const T c = cb[0], n = cb[(kN - kC) * DHp];
      T c_prev = T(0), n_prev = T(0);
      if (t > 0) {
        const T* pb = prv + b * kRingSlots * DHp + j;
        c_prev = pb[0], n_prev = pb[(kN - kC) * DHp];
      }
      T dc = dc_s[s], dn = dn_s[s], d[4];
      SLSTMPointwise::backward(cb[kRingDy * DHp] + dyrec_s[s], dc, dn, gs, c, n, c_prev, n_prev, d[0], d[1], d[2],
                               d[3]);
      dc_s[s] = dc, dn_s[s] = dn;
      T* dw = a.dwx + (static_cast<index_t>(b0 + b) * a.S + t) * 4 * H + h * DH + j;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        dw[g * H] = d[g];
        dg_s[b * Q16 + g * DH + j] = d[g];
      }
    }
    __syncthreads();
    if (t > 0) {
      // Every warp runs every iteration (uniform trip count), so the full-mask shuffles are legal.
      for (int base = 0; base < G; base += nt) {
        const int kk = base + tid;
        const bool active = kk < G;
        const int k = active ? kk >> 2 : 0, part = kk & 3;
        T a0[BT], a1[BT];
#pragma unroll
        for (int b = 0; b < BT; ++b) a0[b] = a1[b] = T(0);
#pragma unroll 2
        for (int c16 = 0; c16 < Q16; c16 += 16) {
          const int q0 = c16 + 4 * part;
          T r[4];
          if constexpr (kRSmem)
            SmemR<T>{R_s, RS}.load4(k, q0, r);
          else
            GlobalR<T>{R_h, DH, G}.load4(k, q0, r);
#pragma unroll
          for (int b = 0; b < BT; ++b) {
            T dv[4];
            lds4(dg_s + b * Q16 + q0, dv);
            a0[b] = fma(r[0], dv[0], a0[b]);
            a1[b] = fma(r[1], dv[1], a1[b]);
            a0[b] = fma(r[2], dv[2], a0[b]);
            a1[b] = fma(r[3], dv[3], a1[b]);
          }
        }
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          T v = a0[b] + a1[b];
          v += __shfl_xor_sync(0xffffffffu, v, 1);
          v += __shfl_xor_sync(0xffffffffu, v, 2);
          if (active && part == 0 && b < nb) dyrec_s[b * DHp + k] = v;
        }
      }
    }
    __pipeline_wait_prior(1);  // steps t-1 and t-2 have landed (t-3 may still be in flight)
    __syncthreads();
  }
}

// ---- quad kernels (head_dim <= 128) ------------------------------------------------------------------------------
// The simple kernels stream all of R_h (and y, dg) through shared memory every step, read by every warp; that
// shared-memory traffic sets their step time. The quad kernels split the products so that each thread owns a
// fixed slice of R_h (in registers when it fits) and warps share their inputs: per step only y (or dg) is
// read from shared memory, about DH*DH/32 wavefronts per batch row.

enum RPlace : int { kRegs = 0, kShared = 1, kGlobal = 2 };
constexpr int kQuadMaxDH = 128;        // 4*DH (forward) and 16*ceil(DH/4) (backward) threads <= 512
constexpr int kQuadRegsThreads = 384;  // register variants: DH <= 96, ~4*KQM + 50 registers a thread

/// Forward quad R_s row stride, = 8 words (mod 32) for float: a warp reads rows 4i..4i+3 (its four k-quarters),
/// 8 consecutive columns each, which then fall into four disjoint bank octets.
template <class T>
__host__ __device__ constexpr int fwd_quad_rs(int DH) {
  constexpr int e = 128 / static_cast<int>(sizeof(T));
  return round_up(4 * DH, e) + e / 4;
}
/// Backward quad R_s row stride: rows 4 apart differ by 16 words (mod 32) for float, so a warp's two k-quads
/// (16 consecutive columns each) use all 32 banks once.
template <class T>
__host__ __device__ constexpr int bwd_quad_rs(int DH) {
  constexpr int e = 128 / static_cast<int>(sizeof(T));
  return round_up(round_up(4 * DH, 16), e) + e / 8;
}

/// k-groups of four a register-R thread holds (compile-time): ceil(DH/4) rounded up to 8, 16 or 24; 0 = none.
inline int quad_kqm(int DH) {
  const int kq = (DH + 3) / 4;
  return kq <= 8 ? 8 : kq <= 16 ? 16 : kq <= 24 ? 24 : 0;
}

template <class T>
inline std::size_t forward_quad_smem(int DH, int BT, int rp, int kqm) {
  const int KQ = (DH + 3) / 4, DHq = 4 * (rp == kRegs ? kqm : KQ), G = 4 * DH;
  const std::size_t n = (rp == kShared ? std::size_t(DHq) * fwd_quad_rs<T>(DH) : 0) + 2 * std::size_t(BT) * DHq +
                        std::size_t(kFwdRing) * BT * G;
  return n * sizeof(T);
}

/// Quad forward for head blockIdx.x and batch rows [blockIdx.y*BT, +BT). Thread (j, p) = (tid/4, tid%4) owns
/// unit j's four gate columns over the k-quarter k = 4i + p: it sums its part of (y_{t-1} R_h)[b][g*DH + j] for
/// all rows b of the tile, two xor-shuffles add the four quarters (fixed order, identical in all four lanes),
/// and lane p then runs the gate math for rows b = p, p+4, ... with c, n, m in registers. y_t goes to the other
/// half of a ping-pong buffer, so one barrier per step suffices. wx is prefetched two steps ahead (cp.async).
template <class T, int BT, int RP, int KQM>
__global__ void __launch_bounds__(RP == kRegs ? kQuadRegsThreads : kMaxThreads, 1)
    slstm_forward_quad_kernel(FwdArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr unsigned kFull = 0xffffffffu;
  constexpr int RB = (BT + 3) / 4;  // batch rows per lane
  const int DH = a.DH, G = 4 * DH, H = a.NH * DH, KQ = (DH + 3) / 4;
  const int DHq = 4 * (RP == kRegs ? KQM : KQ);  // y row length, zero beyond DH
  const int RS = fwd_quad_rs<T>(DH);
  const int h = blockIdx.x, b0 = blockIdx.y * BT, nb = min(BT, a.B - b0);
  const int tid = threadIdx.x, nt = blockDim.x, j = tid >> 2, p = tid & 3;
  const bool active = j < DH;  // inactive lanes compute on zeros: the shuffles need whole warps
  const int jc = active ? j : 0;
  T* R_s = reinterpret_cast<T*>(smem_raw);
  T* y_s = R_s + (RP == kShared ? DHq * RS : 0);  // [2][BT][DHq]
  T* wx_s = y_s + 2 * BT * DHq;                   // [kFwdRing][BT][G]
  const T* R_h = a.R + static_cast<index_t>(h) * DH * G;

  T rr[RP == kRegs ? KQM : 1][4];  // rr[i][g] = R_h[4i + p][g*DH + j]
  if constexpr (RP == kRegs) {
#pragma unroll
    for (int i = 0; i < KQM; ++i) {
      const int k = 4 * i + p;
#pragma unroll
      for (int g = 0; g < 4; ++g) rr[i][g] = active && k < DH ? R_h[static_cast<index_t>(k) * G + g * DH + j] : T(0);
    }
  } else if constexpr (RP == kShared) {
    for (int e = tid; e < DHq * RS; e += nt) {
      const int k = e / RS, q = e - k * RS;
      R_s[e] = k < DH && q < G ? R_h[static_cast<index_t>(k) * G + q] : T(0);
    }
  }
  T bg[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) bg[g] = a.bias[static_cast<index_t>(h) * G + g * DH + jc];
  const index_t BH = static_cast<index_t>(a.B) * H;
  T cs[RB], ns[RB], ms[RB], yl[RB];
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    const int b = 4 * r + p;
    cs[r] = ns[r] = ms[r] = yl[r] = T(0);
    if (a.state && active && b < nb) {
      const index_t o = static_cast<index_t>(b0 + b) * H + h * DH + j;
      yl[r] = a.state[o], cs[r] = a.state[BH + o], ns[r] = a.state[2 * BH + o], ms[r] = a.state[3 * BH + o];
    }
  }
  for (int e = tid; e < 2 * BT * DHq; e += nt) {
    const int b = e / DHq, k = e - b * DHq;  // b >= BT: second half of the ping-pong buffer
    y_s[e] = a.state && b < nb && k < DH ? a.state[static_cast<index_t>(b0 + b) * H + h * DH + k] : T(0);
  }

  auto issue_wx = [&](int t) {
    if (t < a.S) {
      T* dst = wx_s + (t % kFwdRing) * BT * G;
      for (int e = tid; e < nb * G; e += nt) {
        const int b = e / G, q = e - b * G, g = q / DH, jj = q - g * DH;
        const T* src = a.wx + (static_cast<index_t>(b0 + b) * a.S + t) * 4 * H + g * H + h * DH + jj;
        __pipeline_memcpy_async(dst + e, src, sizeof(T));
      }
    }
    __pipeline_commit();
  };
  issue_wx(0);
  issue_wx(1);
  __pipeline_wait_prior(1);
  __syncthreads();

  for (int t = 0; t < a.S; ++t) {
    issue_wx(t + 2);  // its buffer held step t-1's wx, read before the previous step's barrier
    const T* yp = y_s + (t & 1) * BT * DHq;
    T* yn = y_s + ((t + 1) & 1) * BT * DHq;
    T acc[4][BT];
#pragma unroll
    for (int g = 0; g < 4; ++g)
#pragma unroll
      for (int b = 0; b < BT; ++b) acc[g][b] = T(0);
    // k ascending, rows, gates: the same fma sequence for every R placement (padding adds fma(0, 0, acc) = acc).
    if constexpr (RP == kRegs) {
#pragma unroll
      for (int i = 0; i < KQM; ++i) {
        const int k = 4 * i + p;
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          const T yv = yp[b * DHq + k];
#pragma unroll
          for (int g = 0; g < 4; ++g) acc[g][b] = fma(yv, rr[i][g], acc[g][b]);
        }
      }
    } else {
#pragma unroll 2
      for (int i = 0; i < KQ; ++i) {
        const int k = 4 * i + p;
        T rv[4];
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          if constexpr (RP == kShared)
            rv[g] = R_s[k * RS + g * DH + jc];
          else
            rv[g] = k < DH ? __ldg(R_h + static_cast<index_t>(k) * G + g * DH + jc) : T(0);
        }
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          const T yv = yp[b * DHq + k];
#pragma unroll
          for (int g = 0; g < 4; ++g) acc[g][b] = fma(yv, rv[g], acc[g][b]);
        }
      }
    }
#pragma unroll
    for (int g = 0; g < 4; ++g)
#pragma unroll
      for (int b = 0; b < BT; ++b) {
        T v = acc[g][b];
        v += __shfl_xor_sync(kFull, v, 1);
        v += __shfl_xor_sync(kFull, v, 2);
        acc[g][b] = v;
      }
    const T* wxt = wx_s + (t % kFwdRing) * BT * G;
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      T pre[4];
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        pre[g] = acc[g][4 * r];
#pragma unroll
        for (int d = 1; d < 4; ++d)  // select row 4r + p with compile-time indices (no local-memory array)
          if (4 * r + d < BT && p == d) pre[g] = acc[g][4 * r + d < BT ? 4 * r + d : 0];
      }
      const int b = 4 * r + p;
      if (active && b < nb) {
#pragma unroll
        for (int g = 0; g < 4; ++g) pre[g] = (wxt[b * G + g * DH + j] + pre[g]) + bg[g];  // CPU order: wx + Ry + b
        T c, n, m, yv;
        SLSTMGates<T> gs;
        SLSTMPointwise::forward(pre[0], pre[1], pre[2], pre[3], cs[r], ns[r], ms[r], c, n, m, yv, gs);
        const T y_prev = yl[r];  // y_{t-1} of unit (b, j)
        cs[r] = c, ns[r] = n, ms[r] = m, yl[r] = yv;
        yn[b * DHq + j] = yv;
        const index_t row = static_cast<index_t>(b0 + b) * a.S + t;
        a.y[row * H + h * DH + j] = yv;
        if (a.saved) {
          T* sv = a.saved + row * kSlots * H + h * DH + j;
          sv[kYPrev * H] = y_prev, sv[kC * H] = c, sv[kN * H] = n, sv[kI * H] = gs.i, sv[kF * H] = gs.f;
          sv[kSigNF * H] = gs.sig_nf, sv[kZ * H] = gs.z, sv[kO * H] = gs.o;
        }
      }
    }
    __pipeline_wait_prior(1);  // step t+1's wx has landed (this thread's copies); the barrier publishes it
    __syncthreads();
  }

  if (a.state) {
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      const int b = 4 * r + p;
      if (active && b < nb) {
        const index_t o = static_cast<index_t>(b0 + b) * H + h * DH + j;
        a.state[o] = yl[r], a.state[BH + o] = cs[r], a.state[2 * BH + o] = ns[r], a.state[3 * BH + o] = ms[r];
      }
    }
  }
}

template <class T>
inline std::size_t backward_quad_smem(int DH, int BT, int rp, int kqm) {
  const int KQ = (DH + 3) / 4, DHq = 4 * KQ, QL = rp == kRegs ? 16 * kqm : round_up(4 * DH, 16);
  const std::size_t n = (rp == kShared ? std::size_t(DHq) * bwd_quad_rs<T>(DH) : 0) + std::size_t(BT) * QL +
                        3 * std::size_t(BT) * DHq + std::size_t(kBwdRing) * BT * kRingSlots * DHq;
  return n * sizeof(T);
}

/// Quad reverse pass for head blockIdx.x and batch rows [blockIdx.y*BT, +BT). Per step: (A) every thread owns
/// units (b, j) and runs SLSTMPointwise::backward (as the simple kernel); (B) dy_rec[b][k] = sum_q R[k][q] dg[b][q]
/// with thread (kq, part) = (tid/16, tid%16) owning rows k = 4kq..4kq+3 over the columns q = 16i + part (in
/// registers when it fits); four xor-shuffles add the 16 parts in a fixed order.
template <class T, int BT, int RP, int KQM>
__global__ void __launch_bounds__(RP == kRegs ? kQuadRegsThreads : kMaxThreads, 1)
    slstm_backward_quad_kernel(BwdArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr unsigned kFull = 0xffffffffu;
  const int DH = a.DH, G = 4 * DH, H = a.NH * DH, KQ = (DH + 3) / 4, DHq = 4 * KQ;
  const int QL = RP == kRegs ? 16 * KQM : round_up(G, 16);  // dg row length, zero beyond G
  const int RS = bwd_quad_rs<T>(DH);
  const int h = blockIdx.x, b0 = blockIdx.y * BT, nb = min(BT, a.B - b0);
  const int tid = threadIdx.x, nt = blockDim.x, kq = tid >> 4, part = tid & 15;
  const bool active = kq < KQ;
  const int kqc = active ? kq : 0;
  T* R_s = reinterpret_cast<T*>(smem_raw);
  T* dg_s = R_s + (RP == kShared ? DHq * RS : 0);  // [BT][QL]
  T* dyrec_s = dg_s + BT * QL;                     // [BT][DHq]
  T* dc_s = dyrec_s + BT * DHq;
  T* dn_s = dc_s + BT * DHq;
  T* ring = dn_s + BT * DHq;  // [kBwdRing][BT][kRingSlots][DHq]
  const int ring_step = BT * kRingSlots * DHq;
  const T* R_h = a.R + static_cast<index_t>(h) * DH * G;

  T rr[RP == kRegs ? KQM : 1][4];  // rr[i][r] = R_h[4kq + r][16i + part]
  if constexpr (RP == kRegs) {
#pragma unroll
    for (int i = 0; i < KQM; ++i) {
      const int q = 16 * i + part;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int k = 4 * kq + r;
        rr[i][r] = active && k < DH && q < G ? R_h[static_cast<index_t>(k) * G + q] : T(0);
      }
    }
  } else if constexpr (RP == kShared) {
    for (int e = tid; e < DHq * RS; e += nt) {
      const int k = e / RS, q = e - k * RS;
      R_s[e] = k < DH && q < G ? R_h[static_cast<index_t>(k) * G + q] : T(0);
    }
  }
  for (int e = tid; e < BT * QL; e += nt) dg_s[e] = T(0);
  for (int e = tid; e < 3 * BT * DHq; e += nt) dyrec_s[e] = T(0);  // dyrec, dc, dn are contiguous

  auto issue = [&](int t) {
    if (t >= 0) {
      T* dst = ring + (t & (kBwdRing - 1)) * ring_step;
      const int per_b = kRingSlots * DH;
      for (int e = tid; e < nb * per_b; e += nt) {
        const int b = e / per_b, r = e - b * per_b, s = r / DH, j = r - s * DH;
        const index_t row = static_cast<index_t>(b0 + b) * a.S + t;
        const T* src = s < kRingDy ? a.saved + (row * kSlots + kC + s) * H + h * DH + j : a.dy + row * H + h * DH + j;
        __pipeline_memcpy_async(dst + (b * kRingSlots + s) * DHq + j, src, sizeof(T));
      }
    }
    __pipeline_commit();
  };
  issue(a.S - 1);
  issue(a.S - 2);
  issue(a.S - 3);
  __pipeline_wait_prior(1);
  __syncthreads();

  for (int t = a.S - 1; t >= 0; --t) {
    issue(t - 3);  // its buffer held step t+1, last read before the previous step's first barrier
    const T* cur = ring + (t & (kBwdRing - 1)) * ring_step;
    const T* prv = ring + ((t + kBwdRing - 1) & (kBwdRing - 1)) * ring_step;
    for (int u = tid; u < nb * DH; u += nt) {
      const int b = u / DH, j = u - b * DH, s = b * DHq + j;
      const T* cb = cur + b * kRingSlots * DHq + j;  // slot x at cb[(x - kC) * DHq]
      SLSTMGates<T> gs;
      gs.i = cb[(kI - kC) * DHq], gs.f = cb[(kF - kC) * DHq], gs.sig_nf = cb[(kSigNF - kC) * DHq];
      gs.z = cb[(kZ - kC) * DHq], gs.o = cb[(kO - kC) * DHq];
      const T c = cb[0], n = cb[(kN - kC) * DHq];
      T c_prev = T(0), n_prev = T(0);
      if (t > 0) {
        const T* pb = prv + b * kRingSlots * DHq + j;
        c_prev = pb[0], n_prev = pb[(kN - kC) * DHq];
      }
      T dc = dc_s[s], dn = dn_s[s], d[4];
      SLSTMPointwise::backward(cb[kRingDy * DHq] + dyrec_s[s], dc, dn, gs, c, n, c_prev, n_prev, d[0], d[1], d[2],
                               d[3]);
      dc_s[s] = dc, dn_s[s] = dn;
      T* dw = a.dwx + (static_cast<index_t>(b0 + b) * a.S + t) * 4 * H + h * DH + j;
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        dw[g * H] = d[g];
        dg_s[b * QL + g * DH + j] = d[g];
      }
    }
    __syncthreads();
    if (t > 0) {
      T acc[4][BT];
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int b = 0; b < BT; ++b) acc[r][b] = T(0);
      if constexpr (RP == kRegs) {
#pragma unroll
        for (int i = 0; i < KQM; ++i) {
          const int q = 16 * i + part;
#pragma unroll
          for (int b = 0; b < BT; ++b) {
            const T dv = dg_s[b * QL + q];
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r][b] = fma(rr[i][r], dv, acc[r][b]);
          }
        }
      } else {
        const int NQ = QL / 16;
#pragma unroll 2
        for (int i = 0; i < NQ; ++i) {
          const int q = 16 * i + part;
          T rv[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int k = 4 * kqc + r;
            if constexpr (RP == kShared)
              rv[r] = R_s[k * RS + q];
            else
              rv[r] = k < DH && q < G ? __ldg(R_h + static_cast<index_t>(k) * G + q) : T(0);
          }
#pragma unroll
          for (int b = 0; b < BT; ++b) {
            const T dv = dg_s[b * QL + q];
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[r][b] = fma(rv[r], dv, acc[r][b]);
          }
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          T v = acc[r][b];
          v += __shfl_xor_sync(kFull, v, 1);
          v += __shfl_xor_sync(kFull, v, 2);
          v += __shfl_xor_sync(kFull, v, 4);
          v += __shfl_xor_sync(kFull, v, 8);
          if (active && part == r && 4 * kq + r < DH && b < nb) dyrec_s[b * DHq + 4 * kq + r] = v;
        }
    }
    __pipeline_wait_prior(1);  // steps t-1 and t-2 have landed (t-3 may still be in flight)
    __syncthreads();
  }
}

// ---- dR, dbias ---------------------------------------------------------------------------------------------------
// dR_h[k][g*DH + j] = sum over the rows (b, t) of y_{t-1}[b, t, h, k] dg[b, t, g, h, j] is a matrix product with
// the B*S rows as inner dimension; SLSTMCell::backward runs it through cuBLAS (one call per gate, batched over
// the heads). dbias_h[g*DH + j] = sum over the rows of dg[b, t, g, h, j] is a column sum of dwx, split over rows
// (fixed splits, fixed order: deterministic) and then summed over the splits.

constexpr int kBiasThreads = 256;        // dwx columns per block of the dbias partial kernel
constexpr index_t kBiasSplitRows = 256;  // about this many rows per split ...
constexpr index_t kBiasMaxSplits = 256;  // ... with at most this many splits

/// part_b[sp][h][g*DH + j] = sum of dg[r][g*H + h*DH + j] over the rows r of split sp = blockIdx.y, in ascending
/// row order. One thread per dwx column c = blockIdx.x * kBiasThreads + threadIdx.x < 4H, so a warp reads one
/// contiguous piece of a row; eight rows are loaded before they are added (in order) to keep loads in flight.
template <class T>
__global__ void __launch_bounds__(kBiasThreads) slstm_dbias_partial_kernel(T* part_b, const T* dg, index_t rows, int NH,
                                                                           int DH, index_t rows_per_split) {
  constexpr int kUnroll = 8;
  const int H = NH * DH, C = 4 * H;
  const int c = static_cast<int>(blockIdx.x) * kBiasThreads + static_cast<int>(threadIdx.x);
  if (c >= C) return;
  const index_t r_begin = static_cast<index_t>(blockIdx.y) * rows_per_split;
  const index_t r_end = r_begin + rows_per_split < rows ? r_begin + rows_per_split : rows;
  const T* col = dg + c;
  T sum = T(0);
  index_t r = r_begin;
  for (; r + kUnroll <= r_end; r += kUnroll) {
    T v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = col[(r + u) * C];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) sum += v[u];
  }
  for (; r < r_end; ++r) sum += col[r * C];
  const int g = c / H, hj = c - g * H, h = hj / DH, j = hj - h * DH;
  part_b[(static_cast<index_t>(blockIdx.y) * NH + h) * (4 * DH) + g * DH + j] = sum;
}

/// out[e] += sum_{s = 0..nsplit-1} part[s][e], splits in ascending order (deterministic).
template <class T>
__global__ void slstm_accumulate_splits_kernel(T* out, const T* part, index_t n, int nsplit) {
  const index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= n) return;
  T s = part[e];
  for (int i = 1; i < nsplit; ++i) s += part[static_cast<index_t>(i) * n + e];
  out[e] += s;
}

/// Device facts the launch choices need, read once per device.
struct DeviceInfo {
  int sms = 0;
  std::size_t smem_optin = 0;  // max dynamic shared memory per block (after opting in)
  std::size_t smem_per_sm = 0;
};
inline DeviceInfo device_info() {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool have[64] = {};
  int dev = 0;
  DISTILX_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lk(mu);
  if (dev < 64 && have[dev]) return cache[dev];
  DeviceInfo d;
  int v = 0;
  DISTILX_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
  d.sms = v;
  DISTILX_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  d.smem_optin = static_cast<std::size_t>(v);
  DISTILX_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  d.smem_per_sm = static_cast<std::size_t>(v);
  if (dev < 64) cache[dev] = d, have[dev] = true;
  return d;
}

/// A launch plan of the forward or backward recurrence.
struct Plan {
  bool quad = true;
  int bt = 1;
  int rp = kShared;  // RPlace
  int kqm = 0;       // register variants: k-groups held per thread
  int threads = 32;
  std::size_t smem = 0;
};

/// Picks kernel family, batch tile and where R lives. Cost model in shared-memory wavefronts per step (U = DH*DH/32
/// is one pass of y or dg over a warp-shared layout): quad reads U per batch row, plus 4U for R in shared memory
/// (8U from L2); simple reads 4U per batch row plus 4U for R. Blocks sharing an SM share its bandwidth, and each
/// wave pays a fixed ~1500 cycles of gate-math latency and barriers per step. Smallest cost wins, ties to the
/// smaller tile.
template <class T>
Plan choose_plan(bool backward, int B, int NH, int DH, const SLSTMCudaTuning& tune) {
  const DeviceInfo dev = device_info();
  const bool quad = tune.kernel == SLSTMKernel::quad || (tune.kernel == SLSTMKernel::automatic && DH <= kQuadMaxDH);
  DISTILX_REQUIRE(config_error, !quad || DH <= kQuadMaxDH,
                  "SLSTMCell<cuda>: the quad kernels need head_dim <= ", kQuadMaxDH, ", got ", DH);
  const int kqm = quad_kqm(DH);
  const bool regs_ok = quad && kqm > 0 && std::is_same_v<T, float>;  // fp64 R would not fit in registers
  const double U = double(DH) * DH / 32.0;
  Plan best;
  double best_cost = -1;
  for (int bt : {1, 2, 4, 8}) {
    if (tune.batch_tile != 0 && bt != tune.batch_tile) continue;
    Plan p;
    p.quad = quad;
    p.bt = bt;
    auto smem_of = [&](int rp) {
      if (!quad)
        return backward ? backward_simple_smem<T>(DH, bt, rp == kShared)
                        : forward_simple_smem<T>(DH, bt, rp == kShared);
      return backward ? backward_quad_smem<T>(DH, bt, rp, kqm) : forward_quad_smem<T>(DH, bt, rp, kqm);
    };
    const bool regs =
        regs_ok && bt <= 4 && (tune.r_place == SLSTMRPlace::automatic || tune.r_place == SLSTMRPlace::registers);
    if (regs) {
      p.rp = kRegs;
      p.kqm = kqm;
    } else {
      p.rp = tune.r_place != SLSTMRPlace::global && smem_of(kShared) <= dev.smem_optin ? kShared : kGlobal;
    }
    p.smem = smem_of(p.rp);
    if (p.smem > dev.smem_optin) continue;
    const int KQ = (DH + 3) / 4;
    p.threads = quad ? round_up(backward ? 16 * KQ : 4 * DH, 32) : std::min(round_up(4 * DH, 32), kMaxThreads);
    const int regs_per_thread = p.rp == kRegs ? 4 * kqm + 56 : 64;
    const int by_smem = static_cast<int>(dev.smem_per_sm / (p.smem + 1024));
    const int by_regs = 65536 / (p.threads * regs_per_thread);
    const int per_sm = std::max(1, std::min({by_smem, by_regs, 2048 / p.threads}));
    const double blocks = double(NH) * ((B + bt - 1) / bt);
    const double sms = std::max(dev.sms, 1);
    const double traffic = quad ? U * bt + (p.rp == kShared   ? 4 * U
                                            : p.rp == kGlobal ? 8 * U
                                                              : 0)
                                : 4 * U * bt + (p.rp == kShared ? 4 * U : 8 * U);
    const double cost = std::ceil(blocks / sms) * traffic + std::ceil(blocks / (sms * per_sm)) * 1500.0;
    if (best_cost < 0 || cost < best_cost) best = p, best_cost = cost;
  }
  DISTILX_REQUIRE(config_error, best_cost >= 0, "SLSTMCell<cuda>: no batch tile fits in shared memory for head_dim ",
                  DH, " (batch_tile ", tune.batch_tile, ")");
  return best;
}

template <class Kernel, class Args>
inline void launch_recurrence(Kernel kernel, const Args& a, const Plan& p, cudaStream_t st) {
  if (p.smem > 48 * 1024)
    DISTILX_CUDA_CHECK(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem)));
  const dim3 grid(a.NH, (a.B + p.bt - 1) / p.bt);
  kernel<<<grid, p.threads, p.smem, st>>>(a);
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// Instantiates the kernel variant a plan names. Register variants exist for float only, with tiles <= 4.
template <bool kBackward, class T, int BT>
void launch_plan_bt(const std::conditional_t<kBackward, BwdArgs<T>, FwdArgs<T>>& a, const Plan& p, cudaStream_t st) {
  auto quad_kernel = [](auto rp_tag, auto kqm_tag) {
    constexpr int RP = decltype(rp_tag)::value, KQM = decltype(kqm_tag)::value;
    if constexpr (kBackward)
      return &slstm_backward_quad_kernel<T, BT, RP, KQM>;
    else
      return &slstm_forward_quad_kernel<T, BT, RP, KQM>;
  };
  using I = std::integral_constant<int, 0>;
  if (!p.quad) {
    if constexpr (kBackward)
      launch_recurrence(
          p.rp == kShared ? &slstm_backward_simple_kernel<T, BT, true> : &slstm_backward_simple_kernel<T, BT, false>, a,
          p, st);
    else
      launch_recurrence(
          p.rp == kShared ? &slstm_forward_simple_kernel<T, BT, true> : &slstm_forward_simple_kernel<T, BT, false>, a,
          p, st);
    return;
  }
  if (p.rp == kShared) return launch_recurrence(quad_kernel(std::integral_constant<int, kShared>{}, I{}), a, p, st);
  if (p.rp == kGlobal) return launch_recurrence(quad_kernel(std::integral_constant<int, kGlobal>{}, I{}), a, p, st);
  if constexpr (std::is_same_v<T, float> && BT <= 4) {
    using R = std::integral_constant<int, kRegs>;
    switch (p.kqm) {
      case 8: return launch_recurrence(quad_kernel(R{}, std::integral_constant<int, 8>{}), a, p, st);
      case 16: return launch_recurrence(quad_kernel(R{}, std::integral_constant<int, 16>{}), a, p, st);
      case 24: return launch_recurrence(quad_kernel(R{}, std::integral_constant<int, 24>{}), a, p, st);
      default: break;
    }
  }
  DISTILX_ASSERT(false, "SLSTMCell<cuda>: no register variant for this plan");
}

template <bool kBackward, class T>
void launch_plan(const std::conditional_t<kBackward, BwdArgs<T>, FwdArgs<T>>& a, const Plan& p, cudaStream_t st) {
  switch (p.bt) {
    case 1: launch_plan_bt<kBackward, T, 1>(a, p, st); break;
    case 2: launch_plan_bt<kBackward, T, 2>(a, p, st); break;
    case 4: launch_plan_bt<kBackward, T, 4>(a, p, st); break;
    default: launch_plan_bt<kBackward, T, 8>(a, p, st); break;
  }
}

template <class T>
void launch_forward(const FwdArgs<T>& a, const SLSTMCudaTuning& tune, cudaStream_t st) {
  launch_plan<false, T>(a, choose_plan<T>(false, a.B, a.NH, a.DH, tune), st);
}

template <class T>
void launch_backward(const BwdArgs<T>& a, const SLSTMCudaTuning& tune, cudaStream_t st) {
  launch_plan<true, T>(a, choose_plan<T>(true, a.B, a.NH, a.DH, tune), st);
}

/// Row splits of the dbias reduction: a function of the shape alone (not of the device), so dbias is the same on
/// every GPU. About kBiasSplitRows rows per split, at most kBiasMaxSplits splits, none empty.
inline void dbias_splits(index_t rows, int& nsplit, index_t& rows_per_split) {
  const index_t want = std::min(kBiasMaxSplits, std::max<index_t>(1, (rows + kBiasSplitRows - 1) / kBiasSplitRows));
  rows_per_split = std::max<index_t>(1, (rows + want - 1) / want);
  nsplit = static_cast<int>(std::max<index_t>(1, (rows + rows_per_split - 1) / rows_per_split));
}

}  // namespace cuda_backend::slstm_detail

/// SLSTMCell on the CUDA backend: the CPU cell's public interface, every pointer a device pointer, all work
/// on cuda_backend::current_stream(). Saved states are T (fp32 for float).
template <class T>
class SLSTMCell<T, cuda> {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "SLSTMCell<T, cuda>: T must be float or double");

 public:
  SLSTMCell(index_t num_heads, index_t head_dim) : nh_(num_heads), dh_(head_dim) {
    DISTILX_REQUIRE(config_error, num_heads >= 1 && head_dim >= 1,
                    "SLSTMCell: num_heads and head_dim must be >= 1, got ", num_heads, " and ", head_dim);
  }

  index_t num_heads() const { return nh_; }
  index_t head_dim() const { return dh_; }
  index_t hidden_size() const { return nh_ * dh_; }

  /// Launch choices (tests, tuning); see SLSTMCudaTuning.
  SLSTMCudaTuning& tuning() { return tune_; }

  /// Sizes the saved-state workspace for (B, S). Allocates only when the shape changes; forward() calls it.
  void resize(index_t B, index_t S) {
    DISTILX_REQUIRE(shape_error, B >= 0 && S >= 0, "SLSTMCell::resize: B and S must be >= 0, got ", B, ", ", S);
    if (B == B_ && S == S_) return;
    saved_.resize(B * S * cuda_backend::slstm_detail::kSlots * hidden_size());
    B_ = B;
    S_ = S;
    has_saved_ = false;
  }

  /// y [B, S, H] from wx [B, S, 4H] (gate-major [g][h][j] per step), zero initial state. Saves what backward needs.
  void forward(T* y, const T* wx, const T* R, const T* bias, index_t B, index_t S) {
    resize(B, S);
    if (B > 0 && S > 0) {
      const cuda_backend::slstm_detail::FwdArgs<T> a{
          y, saved_.data(), nullptr, wx, R, bias, int_dim(B), int_dim(S), int_dim(nh_), int_dim(dh_)};
      cuda_backend::slstm_detail::launch_forward(a, tune_, cuda_backend::current_stream());
    }
    has_saved_ = true;
  }

  /// dy [B, S, H] -> dwx [B, S, 4H] (overwritten); dR [NH, DH, 4, DH] and dbias [NH, 4, DH] are accumulated (+=)
  /// and may be null (frozen). Needs the states of the last forward() with the same (B, S).
  void backward(T* dwx, T* dR, T* dbias, const T* dy, const T* R, index_t B, index_t S) {
    namespace sd = cuda_backend::slstm_detail;
    DISTILX_REQUIRE(shape_error, has_saved_, "SLSTMCell::backward: call forward() first");
    DISTILX_REQUIRE(shape_error, B == B_ && S == S_, "SLSTMCell::backward: (B, S) = (", B, ", ", S,
                    ") differs from the last forward's (", B_, ", ", S_, ")");
    if (B == 0 || S == 0) return;
    cudaStream_t st = cuda_backend::current_stream();
    sd::BwdArgs<T> a{dwx, saved_.data(), dy, R, int_dim(B), int_dim(S), int_dim(nh_), int_dim(dh_)};
    sd::launch_backward(a, tune_, st);
    if (dR) {
      // dR[h][k][g*DH + j] += sum over rows r = (b, t) of y_{t-1}[r][h*DH + k] * dg[r][g*H + h*DH + j]: for each
      // gate g one product op(A) B = [DH x B*S] [B*S x DH] per head, batched over the heads. A is the kYPrev slot
      // of saved_, [B*S, H] with row pitch kSlots*H (head h at column h*DH), transposed; B is gate g's block of
      // dwx, [B*S, H] with row pitch 4H; C is dR's column block g of head h, [DH, DH] with row pitch 4DH and head
      // stride DH*4DH. beta = 1 accumulates. Rows t = 0 hold y_{-1} = 0, so the sequence starts need no care.
      // Same stream as the recurrence above (current_stream), which wrote dwx; math as ops::gemm (math_mode()).
      const index_t H = hidden_size(), G = 4 * dh_, rows = B * S;
      for (index_t g = 0; g < 4; ++g)
        ops::gemm_strided_batched(cuda{}, ops::Trans::yes, ops::Trans::no, dh_, dh_, rows, T(1),
                                  saved_.data() + sd::kYPrev * H, sd::kSlots * H, dh_, dwx + g * H, 4 * H, dh_, T(1),
                                  dR + g * dh_, G, dh_ * G, nh_);
    }
    if (dbias) {
      const int NH = int_dim(nh_), DH = int_dim(dh_);
      const index_t rows = B * S, nb = static_cast<index_t>(NH) * 4 * DH;
      int nsplit = 1;
      index_t rps = 1;
      sd::dbias_splits(rows, nsplit, rps);
      if (part_b_.size() != nsplit * nb) part_b_.resize(nsplit * nb);
      const dim3 grid(static_cast<unsigned>((4 * hidden_size() + sd::kBiasThreads - 1) / sd::kBiasThreads),
                      static_cast<unsigned>(nsplit));
      sd::slstm_dbias_partial_kernel<T><<<grid, sd::kBiasThreads, 0, st>>>(part_b_.data(), dwx, rows, NH, DH, rps);
      DISTILX_CUDA_LAUNCH_CHECK();
      sd::slstm_accumulate_splits_kernel<T>
          <<<static_cast<unsigned>((nb + 255) / 256), 256, 0, st>>>(dbias, part_b_.data(), nb, nsplit);
      DISTILX_CUDA_LAUNCH_CHECK();
    }
  }

  /// One recurrent step. state [4, B, H] = (y, c, n, m), zero-initialised by the caller, updated in place;
  /// wx [B, 4H] gate-major; writes y [B, H]. Runs the forward kernel with S = 1, so it reproduces forward()
  /// token by token bit for bit.
  static void step(T* y, T* state, const T* wx, const T* R, const T* bias, index_t B, index_t NH, index_t DH) {
    DISTILX_REQUIRE(shape_error, B >= 0 && NH >= 1 && DH >= 1, "SLSTMCell::step: need B >= 0, NH >= 1, DH >= 1, got ",
                    B, ", ", NH, ", ", DH);
    if (B == 0) return;
    cuda_backend::slstm_detail::FwdArgs<T> a{y, nullptr, state, wx, R, bias, int_dim(B), 1, int_dim(NH), int_dim(DH)};
    cuda_backend::slstm_detail::launch_forward(a, SLSTMCudaTuning{}, cuda_backend::current_stream());
  }

 private:
  static int int_dim(index_t v) {
    DISTILX_REQUIRE(shape_error, v <= (index_t(1) << 30), "SLSTMCell<cuda>: dimension ", v, " is too large");
    return static_cast<int>(v);
  }

  index_t nh_, dh_;
  index_t B_ = -1, S_ = -1;
  bool has_saved_ = false;
  SLSTMCudaTuning tune_;
  Buffer<T, cuda> saved_;   // [B, S, kSlots, H]
  Buffer<T, cuda> part_b_;  // [nsplit, NH, 4DH]: dbias split partials
};

}  // namespace distilx
