// mLSTM cell kernel of NX-AI xLSTM (spec-xlstm.md §4.3-§4.6, §9): the parallel stabilised form, a chunkwise
// form that computes the same function without S×S memory, their shared exact backward, and the recurrent step
// for generation (§4.4). Input q, k, v and the gate pre-activations; output h̃ before the per-head output norm.
// Legend: B batch, S time, NH heads, DH head dim, D = NH*DH, L chunk length, q̂ = q/sqrt(DH), ε = 1e-6.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "distilx/backend/cpu/blas.hpp"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"
#include "distilx/ops/activations.hpp"

namespace distilx {

/// automatic: parallel when S <= chunk_size, else chunkwise.
enum class MLSTMForm { parallel, chunkwise, automatic };

namespace detail {

/// ε of the stabilised denominator (NX-AI `eps`).
inline constexpr double kMlstmEps = 1e-6;

/// den = max(|s|, e^{-m}) + ε (spec §4.3).
template <class T>
DISTILX_HOST_DEVICE inline T mlstm_denominator(T s, T m) {
  const T a = std::abs(s), floor = std::exp(-m);
  return (a > floor ? a : floor) + T(kMlstmEps);
}

/// d den / d s = w·sign(s): w = 1 where |s| wins the max, 1/2 on a tie (PyTorch's maximum splits ties), else 0.
template <class T>
DISTILX_HOST_DEVICE inline T mlstm_dden_ds(T s, T m) {
  const T a = std::abs(s), floor = std::exp(-m);
  const T w = a > floor ? T(1) : (a == floor ? T(0.5) : T(0));
  const T sign = s > T(0) ? T(1) : (s < T(0) ? T(-1) : T(0));
  return w * sign;
}

/// One recurrent step of one (b, h) (spec §4.4). C: [DH, DH] (key index major), n: [DH], m: scalar.
template <class T>
DISTILX_HOST_DEVICE inline void mlstm_step_head(T* h, T* C, T* n, T& m, const T* q, const T* k, const T* v, T igate,
                                                T fgate, index_t DH) {
  const T log_f = ops::log_sigmoid(fgate);
  const T m_new = (log_f + m > igate) ? log_f + m : igate;
  const T f_act = std::exp(log_f + m - m_new);
  const T i_act = std::exp(igate - m_new);
  const T scale = T(1) / std::sqrt(T(DH));
  for (index_t i = 0; i < DH; ++i) {
    const T ki = i_act * (k[i] * scale);
    n[i] = f_act * n[i] + ki;
    T* Ci = C + i * DH;
    for (index_t j = 0; j < DH; ++j) Ci[j] = f_act * Ci[j] + ki * v[j];
  }
  T qn = 0;
  for (index_t j = 0; j < DH; ++j) h[j] = 0;
  for (index_t i = 0; i < DH; ++i) {
    qn += q[i] * n[i];
    const T* Ci = C + i * DH;
    for (index_t j = 0; j < DH; ++j) h[j] += q[i] * Ci[j];
  }
  const T den = mlstm_denominator(qn, m_new);
  for (index_t j = 0; j < DH; ++j) h[j] /= den;
  m = m_new;
}

inline int mlstm_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int mlstm_thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace detail

namespace detail {
/// What the CPU and the CUDA mLSTM cells share: heads, head size, form and chunk size, validated
/// once, and the rule that picks the chunk length for a sequence.
class MLSTMCellShape {
 public:
  MLSTMCellShape(index_t num_heads, index_t head_dim, MLSTMForm form, index_t chunk_size)
      : nh_(num_heads), dh_(head_dim), form_(form), chunk_(chunk_size) {
    DISTILX_REQUIRE(config_error, num_heads > 0, "MLSTMCell: num_heads must be > 0, got ", num_heads);
    DISTILX_REQUIRE(config_error, head_dim > 0, "MLSTMCell: head_dim must be > 0, got ", head_dim);
    DISTILX_REQUIRE(config_error, chunk_size > 0, "MLSTMCell: chunk_size must be > 0, got ", chunk_size);
  }

