// mLSTM block of NX-AI's xLSTMBlockStack (spec-xlstm.md §4.1, §6):
//   out = x + proj_down((MHLN(cell(q,k,v,ĩ,f̃)) + skip ⊙ xc) ⊙ SiLU(z)),
//   [x_m | z] = proj_up(LN(x)), xc = SiLU(conv(x_m)), q,k = headwise(xc), v = headwise(x_m),
//   ĩ, f̃ = Linear([q|k|v]). Explicit forward (saving activations) and backward.
// Legend: M = B*S rows, d model width, D inner width, NH heads, DH = D/NH, P = D/bs blocks.
#pragma once

#include <string>

#include "distilx/blocks/init.hpp"
#include "distilx/cells/mlstm.hpp"
#include "distilx/models/config.hpp"
#include "distilx/models/params.hpp"
#include "distilx/ops/conv1d.hpp"
#include "distilx/ops/elementwise.hpp"
#include "distilx/ops/linear.hpp"
#include "distilx/ops/norm.hpp"

namespace distilx {

template <class T, class Backend = cpu>
class MLSTMBlock {
 public:
  /// Registers this block's parameters (NX-AI names, state_dict order) under `prefix`.
  MLSTMBlock(const StudentConfig& c, index_t block_idx, ParamLayout& layout, const std::string& prefix)
      : d_(c.embedding_dim),
        D_(c.mlstm_inner_dim()),
        NH_(c.mlstm_num_heads),
        DH_(D_ / NH_),
        bs_(c.mlstm_qkv_proj_blocksize),
        P_(D_ / bs_),
        K_(c.mlstm_conv1d_kernel_size),
        num_blocks_(c.num_blocks),
        block_idx_(block_idx),
        eps_(static_cast<T>(c.norm_eps)),
        cell_(NH_, DH_, MLSTMForm::automatic, c.mlstm_chunk_size) {
    norm_ = layout.add(prefix + "xlstm_norm.weight", {d_});
    skip_ = layout.add(prefix + "xlstm.learnable_skip", {D_});
    up_ = layout.add(prefix + "xlstm.proj_up.weight", {2 * D_, d_});
    q_ = layout.add(prefix + "xlstm.q_proj.weight", {P_, bs_, bs_});
    k_ = layout.add(prefix + "xlstm.k_proj.weight", {P_, bs_, bs_});
    v_ = layout.add(prefix + "xlstm.v_proj.weight", {P_, bs_, bs_});
    conv_w_ = layout.add(prefix + "xlstm.conv1d.conv.weight", {D_, 1, K_});
    conv_b_ = layout.add(prefix + "xlstm.conv1d.conv.bias", {D_});
    ig_w_ = layout.add(prefix + "xlstm.mlstm_cell.igate.weight", {NH_, 3 * D_});
    ig_b_ = layout.add(prefix + "xlstm.mlstm_cell.igate.bias", {NH_});
    fg_w_ = layout.add(prefix + "xlstm.mlstm_cell.fgate.weight", {NH_, 3 * D_});
    fg_b_ = layout.add(prefix + "xlstm.mlstm_cell.fgate.bias", {NH_});
    outnorm_ = layout.add(prefix + "xlstm.mlstm_cell.outnorm.weight", {D_});
    down_ = layout.add(prefix + "xlstm.proj_down.weight", {d_, D_});
    layout_ = &layout;
  }

  /// NX-AI's reset_parameters (spec §5). Conv keeps PyTorch's default U(±1/sqrt(K)).
  void init(T* params, Rng& rng) const {
    init::constant(p(params, norm_), d_, 0.0);
    init::constant(p(params, skip_), D_, 1.0);
    init::normal(p(params, up_), 2 * D_ * d_, init::small_init_std(d_), rng);
    for (index_t s : {q_, k_, v_}) init::normal(p(params, s), P_ * bs_ * bs_, init::small_init_std(d_), rng);
    const double bound = 1.0 / std::sqrt(double(K_));
    init::uniform(p(params, conv_w_), D_ * K_, -bound, bound, rng);
    init::uniform(p(params, conv_b_), D_, -bound, bound, rng);
    init::constant(p(params, ig_w_), NH_ * 3 * D_, 0.0);
    init::normal(p(params, ig_b_), NH_, 0.1, rng);
    init::constant(p(params, fg_w_), NH_ * 3 * D_, 0.0);
    init::linspace(p(params, fg_b_), NH_, 3.0, 6.0);
    init::constant(p(params, outnorm_), D_, 0.0);
    init::normal(p(params, down_), d_ * D_, init::wang_init_std(d_, num_blocks_), rng);
  }

