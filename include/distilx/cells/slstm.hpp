// sLSTM cell of NX-AI xLSTM (spec-xlstm.md §3.2-3.7): the stabilised recurrence with exponential input and
// sigmoid forget gates, block-diagonal (per head) recurrent matrix, explicit backward (§3.6), a token-by-token
// step for generation, the checkpoint layout conversions (§3.3) and the bias initialisation (§3.7).
// Legend: B batch, S time, NH heads, DH head dim, H = NH*DH, g gate in (i, f, z, o), u = h*DH + j unit index.
#pragma once

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "distilx/backend/cpu/blas.hpp"
#include "distilx/backend/memory.hpp"
#include "distilx/backend/tags.hpp"
#include "distilx/core/config.hpp"
#include "distilx/core/error.hpp"
#include "distilx/core/rng.hpp"
#include "distilx/ops/activations.hpp"

namespace distilx {

/// What one time step keeps per unit for the backward pass.
template <class T>
struct SLSTMGates {
  T i;       // i' = min(1, exp(i~ - m))
  T f;       // f' = min(1, exp(logsig(f~) + m_prev - m))
  T sig_nf;  // sigmoid(-f~) = d logsig(f~) / d f~
  T z;       // tanh(z~)
  T o;       // sigmoid(o~)
};

/// Pointwise sLSTM math of one unit and one time step, shared by every backend (a CUDA kernel calls the
/// same functions), so all backends agree on the stabiliser and the n == 0 rule.
struct SLSTMPointwise {
  /// Pre-activations (ti, tf, tz, to) and previous state -> new state (c, n, m), output y and the gate cache.
  template <class T>
  DISTILX_HOST_DEVICE static void forward(T ti, T tf, T tz, T to, T c_prev, T n_prev, T m_prev, T& c, T& n, T& m,
                                          T& y, SLSTMGates<T>& g) {
    // logsig(f~) and sigmoid(-f~) share exp(-|f~|); both are bitwise what ops::log_sigmoid(tf) and
    // ops::sigmoid(-tf) return (same expressions), one exp cheaper.
    const T e = std::exp(-std::abs(tf));
    const T lf = (tf < T(0) ? tf : T(0)) - std::log1p(e) + m_prev;
    g.sig_nf = tf >= T(0) ? e / (T(1) + e) : T(1) / (T(1) + e);
    // m = max(i~, lf), except when n == 0, which only holds before the first input (zero state, tested per unit
    // like the CUDA kernel): the forget term multiplies zeros there, so m starts from i~ alone. The gate that
    // defines m has exponent 0 (factor exactly 1), so only one exp is needed; min(1, .) is kept for the
    // n == 0 case, where lf - i~ may be positive but f' multiplies zero state.
    if (n_prev == T(0) || ti > lf) {
      m = ti;
      const T ef = std::exp(lf - ti);
      g.i = T(1);
      g.f = ef < T(1) ? ef : T(1);
    } else {
      m = lf;
      g.i = std::exp(ti - lf);
      g.f = T(1);
    }
    g.z = std::tanh(tz);
    g.o = ops::sigmoid(to);
    c = g.f * c_prev + g.i * g.z;
    n = g.f * n_prev + g.i;
    y = g.o * c / n;  // n >= 1 after the first step (spec §3.2), no epsilon needed
  }

