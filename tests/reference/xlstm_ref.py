#!/usr/bin/python3
"""Independent plain-PyTorch reference of NX-AI's ``xLSTMLMModel`` (the Distil-xLSTM student).

Written from the distilx contract /work/shared/docs/spec-xlstm.md (section numbers "§" below refer to
it); no NX-AI code is used or needed.  Requirements: torch (Debian python3-torch 1.13 works) and the
Python standard library.  Gradients come from autograd; there is no hand-written backward.

Parameter names and shapes follow NX-AI's ``state_dict`` exactly (§7), e.g.
``xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_``.  The sLSTM recurrent kernel and
bias are held in NX-AI's "cuda" backend layout (§3.3) by default; the cell can also be built in the
"vanilla" layout (used by the self-test and for layout conversion checks).

Run ``/usr/bin/python3 tests/reference/xlstm_ref.py --selftest`` for the self-checks (exit status 0 on
success, 1 on any failure).
"""

import argparse
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn

LN_EPS = 1e-5      # §2.1 / §2.2
MLSTM_EPS = 1e-6   # §4.3 / §4.4


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------

def proj_up_dim(proj_factor: float, dim: int) -> int:
    """§2.5: ceil(proj_factor * dim / 64) * 64."""
    return int(math.ceil(proj_factor * dim / 64.0)) * 64


@dataclass
class XLSTMConfig:
    vocab_size: int
    embedding_dim: int
    num_blocks: int
    slstm_at: List[int] = field(default_factory=list)
    mlstm_num_heads: int = 4
    mlstm_qkv_proj_blocksize: int = 4
    mlstm_proj_factor: float = 2.0
    mlstm_conv1d_kernel_size: int = 4
    slstm_num_heads: int = 4
    slstm_conv1d_kernel_size: int = 4
    ffn_proj_factor: float = 1.3
    tie_weights: bool = False
    context_length: int = 64
    add_post_blocks_norm: bool = True

    @property
    def mlstm_inner_dim(self) -> int:
        return proj_up_dim(self.mlstm_proj_factor, self.embedding_dim)

    @property
    def ffn_up_dim(self) -> int:
        return proj_up_dim(self.ffn_proj_factor, self.embedding_dim)

    def json_dict(self) -> dict:
        return {
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
            "num_blocks": self.num_blocks,
            "slstm_at": list(self.slstm_at),
            "mlstm_num_heads": self.mlstm_num_heads,
            "mlstm_qkv_proj_blocksize": self.mlstm_qkv_proj_blocksize,
            "mlstm_proj_factor": self.mlstm_proj_factor,
            "mlstm_conv1d_kernel_size": self.mlstm_conv1d_kernel_size,
            "slstm_num_heads": self.slstm_num_heads,
            "slstm_conv1d_kernel_size": self.slstm_conv1d_kernel_size,
            "ffn_proj_factor": self.ffn_proj_factor,
            "tie_weights": self.tie_weights,
            "context_length": self.context_length,
        }


# ----------------------------------------------------------------------------------------------------
# Elementwise helpers (§0)
# ----------------------------------------------------------------------------------------------------

def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Stable log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|))."""
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-torch.abs(x)))


def silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def gelu_exact(x: torch.Tensor) -> torch.Tensor:
    """GELU, erf form (approximate='none')."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _param(shape, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device))


# Fixture-init helpers (see fixture_init_); all draws use an explicit torch.Generator.
def _normal_(p: torch.Tensor, std: float, gen: torch.Generator, mean: float = 0.0) -> None:
    with torch.no_grad():
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std + mean)