  void resize(index_t B, index_t S) {
    if (B == B_ && S == S_) return;
    B_ = B;
    S_ = S;
    const index_t M = B * S;
    for (auto* t : {&xn_, &ln_mean_, &ln_rstd_}) t->resize(M * (t == &xn_ ? d_ : 1));
    for (auto* t : {&xm_, &z_, &xc_pre_, &xc_, &q_act_, &k_act_, &v_act_, &htil_, &hn_, &hs_, &hout_}) t->resize(M * D_);
    ig_act_.resize(M * NH_);
    fg_act_.resize(M * NH_);
    on_mean_.resize(M * NH_);
    on_rstd_.resize(M * NH_);
    for (auto* t : {&g_a_, &g_b_, &g_c_, &g_d_, &g_q_, &g_k_, &g_v_}) t->resize(M * D_);
    g_ig_.resize(M * NH_);
    g_fg_.resize(M * NH_);
    g_xn_.resize(M * d_);
    cell_.resize(B, S);
  }

  /// y [B,S,d] = x + mLSTM(LN(x)). y must not alias x.
  void forward(T* y, const T* x, const T* params, index_t B, index_t S) {
    resize(B, S);
    Backend be{};
    const index_t M = B * S;
    ops::layernorm_forward(be, xn_.data(), ln_mean_.data(), ln_rstd_.data(), x, cp(params, norm_), M, d_, eps_);
    const T* Wup = cp(params, up_);
    ops::linear_forward(be, xm_.data(), xn_.data(), Wup, static_cast<const T*>(nullptr), M, d_, D_);
    ops::linear_forward(be, z_.data(), xn_.data(), Wup + D_ * d_, static_cast<const T*>(nullptr), M, d_, D_);
    ops::causal_conv1d_forward(be, xc_pre_.data(), xm_.data(), cp(params, conv_w_), cp(params, conv_b_), B, S, D_, K_);
    ops::act_forward<ops::Silu>(be, xc_.data(), xc_pre_.data(), M * D_);
    ops::headwise_forward(be, q_act_.data(), xc_.data(), cp(params, q_), M, P_, bs_, bs_);
    ops::headwise_forward(be, k_act_.data(), xc_.data(), cp(params, k_), M, P_, bs_, bs_);
    ops::headwise_forward(be, v_act_.data(), xm_.data(), cp(params, v_), M, P_, bs_, bs_);
    gate_forward(ig_act_.data(), cp(params, ig_w_), cp(params, ig_b_), M);
    gate_forward(fg_act_.data(), cp(params, fg_w_), cp(params, fg_b_), M);
    cell_.forward(htil_.data(), q_act_.data(), k_act_.data(), v_act_.data(), ig_act_.data(), fg_act_.data(), B, S);
    ops::group_layernorm_forward(be, hn_.data(), on_mean_.data(), on_rstd_.data(), htil_.data(), cp(params, outnorm_),
                                 M, NH_, DH_, eps_);
    ops::mlstm_output_forward(be, hout_.data(), hs_.data(), hn_.data(), cp(params, skip_), xc_.data(), z_.data(), M, D_);
    ops::linear_forward(be, y, hout_.data(), cp(params, down_), static_cast<const T*>(nullptr), M, D_, d_);
    ops::add_inplace(be, y, x, M * d_);
  }