  /// One reverse step (spec §3.6), m held constant (exact: y does not depend on m). dy is the total output
  /// gradient of this step; dc, dn carry the state gradients from step t+1 in and the ones for t-1 out.
  template <class T>
  DISTILX_HOST_DEVICE static void backward(T dy, T& dc, T& dn, const SLSTMGates<T>& g, T c, T n, T c_prev,
                                           T n_prev, T& dti, T& dtf, T& dtz, T& dto) {
    const T y = g.o * c / n;  // same expression as forward: bitwise the saved output
    const T dcb = dc + dy * g.o / n;
    const T dnb = dn - dy * y / n;
    dti = g.i * (g.z * dcb + dnb);
    dtf = g.f * (c_prev * dcb + n_prev * dnb) * g.sig_nf;
    dtz = g.i * dcb * (T(1) - g.z * g.z);
    dto = dy * y * (T(1) - g.o);
    dc = g.f * dcb;
    dn = g.f * dnb;
  }
};

/// The sLSTM recurrence over a whole sequence (training) or one token (generation). Parameters are raw
/// pointers in the NX-AI "cuda" layout: R [NH, DH(k, in), 4, DH(j, out)], bias [NH, 4, DH].
/// This header implements the cpu backend; SLSTMCell<T, cuda> is a specialisation supplied with the CUDA
/// backend (fused kernel) and keeps this public interface.
template <class T, class Backend = cpu>
class SLSTMCell {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "SLSTMCell<T, cpu>: T must be float or double");
  static_assert(std::is_same_v<Backend, cpu>,
                "SLSTMCell: this header implements only the cpu backend; include distilx/cuda.cuh for SLSTMCell<T, cuda>");

 public:
  SLSTMCell(index_t num_heads, index_t head_dim) : nh_(num_heads), dh_(head_dim) {
    DISTILX_REQUIRE(config_error, num_heads >= 1 && head_dim >= 1, "SLSTMCell: num_heads and head_dim must be >= 1, got ",
                    num_heads, " and ", head_dim);
  }

  index_t num_heads() const { return nh_; }
  index_t head_dim() const { return dh_; }
  index_t hidden_size() const { return nh_ * dh_; }

  /// Sizes the saved-state workspace for (B, S). Allocates only when the shape changes; forward() calls it.
  void resize(index_t B, index_t S) {
    check_shape(B, S, "resize");
    if (B == B_ && S == S_) return;
    const index_t H = hidden_size();
    saved_.resize(B * S * kSlots * H);
    scratch_.resize(B * 4 * H);
    carry_.resize(4 * B * H);
    B_ = B;
    S_ = S;
    has_saved_ = false;
  }

  /// y [B, S, H] from wx [B, S, 4H] (gate-major [g][h][j] per step), zero initial state. Saves what backward needs.
  void forward(T* y, const T* wx, const T* R, const T* bias, index_t B, index_t S) {
    resize(B, S);
    const index_t H = hidden_size(), NH = nh_, DH = dh_;
    const index_t ld_row = kSlots * H;  // stride between (b, t) rows of saved_
    T* saved = saved_.data();           // [B, S, kSlots, H]
    T* ry = scratch_.data();            // [B, NH, 4, DH]: R y_{t-1} of the current step
    T* m_run = carry_.data();           // [B, H]: stabiliser m_{t-1}
    for (index_t t = 0; t < S; ++t) {
      if (t == 0) {
        for (index_t e = 0; e < B * 4 * H; ++e) ry[e] = T(0);  // y_0 = 0
      } else {
        recurrent_product(ry, saved + t * ld_row + kYPrev * H, S * ld_row, R, B, NH, DH);
      }
#pragma omp parallel for if (B * H >= kParallelUnits)
      for (index_t bh = 0; bh < B * NH; ++bh) {
        const index_t b = bh / NH, h = bh % NH;
        const T* wxr = wx + (b * S + t) * 4 * H + h * DH;  // gate g at wxr[g*H + j]
        const T* ryr = ry + b * 4 * H + h * 4 * DH;        // gate g at ryr[g*DH + j]
        const T* bias_h = bias + h * 4 * DH;
        T* slot = saved + (b * S + t) * ld_row + h * DH;
        const T* prev = t > 0 ? slot - ld_row : nullptr;
        T* next = t + 1 < S ? slot + ld_row : nullptr;
        T* yr = y + (b * S + t) * H + h * DH;
        T* mr = m_run + b * H + h * DH;
        for (index_t j = 0; j < DH; ++j) {
          T pre[4];
          for (int g = 0; g < 4; ++g) pre[g] = wxr[g * H + j] + ryr[g * DH + j] + bias_h[g * DH + j];
          const T c_prev = prev ? prev[kC * H + j] : T(0);
          const T n_prev = prev ? prev[kN * H + j] : T(0);
          const T m_prev = prev ? mr[j] : T(0);
          T c, n, m, yv;
          SLSTMGates<T> gs;
          SLSTMPointwise::forward(pre[0], pre[1], pre[2], pre[3], c_prev, n_prev, m_prev, c, n, m, yv, gs);
          store(slot, H, j, c, n, gs);
          if (t == 0) slot[kYPrev * H + j] = T(0);
          if (next) next[kYPrev * H + j] = yv;
          mr[j] = m;
          yr[j] = yv;
        }
      }
    }
    has_saved_ = true;
  }