  index_t num_heads() const { return nh_; }
  index_t head_dim() const { return dh_; }
  MLSTMForm form() const { return form_; }
  index_t chunk_size() const { return chunk_; }
  void set_form(MLSTMForm f) { form_ = f; }
  void set_chunk_size(index_t L) {
    DISTILX_REQUIRE(config_error, L > 0, "MLSTMCell: chunk_size must be > 0, got ", L);
    chunk_ = L;
  }

 protected:
  /// Chunk length for a sequence of S: S itself (one chunk: the parallel form) when the form is
  /// parallel, or automatic and S fits one chunk; otherwise the chunk size.
  index_t chunk_length(index_t S) const {
    const index_t s = std::max<index_t>(S, 1);
    if (form_ == MLSTMForm::parallel || (form_ == MLSTMForm::automatic && S <= chunk_)) return s;
    return std::min(chunk_, s);
  }

  index_t nh_, dh_;
  MLSTMForm form_;
  index_t chunk_;
};
}  // namespace detail

/// The mLSTM cell kernel (no gate linears, no output norm: those live in the block).
///
/// Parallel and chunkwise are one function. The parallel form is the chunkwise code with a single chunk
/// (L = S), which is exactly NX-AI `parallel_stabilized_simple`. In the chunkwise form the row stabiliser is
/// the parallel form's m_i = max_{j<=i} log D_ij, obtained as max(intra-chunk max, M_{c-1} + b_τ) with the
/// inter-chunk running max M starting at -inf. NX-AI's `chunkwise_simple` starts M at 0, which changes the
/// stabiliser and hence (through ε, spec §4.4) the function itself; starting at -inf makes chunkwise and
/// parallel agree up to rounding, so the one exact backward below serves both.
/// Memory: forward saves m_i, s_i and the argmax a_i ([B, NH, S]); backward recomputes the rest. Scratch is per
/// thread: three L×L tiles, five L×DH tiles, a DH×DH state and O(S) scalars.
template <class T, class Backend = cpu>
class MLSTMCell : public detail::MLSTMCellShape {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "MLSTMCell: T must be float or double");
  static_assert(is_backend_v<Backend>, "MLSTMCell: Backend must be a distilx backend tag");
  static_assert(std::is_same_v<Backend, cpu>,
                "MLSTMCell: this header implements the cpu backend; the CUDA backend specialises MLSTMCell<T, cuda>");

 public:
  MLSTMCell(index_t num_heads, index_t head_dim, MLSTMForm form = MLSTMForm::automatic, index_t chunk_size = 64)
      : detail::MLSTMCellShape(num_heads, head_dim, form, chunk_size) {}

  /// Allocate/resize saved-state workspace for batch B, length S (no allocation in forward/backward when unchanged).
  void resize(index_t B, index_t S) {
    DISTILX_REQUIRE(shape_error, B >= 0 && S >= 0, "MLSTMCell::resize: B and S must be >= 0, got B=", B, " S=", S);
    if (B != B_ || S != S_) {
      const auto n = static_cast<std::size_t>(B * nh_ * S);
      m_.assign(n, T(0));
      s_.assign(n, T(0));
      arg_.assign(n, 0);
      B_ = B;
      S_ = S;
      saved_valid_ = false;
    }
    reserve_scratch(B, S, chunk_length(S));
  }

  /// q, k, v: [B, S, NH*DH] (feature index h*DH + j, i.e. head-major within a time step);
  /// igate, fgate (pre-activations ĩ, f̃): [B, S, NH]; h: [B, S, NH*DH] output.
  void forward(T* h, const T* q, const T* k, const T* v, const T* igate, const T* fgate, index_t B, index_t S) {
    DISTILX_REQUIRE(shape_error, B >= 0 && S >= 0, "MLSTMCell::forward: B and S must be >= 0, got B=", B, " S=", S);
    resize(B, S);
    const index_t L = chunk_length(S);
    fwd_L_ = L;
    saved_valid_ = true;
    const index_t BH = B * nh_;
    if (BH == 0 || S == 0) return;
#pragma omp parallel for schedule(dynamic, 1) num_threads(ws_threads_) if (worth_threads(BH, S, L))
    for (index_t bh = 0; bh < BH; ++bh) {
      const Tiles tl = tiles(detail::mlstm_thread_id(), S, L);
      const Head hd = head(bh, q, k, v, igate, fgate, S);
      forward_head(hd, h + offset(bh, S), tl, S, L);
    }
  }

