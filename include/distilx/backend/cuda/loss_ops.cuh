// CUDA overloads of the loss ops (loss/detail/vocab_ops.hpp, loss/detail/align_ops.hpp): the
// vocabulary-sized row kernel of the distillation loss (divergence at tau, CE at 1, top-1
// agreement, gradient w.r.t. the student logits) and the hidden-state alignment rows. Same
// names, signatures and semantics as the CPU ops, so VocabLoss<T, cuda>, AlignmentLoss<T, cuda>
// and DeltaDistillationLoss<T, cuda> run unchanged.
//
// Pointer convention (mirrors how the loss classes call these ops):
//   distill_rows:      zs, zt, dz are DEVICE pointers ([R, V]; dz may alias zs).
//                      targets, mask are HOST pointers ([R]); div, ce, agree are HOST outputs ([R]).
//                      The op stages targets/mask into device scratch, runs, copies the per-row
//                      results back and synchronises the stream (once per call).
//   align_mean_diff:   D and every matrix are DEVICE pointers; A, B are HOST arrays of device
//                      pointers; mask is HOST; row_sq is a HOST output. Synchronises.
//   align_scale:       y, x DEVICE.
//   align_scale_rows:  y DEVICE; row_scale a HOST input [M].
//   align_cosine_rows: dS, S and the matrices DEVICE; B a HOST array of device pointers; mask HOST;
//                      row_val a HOST output. Synchronises.
//
// distill_rows design. A row of V logits is split over a thread-block cluster of C blocks (sm_90;
// C = 1 elsewhere); block k owns a contiguous segment. Pass 1 reads zs and zt once, computing the
// online maxima, first arg-maxima and the three normalisers (softmax(zs/tau), softmax(zt/tau),
// softmax(zs)) in base 2. The blocks' partial statistics are combined over distributed shared
// memory in rank order, so every block holds bit-identical row statistics. forward_kl then needs
// one more pass (divergence and gradient together); reverse_kl, jsd and skew_kl first reduce the
// row constant their gradient needs (one extra pass), then write the gradient. Optionally the
// segment stays in shared memory after pass 1 (one HBM read of zs and zt instead of two or three),
// but on an H100 at V = 151936 that path measured 2.7x slower than re-reading (one 150 KiB block
// per SM: the load and compute phases serialise and clusters wait for 8 free SMs), so the default
// re-reads, with 4 blocks per row at that V (bench/cuda_loss_bench.cu, DistillRowsTuning). All
// reductions have a fixed order: results are run-to-run identical. Per-thread partial sums are in
// T, every combination across threads and blocks in double (T = float) or T (double).
#pragma once

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#include "distilx/backend/cuda/check.cuh"
#include "distilx/backend/cuda/memory.cuh"
#include "distilx/backend/cuda/ops.cuh"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"
#include "distilx/loss/detail/align_ops.hpp"
#include "distilx/loss/detail/vocab_ops.hpp"

namespace distilx::cuda_backend {

/// Launch shape of distill_rows. Zeros / -1 mean "choose automatically"; tests and benchmarks
/// force the other paths through it. Process-wide, not thread-safe to change while ops run.
struct DistillRowsTuning {
  int cluster = 0;   // blocks per row: 1, 2, 4, 8 or 16 (16 needs sm_90 non-portable clusters); 0 = auto
  int cached = -1;   // 1: keep the row segment in shared memory (falls back to re-reading if it does
                     // not fit); 0 or -1 (auto): re-read (measured faster, see the header comment)
  int threads = 0;   // threads per block (multiple of 32, <= 1024); 0 = auto (512)
};
inline DistillRowsTuning& distill_rows_tuning() {
  static DistillRowsTuning t;
  return t;
}

/// What the last distill_rows call of this thread launched (benchmarks report it).
struct DistillRowsLaunch {
  int cluster = 1, threads = 0;
  bool cached = false;
  std::size_t smem_bytes = 0;
  int passes = 0;  // passes over the row (1 = statistics only ... 3)
};
inline DistillRowsLaunch& last_distill_rows_launch() {
  thread_local DistillRowsLaunch l;
  return l;
}

namespace loss_kernels {

namespace cg = cooperative_groups;

constexpr double kLn2 = 0.693147180559945309417232121458;
constexpr double kLog2e = 1.44269504088896340735992468100;

__device__ inline float dexp2(float x) { return exp2f(x); }
__device__ inline double dexp2(double x) { return exp2(x); }
__device__ inline float dlog2(float x) { return log2f(x); }
__device__ inline double dlog2(double x) { return log2(x); }
__device__ inline float dlog1p(float x) { return log1pf(x); }
__device__ inline double dlog1p(double x) { return log1p(x); }

template <class T>
__device__ inline T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

/// Accumulator type of combinations across threads and blocks.
template <class T>
using Acc = std::conditional_t<std::is_same_v<T, float>, double, T>;

template <class T>
__device__ inline T shfl(T v, int o) {
  return __shfl_xor_sync(0xffffffffu, v, o);
}

/// Online softmax statistics of one row segment (or a whole row once merged): maxima with their
/// first index, and the normalisers sum exp2((z - max) * k) at k = log2(e)/tau (ss, st) and
/// k = log2(e) (s1). Merging is symmetric in its arguments, so butterfly shuffles give every
/// lane the same bits.
template <class T>
struct RowStats {
  T ms, mt;      // max of zs, zt
  int is, it;    // first index of the max (INT_MAX: none seen)
  Acc<T> ss, s1, st;