  /// dy [B, S, H] -> dwx [B, S, 4H] (overwritten); dR [NH, DH, 4, DH] and dbias [NH, 4, DH] are accumulated (+=)
  /// and may be null (frozen). Needs the states of the last forward() with the same (B, S).
  void backward(T* dwx, T* dR, T* dbias, const T* dy, const T* R, index_t B, index_t S) {
    DISTILX_REQUIRE(shape_error, has_saved_, "SLSTMCell::backward: call forward() first");
    DISTILX_REQUIRE(shape_error, B == B_ && S == S_, "SLSTMCell::backward: (B, S) = (", B, ", ", S,
                    ") differs from the last forward's (", B_, ", ", S_, ")");
    const index_t H = hidden_size(), NH = nh_, DH = dh_;
    const index_t ld_row = kSlots * H;
    const T* saved = saved_.data();  // [B, S, kSlots, H]
    T* dg = scratch_.data();         // [B, NH, 4, DH]: head-major copy of this step's gate gradients
    T* dyrec = carry_.data();        // [B, H]: gradient reaching y_t through R (from step t+1)
    T* dc = dyrec + B * H;           // [B, H]
    T* dn = dc + B * H;              // [B, H]
    for (index_t e = 0; e < 3 * B * H; ++e) dyrec[e] = T(0);
    for (index_t t = S - 1; t >= 0; --t) {
#pragma omp parallel for if (B * H >= kParallelUnits)
      for (index_t bh = 0; bh < B * NH; ++bh) {
        const index_t b = bh / NH, h = bh % NH;
        const T* slot = saved + (b * S + t) * ld_row + h * DH;
        const T* prev = t > 0 ? slot - ld_row : nullptr;
        const T* dyr = dy + (b * S + t) * H + h * DH;
        T* dwxr = dwx + (b * S + t) * 4 * H + h * DH;  // gate g at dwxr[g*H + j]
        T* dgr = dg + b * 4 * H + h * 4 * DH;          // gate g at dgr[g*DH + j]
        const index_t o = b * H + h * DH;
        for (index_t j = 0; j < DH; ++j) {
          SLSTMGates<T> gs;
          load(slot, H, j, gs);
          const T c_prev = prev ? prev[kC * H + j] : T(0);
          const T n_prev = prev ? prev[kN * H + j] : T(0);
          T d[4];
          SLSTMPointwise::backward(dyr[j] + dyrec[o + j], dc[o + j], dn[o + j], gs, slot[kC * H + j], slot[kN * H + j],
                                   c_prev, n_prev, d[0], d[1], d[2], d[3]);
          for (int g = 0; g < 4; ++g) {
            dwxr[g * H + j] = d[g];
            dgr[g * DH + j] = d[g];
          }
        }
      }
      if (t > 0) {
        // dy_rec[b, h, k] = sum_{g,j} R[h, k, g, j] dg[b, h, g, j].
        for (index_t h = 0; h < NH; ++h)
          ops::gemm(Backend{}, ops::Trans::no, ops::Trans::yes, B, DH, 4 * DH, T(1), dg + h * 4 * DH, 4 * H,
                    R + h * DH * 4 * DH, 4 * DH, T(0), dyrec + h * DH, H);
      }
    }
    if (dR) {
      // dR[h, :, g, :] += sum over all (b, t) of y_{t-1}[b, h, :]^T dg~[b, t, h, :]: one product with K = B*S per
      // (head, gate) instead of S small ones.
      for (index_t hg = 0; hg < NH * 4; ++hg) {
        const index_t h = hg / 4, g = hg % 4;
        ops::gemm(Backend{}, ops::Trans::yes, ops::Trans::no, DH, DH, B * S, T(1), saved + kYPrev * H + h * DH, ld_row,
                  dwx + g * H + h * DH, 4 * H, T(1), dR + h * DH * 4 * DH + g * DH, 4 * DH);
      }
    }
    if (dbias) {
      // Row-order column sums (sequential, so deterministic), then one scatter into the [NH, 4, DH] layout.
      T* colsum = scratch_.data();  // [4H], gate-major like dwx
      for (index_t e = 0; e < 4 * H; ++e) colsum[e] = T(0);
      for (index_t r = 0; r < B * S; ++r) {
        const T* row = dwx + r * 4 * H;
        for (index_t e = 0; e < 4 * H; ++e) colsum[e] += row[e];
      }
      for (index_t h = 0; h < NH; ++h)
        for (index_t g = 0; g < 4; ++g)
          for (index_t j = 0; j < DH; ++j) dbias[h * 4 * DH + g * DH + j] += colsum[g * H + h * DH + j];
    }
  }

