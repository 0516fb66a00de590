// sLSTM block of NX-AI's xLSTMBlockStack (spec-xlstm.md §3.1, §2.6, §6):
//   x1 = x + MHLN(sLSTM(LN(x))),  out = x1 + W_down(GELU(g) ⊙ a), [g|a] = W_up LN_ffn(x1).
// Gate inputs: i from `fgate`(xc), f from `igate`(xc) (NX-AI's swapped names, kept for
// checkpoint compatibility), z from `zgate`(LN(x)), o from `ogate`(LN(x)); xc = SiLU(conv(LN(x))).
// Legend: M = B*S rows, d = H model width, NH heads, DH = d/NH, u FFN inner width.
#pragma once

#include <string>

#include "distilx/blocks/init.hpp"
#include "distilx/cells/slstm.hpp"
#include "distilx/models/config.hpp"
#include "distilx/models/params.hpp"
#include "distilx/ops/conv1d.hpp"
#include "distilx/ops/elementwise.hpp"
#include "distilx/ops/linear.hpp"
#include "distilx/ops/norm.hpp"

namespace distilx {

inline SLSTMBiasInit parse_slstm_bias_init(const std::string& s) {
  if (s == "powerlaw_blockdependent") return SLSTMBiasInit::powerlaw_blockdependent;
  if (s == "small_init") return SLSTMBiasInit::small_init;
  if (s == "standard") return SLSTMBiasInit::standard;
  if (s == "zeros") return SLSTMBiasInit::zeros;
  throw config_error("unknown slstm_bias_init '" + s + "' (expected powerlaw_blockdependent, small_init, standard, zeros)");
}

template <class T, class Backend = cpu>
class SLSTMBlock {
 public:
  SLSTMBlock(const StudentConfig& c, index_t block_idx, ParamLayout& layout, const std::string& prefix)
      : d_(c.embedding_dim),
        NH_(c.slstm_num_heads),
        DH_(d_ / NH_),
        K_(c.slstm_conv1d_kernel_size),
        u_(c.ffn_inner_dim()),
        num_blocks_(c.num_blocks),
        block_idx_(block_idx),
        eps_(static_cast<T>(c.norm_eps)),
        bias_init_(parse_slstm_bias_init(c.slstm_bias_init)),
        cell_(NH_, DH_) {
    norm_ = layout.add(prefix + "xlstm_norm.weight", {d_});
    if (K_ > 0) {
      conv_w_ = layout.add(prefix + "xlstm.conv1d.conv.weight", {d_, 1, K_});
      conv_b_ = layout.add(prefix + "xlstm.conv1d.conv.bias", {d_});
    }
    gi_ = layout.add(prefix + "xlstm.fgate.weight", {NH_, DH_, DH_});  // feeds the input gate i
    gf_ = layout.add(prefix + "xlstm.igate.weight", {NH_, DH_, DH_});  // feeds the forget gate f
    gz_ = layout.add(prefix + "xlstm.zgate.weight", {NH_, DH_, DH_});
    go_ = layout.add(prefix + "xlstm.ogate.weight", {NH_, DH_, DH_});
    R_ = layout.add(prefix + "xlstm.slstm_cell._recurrent_kernel_", {NH_, DH_, 4 * DH_});
    b_ = layout.add(prefix + "xlstm.slstm_cell._bias_", {4 * d_});
    gn_ = layout.add(prefix + "xlstm.group_norm.weight", {d_});
    ffn_norm_ = layout.add(prefix + "ffn_norm.weight", {d_});
    up_ = layout.add(prefix + "ffn.proj_up.weight", {2 * u_, d_});
    down_ = layout.add(prefix + "ffn.proj_down.weight", {d_, u_});
    layout_ = &layout;
  }