  /// Gradients of the scalar loss: writes (overwrites) dq, dk, dv [B,S,NH*DH], digate, dfgate [B,S,NH],
  /// given dh [B,S,NH*DH] and the same inputs passed to the last forward (same B, S). Outputs must not alias the
  /// inputs or each other (dv holds intermediate values during the call).
  void backward(T* dq, T* dk, T* dv, T* digate, T* dfgate, const T* dh, const T* q, const T* k, const T* v,
                const T* igate, const T* fgate, index_t B, index_t S) {
    DISTILX_REQUIRE(error, saved_valid_, "MLSTMCell::backward: call forward first");
    DISTILX_REQUIRE(shape_error, B == B_ && S == S_, "MLSTMCell::backward: shape (B=", B, ", S=", S,
                    ") differs from the last forward (B=", B_, ", S=", S_, ")");
    const index_t L = fwd_L_;  // the chunking of the forward whose statistics are saved
    reserve_scratch(B, S, L);
    const index_t BH = B * nh_;
    if (BH == 0 || S == 0) return;
#pragma omp parallel for schedule(dynamic, 1) num_threads(ws_threads_) if (worth_threads(BH, S, L))
    for (index_t bh = 0; bh < BH; ++bh) {
      const Tiles tl = tiles(detail::mlstm_thread_id(), S, L);
      const Head hd = head(bh, q, k, v, igate, fgate, S);
      const index_t o = offset(bh, S), og = (bh / nh_) * S * nh_ + bh % nh_;
      const Grads gr{dh + o, dq + o, dk + o, dv + o, digate + og, dfgate + og};
      backward_head(hd, gr, tl, S, L);
    }
  }

  /// Recurrent step (generation), spec §4.4: C [B,NH,DH,DH], n [B,NH,DH], m [B,NH] (all zero-initialised by the
  /// caller), q,k,v [B, NH*DH], igate/fgate [B, NH] for one time step; writes h [B, NH*DH]; updates C, n, m.
  static void step(T* h, T* C, T* n, T* m, const T* q, const T* k, const T* v, const T* igate, const T* fgate,
                   index_t B, index_t NH, index_t DH) {
    const index_t BH = B * NH;
#pragma omp parallel for if (BH * DH * DH > 65536)
    for (index_t bh = 0; bh < BH; ++bh) {
      const index_t o = bh * DH;  // [B, NH*DH] rows are [B, NH, DH] flattened
      detail::mlstm_step_head(h + o, C + bh * DH * DH, n + o, m[bh], q + o, k + o, v + o, igate[bh], fgate[bh], DH);
    }
  }

 private:
  static constexpr T kNegInf = -std::numeric_limits<T>::infinity();

  /// Inputs of one (b, h): q, k, v rows have stride ld = D; gates have stride gs = NH. Saved statistics are [S].
  struct Head {
    const T *q, *k, *v, *ig, *fg;
    index_t ld, gs;
    T *m, *s;        // row stabiliser m_i, row sum s_i
    index_t* arg;    // a_i = argmax_j log D_ij (global time index)
  };
  struct Grads {
    const T* dh;
    T *dq, *dk, *dv, *dig, *dfg;
  };
  /// Per-thread scratch. Tiles are row-major with the leading dimension in the comment.
  struct Tiles {
    T *qt, *nt, *xt, *y1, *y2;  // [L, DH], ld DH
    T *w, *e, *dp;              // [L, L], ld L
    T *st, *sv;                 // inter-chunk state [DH, DH] (C, or G in the reverse sweep), [DH] (n, or r)
    T *alpha, *beta;            // [L]
    double* b;                  // [L] local cumulative log-forget (double: see load_chunk)
    T* cm;                      // [nc + 1] running max M after each chunk (cm[0] = -inf)
    T* ds;                      // [S] δs of the whole sequence for the reverse sweep (δñ waits in dv)
  };