  /// dx [B,S,d] (overwritten) from dy; parameter gradients accumulate into grads.
  void backward(T* dx, T* grads, const T* dy, const T* x, const T* params, index_t B, index_t S) {
    Backend be{};
    const index_t M = B * S;
    T* dh = g_a_.data();    // [M, D] grad of proj_down input
    T* dhn = g_b_.data();   // [M, D]
    T* dz = g_c_.data();    // [M, D]
    T* dxc = g_q_.data();   // [M, D] accumulates every path into xc
    T* dxm = g_k_.data();   // [M, D] accumulates every path into x_m
    ops::linear_backward(be, dh, g(grads, down_), static_cast<T*>(nullptr), dy, hout_.data(), cp(params, down_), M, D_, d_);
    ops::fill_zero(be, dxc, M * D_);
    ops::mlstm_output_backward(be, dhn, dz, dxc, g(grads, skip_), dh, hs_.data(), cp(params, skip_), xc_.data(),
                               z_.data(), M, D_);
    T* dhtil = g_a_.data();  // dh no longer needed
    ops::group_layernorm_backward(be, dhtil, g(grads, outnorm_), dhn, htil_.data(), cp(params, outnorm_),
                                  on_mean_.data(), on_rstd_.data(), M, NH_, DH_);
    T* dq = g_b_.data();  // dhn no longer needed
    T* dv = g_v_.data();
    T* dk = g_d_.data();
    cell_.backward(dq, dk, dv, g_ig_.data(), g_fg_.data(), dhtil, q_act_.data(), k_act_.data(), v_act_.data(),
                   ig_act_.data(), fg_act_.data(), B, S);
    gate_backward(dq, dk, dv, g_ig_.data(), g(grads, ig_w_), g(grads, ig_b_), cp(params, ig_w_), M);
    gate_backward(dq, dk, dv, g_fg_.data(), g(grads, fg_w_), g(grads, fg_b_), cp(params, fg_w_), M);
    ops::headwise_backward(be, dxc, g(grads, q_), dq, xc_.data(), cp(params, q_), M, P_, bs_, bs_, true);
    ops::headwise_backward(be, dxc, g(grads, k_), dk, xc_.data(), cp(params, k_), M, P_, bs_, bs_, true);
    ops::headwise_backward(be, dxm, g(grads, v_), dv, xm_.data(), cp(params, v_), M, P_, bs_, bs_, false);
    T* dxc_pre = g_a_.data();  // dhtil consumed by the cell backward
    ops::act_backward<ops::Silu>(be, dxc_pre, dxc, xc_pre_.data(), M * D_);
    ops::causal_conv1d_backward(be, dxm, g(grads, conv_w_), g(grads, conv_b_), dxc_pre, xm_.data(), cp(params, conv_w_),
                                B, S, D_, K_, true);
    const T* Wup = cp(params, up_);
    T* dWup = g(grads, up_);
    ops::linear_backward(be, g_xn_.data(), dWup, static_cast<T*>(nullptr), dxm, xn_.data(), Wup, M, d_, D_);
    ops::linear_backward(be, g_xn_.data(), dWup + D_ * d_, static_cast<T*>(nullptr), dz, xn_.data(), Wup + D_ * d_, M, d_,
                         D_, true);
    ops::layernorm_backward(be, dx, g(grads, norm_), g_xn_.data(), x, cp(params, norm_), ln_mean_.data(),
                            ln_rstd_.data(), M, d_);
    ops::add_inplace(be, dx, dy, M * d_);
  }

  /// Recurrent state for generation (spec §4.4): conv window [B,K,D], C [B,NH,DH,DH], n [B,NH,DH], m [B,NH].
  struct State {
    Buffer<T, Backend> conv, C, n, m;
  };
  void init_state(State& s, index_t B) const {
    s.conv.resize(B * K_ * D_);
    s.C.resize(B * NH_ * DH_ * DH_);
    s.n.resize(B * NH_ * DH_);
    s.m.resize(B * NH_);
  }
  /// One token: x [B,d] -> y [B,d] (y must not alias x). Uses the cell's recurrent form.
  void step(T* y, const T* x, State& s, const T* params, index_t B) {
    Backend be{};
    resize_step(B);
    Buffer<T, Backend>& w = step_ws_;
    T* xn = w.data();
    T* xm = xn + B * d_;
    T* z = xm + B * D_;
    T* xc = z + B * D_;
    T* q = xc + B * D_;
    T* k = q + B * D_;
    T* v = k + B * D_;
    T* h = v + B * D_;
    T* hs = h + B * D_;
    T* ig = hs + B * D_;
    T* fg = ig + B * NH_;
    T* stats = fg + B * NH_;  // [2, B*NH]
    ops::layernorm_forward(be, xn, stats, stats + B * NH_, x, cp(params, norm_), B, d_, eps_);
    const T* Wup = cp(params, up_);
    ops::linear_forward(be, xm, xn, Wup, static_cast<const T*>(nullptr), B, d_, D_);
    ops::linear_forward(be, z, xn, Wup + D_ * d_, static_cast<const T*>(nullptr), B, d_, D_);
    ops::causal_conv1d_step(be, xc, s.conv.data(), xm, cp(params, conv_w_), cp(params, conv_b_), B, D_, K_);
    ops::act_forward<ops::Silu>(be, xc, xc, B * D_);
    ops::headwise_forward(be, q, xc, cp(params, q_), B, P_, bs_, bs_);
    ops::headwise_forward(be, k, xc, cp(params, k_), B, P_, bs_, bs_);
    ops::headwise_forward(be, v, xm, cp(params, v_), B, P_, bs_, bs_);
    gate_forward_rows(ig, q, k, v, cp(params, ig_w_), cp(params, ig_b_), B);
    gate_forward_rows(fg, q, k, v, cp(params, fg_w_), cp(params, fg_b_), B);
    MLSTMCell<T, Backend>::step(h, s.C.data(), s.n.data(), s.m.data(), q, k, v, ig, fg, B, NH_, DH_);
    ops::group_layernorm_forward(be, h, stats, stats + B * NH_, h, cp(params, outnorm_), B, NH_, DH_, eps_);
    ops::mlstm_output_forward(be, h, hs, h, cp(params, skip_), xc, z, B, D_);
    ops::linear_forward(be, y, h, cp(params, down_), static_cast<const T*>(nullptr), B, D_, d_);
    ops::add_inplace(be, y, x, B * d_);
  }