  void init(T* params, Rng& rng) const {
    init::constant(p(params, norm_), d_, 0.0);
    if (K_ > 0) {
      const double bound = 1.0 / std::sqrt(double(K_));
      init::uniform(p(params, conv_w_), d_ * K_, -bound, bound, rng);
      init::uniform(p(params, conv_b_), d_, -bound, bound, rng);
    }
    for (index_t s : {gi_, gf_, gz_, go_}) init::normal(p(params, s), NH_ * DH_ * DH_, init::small_init_std(d_), rng);
    init::constant(p(params, R_), NH_ * DH_ * 4 * DH_, 0.0);  // recurrent_weight_init = "zeros"
    slstm_init_bias(p(params, b_), NH_, DH_, bias_init_, block_idx_, num_blocks_, rng);
    init::constant(p(params, gn_), d_, 0.0);
    init::constant(p(params, ffn_norm_), d_, 0.0);
    init::normal(p(params, up_), 2 * u_ * d_, init::small_init_std(d_), rng);
    init::normal(p(params, down_), d_ * u_, init::wang_init_std(d_, num_blocks_), rng);
  }

  void resize(index_t B, index_t S) {
    if (B == B_ && S == S_) return;
    B_ = B;
    S_ = S;
    const index_t M = B * S;
    for (auto* t : {&xn_, &xc_pre_, &xc_, &ycell_, &x1_, &xn2_, &g_a_, &g_b_, &g_c_}) t->resize(M * d_);
    for (auto* t : {&ln_mean_, &ln_rstd_, &ln2_mean_, &ln2_rstd_}) t->resize(M);
    gn_mean_.resize(M * NH_);
    gn_rstd_.resize(M * NH_);
    wx_.resize(M * 4 * d_);
    g_wx_.resize(M * 4 * d_);
    for (auto* t : {&gu_, &au_, &act_, &g_u1_, &g_u2_}) t->resize(M * u_);
    cell_.resize(B, S);
  }

  void forward(T* y, const T* x, const T* params, index_t B, index_t S) {
    resize(B, S);
    Backend be{};
    const index_t M = B * S, H = d_;
    ops::layernorm_forward(be, xn_.data(), ln_mean_.data(), ln_rstd_.data(), x, cp(params, norm_), M, d_, eps_);
    const T* xc = xn_.data();
    if (K_ > 0) {
      ops::causal_conv1d_forward(be, xc_pre_.data(), xn_.data(), cp(params, conv_w_), cp(params, conv_b_), B, S, d_, K_);
      ops::act_forward<ops::Silu>(be, xc_.data(), xc_pre_.data(), M * d_);
      xc = xc_.data();
    }
    T* wx = wx_.data();  // [M, 4, H] gate-major (i, f, z, o)
    ops::headwise_forward(be, wx + 0 * H, xc, cp(params, gi_), M, NH_, DH_, DH_, 4 * H);
    ops::headwise_forward(be, wx + 1 * H, xc, cp(params, gf_), M, NH_, DH_, DH_, 4 * H);
    ops::headwise_forward(be, wx + 2 * H, xn_.data(), cp(params, gz_), M, NH_, DH_, DH_, 4 * H);
    ops::headwise_forward(be, wx + 3 * H, xn_.data(), cp(params, go_), M, NH_, DH_, DH_, 4 * H);
    cell_.forward(ycell_.data(), wx, cp(params, R_), cp(params, b_), B, S);
    T* x1 = x1_.data();
    ops::group_layernorm_forward(be, x1, gn_mean_.data(), gn_rstd_.data(), ycell_.data(), cp(params, gn_), M, NH_, DH_,
                                 eps_);
    ops::add_inplace(be, x1, x, M * d_);
    ffn_forward(y, x1, params, M);
  }