  /// Threads only pay off above a few tens of thousands of multiply-adds (each (b, h) costs about
  /// S·(L + DH)·DH); below that, waking a team costs more than the work, badly so on a loaded machine.
  bool worth_threads(index_t BH, index_t S, index_t L) const { return BH > 1 && BH * S * (L + dh_) * dh_ > 65536; }
  index_t scratch_per_thread(index_t S, index_t L) const {
    const index_t nc = (S + L - 1) / L;
    return 5 * L * dh_ + 3 * L * L + dh_ * dh_ + dh_ + 2 * L + (nc + 1) + S;
  }
  void reserve_scratch(index_t B, index_t S, index_t L) {
    const int threads =
        static_cast<int>(std::max<index_t>(1, std::min<index_t>(detail::mlstm_max_threads(), B * nh_)));
    const index_t per = scratch_per_thread(S, L);
    if (threads == ws_threads_ && per == ws_per_ && L == ws_cum_per_) return;
    scratch_.assign(static_cast<std::size_t>(threads * per), T(0));
    cum_.assign(static_cast<std::size_t>(threads * L), 0.0);
    ws_threads_ = threads;
    ws_per_ = per;
    ws_cum_per_ = L;
  }
  Tiles tiles(int thread, index_t S, index_t L) {
    T* p = scratch_.data() + thread * ws_per_;
    auto take = [&p](index_t n) {
      T* r = p;
      p += n;
      return r;
    };
    Tiles t;
    t.qt = take(L * dh_);
    t.nt = take(L * dh_);
    t.xt = take(L * dh_);
    t.y1 = take(L * dh_);
    t.y2 = take(L * dh_);
    t.w = take(L * L);
    t.e = take(L * L);
    t.dp = take(L * L);
    t.st = take(dh_ * dh_);
    t.sv = take(dh_);
    t.b = cum_.data() + thread * ws_cum_per_;
    t.alpha = take(L);
    t.beta = take(L);
    t.cm = take((S + L - 1) / L + 1);
    t.ds = take(S);
    return t;
  }
  index_t offset(index_t bh, index_t S) const { return (bh / nh_) * S * nh_ * dh_ + (bh % nh_) * dh_; }
  Head head(index_t bh, const T* q, const T* k, const T* v, const T* ig, const T* fg, index_t S) {
    const index_t o = offset(bh, S), og = (bh / nh_) * S * nh_ + bh % nh_;
    return Head{q + o, k + o, v + o, ig + og, fg + og, nh_ * dh_, nh_, m_.data() + bh * S, s_.data() + bh * S,
                arg_.data() + bh * S};
  }

  /// Chunk [t0, t0+Lc): b = local cumulative log-forget, qt = q̂ rows, w = q̂ k^T. Returns g = b[Lc-1].
  /// Exponents use differences b_r - b_c; for float, a float cumsum would lose |b| * 6e-8 absolute in each
  /// (|b| ~ 50 after 100 steps of moderate forgetting), so b is accumulated and differenced in double and
  /// rounded to T once. Per-chunk (local) cumsums keep |b| small in the chunkwise form as well.
  double load_chunk(const Head& hd, const Tiles& tl, index_t t0, index_t Lc, index_t L) const {
    double acc = 0;
    for (index_t r = 0; r < Lc; ++r) {
      acc += ops::log_sigmoid(hd.fg[(t0 + r) * hd.gs]);
      tl.b[r] = acc;
    }
    const T scale = T(1) / std::sqrt(T(dh_));
    for (index_t r = 0; r < Lc; ++r) {
      const T* qr = hd.q + (t0 + r) * hd.ld;
      for (index_t j = 0; j < dh_; ++j) tl.qt[r * dh_ + j] = qr[j] * scale;
    }
    ops::gemm(Backend{}, ops::Trans::no, ops::Trans::yes, Lc, Lc, dh_, T(1), tl.qt, dh_, hd.k + t0 * hd.ld, hd.ld,
              T(0), tl.w, L);
    return acc;
  }

  /// e = exp(log D - m_row) on and below the diagonal, 0 above; w (= q̂ k^T on entry) becomes W = w ⊙ e.
  void apply_decay(const Head& hd, const Tiles& tl, index_t t0, index_t Lc, index_t L) const {
    for (index_t r = 0; r < Lc; ++r) {
      const T mr = hd.m[t0 + r];
      T* er = tl.e + r * L;
      T* wr = tl.w + r * L;
      for (index_t c = 0; c <= r; ++c) {
        er[c] = std::exp(T(tl.b[r] - tl.b[c]) + hd.ig[(t0 + c) * hd.gs] - mr);
        wr[c] *= er[c];
      }
      for (index_t c = r + 1; c < Lc; ++c) er[c] = wr[c] = T(0);
    }
  }