  __device__ static RowStats empty() { return {neg_inf<T>(), neg_inf<T>(), INT_MAX, INT_MAX, 0, 0, 0}; }
  __device__ RowStats shfl_xor(int o) const {
    return {shfl(ms, o), shfl(mt, o), shfl(is, o), shfl(it, o), shfl(ss, o), shfl(s1, o), shfl(st, o)};
  }
};

/// Rescales a normaliser from max m to max m_new (m <= m_new); an empty sum stays 0 (no inf - inf).
template <class A, class T>
__device__ inline A rescale(A sum, T m, T m_new, A k) {
  return sum == A(0) ? A(0) : sum * dexp2((A(m) - A(m_new)) * k);
}

template <class T>
struct StatsMerge {
  Acc<T> ks;  // log2(e) / tau
  __device__ RowStats<T> operator()(const RowStats<T>& a, const RowStats<T>& b) const {
    using A = Acc<T>;
    RowStats<T> r;
    const bool bs = b.ms > a.ms || (b.ms == a.ms && b.is < a.is);
    r.ms = bs ? b.ms : a.ms;
    r.is = bs ? b.is : a.is;
    const bool bt = b.mt > a.mt || (b.mt == a.mt && b.it < a.it);
    r.mt = bt ? b.mt : a.mt;
    r.it = bt ? b.it : a.it;
    r.ss = rescale(a.ss, a.ms, r.ms, ks) + rescale(b.ss, b.ms, r.ms, ks);
    r.s1 = rescale(a.s1, a.ms, r.ms, A(kLog2e)) + rescale(b.s1, b.ms, r.ms, A(kLog2e));
    r.st = rescale(a.st, a.mt, r.mt, ks) + rescale(b.st, b.mt, r.mt, ks);
    return r;
  }
};

/// Two sums (divergence parts / row constants).
template <class T>
struct Sums2 {
  Acc<T> a, b;
  __device__ Sums2 shfl_xor(int o) const { return {shfl(a, o), shfl(b, o)}; }
};
template <class T>
struct SumsMerge {
  __device__ Sums2<T> operator()(const Sums2<T>& x, const Sums2<T>& y) const { return {x.a + y.a, x.b + y.b}; }
};

/// Reduces v over the block (butterfly in each warp, then the warps in order), then over the
/// cluster (block partials in rank order, read through distributed shared memory). Every thread
/// of every block of the cluster returns the same bits. `slots` is this reduction's own shared
/// area (32 warp partials + the block partial); it must not be reused by a later reduction of the
/// same kernel, because peers may still read it.
template <class S, class Merge>
__device__ S block_cluster_reduce(S v, S* slots, int csize, const Merge& merge) {
  for (int o = 16; o > 0; o >>= 1) v = merge(v, v.shfl_xor(o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
  if (lane == 0) slots[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    S b = slots[0];
    for (int w = 1; w < nw; ++w) b = merge(b, slots[w]);
    slots[32] = b;
  }
  __syncthreads();
  if (csize == 1) return slots[32];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every block's partial is written
  S r = *cluster.map_shared_rank(slots + 32, 0);
  for (int k = 1; k < csize; ++k) r = merge(r, *cluster.map_shared_rank(slots + 32, k));
  return r;
#else
  __trap();  // the host never launches clusters below sm_90
  return v;
#endif
}

template <class T, int VEC>
struct Vec {
  T v[VEC];
};
template <class T, int VEC>
__device__ inline Vec<T, VEC> load(const T* p) {
  Vec<T, VEC> r;
  if constexpr (VEC == 4 && std::is_same_v<T, float>) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    r.v[0] = x.x, r.v[1] = x.y, r.v[2] = x.z, r.v[3] = x.w;
  } else if constexpr (VEC == 2 && std::is_same_v<T, double>) {
    const double2 x = *reinterpret_cast<const double2*>(p);
    r.v[0] = x.x, r.v[1] = x.y;
  } else {
    for (int k = 0; k < VEC; ++k) r.v[k] = p[k];
  }
  return r;
}
template <class T, int VEC>
__device__ inline void store(T* p, const Vec<T, VEC>& r) {
  if constexpr (VEC == 4 && std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(p) = make_float4(r.v[0], r.v[1], r.v[2], r.v[3]);
  } else if constexpr (VEC == 2 && std::is_same_v<T, double>) {
    *reinterpret_cast<double2*>(p) = make_double2(r.v[0], r.v[1]);
  } else {
    for (int k = 0; k < VEC; ++k) p[k] = r.v[k];
  }
}

template <class T>
struct RowArgs {
  const T* zs;
  const T* zt;  // null: no divergence
  T* dz;        // null: no gradient (in T)
  void* dz16;   // T = float only: the gradient as bf16 (dz16_bf16) or fp16 instead of dz; null: none
  bool dz16_bf16;
  const std::int32_t* targets;  // device [R] or null
  const std::uint8_t* mask;     // device [R] or null
  double* div;                  // device [R]
  double* ce;                   // device [R]
  std::uint8_t* agree;          // device [R]
  index_t V;
  int seg;       // elements per block segment (multiple of VEC)
  int csize;     // blocks per row
  bool cached;   // segment kept in shared memory (2 * seg values of T after the reduction slots)
  T inv_tau;     // 1 / tau
  T kc, cc;      // gradient coefficients: div_coef / tau (0 without teacher), ce_coef
  T beta, omb;   // beta, 1 - beta
  T lb2, lomb2;  // log2(beta), log2(1 - beta) (0 at the ends, which are special-cased)
  bool tau_one;
};

constexpr int kSlotCount = 33;  // 32 warp partials + 1 block partial per reduction

/// Stores VEC gradient values at element j of the row: in T to dz, or as 16-bit values to dz16.
template <class T, int VEC>
__device__ inline void store_grad(const RowArgs<T>& a, T* dz_row, index_t row, int j, const Vec<T, VEC>& g) {
  if (dz_row) {
    store<T, VEC>(dz_row + j, g);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    const index_t at = row * a.V + j;
    if constexpr (VEC == 4) {
      const float4 v = make_float4(g.v[0], g.v[1], g.v[2], g.v[3]);
      if (a.dz16_bf16) cuda_backend::detail::store4(static_cast<__nv_bfloat16*>(a.dz16) + at, v);
      else cuda_backend::detail::store4(static_cast<__half*>(a.dz16) + at, v);
    } else {
      for (int k = 0; k < VEC; ++k) {
        if (a.dz16_bf16) static_cast<__nv_bfloat16*>(a.dz16)[at + k] = cuda_backend::detail::to_half<__nv_bfloat16>(g.v[k]);
        else static_cast<__half*>(a.dz16)[at + k] = cuda_backend::detail::to_half<__half>(g.v[k]);
      }
    }
  }
}

/// log2 of the mixture m = beta p_t + (1 - beta) p_s from log2 p_t, log2 p_s (the CPU's LogMixture in base 2).
template <class T>
__device__ inline T log2_mix(const RowArgs<T>& a, T l2t, T l2s) {
  if (a.beta == T(0)) return l2s;
  if (a.beta == T(1)) return l2t;
  const T x = a.lb2 + l2t, y = a.lomb2 + l2s;
  const T mx = x > y ? x : y, mn = x > y ? y : x;
  if (mx == neg_inf<T>()) return mx;
  return mx + dlog1p(dexp2(mn - mx)) * T(kLog2e);
}

/// One row (blockIdx.x / csize), segment blockIdx.x % csize. Shared memory: three reduction
/// areas (statistics, row constants, divergence), then the cached segment of zs and zt.
template <Divergence K, class T, int VEC>
__global__ void __launch_bounds__(1024) distill_rows_kernel(RowArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem[];
  using A = Acc<T>;
  RowStats<T>* stats_slots = reinterpret_cast<RowStats<T>*>(smem);
  Sums2<T>* aux_slots = reinterpret_cast<Sums2<T>*>(smem + kSlotCount * sizeof(RowStats<T>));
  Sums2<T>* div_slots = aux_slots + kSlotCount;
  const std::size_t red_bytes = kSlotCount * (sizeof(RowStats<T>) + 2 * sizeof(Sums2<T>));
  T* cache_s = reinterpret_cast<T*>(smem + (red_bytes + 15) / 16 * 16);
  T* cache_t = cache_s + a.seg;

  const index_t row = blockIdx.x / a.csize;
  const int rank = static_cast<int>(blockIdx.x % a.csize);
  const index_t V = a.V;
  const int j0 = rank * a.seg;
  const int j1 = static_cast<int>(min(V, static_cast<index_t>(j0) + a.seg));
  const T* s_row = a.zs + row * V;
  const T* t_row = a.zt ? a.zt + row * V : nullptr;
  T* dz_row = a.dz ? a.dz + row * V : nullptr;
  const bool want_dz = dz_row != nullptr || a.dz16 != nullptr;
  const int step = blockDim.x * VEC;
  const int first = j0 + threadIdx.x * VEC;

  if (a.mask && !a.mask[row]) {  // padding: zeros everywhere (uniform over the cluster: no barrier)
    if (want_dz)
      for (int j = first; j < j1; j += step) store_grad<T, VEC>(a, dz_row, row, j, Vec<T, VEC>{});
    if (rank == 0 && threadIdx.x == 0) {
      a.div[row] = 0;
      a.ce[row] = 0;
      a.agree[row] = 0;
    }
    return;
  }
  const bool has_div = t_row != nullptr;
  const int y = a.targets ? a.targets[row] : -1;
  const bool has_target = y >= 0;
  const bool need_s1 = has_target && !a.tau_one;
  const T ks = a.inv_tau * T(kLog2e);  // log2 p_s^tau = (z - max) * ks - log2(sum)

  // Pass 1: online statistics; the owner of element y keeps z_s[y].
  RowStats<T> st = RowStats<T>::empty();
  T ss = 0, s1 = 0, stt = 0;  // per-thread normalisers relative to st.ms / st.mt
  T zy = 0;
  bool own_y = false;
  for (int j = first; j < j1; j += step) {
    const Vec<T, VEC> s = load<T, VEC>(s_row + j);
    Vec<T, VEC> t{};
    if (has_div) t = load<T, VEC>(t_row + j);
    if (a.cached) {
      store<T, VEC>(cache_s + (j - j0), s);
      if (has_div) store<T, VEC>(cache_t + (j - j0), t);
    }
    T vm = st.ms;
    int vi = st.is;
    for (int k = 0; k < VEC; ++k)
      if (s.v[k] > vm) vm = s.v[k], vi = j + k;
    if (vm > st.ms) {
      if (st.ms != neg_inf<T>()) {
        ss *= dexp2((st.ms - vm) * ks);
        if (need_s1) s1 *= dexp2((st.ms - vm) * T(kLog2e));
      }
      st.ms = vm, st.is = vi;
    }
    if (st.ms != neg_inf<T>())
      for (int k = 0; k < VEC; ++k) {
        ss += dexp2((s.v[k] - st.ms) * ks);
        if (need_s1) s1 += dexp2((s.v[k] - st.ms) * T(kLog2e));
      }
    if (has_div) {
      T wm = st.mt;
      int wi = st.it;
      for (int k = 0; k < VEC; ++k)
        if (t.v[k] > wm) wm = t.v[k], wi = j + k;
      if (wm > st.mt) {
        if (st.mt != neg_inf<T>()) stt *= dexp2((st.mt - wm) * ks);
        st.mt = wm, st.it = wi;
      }
      if (st.mt != neg_inf<T>())
        for (int k = 0; k < VEC; ++k) stt += dexp2((t.v[k] - st.mt) * ks);
    }
    if (has_target && y >= j && y < j + VEC) {
      own_y = true;
      for (int k = 0; k < VEC; ++k)
        if (j + k == y) zy = s.v[k];
    }
  }
  st.ss = A(ss), st.s1 = A(s1), st.st = A(stt);
  st = block_cluster_reduce(st, stats_slots, a.csize, StatsMerge<T>{A(ks)});
  if (a.tau_one) st.s1 = st.ss;
  const T ms = st.ms, mt = has_div ? st.mt : T(0);
  const T L2s = T(log2(double(st.ss))), L2t = has_div ? T(log2(double(st.st))) : T(0);
  const T L21 = T(log2(double(st.s1)));
  if (own_y) a.ce[row] = -(double(zy - ms) - double(L21) * kLn2);
  if (rank == 0 && threadIdx.x == 0) {
    if (!has_target) a.ce[row] = 0;
    a.agree[row] = has_div && st.is == st.it;
    if (!has_div) a.div[row] = 0;
  }

  auto row_s = [&](int j) { return a.cached ? load<T, VEC>(cache_s + (j - j0)) : load<T, VEC>(s_row + j); };
  auto row_t = [&](int j) { return a.cached ? load<T, VEC>(cache_t + (j - j0)) : load<T, VEC>(t_row + j); };

  // Pass 2 (reverse_kl, jsd, skew_kl): the divergence and the row constant of the gradient.
  T aux = 0;  // natural-log units
  if constexpr (K != Divergence::forward_kl) {
    if (has_div) {
      T p0 = 0, p1 = 0;
      for (int j = first; j < j1; j += step) {
        const Vec<T, VEC> s = row_s(j), t = row_t(j);
        for (int k = 0; k < VEC; ++k) {
          const T l2s = (s.v[k] - ms) * ks - L2s, l2t = (t.v[k] - mt) * ks - L2t;
          if constexpr (K == Divergence::reverse_kl) {
            const T ps = dexp2(l2s);
            if (ps > T(0)) p0 += ps * (l2s - l2t);
          } else {
            const T l2m = log2_mix(a, l2t, l2s), pt = dexp2(l2t), ps = dexp2(l2s);
            if (pt > T(0)) p0 += pt * (l2t - l2m);
            if constexpr (K == Divergence::jsd) {
              if (ps > T(0)) p1 += ps * (l2s - l2m);
            } else {
              if (ps > T(0) && pt > T(0)) p1 += ps * dexp2(l2t - l2m);
            }
          }
        }
      }
      const Sums2<T> r = block_cluster_reduce(Sums2<T>{A(p0), A(p1)}, aux_slots, a.csize, SumsMerge<T>{});
      double D;
      if constexpr (K == Divergence::reverse_kl) {
        D = double(r.a) * kLn2;
        aux = T(D);
      } else if constexpr (K == Divergence::jsd) {
        D = double(a.beta) * double(r.a) * kLn2 + double(a.omb) * double(r.b) * kLn2;
        aux = T(double(r.b) * kLn2);  // KL(p_s || m)
      } else {
        D = double(r.a) * kLn2;
        aux = T(r.b);  // sum p_s p_t / m
      }
      if (rank == 0 && threadIdx.x == 0) a.div[row] = D;
    }
  }

  // Last pass: the gradient (and, for forward_kl, the divergence). With q = z_s / tau,
  // dD/dq = p_s (g - <p_s, g>) for g = dD/dp_s (see the CPU op); dD/dz_s = dD/dq / tau; CE adds
  // softmax(z_s) - onehot(y).
  const bool fwd_div = K == Divergence::forward_kl && has_div;
  if (want_dz || fwd_div) {
    const T kc = has_div ? a.kc : T(0);
    const T cc = has_target ? a.cc : T(0);
    T dsum = 0;
    for (int j = first; j < j1; j += step) {
      const Vec<T, VEC> s = row_s(j);
      Vec<T, VEC> t{};
      if (has_div) t = row_t(j);
      Vec<T, VEC> g;
      for (int k = 0; k < VEC; ++k) {
        T gk = T(0);
        if (has_div && (kc != T(0) || fwd_div)) {
          const T l2s = (s.v[k] - ms) * ks - L2s, l2t = (t.v[k] - mt) * ks - L2t;
          const T ps = dexp2(l2s);
          T gq;
          if constexpr (K == Divergence::forward_kl) {
            const T pt = dexp2(l2t);
            if (pt > T(0)) dsum += pt * (l2t - l2s);
            gq = ps - pt;
          } else if constexpr (K == Divergence::reverse_kl) {
            gq = ps > T(0) ? ps * ((l2s - l2t) * T(kLn2) - aux) : T(0);
          } else if constexpr (K == Divergence::jsd) {
            gq = ps > T(0) ? a.omb * ps * ((l2s - log2_mix(a, l2t, l2s)) * T(kLn2) - aux) : T(0);
          } else {
            const T pt_over_m = dexp2(l2t) > T(0) ? dexp2(l2t - log2_mix(a, l2t, l2s)) : T(0);
            gq = a.omb * ps * (aux - pt_over_m);
          }
          if (kc != T(0)) gk = kc * gq;
        }
        if (cc != T(0)) gk += cc * (dexp2((s.v[k] - ms) * T(kLog2e) - L21) - (j + k == y ? T(1) : T(0)));
        g.v[k] = gk;
      }
      if (want_dz) store_grad<T, VEC>(a, dz_row, row, j, g);
    }
    if (fwd_div) {
      const Sums2<T> r = block_cluster_reduce(Sums2<T>{A(dsum), A(0)}, div_slots, a.csize, SumsMerge<T>{});
      if (rank == 0 && threadIdx.x == 0) a.div[row] = double(r.a) * kLn2;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // A block's shared memory must outlive its peers' reads of its reduction slots.
  if (a.csize > 1) cg::this_cluster().sync();
#endif
}

}  // namespace loss_kernels


namespace align_kernels {

using kernels::kRowWarps;
using kernels::warp_sum;

/// Loads the pointer table (A then B) into shared memory; all threads take part.
template <class T>
__device__ inline const T* const* stage_ptrs(const T* const* ptrs, int n) {
  extern __shared__ __align__(16) unsigned char align_smem[];
  const T** sp = reinterpret_cast<const T**>(align_smem);
  for (int i = threadIdx.x; i < n; i += blockDim.x) sp[i] = ptrs[i];
  __syncthreads();
  return sp;
}

/// One warp per row: D = mean A - mean B (summed in T in pointer order, as on the CPU) and
/// ||D[m,:]||^2 in double (lane partials, then a butterfly: fixed order).
template <class T>
__global__ void mean_diff_kernel(T* D, const T* const* ptrs, int nA, int nB, const std::uint8_t* mask, index_t M,
                                 index_t d, double* row_sq) {
  const T* const* P = stage_ptrs(ptrs, nA + nB);
  const T ia = T(1) / T(nA), ib = T(1) / T(nB);
  const int lane = threadIdx.x % 32;
  for (index_t m = blockIdx.x * static_cast<index_t>(kRowWarps) + threadIdx.x / 32; m < M;
       m += static_cast<index_t>(gridDim.x) * kRowWarps) {
    T* out = D + m * d;
    if (mask && !mask[m]) {
      for (index_t k = lane; k < d; k += 32) out[k] = T(0);
      if (lane == 0) row_sq[m] = 0;
      continue;
    }
    double sq = 0;
    for (index_t k = lane; k < d; k += 32) {
      T sa = T(0), sb = T(0);
      for (int i = 0; i < nA; ++i) sa += P[i][m * d + k];
      for (int j = 0; j < nB; ++j) sb += P[nA + j][m * d + k];
      const T v = sa * ia - sb * ib;
      out[k] = v;
      sq += double(v) * double(v);
    }
    sq = warp_sum(sq);
    if (lane == 0) row_sq[m] = sq;
  }
}

template <class T>
__global__ void scale_kernel(T* y, const T* x, T s, index_t n) {
  for (index_t i = kernels::global_id(); i < n; i += kernels::global_stride()) y[i] = s * x[i];
}

template <class T>
__global__ void scale_rows_kernel(T* y, const double* row_scale, index_t M, index_t d) {
  for (index_t i = kernels::global_id(); i < M * d; i += kernels::global_stride()) y[i] *= T(row_scale[i / d]);
}

/// One warp per row: cosine distance to the teacher mean and its gradient (see the CPU op).
template <class T>
__global__ void cosine_rows_kernel(T* dS, const T* S, const T* const* ptrs, int nB, const std::uint8_t* mask,
                                   index_t M, index_t d, T coef, double* row_val) {
  const T* const* B = stage_ptrs(ptrs, nB);
  const T ib = T(1) / T(nB);
  const int lane = threadIdx.x % 32;
  for (index_t m = blockIdx.x * static_cast<index_t>(kRowWarps) + threadIdx.x / 32; m < M;
       m += static_cast<index_t>(gridDim.x) * kRowWarps) {
    const T* s = S + m * d;
    T* ds = dS ? dS + m * d : nullptr;
    auto teacher = [&](index_t k) {
      T sum = T(0);
      for (int j = 0; j < nB; ++j) sum += B[j][m * d + k];
      return sum * ib;
    };
    if (mask && !mask[m]) {
      if (ds)
        for (index_t k = lane; k < d; k += 32) ds[k] = T(0);
      if (lane == 0) row_val[m] = 0;
      continue;
    }
    double st = 0, ss = 0, tt = 0;
    for (index_t k = lane; k < d; k += 32) {
      const double sk = double(s[k]), tk = double(teacher(k));
      st += sk * tk;
      ss += sk * sk;
      tt += tk * tk;
    }
    st = warp_sum(st);
    ss = warp_sum(ss);
    tt = warp_sum(tt);
    if (ss == 0 || tt == 0) {
      if (ds)
        for (index_t k = lane; k < d; k += 32) ds[k] = T(0);
      if (lane == 0) row_val[m] = 1;
      continue;
    }
    const double ns = kernels::dev_sqrt(ss), nt = kernels::dev_sqrt(tt), c = st / (ns * nt);
    if (lane == 0) row_val[m] = 1 - c;
    if (ds) {
      const T a = T(c / ss), b = T(1 / (ns * nt));
      for (index_t k = lane; k < d; k += 32) ds[k] = coef * (a * s[k] - b * teacher(k));
    }
  }
}

}  // namespace align_kernels

namespace detail {
/// Packs a host table of device pointers and an optional host mask into this thread's scratch
/// after `out_doubles` doubles of device output; returns the scratch base.
template <class T>
unsigned char* stage_align_inputs(const T* const* A, index_t nA, const T* const* B, index_t nB,
                                  const std::uint8_t* mask, index_t M, std::size_t& off_ptrs, std::size_t& off_mask) {
  const std::size_t np = static_cast<std::size_t>(nA + nB);
  off_ptrs = (sizeof(double) * static_cast<std::size_t>(M) + 15) / 16 * 16;
  off_mask = off_ptrs + sizeof(const T*) * np;
  const std::size_t bytes = off_mask + (mask ? static_cast<std::size_t>(M) : 0);
  unsigned char* buf = scratch<unsigned char>(static_cast<index_t>(bytes));
  thread_local std::vector<unsigned char> host;
  host.resize(bytes - off_ptrs);
  if (nA) std::memcpy(host.data(), A, sizeof(const T*) * nA);
  if (nB) std::memcpy(host.data() + sizeof(const T*) * nA, B, sizeof(const T*) * nB);
  if (mask) std::memcpy(host.data() + (off_mask - off_ptrs), mask, static_cast<std::size_t>(M));
  // From pageable memory: returns once `host` is staged.
  DISTILX_CUDA_CHECK(
      cudaMemcpyAsync(buf + off_ptrs, host.data(), bytes - off_ptrs, cudaMemcpyHostToDevice, current_stream()));
  return buf;
}
inline void fetch_rows(double* host_out, const unsigned char* buf, index_t M) {
  DISTILX_CUDA_CHECK(cudaMemcpyAsync(host_out, buf, sizeof(double) * static_cast<std::size_t>(M),
                                     cudaMemcpyDeviceToHost, current_stream()));
  DISTILX_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
}
}  // namespace detail

namespace detail {
/// Device capability queries, cached per device.
struct DeviceLimits {
  int cc_major = 0;
  int smem_optin = 0;  // max dynamic shared memory per block with opt-in
};
inline const DeviceLimits& device_limits() {
  thread_local int dev = -1;
  thread_local DeviceLimits lim;
  int cur = 0;
  DISTILX_CUDA_CHECK(cudaGetDevice(&cur));
  if (cur != dev) {
    DISTILX_CUDA_CHECK(cudaDeviceGetAttribute(&lim.cc_major, cudaDevAttrComputeCapabilityMajor, cur));
    DISTILX_CUDA_CHECK(cudaDeviceGetAttribute(&lim.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, cur));
    dev = cur;
  }
  return lim;
}
}  // namespace detail

}  // namespace distilx::cuda_backend

namespace distilx::ops {

namespace detail_cuda_loss {

namespace lk = ::distilx::cuda_backend::loss_kernels;

/// Raises a kernel's dynamic shared memory limit (and allows clusters of 16) once per value:
/// these attribute calls are not free, and distill_rows runs once per chunk.
inline void set_smem_attr(const void* kernel, std::size_t smem, bool non_portable) {
  thread_local std::map<const void*, std::pair<std::size_t, bool>> done;
  auto it = done.find(kernel);
  if (it != done.end() && it->second.first >= smem && (it->second.second || !non_portable)) return;
  const std::size_t want = std::max(smem, it != done.end() ? it->second.first : std::size_t(0));
  DISTILX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(want)));
  const bool np = non_portable || (it != done.end() && it->second.second);
  if (np) DISTILX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  done[kernel] = {want, np};
}

template <Divergence K, class T, int VEC>
void launch_distill_rows(const lk::RowArgs<T>& args, index_t R, int threads, std::size_t smem) {
  auto kernel = lk::distill_rows_kernel<K, T, VEC>;
  set_smem_attr(reinterpret_cast<const void*>(kernel), smem, args.csize > 8);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(R * args.csize));
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.stream = cuda_backend::current_stream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(args.csize);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  if (args.csize > 1) {
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  DISTILX_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args));
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// True when clusters of csize blocks with this shared memory can be resident (cached per shape).
template <Divergence K, class T, int VEC>
bool cluster_fits(int csize, int threads, std::size_t smem) {
  thread_local std::map<std::tuple<int, int, std::size_t>, bool> memo;
  const auto key = std::make_tuple(csize, threads, smem);
  if (auto it = memo.find(key); it != memo.end()) return it->second;
  auto kernel = lk::distill_rows_kernel<K, T, VEC>;
  bool ok = true;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) != cudaSuccess ||
      (csize > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)) {
    (void)cudaGetLastError();
    ok = false;
  }
  if (ok) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(static_cast<unsigned>(csize));
    cfg.blockDim = dim3(static_cast<unsigned>(threads));
    cfg.dynamicSmemBytes = smem;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(csize);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();
      n = 0;
    }
    ok = n > 0;
  }
  memo[key] = ok;
  return ok;
}