  void backward(T* dx, T* grads, const T* dy, const T* x, const T* params, index_t B, index_t S) {
    Backend be{};
    const index_t M = B * S, H = d_;
    T* dx1 = g_a_.data();
    ffn_backward(dx1, grads, dy, params, M);
    ops::add_inplace(be, dx1, dy, M * d_);
    T* dycell = g_b_.data();
    ops::group_layernorm_backward(be, dycell, g(grads, gn_), dx1, ycell_.data(), cp(params, gn_), gn_mean_.data(),
                                  gn_rstd_.data(), M, NH_, DH_);
    T* dwx = g_wx_.data();
    cell_.backward(dwx, g(grads, R_), g(grads, b_), dycell, cp(params, R_), B, S);
    T* dxn = g_c_.data();
    const T* xc = K_ > 0 ? xc_.data() : xn_.data();
    T* dxc = K_ > 0 ? g_b_.data() : dxn;  // dycell consumed
    ops::headwise_backward(be, dxn, g(grads, gz_), dwx + 2 * H, xn_.data(), cp(params, gz_), M, NH_, DH_, DH_, false, 4 * H);
    ops::headwise_backward(be, dxn, g(grads, go_), dwx + 3 * H, xn_.data(), cp(params, go_), M, NH_, DH_, DH_, true, 4 * H);
    ops::headwise_backward(be, dxc, g(grads, gi_), dwx + 0 * H, xc, cp(params, gi_), M, NH_, DH_, DH_, K_ == 0, 4 * H);
    ops::headwise_backward(be, dxc, g(grads, gf_), dwx + 1 * H, xc, cp(params, gf_), M, NH_, DH_, DH_, true, 4 * H);
    if (K_ > 0) {
      ops::act_backward<ops::Silu>(be, dxc, dxc, xc_pre_.data(), M * d_);
      ops::causal_conv1d_backward(be, dxn, g(grads, conv_w_), g(grads, conv_b_), dxc, xn_.data(), cp(params, conv_w_), B,
                                  S, d_, K_, true);
    }
    ops::layernorm_backward(be, dx, g(grads, norm_), dxn, x, cp(params, norm_), ln_mean_.data(), ln_rstd_.data(), M, d_);
    ops::add_inplace(be, dx, dx1, M * d_);
  }

  /// Generation state: conv window [B,K,d] and the cell state [4,B,H] = (y, c, n, m).
  struct State {
    Buffer<T, Backend> conv, cell;
  };
  void init_state(State& s, index_t B) const {
    s.conv.resize(B * std::max<index_t>(K_, 1) * d_);
    s.cell.resize(4 * B * d_);
  }
  void step(T* y, const T* x, State& s, const T* params, index_t B) {
    Backend be{};
    const index_t H = d_;
    const index_t need = B * (4 * d_ + 4 * d_ + 2 * NH_ + 3 * u_);
    if (step_ws_.size() != need) step_ws_.resize(need);
    T* xn = step_ws_.data();
    T* xc = xn + B * d_;
    T* ycell = xc + B * d_;
    T* x1 = ycell + B * d_;
    T* wx = x1 + B * d_;
    T* stats = wx + 4 * B * d_;
    T* gu = stats + 2 * B * NH_;
    T* au = gu + B * u_;
    T* act = au + B * u_;
    ops::layernorm_forward(be, xn, stats, stats + B, x, cp(params, norm_), B, d_, eps_);
    const T* xcp = xn;
    if (K_ > 0) {
      ops::causal_conv1d_step(be, xc, s.conv.data(), xn, cp(params, conv_w_), cp(params, conv_b_), B, d_, K_);
      ops::act_forward<ops::Silu>(be, xc, xc, B * d_);
      xcp = xc;
    }
    ops::headwise_forward(be, wx + 0 * H, xcp, cp(params, gi_), B, NH_, DH_, DH_, 4 * H);
    ops::headwise_forward(be, wx + 1 * H, xcp, cp(params, gf_), B, NH_, DH_, DH_, 4 * H);
    ops::headwise_forward(be, wx + 2 * H, xn, cp(params, gz_), B, NH_, DH_, DH_, 4 * H);
    ops::headwise_forward(be, wx + 3 * H, xn, cp(params, go_), B, NH_, DH_, DH_, 4 * H);
    SLSTMCell<T, Backend>::step(ycell, s.cell.data(), wx, cp(params, R_), cp(params, b_), B, NH_, DH_);
    ops::group_layernorm_forward(be, x1, stats, stats + B * NH_, ycell, cp(params, gn_), B, NH_, DH_, eps_);
    ops::add_inplace(be, x1, x, B * d_);
    // FFN on one row per sequence
    ops::layernorm_forward(be, xn, stats, stats + B, x1, cp(params, ffn_norm_), B, d_, eps_);
    const T* Wup = cp(params, up_);
    ops::linear_forward(be, gu, xn, Wup, static_cast<const T*>(nullptr), B, d_, u_);
    ops::linear_forward(be, au, xn, Wup + u_ * d_, static_cast<const T*>(nullptr), B, d_, u_);
    ops::gated_forward<ops::Gelu>(be, act, gu, au, B * u_);
    ops::linear_forward(be, y, act, cp(params, down_), static_cast<const T*>(nullptr), B, u_, d_);
    ops::add_inplace(be, y, x1, B * d_);
  }