  /// One recurrent step. state [4, B, H] = (y, c, n, m), zero-initialised by the caller, updated in place;
  /// wx [B, 4H] gate-major; writes y [B, H]. Same arithmetic as forward(), so it reproduces it token by token.
  static void step(T* y, T* state, const T* wx, const T* R, const T* bias, index_t B, index_t NH, index_t DH) {
    DISTILX_REQUIRE(shape_error, B >= 0 && NH >= 1 && DH >= 1, "SLSTMCell::step: need B >= 0, NH >= 1, DH >= 1, got ",
                    B, ", ", NH, ", ", DH);
    const index_t H = NH * DH;
    // Per-thread scratch that only grows: no allocation per generated token once warm.
    thread_local std::vector<T> scratch;
    if (static_cast<index_t>(scratch.size()) < B * 4 * H) scratch.resize(static_cast<std::size_t>(B * 4 * H));
    T* ry = scratch.data();  // [B, NH, 4, DH]
    T* ys = state;           // [B, H]
    T* cs = state + B * H;   // [B, H]
    T* ns = cs + B * H;      // [B, H]
    T* ms = ns + B * H;      // [B, H]
    recurrent_product(ry, ys, H, R, B, NH, DH);
#pragma omp parallel for if (B * H >= kParallelUnits)
    for (index_t bh = 0; bh < B * NH; ++bh) {
      const index_t b = bh / NH, h = bh % NH;
      const T* wxr = wx + b * 4 * H + h * DH;
      const T* ryr = ry + b * 4 * H + h * 4 * DH;
      const T* bias_h = bias + h * 4 * DH;
      const index_t o = b * H + h * DH;
      for (index_t j = 0; j < DH; ++j) {
        T pre[4];
        for (int g = 0; g < 4; ++g) pre[g] = wxr[g * H + j] + ryr[g * DH + j] + bias_h[g * DH + j];
        T c, n, m, yv;
        SLSTMGates<T> gs;
        SLSTMPointwise::forward(pre[0], pre[1], pre[2], pre[3], cs[o + j], ns[o + j], ms[o + j], c, n, m, yv, gs);
        ys[o + j] = yv;
        cs[o + j] = c;
        ns[o + j] = n;
        ms[o + j] = m;
        y[o + j] = yv;
      }
    }
  }