  /// nt = ñ rows of the chunk: W v (intra) plus alpha_r q̂_r^T C (inter, when a state exists).
  void numerator(const Head& hd, const Tiles& tl, index_t t0, index_t Lc, index_t L, bool has_state) const {
    ops::gemm(Backend{}, ops::Trans::no, ops::Trans::no, Lc, dh_, Lc, T(1), tl.w, L, hd.v + t0 * hd.ld, hd.ld, T(0),
              tl.nt, dh_);
    if (!has_state) return;
    scale_rows(tl.xt, tl.qt, dh_, tl.alpha, Lc);
    ops::gemm(Backend{}, ops::Trans::no, ops::Trans::no, Lc, dh_, dh_, T(1), tl.xt, dh_, tl.st, dh_, T(1), tl.nt,
              dh_);
  }

  /// dp = δP = (δñ v^T + δs 1^T) ⊙ e for the chunk (δW with m held fixed, times the decay); dn: the chunk's δñ
  /// rows with leading dimension ld.
  void delta_scores(const Head& hd, const Tiles& tl, const T* dn, index_t t0, index_t Lc, index_t L) const {
    ops::gemm(Backend{}, ops::Trans::no, ops::Trans::yes, Lc, Lc, dh_, T(1), dn, hd.ld, hd.v + t0 * hd.ld, hd.ld,
              T(0), tl.dp, L);
    for (index_t r = 0; r < Lc; ++r) {
      const T dsr = tl.ds[t0 + r];
      T* dpr = tl.dp + r * L;
      const T* er = tl.e + r * L;
      for (index_t c = 0; c <= r; ++c) dpr[c] = (dpr[c] + dsr) * er[c];
      for (index_t c = r + 1; c < Lc; ++c) dpr[c] = T(0);
    }
  }

  /// Folds the chunk's keys into the inter-chunk state: st = Σ_{j<=end} e^{F_end - F_j + ĩ_j - M} k_j v_j^T and
  /// sv = Σ e^{...} k_j, where M is the running max of those exponents (from -inf), so every weight is <= 1.
  /// Updates M and its argmax A (earlier index wins ties, as in the parallel form's max).
  void advance_state(const Head& hd, const Tiles& tl, index_t t0, index_t Lc, double g, T& M, index_t& A) const {
    T mu = kNegInf;
    index_t amu = -1;
    for (index_t r = 0; r < Lc; ++r) {
      tl.beta[r] = hd.ig[(t0 + r) * hd.gs] + T(g - tl.b[r]);
      if (tl.beta[r] > mu) {
        mu = tl.beta[r];
        amu = t0 + r;
      }
    }
    const T carried = T(g) + M;
    const T M_new = mu > carried ? mu : carried;
    if (mu > carried) A = amu;
    const T decay = std::exp(carried - M_new);  // 0 for the first chunk (M = -inf)
    for (index_t r = 0; r < Lc; ++r) tl.beta[r] = std::exp(tl.beta[r] - M_new);
    for (index_t r = 0; r < Lc; ++r) {
      const T* kr = hd.k + (t0 + r) * hd.ld;
      for (index_t j = 0; j < dh_; ++j) tl.xt[r * dh_ + j] = tl.beta[r] * kr[j];
    }
    ops::gemm(Backend{}, ops::Trans::yes, ops::Trans::no, dh_, dh_, Lc, T(1), tl.xt, dh_, hd.v + t0 * hd.ld, hd.ld,
              decay, tl.st, dh_);
    for (index_t j = 0; j < dh_; ++j) tl.sv[j] *= decay;
    for (index_t r = 0; r < Lc; ++r)
      for (index_t j = 0; j < dh_; ++j) tl.sv[j] += tl.xt[r * dh_ + j];
    M = M_new;
  }