def _uniform_(p: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    with torch.no_grad():
        p.copy_((torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2.0 - 1.0) * bound)


# ----------------------------------------------------------------------------------------------------
# Shared components (§2)
# ----------------------------------------------------------------------------------------------------

class Linear(nn.Module):
    """Dense y = x W^T (+ b), W stored (out, in) (§0)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _param((out_features, in_features), device)
        self.bias = _param((out_features,), device) if bias else None

    def forward(self, x):
        y = torch.matmul(x, self.weight.t())
        return y + self.bias if self.bias is not None else y


class LayerNorm(nn.Module):
    """§2.1: (x - mean) / sqrt(var + eps) * (1 + w), biased variance, no bias parameter."""

    def __init__(self, dim: int, device=None):
        super().__init__()
        self.weight = _param((dim,), device)

    def forward(self, x):
        mu = x.mean(dim=-1, keepdim=True)
        var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + LN_EPS) * (1.0 + self.weight)


class MultiHeadLayerNorm(nn.Module):
    """§2.2: input (B, NH, S, DH); per (b, t, head) normalise the DH values, output (B, S, NH*DH)
    head-major, scaled channel-wise by (1 + w), w of shape (NH*DH,)."""

    def __init__(self, num_channels: int, device=None):
        super().__init__()
        self.weight = _param((num_channels,), device)

    def forward(self, x):
        B, NH, S, DH = x.shape
        mu = x.mean(dim=-1, keepdim=True)
        var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
        xn = (x - mu) / torch.sqrt(var + LN_EPS)
        xn = xn.transpose(1, 2).reshape(B, S, NH * DH)
        return xn * (1.0 + self.weight)


class _DepthwiseConvParams(nn.Module):
    """Holds `weight` (F, 1, K) and `bias` (F,) so names read `conv1d.conv.weight` like nn.Conv1d."""

    def __init__(self, channels: int, kernel_size: int, device=None):
        super().__init__()
        self.weight = _param((channels, 1, kernel_size), device)
        self.bias = _param((channels,), device)


class CausalConv1d(nn.Module):
    """§2.3: depthwise causal conv, y_t[f] = b[f] + sum_j W[f,0,j] x_{t-K+1+j}[f], x_{<0} = 0.
    kernel_size == 0 means identity (no parameters)."""

    def __init__(self, channels: int, kernel_size: int, device=None):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = _DepthwiseConvParams(channels, kernel_size, device) if kernel_size > 0 else None

    def forward(self, x):  # x (B, S, F)
        if self.conv is None:
            return x
        K = self.kernel_size
        B, S, F = x.shape
        xp = torch.cat([x.new_zeros(B, K - 1, F), x], dim=1)  # left zero padding
        w = self.conv.weight[:, 0, :]                          # (F, K)
        y = self.conv.bias.expand(B, S, F)
        for j in range(K):                                     # newest sample uses W[..., K-1]
            y = y + xp[:, j:j + S, :] * w[:, j]
        return y


class LinearHeadwiseExpand(nn.Module):
    """§2.4: block-diagonal linear, weight (P, out/P, in/P), no bias.
    y[..., p, o] = sum_i x[..., p, i] W[p, o, i]."""

    def __init__(self, in_features: int, num_blocks: int, out_features: Optional[int] = None,
                 device=None):
        super().__init__()
        out_features = in_features if out_features is None else out_features
        assert in_features % num_blocks == 0 and out_features % num_blocks == 0
        self.P = num_blocks
        self.in_per_block = in_features // num_blocks
        self.out_per_block = out_features // num_blocks
        self.weight = _param((num_blocks, self.out_per_block, self.in_per_block), device)

    def forward(self, x):
        lead = x.shape[:-1]
        xb = x.reshape(*lead, self.P, self.in_per_block)
        y = torch.einsum("...pi,poi->...po", xb, self.weight)
        return y.reshape(*lead, self.P * self.out_per_block)


class GatedFeedForward(nn.Module):
    """§2.6: [g | a] = x W_up^T (gate first), y = W_down(GELU(g) * a); no biases."""

    def __init__(self, dim: int, up_dim: int, device=None):
        super().__init__()
        self.up_dim = up_dim
        self.proj_up = Linear(dim, 2 * up_dim, device=device)
        self.proj_down = Linear(up_dim, dim, device=device)

    def forward(self, x):
        ga = self.proj_up(x)
        g, a = ga[..., :self.up_dim], ga[..., self.up_dim:]
        return self.proj_down(gelu_exact(g) * a)


# ----------------------------------------------------------------------------------------------------
# sLSTM (§3)
# ----------------------------------------------------------------------------------------------------

# Layout conversions of the packed sLSTM parameters (§3.3).  Gate order (i, f, z, o) everywhere.
#   R cuda    (NH, DH, 4*DH): [h][k][g*DH+j]        R vanilla (NH, 4*DH, DH): [h][g*DH+j][k]
#   b cuda    (4H,): [h][g][j]                      b vanilla (4H,): [g][h][j]
def slstm_R_cuda_to_vanilla(R: torch.Tensor) -> torch.Tensor:
    return R.transpose(1, 2).contiguous()


def slstm_R_vanilla_to_cuda(R: torch.Tensor) -> torch.Tensor:
    return R.transpose(1, 2).contiguous()


def slstm_bias_cuda_to_vanilla(b: torch.Tensor, num_heads: int) -> torch.Tensor:
    return b.reshape(num_heads, 4, -1).permute(1, 0, 2).reshape(-1).contiguous()


def slstm_bias_vanilla_to_cuda(b: torch.Tensor, num_heads: int) -> torch.Tensor:
    return b.reshape(4, num_heads, -1).permute(1, 0, 2).reshape(-1).contiguous()


class sLSTMCell(nn.Module):
    """§3.2 recurrence over time (Python loop), parameters in the "cuda" (default) or "vanilla" layout.

    Input Wx: (B, S, 4H) gate-major [g][h][j] with gates (i, f, z, o); output y: (B, NH, S, DH).
    """

    def __init__(self, hidden_size: int, num_heads: int, layout: str = "cuda", device=None):
        super().__init__()
        assert layout in ("cuda", "vanilla") and hidden_size % num_heads == 0
        self.H, self.NH, self.DH = hidden_size, num_heads, hidden_size // num_heads
        self.layout = layout
        if layout == "cuda":
            self._recurrent_kernel_ = _param((self.NH, self.DH, 4 * self.DH), device)
        else:
            self._recurrent_kernel_ = _param((self.NH, 4 * self.DH, self.DH), device)
        self._bias_ = _param((4 * hidden_size,), device)

    # --- layout-specific pieces ---------------------------------------------------------------------
    def _recurrent(self, y):
        """(R_g y)[b, h, g, j] = sum_k y[b, h, k] R_ext[h, k, g, j], returned as (B, NH, 4, DH)."""
        B = y.shape[0]
        if self.layout == "cuda":      # R[h, k, g*DH+j]: per head a (DH_in, 4DH_out) matrix
            ry = torch.einsum("bhk,hkn->bhn", y, self._recurrent_kernel_)
        else:                          # R[h, g*DH+j, k]: per head nn.Linear (out, in) convention
            ry = torch.einsum("bhk,hnk->bhn", y, self._recurrent_kernel_)
        return ry.reshape(B, self.NH, 4, self.DH)

    def _bias_ext(self):
        """Bias as b_ext[h, g, j] (NH, 4, DH)."""
        if self.layout == "cuda":
            return self._bias_.reshape(self.NH, 4, self.DH)
        return self._bias_.reshape(4, self.NH, self.DH).permute(1, 0, 2)

    # --- recurrence ---------------------------------------------------------------------------------
    def forward(self, wx):
        B, S, _ = wx.shape
        NH, DH = self.NH, self.DH
        # [g][h][j] -> time-major, per-head gate blocks: (S, B, NH, 4, DH)
        wx = wx.reshape(B, S, 4, NH, DH).permute(1, 0, 3, 2, 4)
        bias = self._bias_ext()
        y = wx.new_zeros(B, NH, DH)
        c = torch.zeros_like(y)
        n = torch.zeros_like(y)
        m = torch.zeros_like(y)
        ys = []
        for t in range(S):
            raw = wx[t] + self._recurrent(y) + bias
            i_t, f_t, z_t, o_t = raw.unbind(dim=2)
            logf_plus_m = log_sigmoid(f_t) + m
            # stabiliser m_t (elementwise n == 0 test, as the CUDA kernel does)
            m_new = torch.where(n == 0.0, i_t, torch.maximum(i_t, logf_plus_m))
            one = torch.ones_like(i_t)
            i_p = torch.minimum(torch.exp(i_t - m_new), one)
            f_p = torch.minimum(torch.exp(logf_plus_m - m_new), one)
            c = f_p * c + i_p * torch.tanh(z_t)
            n = f_p * n + i_p
            y = torch.sigmoid(o_t) * c / n
            m = m_new
            ys.append(y)
        return torch.stack(ys, dim=2)  # (B, NH, S, DH)


class sLSTMLayer(nn.Module):
    """§3.1. Note the swapped names: module `fgate` gives the INPUT gate preact, `igate` the FORGET gate."""

    def __init__(self, dim: int, num_heads: int, conv_kernel: int, layout: str = "cuda", device=None):
        super().__init__()
        self.conv1d = CausalConv1d(dim, conv_kernel, device=device)
        self.fgate = LinearHeadwiseExpand(dim, num_heads, device=device)   # -> i
        self.igate = LinearHeadwiseExpand(dim, num_heads, device=device)   # -> f
        self.zgate = LinearHeadwiseExpand(dim, num_heads, device=device)
        self.ogate = LinearHeadwiseExpand(dim, num_heads, device=device)
        self.slstm_cell = sLSTMCell(dim, num_heads, layout=layout, device=device)
        self.group_norm = MultiHeadLayerNorm(dim, device=device)
        self.conv_kernel = conv_kernel

    def forward(self, x):
        xc = silu(self.conv1d(x)) if self.conv_kernel > 0 else x
        wx = torch.cat([self.fgate(xc), self.igate(xc), self.zgate(x), self.ogate(x)], dim=-1)
        y = self.slstm_cell(wx)
        return self.group_norm(y)


# ----------------------------------------------------------------------------------------------------
# mLSTM (§4)
# ----------------------------------------------------------------------------------------------------

def mlstm_parallel_stabilized(q, k, v, igate, fgate, eps: float = MLSTM_EPS):
    """§4.3. q, k, v: (B, NH, S, DH); igate, fgate preacts: (B, NH, S). Returns h~ (B, NH, S, DH)."""
    S, DH = q.shape[-2], q.shape[-1]
    logf = log_sigmoid(fgate)
    F = torch.cumsum(logf, dim=-1)                                  # F_t = sum_{s<=t} log sig(f_s)
    log_D = F.unsqueeze(-1) - F.unsqueeze(-2) + igate.unsqueeze(-2)  # [i, j] = F_i - F_j + i_j
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_D = torch.where(causal, log_D, torch.full_like(log_D, -math.inf))
    m = log_D.max(dim=-1, keepdim=True).values                      # (B, NH, S, 1)
    D_p = torch.exp(log_D - m)
    C = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(DH) * D_p
    s = C.sum(dim=-1, keepdim=True)
    den = torch.maximum(s.abs(), torch.exp(-m)) + eps
    return torch.matmul(C / den, v)


def mlstm_recurrent_stabilized(q, k, v, igate, fgate, eps: float = MLSTM_EPS):
    """§4.4 step-by-step form with states C (DH x DH), n (DH), m (scalar), all starting at 0."""
    B, NH, S, DH = q.shape
    C = q.new_zeros(B, NH, DH, DH)
    n = q.new_zeros(B, NH, DH)
    m = q.new_zeros(B, NH)
    hs = []
    for t in range(S):
        q_t, k_t, v_t = q[:, :, t], k[:, :, t] / math.sqrt(DH), v[:, :, t]
        logf_plus_m = log_sigmoid(fgate[:, :, t]) + m
        i_t = igate[:, :, t]
        m_new = torch.maximum(logf_plus_m, i_t)
        f_p = torch.exp(logf_plus_m - m_new).unsqueeze(-1)
        i_p = torch.exp(i_t - m_new).unsqueeze(-1)
        C = f_p.unsqueeze(-1) * C + i_p.unsqueeze(-1) * k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        n = f_p * n + i_p * k_t
        num = torch.einsum("bhi,bhij->bhj", q_t, C)
        den = torch.maximum((n * q_t).sum(-1).abs(), torch.exp(-m_new)) + eps
        hs.append(num / den.unsqueeze(-1))
        m = m_new
    return torch.stack(hs, dim=2)


class mLSTMCell(nn.Module):
    """§4.2: gates from [q | k | v] (all heads), one scalar per head per step; kernel; outnorm."""

    def __init__(self, inner_dim: int, num_heads: int, device=None):
        super().__init__()
        self.D, self.NH, self.DH = inner_dim, num_heads, inner_dim // num_heads
        self.igate = Linear(3 * inner_dim, num_heads, bias=True, device=device)
        self.fgate = Linear(3 * inner_dim, num_heads, bias=True, device=device)
        self.outnorm = MultiHeadLayerNorm(inner_dim, device=device)
        self.mode = "parallel"   # or "recurrent" (self-test only)

    def forward(self, q, k, v):
        B, S, _ = q.shape
        gate_in = torch.cat([q, k, v], dim=-1)
        ig = self.igate(gate_in).transpose(1, 2)   # (B, NH, S)
        fg = self.fgate(gate_in).transpose(1, 2)

        def heads(x):
            return x.reshape(B, S, self.NH, self.DH).transpose(1, 2)

        kernel = mlstm_parallel_stabilized if self.mode == "parallel" else mlstm_recurrent_stabilized
        h = kernel(heads(q), heads(k), heads(v), ig, fg)
        return self.outnorm(h)


class mLSTMLayer(nn.Module):
    """§4.1 pre-up-projection layer."""

    def __init__(self, dim: int, inner_dim: int, num_heads: int, qkv_blocksize: int, conv_kernel: int,
                 device=None):
        super().__init__()
        assert inner_dim % qkv_blocksize == 0 and inner_dim % num_heads == 0
        self.D = inner_dim
        self.conv_kernel = conv_kernel
        nblk = inner_dim // qkv_blocksize
        # registration order = NX-AI state_dict order (§7 table)
        self.learnable_skip = _param((inner_dim,), device)
        self.proj_up = Linear(dim, 2 * inner_dim, device=device)
        self.q_proj = LinearHeadwiseExpand(inner_dim, nblk, device=device)
        self.k_proj = LinearHeadwiseExpand(inner_dim, nblk, device=device)
        self.v_proj = LinearHeadwiseExpand(inner_dim, nblk, device=device)
        self.conv1d = CausalConv1d(inner_dim, conv_kernel, device=device)
        self.mlstm_cell = mLSTMCell(inner_dim, num_heads, device=device)
        self.proj_down = Linear(inner_dim, dim, device=device)

    def forward(self, x):
        xz = self.proj_up(x)
        x_m, z = xz[..., :self.D], xz[..., self.D:]
        xc = silu(self.conv1d(x_m)) if self.conv_kernel > 0 else x_m
        q, k, v = self.q_proj(xc), self.k_proj(xc), self.v_proj(x_m)   # v from the pre-conv branch
        h_tilde = self.mlstm_cell(q, k, v)
        h = (h_tilde + self.learnable_skip * xc) * silu(z)
        return self.proj_down(h)


# ----------------------------------------------------------------------------------------------------
# Blocks, stack, LM model (§1, §6)
# ----------------------------------------------------------------------------------------------------

class xLSTMBlock(nn.Module):
    """§6: x += layer(LN(x)); sLSTM blocks additionally x += FFN(LN_ffn(x))."""

    def __init__(self, cfg: XLSTMConfig, is_slstm: bool, slstm_layout: str = "cuda", device=None):
        super().__init__()
        d = cfg.embedding_dim
        self.is_slstm = is_slstm
        self.xlstm_norm = LayerNorm(d, device=device)
        if is_slstm:
            self.xlstm = sLSTMLayer(d, cfg.slstm_num_heads, cfg.slstm_conv1d_kernel_size,
                                    layout=slstm_layout, device=device)
            self.ffn_norm = LayerNorm(d, device=device)
            self.ffn = GatedFeedForward(d, cfg.ffn_up_dim, device=device)
        else:
            self.xlstm = mLSTMLayer(d, cfg.mlstm_inner_dim, cfg.mlstm_num_heads,
                                    cfg.mlstm_qkv_proj_blocksize, cfg.mlstm_conv1d_kernel_size,
                                    device=device)
            self.ffn_norm = None
            self.ffn = None

    def forward(self, x):
        x = x + self.xlstm(self.xlstm_norm(x))
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x


class xLSTMBlockStack(nn.Module):
    def __init__(self, cfg: XLSTMConfig, slstm_layout: str = "cuda", device=None):
        super().__init__()
        self.blocks = nn.ModuleList([
            xLSTMBlock(cfg, i in cfg.slstm_at, slstm_layout=slstm_layout, device=device)
            for i in range(cfg.num_blocks)])
        self.post_blocks_norm = (LayerNorm(cfg.embedding_dim, device=device)
                                 if cfg.add_post_blocks_norm else None)

    def forward(self, x):
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        if self.post_blocks_norm is not None:
            x = self.post_blocks_norm(x)
        return x, outs


class xLSTMLMModel(nn.Module):
    """§1: logits = lm_head(post_blocks_norm(blocks(E[idx]))). Embedding dropout is off (p = 0)."""

    def __init__(self, cfg: XLSTMConfig, slstm_layout: str = "cuda", device=None):
        super().__init__()
        self.cfg = cfg
        # registration order = NX-AI state_dict order: stack, token_embedding, lm_head
        self.xlstm_block_stack = xLSTMBlockStack(cfg, slstm_layout=slstm_layout, device=device)
        self.token_embedding = nn.Module()
        self.token_embedding.weight = _param((cfg.vocab_size, cfg.embedding_dim), device)
        self.lm_head = nn.Module()
        if cfg.tie_weights:
            self.lm_head.weight = self.token_embedding.weight   # same Parameter, both keys in state_dict
        else:
            self.lm_head.weight = _param((cfg.vocab_size, cfg.embedding_dim), device)

    def forward(self, idx):
        """idx (B, S) int64 -> (logits (B, S, V), [per-block outputs (B, S, d)])."""
        S = idx.shape[1]
        for blk in self.xlstm_block_stack.blocks:
            if not blk.is_slstm and blk.xlstm.mlstm_cell.mode == "parallel" and S > self.cfg.context_length:
                raise ValueError("parallel mLSTM needs S <= context_length (§1)")
        x = self.token_embedding.weight[idx]
        h, block_outs = self.xlstm_block_stack(x)
        logits = torch.matmul(h, self.lm_head.weight.t())
        return logits, block_outs

    def set_mlstm_mode(self, mode: str):
        for mod in self.modules():
            if isinstance(mod, mLSTMCell):
                mod.mode = mode

    def stack_parameters(self):
        """Parameters of the block stack + post norm (the trainable set in Distil-xLSTM)."""
        return list(self.xlstm_block_stack.parameters())


def fixture_init_(model: xLSTMLMModel, gen: torch.Generator) -> None:
    """Random fixture initialisation (NOT NX-AI's §5 init): scaled so activations are O(1) and every
    path matters.  Parameters are visited in state_dict order (a tied lm_head is skipped), so the draw
    sequence is deterministic for a given generator seed.

      dense Linear weight (out, in)     N(0, 1/in)             (lm_head: N(0, 1/d))
      headwise weight (P, out/P, in/P)  N(0, 1/(in/P))
      norm weights w (scale 1 + w)      N(0, 0.1^2)
      learnable_skip                    1 + N(0, 0.1^2)
      conv1d weight / bias              U(-0.5, 0.5)
      sLSTM _recurrent_kernel_          N(0, 0.3^2 / DH)
      sLSTM _bias_                      N(0, 0.5^2), forget-gate entries + 1
      mLSTM igate/fgate weight          N(0, 0.02^2)
      mLSTM igate bias                  N(0, 0.5^2)
      mLSTM fgate bias                  linspace(3, 6, NH) + N(0, 0.1^2)
      token_embedding                   N(0, 1)
    """
    d = model.cfg.embedding_dim
    for name, p in model.named_parameters():
        if name == "token_embedding.weight":
            _normal_(p, 1.0, gen)
        elif name == "lm_head.weight":
            _normal_(p, 1.0 / math.sqrt(d), gen)
        elif name.endswith("norm.weight"):   # xlstm_norm, ffn_norm, post_blocks_norm, group_norm, outnorm
            _normal_(p, 0.1, gen)
        elif name.endswith("learnable_skip"):
            _normal_(p, 0.1, gen, mean=1.0)
        elif ".conv1d.conv." in name:
            _uniform_(p, 0.5, gen)
        elif name.endswith("slstm_cell._recurrent_kernel_"):
            cell = model.get_submodule(name.rsplit(".", 1)[0])
            _normal_(p, 0.3 / math.sqrt(cell.DH), gen)
        elif name.endswith("slstm_cell._bias_"):
            cell = model.get_submodule(name.rsplit(".", 1)[0])
            _normal_(p, 0.5, gen)
            with torch.no_grad():            # forget gate = gate index 1 of b_ext[h, g, j]
                cell._bias_ext()[:, 1, :] += 1.0
        elif name.endswith("mlstm_cell.igate.weight") or name.endswith("mlstm_cell.fgate.weight"):
            _normal_(p, 0.02, gen)
        elif name.endswith("mlstm_cell.igate.bias"):
            _normal_(p, 0.5, gen)
        elif name.endswith("mlstm_cell.fgate.bias"):
            _normal_(p, 0.1, gen, mean=0.0)
            with torch.no_grad():
                p += torch.linspace(3.0, 6.0, p.numel(), dtype=p.dtype)
        elif p.dim() == 3:                   # LinearHeadwiseExpand
            _normal_(p, 1.0 / math.sqrt(p.shape[-1]), gen)
        elif p.dim() == 2:                   # dense Linear
            _normal_(p, 1.0 / math.sqrt(p.shape[1]), gen)
        else:
            raise KeyError(f"no fixture init rule for {name} {tuple(p.shape)}")


def convert_slstm_layout(model: xLSTMLMModel, target: str) -> xLSTMLMModel:
    """Return a new model with the sLSTM R/bias in `target` layout and identical math."""
    src_layout = next((m.layout for m in model.modules() if isinstance(m, sLSTMCell)), "cuda")
    new = xLSTMLMModel(model.cfg, slstm_layout=target)
    sd = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if src_layout != target and name.endswith("slstm_cell._recurrent_kernel_"):
            t = t.transpose(1, 2).contiguous()
        elif src_layout != target and name.endswith("slstm_cell._bias_"):
            nh = model.cfg.slstm_num_heads
            t = (slstm_bias_cuda_to_vanilla(t, nh) if target == "vanilla"
                 else slstm_bias_vanilla_to_cuda(t, nh))
        sd[name] = t
    new.load_state_dict(sd)
    return new


# ----------------------------------------------------------------------------------------------------
# Minimal safetensors I/O (shared with gen_fixtures.py)
# ----------------------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float64: ("F64", "<f8"), torch.float32: ("F32", "<f4"), torch.int64: ("I64", "<i8")}


def write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """8-byte LE header length, JSON header padded with spaces to a multiple of 8, raw LE data."""
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    blobs, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        dt, np_fmt = _ST_DTYPES[t.dtype]
        raw = t.numpy().astype(np_fmt, copy=False).tobytes(order="C")
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hbytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hbytes += b" " * ((-len(hbytes)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hbytes)))
        f.write(hbytes)
        for raw in blobs:
            f.write(raw)


def read_safetensors(path: str):
    """Inverse of write_safetensors; returns (dict name -> tensor, metadata dict)."""
    import numpy as np
    with open(path, "rb") as f:
        buf = f.read()
    (hlen,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + hlen].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    base = 8 + hlen
    rev = {dt: np_fmt for (dt, np_fmt) in _ST_DTYPES.values()}
    out = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        arr = np.frombuffer(buf[base + b:base + e], dtype=rev[h["dtype"]]).reshape(h["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out, meta


# ----------------------------------------------------------------------------------------------------
# Self-tests
# ----------------------------------------------------------------------------------------------------

def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _check(results: list, name: str, ok: bool, detail: str):
    results.append(ok)
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}")


def selftest_param_counts(results):
    """(a) §7 counts, from the module's parameter shapes on the meta device (no allocation)."""
    base = dict(vocab_size=151936, embedding_dim=1536, num_blocks=6, context_length=512)
    cases = [
        ("illustrative", XLSTMConfig(**base, slstm_at=[1, 3, 5], mlstm_num_heads=4, slstm_num_heads=4,
                                     mlstm_qkv_proj_blocksize=4, ffn_proj_factor=1.3), 85392408, 552139800),
        ("illustrative tied", XLSTMConfig(**base, slstm_at=[1, 3, 5], mlstm_num_heads=4, slstm_num_heads=4,
                                          mlstm_qkv_proj_blocksize=4, ffn_proj_factor=1.3, tie_weights=True),
         85392408, 318766104),
        ("paper", XLSTMConfig(**base, slstm_at=[0, 2, 4], mlstm_num_heads=16, slstm_num_heads=16,
                              mlstm_qkv_proj_blocksize=32, ffn_proj_factor=1.7), 84175968, 550923360),
    ]
    for name, cfg, want_stack, want_total in cases:
        model = xLSTMLMModel(cfg, device="meta")
        stack = sum(p.numel() for p in model.xlstm_block_stack.parameters())
        total = sum(p.numel() for p in model.parameters())      # unique Parameters (tied counted once)
        _check(results, f"param count {name}", stack == want_stack and total == want_total,
               f"stack+post_norm {stack:,} (want {want_stack:,}), total {total:,} (want {want_total:,})")
        if name == "illustrative":
            sd = model.state_dict()
            shapes_ok = (len(sd) == 84
                         and tuple(sd["xlstm_block_stack.blocks.0.xlstm.mlstm_cell.igate.weight"].shape) == (4, 9216)
                         and tuple(sd["xlstm_block_stack.blocks.0.xlstm.q_proj.weight"].shape) == (768, 4, 4)
                         and tuple(sd["xlstm_block_stack.blocks.1.xlstm.slstm_cell._recurrent_kernel_"].shape)
                         == (4, 384, 1536)
                         and tuple(sd["xlstm_block_stack.blocks.1.ffn.proj_up.weight"].shape) == (4096, 1536))
            _check(results, "state_dict keys/shapes illustrative", shapes_ok, f"{len(sd)} keys (want 84)")
        if name == "illustrative tied":
            sd = model.state_dict()
            _check(results, "tied state_dict has both keys",
                   "token_embedding.weight" in sd and "lm_head.weight" in sd and len(sd) == 84, f"{len(sd)} keys")


def selftest_slstm_layouts(results):
    """(b) sLSTM in cuda layout == vanilla layout after conversion (outputs and gradients)."""
    gen = torch.Generator().manual_seed(1234)
    B, S, H, NH = 3, 11, 24, 4
    cell_c = sLSTMCell(H, NH, layout="cuda")
    with torch.no_grad():
        cell_c._recurrent_kernel_.copy_(torch.randn(cell_c._recurrent_kernel_.shape, generator=gen) * 0.3)
        cell_c._bias_.copy_(torch.randn(4 * H, generator=gen) * 0.5)
    cell_v = sLSTMCell(H, NH, layout="vanilla")
    with torch.no_grad():
        cell_v._recurrent_kernel_.copy_(slstm_R_cuda_to_vanilla(cell_c._recurrent_kernel_))
        cell_v._bias_.copy_(slstm_bias_cuda_to_vanilla(cell_c._bias_, NH))
    wx = torch.randn(B, S, 4 * H, generator=gen, dtype=torch.float64)
    g = torch.randn(B, NH, S, H // NH, generator=gen, dtype=torch.float64)
    yc, yv = cell_c(wx), cell_v(wx)
    (yc * g).sum().backward()
    (yv * g).sum().backward()
    e_y = _rel_err(yv, yc)
    e_R = _rel_err(slstm_R_vanilla_to_cuda(cell_v._recurrent_kernel_.grad), cell_c._recurrent_kernel_.grad)
    e_b = _rel_err(slstm_bias_vanilla_to_cuda(cell_v._bias_.grad, NH), cell_c._bias_.grad)
    # independent scalar check of one element of the layouts (§3.3 index formulas)
    h, k, gi, j = 2, 3, 1, 4
    DH = H // NH
    idx_ok = (cell_c._recurrent_kernel_[h, k, gi * DH + j] == cell_v._recurrent_kernel_[h, gi * DH + j, k]
              and cell_c._bias_[h * 4 * DH + gi * DH + j] == cell_v._bias_[gi * H + h * DH + j])
    ok = e_y < 1e-13 and e_R < 1e-13 and e_b < 1e-13 and bool(idx_ok)
    _check(results, "sLSTM cuda vs vanilla layout", ok,
           f"rel err y {e_y:.1e}, dR {e_R:.1e}, db {e_b:.1e}, index formulas {'ok' if idx_ok else 'WRONG'}")

    # whole model: cuda-layout model vs converted vanilla-layout model
    cfg = XLSTMConfig(vocab_size=37, embedding_dim=16, num_blocks=2, slstm_at=[0], mlstm_num_heads=2,
                      slstm_num_heads=2, context_length=16)
    m_c = xLSTMLMModel(cfg)
    fixture_init_(m_c, gen)
    m_v = convert_slstm_layout(m_c, "vanilla")
    idx = torch.randint(0, cfg.vocab_size, (2, 6), generator=gen)
    e_model = _rel_err(m_v(idx)[0], m_c(idx)[0])
    _check(results, "model cuda vs vanilla layout", e_model < 1e-13, f"rel err logits {e_model:.1e}")


def selftest_mlstm_forms(results):
    """(c) §4.3 parallel form vs §4.4 recurrent form (float64)."""
    gen = torch.Generator().manual_seed(99)
    B, NH, S, DH = 2, 3, 13, 16
    worst_eps, worst_exact = 0.0, 0.0
    for ig_std in (0.5, 2.0, 5.0):
        q = torch.randn(B, NH, S, DH, generator=gen, dtype=torch.float64)
        k = torch.randn(B, NH, S, DH, generator=gen, dtype=torch.float64)
        v = torch.randn(B, NH, S, DH, generator=gen, dtype=torch.float64)
        ig = torch.randn(B, NH, S, generator=gen, dtype=torch.float64) * ig_std
        fg = torch.randn(B, NH, S, generator=gen, dtype=torch.float64) + 3.0
        hp = mlstm_parallel_stabilized(q, k, v, ig, fg)
        hr = mlstm_recurrent_stabilized(q, k, v, ig, fg)
        worst_eps = max(worst_eps, _rel_err(hr, hp))
        # with eps = 0 the two forms are mathematically identical (eps placement is the only difference)
        worst_exact = max(worst_exact, _rel_err(mlstm_recurrent_stabilized(q, k, v, ig, fg, eps=0.0),
                                                mlstm_parallel_stabilized(q, k, v, ig, fg, eps=0.0)))
    _check(results, "mLSTM parallel vs recurrent (eps=1e-6)", worst_eps < 1e-6, f"rel err {worst_eps:.1e}")
    _check(results, "mLSTM parallel vs recurrent (eps=0)", worst_exact < 1e-12, f"rel err {worst_exact:.1e}")

    # full fixture-like model, mLSTM cells switched to the recurrent form
    cfg = XLSTMConfig(vocab_size=97, embedding_dim=32, num_blocks=4, slstm_at=[1, 3], context_length=16)
    model = xLSTMLMModel(cfg)
    fixture_init_(model, gen)
    idx = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    with torch.no_grad():
        lp = model(idx)[0]
        model.set_mlstm_mode("recurrent")
        lr = model(idx)[0]
    e = _rel_err(lr, lp)
    _check(results, "model logits parallel vs recurrent mLSTM", e < 1e-6, f"rel err {e:.1e}")


def selftest_gradients(results):
    """(d) autograd vs central finite differences along a random direction (whole model, float64)."""
    gen = torch.Generator().manual_seed(7)
    cfg = XLSTMConfig(vocab_size=23, embedding_dim=16, num_blocks=3, slstm_at=[1], mlstm_num_heads=2,
                      slstm_num_heads=2, context_length=8)
    model = xLSTMLMModel(cfg)
    fixture_init_(model, gen)
    idx = torch.randint(0, cfg.vocab_size, (2, 5), generator=gen)
    params = model.stack_parameters()
    g_l = torch.randn(2, 5, cfg.vocab_size, generator=gen, dtype=torch.float64)

    def loss():
        logits, outs = model(idx)
        return (logits * g_l).sum() + sum(o.sum() for o in outs)

    grads = torch.autograd.grad(loss(), params)
    dirs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    analytic = sum(float((g * u).sum()) for g, u in zip(grads, dirs))
    h = 1e-6
    with torch.no_grad():
        for p, u in zip(params, dirs):
            p.add_(h * u)
        lp = float(loss())
        for p, u in zip(params, dirs):
            p.sub_(2 * h * u)
        lm = float(loss())
        for p, u in zip(params, dirs):
            p.add_(h * u)
    numeric = (lp - lm) / (2 * h)
    rel = abs(numeric - analytic) / max(abs(analytic), 1e-12)
    finite = all(bool(torch.isfinite(g).all()) for g in grads)
    _check(results, "autograd vs finite differences", rel < 1e-6 and finite,
           f"directional derivative {analytic:.6e} vs {numeric:.6e}, rel {rel:.1e}")


def selftest_safetensors(results):
    """(e) safetensors writer round trip."""
    import os
    import tempfile
    tensors = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.randn(2, dtype=torch.float32), "s": torch.tensor([1.5], dtype=torch.float64)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.safetensors")
        write_safetensors(path, tensors, {"k": "v"})
        back, meta = read_safetensors(path)
        with open(path, "rb") as f:
            hlen = struct.unpack("<Q", f.read(8))[0]
    ok = (meta == {"k": "v"} and hlen % 8 == 0
          and all(torch.equal(back[n], tensors[n]) and back[n].dtype == tensors[n].dtype for n in tensors))
    _check(results, "safetensors round trip", ok, f"header {hlen} bytes")


def run_selftests() -> int:
    torch.set_default_dtype(torch.float64)
    results = []
    selftest_param_counts(results)
    selftest_slstm_layouts(results)
    selftest_mlstm_forms(results)
    selftest_gradients(results)
    selftest_safetensors(results)
    n_fail = results.count(False)
    print(f"{len(results) - n_fail}/{len(results)} self-tests passed")
    return 0 if n_fail == 0 else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--selftest", action="store_true", help="run the self-checks")
    args = ap.parse_args(argv)
    if args.selftest:
        return run_selftests()
    ap.print_help()
    return 0

if __name__ == "__main__":
    sys.exit(main())