 private:
  // Saved per (b, t) row: y_{t-1} (the recurrent input, laid out so dR is one product over all rows),
  // the states c_t, n_t and the gate cache. y_t is recomputed as o c / n.
  enum Slot : index_t { kYPrev = 0, kC, kN, kI, kF, kSigNF, kZ, kO, kSlots };
  // Below this many units per step, OpenMP start-up costs more than the pointwise loop. The products are not
  // wrapped in OpenMP: gemm is called from one host thread (its stats are not thread-safe) and Eigen
  // parallelises large ones itself without changing the summation order.
  static constexpr index_t kParallelUnits = 4096;

  static void check_shape(index_t B, index_t S, const char* what) {
    DISTILX_REQUIRE(shape_error, B >= 0 && S >= 0, "SLSTMCell::", what, ": B and S must be >= 0, got ", B, ", ", S);
  }

  static void store(T* slot, index_t H, index_t j, T c, T n, const SLSTMGates<T>& g) {
    slot[kC * H + j] = c;
    slot[kN * H + j] = n;
    slot[kI * H + j] = g.i;
    slot[kF * H + j] = g.f;
    slot[kSigNF * H + j] = g.sig_nf;
    slot[kZ * H + j] = g.z;
    slot[kO * H + j] = g.o;
  }
  static void load(const T* slot, index_t H, index_t j, SLSTMGates<T>& g) {
    g.i = slot[kI * H + j];
    g.f = slot[kF * H + j];
    g.sig_nf = slot[kSigNF * H + j];
    g.z = slot[kZ * H + j];
    g.o = slot[kO * H + j];
  }

  /// ry[b, h, :] = y[b, h, :] R[h] per head: [B, DH] x [DH, 4DH] -> [B, 4DH]; y rows have stride ldy.
  static void recurrent_product(T* ry, const T* y, index_t ldy, const T* R, index_t B, index_t NH, index_t DH) {
    const index_t H = NH * DH;
    for (index_t h = 0; h < NH; ++h)
      ops::gemm(Backend{}, ops::Trans::no, ops::Trans::no, B, 4 * DH, DH, T(1), y + h * DH, ldy, R + h * DH * 4 * DH,
                4 * DH, T(0), ry + h * 4 * DH, 4 * H);
  }

  index_t nh_, dh_;
  index_t B_ = -1, S_ = -1;
  bool has_saved_ = false;
  Buffer<T, Backend> saved_;    // [B, S, kSlots, H]
  Buffer<T, Backend> scratch_;  // [B, 4H]
  Buffer<T, Backend> carry_;    // [4, B, H]: m (forward); dy_rec, dc, dn (backward)
};

// ---- checkpoint layouts (spec §3.3) ----------------------------------------------------------------------------

/// r_cuda[h][k][g*DH + j] = r_vanilla[h][g*DH + j][k] (per head a transpose of the nn.Linear (out, in) matrix).
template <class T>
void slstm_r_from_vanilla(T* r_cuda, const T* r_vanilla, index_t NH, index_t DH) {
  const index_t G = 4 * DH;
  for (index_t h = 0; h < NH; ++h)
    for (index_t k = 0; k < DH; ++k)
      for (index_t q = 0; q < G; ++q) r_cuda[(h * DH + k) * G + q] = r_vanilla[(h * G + q) * DH + k];
}
template <class T>
void slstm_r_to_vanilla(T* r_vanilla, const T* r_cuda, index_t NH, index_t DH) {
  const index_t G = 4 * DH;
  for (index_t h = 0; h < NH; ++h)
    for (index_t q = 0; q < G; ++q)
      for (index_t k = 0; k < DH; ++k) r_vanilla[(h * G + q) * DH + k] = r_cuda[(h * DH + k) * G + q];
}
/// b_cuda[h][g][j] = b_vanilla[g][h][j].
template <class T>
void slstm_bias_from_vanilla(T* b_cuda, const T* b_vanilla, index_t NH, index_t DH) {
  for (index_t g = 0; g < 4; ++g)
    for (index_t h = 0; h < NH; ++h)
      for (index_t j = 0; j < DH; ++j) b_cuda[(h * 4 + g) * DH + j] = b_vanilla[(g * NH + h) * DH + j];
}
template <class T>
void slstm_bias_to_vanilla(T* b_vanilla, const T* b_cuda, index_t NH, index_t DH) {
  for (index_t g = 0; g < 4; ++g)
    for (index_t h = 0; h < NH; ++h)
      for (index_t j = 0; j < DH; ++j) b_vanilla[(g * NH + h) * DH + j] = b_cuda[(h * 4 + g) * DH + j];
}