  // [B, S, NH, DH] -> one (b, h): every chunk in time order, state carried forward.
  void forward_head(const Head& hd, T* h, const Tiles& tl, index_t S, index_t L) const {
    std::fill(tl.st, tl.st + dh_ * dh_, T(0));
    std::fill(tl.sv, tl.sv + dh_, T(0));
    T M = kNegInf;  // no keys before the first chunk (see the class comment)
    index_t A = -1;
    for (index_t t0 = 0; t0 < S; t0 += L) {
      const index_t Lc = std::min(L, S - t0);
      const bool first = t0 == 0, last = t0 + Lc >= S;
      const double g = load_chunk(hd, tl, t0, Lc, L);
      // Row stabiliser m_i = max_{j<=i} log D_ij: intra-chunk keys vs the running max of all earlier keys.
      for (index_t r = 0; r < Lc; ++r) {
        T best = kNegInf;
        index_t arg = -1;
        for (index_t c = 0; c <= r; ++c) {
          const T ld = T(tl.b[r] - tl.b[c]) + hd.ig[(t0 + c) * hd.gs];
          if (ld > best) {
            best = ld;
            arg = t0 + c;
          }
        }
        const T inter = M + T(tl.b[r]);
        if (A >= 0 && inter >= best) {  // earlier keys win ties
          best = inter;
          arg = A;
        }
        if (arg < 0) arg = t0 + r;  // only with non-finite gates; keeps backward's scatter in range
        hd.m[t0 + r] = best;
        hd.arg[t0 + r] = arg;
        tl.alpha[r] = std::exp(inter - best);
      }
      apply_decay(hd, tl, t0, Lc, L);
      numerator(hd, tl, t0, Lc, L, !first);
      for (index_t r = 0; r < Lc; ++r) {
        T s = 0;
        const T* wr = tl.w + r * L;
        for (index_t c = 0; c <= r; ++c) s += wr[c];
        if (!first) s += tl.alpha[r] * dot(tl.qt + r * dh_, tl.sv);
        hd.s[t0 + r] = s;
        const T den = detail::mlstm_denominator(s, hd.m[t0 + r]);
        T* hr = h + (t0 + r) * hd.ld;
        for (index_t j = 0; j < dh_; ++j) hr[j] = tl.nt[r * dh_ + j] / den;
      }
      if (!last) advance_state(hd, tl, t0, Lc, g, M, A);
    }
  }