  SLSTMCell<T, Backend>& cell() { return cell_; }

 private:
  T* p(T* params, index_t slot) const { return params + (*layout_)[slot].offset; }
  const T* cp(const T* params, index_t slot) const { return params + (*layout_)[slot].offset; }
  T* g(T* grads, index_t slot) const { return grads + (*layout_)[slot].offset; }

  void ffn_forward(T* y, const T* x1, const T* params, index_t M) {
    Backend be{};
    ops::layernorm_forward(be, xn2_.data(), ln2_mean_.data(), ln2_rstd_.data(), x1, cp(params, ffn_norm_), M, d_, eps_);
    const T* Wup = cp(params, up_);
    ops::linear_forward(be, gu_.data(), xn2_.data(), Wup, static_cast<const T*>(nullptr), M, d_, u_);
    ops::linear_forward(be, au_.data(), xn2_.data(), Wup + u_ * d_, static_cast<const T*>(nullptr), M, d_, u_);
    ops::gated_forward<ops::Gelu>(be, act_.data(), gu_.data(), au_.data(), M * u_);
    ops::linear_forward(be, y, act_.data(), cp(params, down_), static_cast<const T*>(nullptr), M, u_, d_);
    ops::add_inplace(be, y, x1, M * d_);
  }
  // dx1 (overwritten) = FFN input gradient only; the residual is added by the caller.
  void ffn_backward(T* dx1, T* grads, const T* dy, const T* params, index_t M) {
    Backend be{};
    T* dact = g_u1_.data();
    ops::linear_backward(be, dact, g(grads, down_), static_cast<T*>(nullptr), dy, act_.data(), cp(params, down_), M, u_, d_);
    T* dgu = g_u2_.data();
    T* dau = dact;  // gated_backward reads dy[i] before writing da[i] at the same index
    ops::gated_backward<ops::Gelu>(be, dgu, dau, dact, gu_.data(), au_.data(), M * u_);
    const T* Wup = cp(params, up_);
    T* dWup = g(grads, up_);
    T* dxn2 = g_c_.data();
    ops::linear_backward(be, dxn2, dWup, static_cast<T*>(nullptr), dgu, xn2_.data(), Wup, M, d_, u_);
    ops::linear_backward(be, dxn2, dWup + u_ * d_, static_cast<T*>(nullptr), dau, xn2_.data(), Wup + u_ * d_, M, d_, u_, true);
    ops::layernorm_backward(be, dx1, g(grads, ffn_norm_), dxn2, x1_.data(), cp(params, ffn_norm_), ln2_mean_.data(),
                            ln2_rstd_.data(), M, d_);
  }

  index_t d_, NH_, DH_, K_, u_, num_blocks_, block_idx_;
  T eps_;
  SLSTMBiasInit bias_init_;
  SLSTMCell<T, Backend> cell_;
  const ParamLayout* layout_ = nullptr;
  index_t norm_ = -1, conv_w_ = -1, conv_b_ = -1, gi_, gf_, gz_, go_, R_, b_, gn_, ffn_norm_, up_, down_;
  index_t B_ = -1, S_ = -1;
  Buffer<T, Backend> xn_, ln_mean_, ln_rstd_, xc_pre_, xc_, wx_, ycell_, gn_mean_, gn_rstd_, x1_, xn2_, ln2_mean_,
      ln2_rstd_, gu_, au_, act_;
  Buffer<T, Backend> g_a_, g_b_, g_c_, g_wx_, g_u1_, g_u2_;
  Buffer<T, Backend> step_ws_;
};

}  // namespace distilx