template <Divergence K, class T, int VEC>
void run_distill_rows(lk::RowArgs<T> args, index_t R) {
  const auto& tune = cuda_backend::distill_rows_tuning();
  const auto& lim = cuda_backend::detail::device_limits();
  const int threads = tune.threads > 0 ? tune.threads : 512;
  DISTILX_REQUIRE(error, threads % 32 == 0 && threads >= 32 && threads <= 1024,
                  "distill_rows(cuda): tuning.threads = ", threads, " must be a multiple of 32 in [32, 1024]");
  const std::size_t red =
      (lk::kSlotCount * (sizeof(lk::RowStats<T>) + 2 * sizeof(lk::Sums2<T>)) + 15) / 16 * 16;
  const bool clusters = lim.cc_major >= 9;
  auto seg_of = [&](int c) {
    const index_t s = (args.V + c - 1) / c;
    return static_cast<int>((s + VEC - 1) / VEC * VEC);
  };
  auto cache_bytes = [&](int c) { return 2 * sizeof(T) * static_cast<std::size_t>(seg_of(c)); };
  int csize = 1;
  bool cached = false;
  if (tune.cluster > 0) {
    csize = tune.cluster;
    DISTILX_REQUIRE(error, csize == 1 || csize == 2 || csize == 4 || csize == 8 || csize == 16,
                    "distill_rows(cuda): tuning.cluster = ", csize, " must be 1, 2, 4, 8 or 16");
    DISTILX_REQUIRE(error, csize == 1 || clusters, "distill_rows(cuda): tuning.cluster = ", csize,
                    " needs thread-block clusters (compute capability 9.0+); use 1 on this device");
    cached = tune.cached == 1 && red + cache_bytes(csize) <= std::size_t(lim.smem_optin) &&
             (csize == 1 || cluster_fits<K, T, VEC>(csize, threads, red + cache_bytes(csize)));
  } else if (clusters) {
    // Re-read (see the header comment), with the smallest cluster (<= 8) that leaves at most
    // ~40K elements per block: at V = 151936 that is 4 (H100, forward KL, 1024 rows: 1.20 ms;
    // 2 blocks 1.17, 8 blocks 1.71, one 1024-thread block per row 1.32, cached cluster of 8 3.28).
    csize = 1;
    while (csize < 8 && (args.V + csize - 1) / csize > 40000) csize *= 2;
    cached = tune.cached == 1 && red + cache_bytes(csize) <= std::size_t(lim.smem_optin) &&
             (csize == 1 || cluster_fits<K, T, VEC>(csize, threads, red + cache_bytes(csize)));
    if (csize > 1 && !cached && !cluster_fits<K, T, VEC>(csize, threads, red)) csize = 1;
  } else {
    cached = tune.cached == 1 && red + cache_bytes(1) <= std::size_t(lim.smem_optin);
  }
  args.csize = csize;
  args.cached = cached;
  args.seg = seg_of(csize);
  const std::size_t smem = red + (cached ? cache_bytes(csize) : 0);
  auto& l = cuda_backend::last_distill_rows_launch();
  l.cluster = csize;
  l.threads = threads;
  l.cached = cached;
  l.smem_bytes = smem;
  l.passes = 1 + (args.zt && K != Divergence::forward_kl ? 1 : 0) +
             ((args.dz || args.dz16 || (args.zt && K == Divergence::forward_kl)) ? 1 : 0);
  launch_distill_rows<K, T, VEC>(args, R, threads, smem);
}