// ---- initialisation (spec §3.7) --------------------------------------------------------------------------------

enum class SLSTMBiasInit { powerlaw_blockdependent, small_init, standard, zeros };
enum class SLSTMRecurrentInit { zeros, standard };

/// Maps the NX-AI config string (`bias_init`) to the enum; throws config_error for anything else.
inline SLSTMBiasInit slstm_bias_init_from_string(const std::string& s) {
  if (s == "powerlaw_blockdependent") return SLSTMBiasInit::powerlaw_blockdependent;
  if (s == "small_init") return SLSTMBiasInit::small_init;
  if (s == "standard") return SLSTMBiasInit::standard;
  if (s == "zeros") return SLSTMBiasInit::zeros;
  throw config_error(detail::concat("sLSTM bias_init '", s,
                                    "' is unknown; expected powerlaw_blockdependent, small_init, standard or zeros"));
}

/// Writes bias [NH, 4, DH] (cuda layout). block_idx is the global block index, num_blocks the stack size.
/// With DH == 1 the power law's j/(DH-1) is taken as 0 (bias +5); the reference would produce NaN there.
template <class T>
void slstm_init_bias(T* bias, index_t NH, index_t DH, SLSTMBiasInit kind, index_t block_idx, index_t num_blocks,
                     Rng& rng) {
  DISTILX_REQUIRE(config_error, NH >= 1 && DH >= 1, "slstm_init_bias: NH and DH must be >= 1, got ", NH, ", ", DH);
  DISTILX_REQUIRE(config_error, num_blocks >= 1 && block_idx >= 0 && block_idx < num_blocks,
                  "slstm_init_bias: need 0 <= block_idx < num_blocks, got block_idx=", block_idx,
                  ", num_blocks=", num_blocks);
  const index_t n = NH * 4 * DH;
  if (kind == SLSTMBiasInit::standard) {
    const double a = 1.0 / std::sqrt(static_cast<double>(NH * DH));
    for (index_t e = 0; e < n; ++e) bias[e] = static_cast<T>(rng.uniform(-a, a));
    return;
  }
  for (index_t e = 0; e < n; ++e) bias[e] = T(0);
  if (kind == SLSTMBiasInit::zeros) return;
  const double r = num_blocks > 1 ? static_cast<double>(block_idx) / static_cast<double>(num_blocks - 1) : 0.0;
  for (index_t h = 0; h < NH; ++h) {
    T* bf = bias + (h * 4 + 1) * DH;  // forget gate, g = 1
    for (index_t j = 0; j < DH; ++j) {
      const double x = DH > 1 ? static_cast<double>(j) / static_cast<double>(DH - 1) : 0.0;
      bf[j] = static_cast<T>(kind == SLSTMBiasInit::powerlaw_blockdependent ? 5.0 - 12.0 * std::pow(x, 0.3 + 1.3 * r)
                                                                            : 3.0 + 3.0 * x);
    }
  }
}

/// Writes R [NH, DH, 4, DH]: zeros (the NX-AI default) or U(+-1/sqrt(H)).
template <class T>
void slstm_init_recurrent(T* R, index_t NH, index_t DH, SLSTMRecurrentInit kind, Rng& rng) {
  const index_t n = NH * DH * 4 * DH;
  const double a = 1.0 / std::sqrt(static_cast<double>(NH * DH));
  for (index_t e = 0; e < n; ++e)
    R[e] = kind == SLSTMRecurrentInit::standard ? static_cast<T>(rng.uniform(-a, a)) : T(0);
}

}  // namespace distilx