  MLSTMCell<T, Backend>& cell() { return cell_; }

 private:
  T* p(T* params, index_t slot) const { return params + (*layout_)[slot].offset; }
  const T* cp(const T* params, index_t slot) const { return params + (*layout_)[slot].offset; }
  T* g(T* grads, index_t slot) const { return grads + (*layout_)[slot].offset; }

  // ĩ or f̃ [M, NH] = [q|k|v] W^T + b without materialising the concat: W is [NH, 3D].
  void gate_forward(T* out, const T* W, const T* b, index_t M) {
    gate_forward_rows(out, q_act_.data(), k_act_.data(), v_act_.data(), W, b, M);
  }
  void gate_forward_rows(T* out, const T* q, const T* k, const T* v, const T* W, const T* b, index_t M) const {
    Backend be{};
    ops::gemm(be, ops::Trans::no, ops::Trans::yes, M, NH_, D_, T(1), q, D_, W, 3 * D_, T(0), out, NH_);
    ops::gemm(be, ops::Trans::no, ops::Trans::yes, M, NH_, D_, T(1), k, D_, W + D_, 3 * D_, T(1), out, NH_);
    ops::gemm(be, ops::Trans::no, ops::Trans::yes, M, NH_, D_, T(1), v, D_, W + 2 * D_, 3 * D_, T(1), out, NH_);
    ops::add_row_vector(be, out, b, M, NH_);
  }
  // dq,dk,dv += dgate W[:, part]; dW[:, part] += dgate^T part; db += Σ dgate.
  void gate_backward(T* dq, T* dk, T* dv, const T* dgate, T* dW, T* db, const T* W, index_t M) {
    Backend be{};
    const T* parts[3] = {q_act_.data(), k_act_.data(), v_act_.data()};
    T* dparts[3] = {dq, dk, dv};
    for (int i = 0; i < 3; ++i) {
      ops::gemm(be, ops::Trans::no, ops::Trans::no, M, D_, NH_, T(1), dgate, NH_, W + i * D_, 3 * D_, T(1), dparts[i], D_);
      ops::gemm(be, ops::Trans::yes, ops::Trans::no, NH_, D_, M, T(1), dgate, NH_, parts[i], D_, T(1), dW + i * D_, 3 * D_);
    }
    ops::column_sum(be, db, dgate, M, NH_);
  }
  void resize_step(index_t B) {
    const index_t need = B * (d_ + 8 * D_ + 4 * NH_);
    if (step_ws_.size() != need) step_ws_.resize(need);
  }

  index_t d_, D_, NH_, DH_, bs_, P_, K_, num_blocks_, block_idx_;
  T eps_;
  MLSTMCell<T, Backend> cell_;
  const ParamLayout* layout_ = nullptr;
  index_t norm_, skip_, up_, q_, k_, v_, conv_w_, conv_b_, ig_w_, ig_b_, fg_w_, fg_b_, outnorm_, down_;
  index_t B_ = -1, S_ = -1;
  // saved activations
  Buffer<T, Backend> xn_, ln_mean_, ln_rstd_, xm_, z_, xc_pre_, xc_, q_act_, k_act_, v_act_, ig_act_, fg_act_, htil_, hn_,
      on_mean_, on_rstd_, hs_, hout_;
  // backward scratch
  Buffer<T, Backend> g_a_, g_b_, g_c_, g_d_, g_q_, g_k_, g_v_, g_ig_, g_fg_, g_xn_;
  Buffer<T, Backend> step_ws_;
};

}  // namespace distilx