template <Divergence K, class T>
void dispatch_vec(const lk::RowArgs<T>& args, index_t R) {
  constexpr int kVec = 16 / sizeof(T);
  auto aligned = [](const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  // dz16 (8-byte stores of 4 values) is aligned when V % 4 == 0 and its base is 8-byte aligned.
  if (args.V % kVec == 0 && aligned(args.zs) && aligned(args.zt) && aligned(args.dz) &&
      reinterpret_cast<std::uintptr_t>(args.dz16) % 8 == 0)
    run_distill_rows<K, T, kVec>(args, R);
  else
    run_distill_rows<K, T, 1>(args, R);
}

}  // namespace detail_cuda_loss

/// Per-row divergence, CE, agreement and gradient on the GPU (see the pointer convention at the
/// top of this header). Results match the CPU op to rounding; runs are bit-identical.
template <class T>
void distill_rows(cuda, const DistillRows<T>& a) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "distill_rows(cuda): float or double");
  namespace lk = ::distilx::cuda_backend::loss_kernels;
  const index_t R = a.R, V = a.V;
  if (R <= 0) return;
  DISTILX_REQUIRE(shape_error, V >= 1 && V <= (index_t(1) << 30), "distill_rows(cuda): V = ", V,
                  " must lie in [1, 2^30]");
  DISTILX_REQUIRE(shape_error, a.zs && a.div && a.ce && a.agree,
                  "distill_rows(cuda): zs (device), div, ce and agree (host) are required");
  DISTILX_REQUIRE(config_error, a.tau > T(0), "distill_rows(cuda): tau = ", a.tau, " must be > 0");
  if (a.targets)
    for (index_t r = 0; r < R; ++r)
      DISTILX_REQUIRE(error, a.targets[r] < V, "distill_rows(cuda): target id ", a.targets[r], " in row ", r,
                      " is outside the vocabulary (V = ", V, ")");

  // One scratch block: outputs (div, ce: double; agree: byte), then the staged targets and mask.
  const std::size_t off_ce = sizeof(double) * R, off_agree = 2 * sizeof(double) * R;
  const std::size_t off_tgt = (off_agree + R + 15) / 16 * 16;
  const std::size_t off_mask = off_tgt + sizeof(std::int32_t) * R;
  const std::size_t bytes = off_mask + R;
  unsigned char* buf = cuda_backend::scratch<unsigned char>(static_cast<index_t>(bytes));
  const cudaStream_t s = cuda_backend::current_stream();
  thread_local std::vector<unsigned char> host;
  if (a.targets || a.mask) {
    host.resize(bytes - off_tgt);
    if (a.targets) std::memcpy(host.data(), a.targets, sizeof(std::int32_t) * R);
    if (a.mask) std::memcpy(host.data() + (off_mask - off_tgt), a.mask, R);
    // From pageable memory: returns once `host` is staged, so it may be reused afterwards.
    DISTILX_CUDA_CHECK(cudaMemcpyAsync(buf + off_tgt, host.data(), bytes - off_tgt, cudaMemcpyHostToDevice, s));
  }
  lk::RowArgs<T> args{};
  args.zs = a.zs;
  args.zt = a.zt;
  args.dz = a.dz;
  namespace cbd = ::distilx::cuda_backend::detail;
  cbd::drop_staged_image();  // a new gradient: an image of the last one is stale
  if constexpr (std::is_same_v<T, float>) {
    // The gradient only feeds the LM-head product, which reads 16-bit operands in bf16 / fp16
    // mode: write it in that format (half the bytes, and no conversion pass before the product).
    const auto mode = cuda_backend::math_mode();
    if (a.dz && a.dz_feeds_lm_head_only && cuda_backend::is_half_mode(mode)) {
      args.dz16 = cbd::operand_scratch(cbd::kStagedImageSlot, 2 * static_cast<std::size_t>(R * V));
      args.dz16_bf16 = mode == cuda_backend::MathMode::bf16;
      args.dz = nullptr;
      cbd::stage_half_image(a.dz, R * V, args.dz16, mode);
    }
  }
  args.targets = a.targets ? reinterpret_cast<const std::int32_t*>(buf + off_tgt) : nullptr;
  args.mask = a.mask ? buf + off_mask : nullptr;
  args.div = reinterpret_cast<double*>(buf);
  args.ce = reinterpret_cast<double*>(buf + off_ce);
  args.agree = buf + off_agree;
  args.V = V;
  args.inv_tau = T(1) / a.tau;
  args.tau_one = a.tau == T(1);
  args.kc = a.zt ? a.div_coef * args.inv_tau : T(0);
  args.cc = a.ce_coef;
  args.beta = T(a.beta);
  args.omb = T(1) - T(a.beta);
  args.lb2 = a.beta > 0 ? T(std::log2(a.beta)) : T(0);
  args.lomb2 = a.beta < 1 ? T(std::log1p(-a.beta) / std::log(2.0)) : T(0);
  switch (a.divergence) {
    case Divergence::forward_kl: detail_cuda_loss::dispatch_vec<Divergence::forward_kl>(args, R); break;
    case Divergence::reverse_kl: detail_cuda_loss::dispatch_vec<Divergence::reverse_kl>(args, R); break;
    case Divergence::jsd: detail_cuda_loss::dispatch_vec<Divergence::jsd>(args, R); break;
    case Divergence::skew_kl: detail_cuda_loss::dispatch_vec<Divergence::skew_kl>(args, R); break;
  }
  host.resize(std::max(host.size(), off_tgt));
  DISTILX_CUDA_CHECK(cudaMemcpyAsync(host.data(), buf, off_tgt, cudaMemcpyDeviceToHost, s));
  DISTILX_CUDA_CHECK(cudaStreamSynchronize(s));
  std::memcpy(a.div, host.data(), sizeof(double) * R);
  std::memcpy(a.ce, host.data() + off_ce, sizeof(double) * R);
  std::memcpy(a.agree, host.data() + off_agree, R);
}