  // Backward of one (b, h). Forward sweep: recompute ñ (hence h), get δñ, δs, the stabiliser path δm and δq̂
  // (intra tile plus the inter-chunk state C, n as in the forward). Reverse sweep: δk, δv from the intra tile
  // plus a state G = Σ_{later i} e^{F_i - m_i - F_end + M} q̂_i δñ_i^T (and r for the δs_i q̂_i terms). Since
  // F_i - m_i <= F_j - ĩ_j for all j <= i, choosing the forward's M as G's scale makes both G's weights and the
  // read-out weights e^{-M + F_end - F_j + ĩ_j} <= 1. The log-decay gradients reduce to dot products: row sums
  // of δ log D are δq̂_i·q̂_i, column sums δk_j·k_j. δñ is parked in the dv rows between the sweeps (each chunk's
  // δv is written after its last use of δñ), so the scratch stays O(L² + L·DH + DH²) per thread.
  void backward_head(const Head& hd, const Grads& gr, const Tiles& tl, index_t S, index_t L) const {
    const T eps = T(detail::kMlstmEps);
    const T scale = T(1) / std::sqrt(T(dh_));
    for (index_t t = 0; t < S; ++t) gr.dig[t * hd.gs] = gr.dfg[t * hd.gs] = T(0);
    std::fill(tl.st, tl.st + dh_ * dh_, T(0));
    std::fill(tl.sv, tl.sv + dh_, T(0));
    const index_t nc = (S + L - 1) / L;
    T M = kNegInf;
    index_t A = -1;
    tl.cm[0] = M;
    for (index_t c = 0; c < nc; ++c) {
      const index_t t0 = c * L, Lc = std::min(L, S - t0);
      const bool first = c == 0, last = c + 1 == nc;
      const double g = load_chunk(hd, tl, t0, Lc, L);
      for (index_t r = 0; r < Lc; ++r) tl.alpha[r] = std::exp(M + T(tl.b[r]) - hd.m[t0 + r]);
      apply_decay(hd, tl, t0, Lc, L);
      numerator(hd, tl, t0, Lc, L, !first);
      for (index_t r = 0; r < Lc; ++r) {
        const index_t i = t0 + r;
        const T s = hd.s[i], m = hd.m[i];
        const T den = detail::mlstm_denominator(s, m);
        const T* dhr = gr.dh + i * hd.ld;
        T* dnr = gr.dv + i * hd.ld;
        T dot_hh = 0;
        for (index_t j = 0; j < dh_; ++j) {
          dot_hh += dhr[j] * (tl.nt[r * dh_ + j] / den);
          dnr[j] = dhr[j] / den;
        }
        const T dden = -dot_hh / den;
        tl.ds[i] = dden * detail::mlstm_dden_ds(s, m);
        // h = N / (max(|S|,1) + ε e^m) unstabilised, so dh/dm = -h ε / den at fixed log D; m = log D_{i,a_i}.
        const T dm = eps * dden;
        const index_t a = hd.arg[i];
        gr.dfg[i * hd.gs] += dm;
        gr.dfg[a * hd.gs] -= dm;
        gr.dig[a * hd.gs] += dm;
      }
      delta_scores(hd, tl, gr.dv + t0 * hd.ld, t0, Lc, L);
      ops::gemm(Backend{}, ops::Trans::no, ops::Trans::no, Lc, dh_, Lc, T(1), tl.dp, L, hd.k + t0 * hd.ld, hd.ld,
                T(0), tl.y1, dh_);
      if (!first) {  // δq̂_i += alpha_i (C δñ_i + δs_i n)
        scale_rows(tl.xt, gr.dv + t0 * hd.ld, hd.ld, tl.alpha, Lc);
        ops::gemm(Backend{}, ops::Trans::no, ops::Trans::yes, Lc, dh_, dh_, T(1), tl.xt, dh_, tl.st, dh_, T(1),
                  tl.y1, dh_);
        for (index_t r = 0; r < Lc; ++r) {
          const T a = tl.alpha[r] * tl.ds[t0 + r];
          for (index_t j = 0; j < dh_; ++j) tl.y1[r * dh_ + j] += a * tl.sv[j];
        }
      }
      for (index_t r = 0; r < Lc; ++r) {
        const T* dqr = tl.y1 + r * dh_;
        gr.dfg[(t0 + r) * hd.gs] += dot(dqr, tl.qt + r * dh_);
        T* out = gr.dq + (t0 + r) * hd.ld;
        for (index_t j = 0; j < dh_; ++j) out[j] = dqr[j] * scale;
      }
      if (!last) advance_state(hd, tl, t0, Lc, g, M, A);
      tl.cm[c + 1] = M;
    }

    std::fill(tl.st, tl.st + dh_ * dh_, T(0));  // now G
    std::fill(tl.sv, tl.sv + dh_, T(0));        // now r
    for (index_t c = nc - 1; c >= 0; --c) {
      const index_t t0 = c * L, Lc = std::min(L, S - t0);
      const bool first = c == 0, last = c + 1 == nc;
      const double g = load_chunk(hd, tl, t0, Lc, L);
      const T M_prev = tl.cm[c];
      for (index_t r = 0; r < Lc; ++r) tl.alpha[r] = std::exp(M_prev + T(tl.b[r]) - hd.m[t0 + r]);
      apply_decay(hd, tl, t0, Lc, L);
      const T* dn = gr.dv + t0 * hd.ld;  // δñ rows of this chunk
      delta_scores(hd, tl, dn, t0, Lc, L);
      ops::gemm(Backend{}, ops::Trans::yes, ops::Trans::no, Lc, dh_, Lc, T(1), tl.dp, L, tl.qt, dh_, T(0), tl.y1,
                dh_);
      ops::gemm(Backend{}, ops::Trans::yes, ops::Trans::no, Lc, dh_, Lc, T(1), tl.w, L, dn, hd.ld, T(0), tl.y2,
                dh_);
      if (!last) {  // queries of later chunks: δk_j += β_j (G v_j + r), δv_j += β_j G^T k_j
        const T M_c = tl.cm[c + 1];
        for (index_t r = 0; r < Lc; ++r) tl.beta[r] = std::exp(T(g - tl.b[r]) + hd.ig[(t0 + r) * hd.gs] - M_c);
        scale_rows(tl.xt, hd.v + t0 * hd.ld, hd.ld, tl.beta, Lc);
        ops::gemm(Backend{}, ops::Trans::no, ops::Trans::yes, Lc, dh_, dh_, T(1), tl.xt, dh_, tl.st, dh_, T(1),
                  tl.y1, dh_);
        for (index_t r = 0; r < Lc; ++r)
          for (index_t j = 0; j < dh_; ++j) tl.y1[r * dh_ + j] += tl.beta[r] * tl.sv[j];
        scale_rows(tl.xt, hd.k + t0 * hd.ld, hd.ld, tl.beta, Lc);
        ops::gemm(Backend{}, ops::Trans::no, ops::Trans::no, Lc, dh_, dh_, T(1), tl.xt, dh_, tl.st, dh_, T(1),
                  tl.y2, dh_);
      }
      if (!first) {  // G <- e^{g + M_{c-1} - M_c} G + Σ_{i in chunk} alpha_i q̂_i δñ_i^T, rescaled to M_{c-1}
        const T decay = last ? T(0) : std::exp(T(g) + M_prev - tl.cm[c + 1]);
        scale_rows(tl.xt, tl.qt, dh_, tl.alpha, Lc);
        ops::gemm(Backend{}, ops::Trans::yes, ops::Trans::no, dh_, dh_, Lc, T(1), tl.xt, dh_, dn, hd.ld, decay,
                  tl.st, dh_);
        for (index_t j = 0; j < dh_; ++j) tl.sv[j] *= decay;
        for (index_t r = 0; r < Lc; ++r) {
          const T a = tl.ds[t0 + r];
          for (index_t j = 0; j < dh_; ++j) tl.sv[j] += a * tl.xt[r * dh_ + j];
        }
      }
      for (index_t r = 0; r < Lc; ++r) {  // δñ of this chunk is dead now: overwrite it with δv
        const index_t i = t0 + r;
        const T* kr = hd.k + i * hd.ld;
        T* dkr = gr.dk + i * hd.ld;
        T* dvr = gr.dv + i * hd.ld;
        for (index_t j = 0; j < dh_; ++j) {
          dkr[j] = tl.y1[r * dh_ + j];
          dvr[j] = tl.y2[r * dh_ + j];
        }
        const T kk = dot(tl.y1 + r * dh_, kr);
        gr.dig[i * hd.gs] += kk;
        gr.dfg[i * hd.gs] -= kk;
      }
    }

    // δ logσ(f̃_s) = Σ_{t>=s} δF_t; δf̃ = δ logσ(f̃) · σ(-f̃).
    double acc = 0;
    for (index_t t = S - 1; t >= 0; --t) {
      acc += gr.dfg[t * hd.gs];
      gr.dfg[t * hd.gs] = T(acc) * ops::sigmoid(-hd.fg[t * hd.gs]);
    }
  }

  T dot(const T* a, const T* b) const {
    double s = 0;
    for (index_t j = 0; j < dh_; ++j) s += double(a[j]) * double(b[j]);
    return T(s);
  }
  /// out[r, :] = f[r] * x[r, :]; x is [rows, DH] with leading dimension ld, out is contiguous [rows, DH].
  void scale_rows(T* out, const T* x, index_t ld, const T* f, index_t rows) const {
    for (index_t r = 0; r < rows; ++r)
      for (index_t j = 0; j < dh_; ++j) out[r * dh_ + j] = f[r] * x[r * ld + j];
  }

  // Saved by forward for backward, [B, NH, S].
  std::vector<T> m_, s_;
  std::vector<index_t> arg_;
  index_t B_ = -1, S_ = -1, fwd_L_ = 1;
  bool saved_valid_ = false;
  // Per-thread scratch, ws_threads_ blocks of ws_per_ elements.
  std::vector<T> scratch_;
  std::vector<double> cum_;  // ws_threads_ blocks of ws_cum_per_ (= L)
  int ws_threads_ = 0;
  index_t ws_per_ = 0, ws_cum_per_ = 0;
};

}  // namespace distilx