// ---- hidden-state alignment rows ------------------------------------------------------

/// D[m,:] = mean_i A_i[m,:] - mean_j B_j[m,:] on real rows, 0 on padding; row_sq[m] = ||D[m,:]||^2
/// (double). D and the matrices on the device; A, B host arrays of device pointers; mask and
/// row_sq on the host. Synchronises.
template <class T>
void align_mean_diff(cuda, T* D, const T* const* A, index_t nA, const T* const* B, index_t nB,
                     const std::uint8_t* mask, index_t M, index_t d, double* row_sq) {
  namespace ak = ::distilx::cuda_backend::align_kernels;
  if (M <= 0) return;
  DISTILX_REQUIRE(shape_error, nA >= 1 && nB >= 1 && nA + nB <= 4096 && d >= 1,
                  "align_mean_diff(cuda): need 1 <= nA, nB, nA + nB <= 4096 and d >= 1 (got nA = ", nA, ", nB = ", nB,
                  ", d = ", d, ")");
  std::size_t off_ptrs = 0, off_mask = 0;
  unsigned char* buf = cuda_backend::detail::stage_align_inputs(A, nA, B, nB, mask, M, off_ptrs, off_mask);
  ak::mean_diff_kernel<<<cuk::row_grid(M), 32 * cuk::kRowWarps, sizeof(const T*) * (nA + nB), cuk::stream()>>>(
      D, reinterpret_cast<const T* const*>(buf + off_ptrs), static_cast<int>(nA), static_cast<int>(nB),
      mask ? buf + off_mask : nullptr, M, d, reinterpret_cast<double*>(buf));
  DISTILX_CUDA_LAUNCH_CHECK();
  cuda_backend::detail::fetch_rows(row_sq, buf, M);
}

/// y[i] = s * x[i] on the device (y may alias x).
template <class T>
void align_scale(cuda, T* y, const T* x, T s, index_t n) {
  if (n <= 0) return;
  ::distilx::cuda_backend::align_kernels::scale_kernel<<<cuk::grid_for(n), cuk::kBlock, 0, cuk::stream()>>>(y, x, s, n);
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// y[m,:] *= row_scale[m]: y on the device, row_scale a host array [M].
template <class T>
void align_scale_rows(cuda, T* y, const double* row_scale, index_t M, index_t d) {
  if (M <= 0 || d <= 0) return;
  double* dev = cuda_backend::scratch<double>(M);
  // From pageable memory: returns once row_scale is staged; the kernel is ordered after the copy.
  DISTILX_CUDA_CHECK(cudaMemcpyAsync(dev, row_scale, sizeof(double) * static_cast<std::size_t>(M),
                                     cudaMemcpyHostToDevice, cuk::stream()));
  ::distilx::cuda_backend::align_kernels::scale_rows_kernel<<<cuk::grid_for(M * d), cuk::kBlock, 0, cuk::stream()>>>(
      y, dev, M, d);
  DISTILX_CUDA_LAUNCH_CHECK();
}

/// Per real row: row_val[m] = 1 - cos(S[m,:], mean_j B_j[m,:]) and, when dS is not null, its
/// gradient times coef (see the CPU op). dS, S and the matrices on the device; B a host array of
/// device pointers; mask and row_val on the host. Synchronises.
template <class T>
void align_cosine_rows(cuda, T* dS, const T* S, const T* const* B, index_t nB, const std::uint8_t* mask, index_t M,
                       index_t d, T coef, double* row_val) {
  namespace ak = ::distilx::cuda_backend::align_kernels;
  if (M <= 0) return;
  DISTILX_REQUIRE(shape_error, nB >= 1 && nB <= 4096 && d >= 1,
                  "align_cosine_rows(cuda): need 1 <= nB <= 4096 and d >= 1 (got nB = ", nB, ", d = ", d, ")");
  std::size_t off_ptrs = 0, off_mask = 0;
  unsigned char* buf =
      cuda_backend::detail::stage_align_inputs<T>(nullptr, 0, B, nB, mask, M, off_ptrs, off_mask);
  ak::cosine_rows_kernel<<<cuk::row_grid(M), 32 * cuk::kRowWarps, sizeof(const T*) * nB, cuk::stream()>>>(
      dS, S, reinterpret_cast<const T* const*>(buf + off_ptrs), static_cast<int>(nB), mask ? buf + off_mask : nullptr,
      M, d, coef, reinterpret_cast<double*>(buf));
  DISTILX_CUDA_LAUNCH_CHECK();
  cuda_backend::detail::fetch_rows(row_val, buf, M);
}

}  // namespace distilx::ops
