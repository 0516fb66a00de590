"""The Distil-xLSTM student written the way a PyTorch user would, for the baselines.

Follows /work/shared/docs/spec-xlstm.md (section numbers "§" refer to it), same math as the float64
reference tests/reference/xlstm_ref.py, but with the usual PyTorch building blocks (nn.Linear,
F.layer_norm, F.group_norm, depthwise F.conv1d, F.gelu) so that bf16 autocast and torch.compile
see ordinary ops:

* mLSTM cell: the parallel stabilised form (§4.3, what NX-AI's package trains with) or the chunkwise
  form (§4.5, chunk 64, for long sequences where the parallel form's S x S temporaries get large).
* sLSTM cell: a Python loop over time steps (§3.2), one batched matmul with R per step plus the
  pointwise gate math: that is what a PyTorch user gets without a custom CUDA kernel (NX-AI's
  "vanilla" backend does the same). States are kept in float32; the R product runs in bf16 under
  autocast.
* Frozen, untied token embedding and LM head (copied from the teacher when one is given).

Works with torch 1.13 (CPU smoke tests) and torch 2.x. `compile_slstm_step()` swaps the per-step
function for a torch.compile'd one; `SLSTM_LOOP_DISABLE_DYNAMO` keeps dynamo from unrolling the time
loop when the whole student is compiled.
"""

import math
from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-5
MLSTM_EPS = 1e-6


def f32(t):
    """Widen half/bf16 to float32 for the cell math; float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def proj_up_dim(factor: float, dim: int) -> int:
    return int(math.ceil(factor * dim / 64.0)) * 64


@dataclass
class StudentConfig:
    vocab_size: int = 151936
    d: int = 1536
    num_blocks: int = 6
    slstm_at: List[int] = field(default_factory=lambda: [0, 2, 4])
    mlstm_heads: int = 16
    slstm_heads: int = 16
    qkv_blocksize: int = 32
    conv_kernel: int = 4
    mlstm_proj_factor: float = 2.0
    ffn_proj_factor: float = 1.7
    mlstm_form: str = "parallel"     # "parallel" or "chunkwise"
    chunk: int = 64

    @property
    def D(self):
        return proj_up_dim(self.mlstm_proj_factor, self.d)

    @property
    def ffn_up(self):
        return proj_up_dim(self.ffn_proj_factor, self.d)


# ---------------------------------------------------------------------------------------------------
# components
# ---------------------------------------------------------------------------------------------------

class ResLayerNorm(nn.Module):
    """§2.1: LayerNorm with effective scale 1 + w, no bias."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), 1.0 + self.weight, None, LN_EPS)


class MultiHeadNorm(nn.Module):
    """§2.2: per-head normalisation of (B, NH, S, DH) -> (B, S, NH*DH), scale 1 + w, via group_norm."""

    def __init__(self, channels):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        B, NH, S, DH = x.shape
        x = x.transpose(1, 2).reshape(B * S, NH * DH)
        x = F.group_norm(x, NH, 1.0 + self.weight, None, LN_EPS)
        return x.view(B, S, NH * DH)


class CausalConv(nn.Module):
    """§2.3: depthwise causal conv over (B, S, F), left padding K-1."""

    def __init__(self, channels, k):
        super().__init__()
        self.k = k
        self.conv = nn.Conv1d(channels, channels, k, groups=channels, padding=0, bias=True)

    def forward(self, x):
        x = F.pad(x.transpose(1, 2), (self.k - 1, 0))
        return self.conv(x).transpose(1, 2)


class Headwise(nn.Module):
    """§2.4: block-diagonal linear, weight (P, out/P, in/P)."""

    def __init__(self, features, blocks):
        super().__init__()
        self.P, self.bs = blocks, features // blocks
        self.weight = nn.Parameter(torch.empty(blocks, self.bs, self.bs))

    def forward(self, x):
        lead = x.shape[:-1]
        y = torch.einsum("...pi,poi->...po", x.reshape(*lead, self.P, self.bs), self.weight)
        return y.reshape(*lead, self.P * self.bs)


class GatedFFN(nn.Module):
    """§2.6: W_down(GELU(g) * a), [g | a] = W_up x."""

    def __init__(self, d, u):
        super().__init__()
        self.u = u
        self.proj_up = nn.Linear(d, 2 * u, bias=False)
        self.proj_down = nn.Linear(u, d, bias=False)

    def forward(self, x):
        g, a = self.proj_up(x).split(self.u, dim=-1)
        return self.proj_down(F.gelu(g) * a)


# ---------------------------------------------------------------------------------------------------
# sLSTM (§3): Python loop over time
# ---------------------------------------------------------------------------------------------------

def slstm_step(wx_t, y, c, n, m, R, first: bool):
    """One §3.2 step for all heads at once.
    wx_t (NH, B, 4DH) float32 (input projections + bias), y/c/n/m (NH, B, DH) float32,
    R (NH, DH, 4DH) in NX-AI's cuda layout [h][k][g*DH+j]. The min(1, .) clamps of §3.2 are
    omitted: both exponents are <= 0 by construction of m."""
    DH = y.shape[-1]
    raw = wx_t + f32(torch.bmm(y.to(R.dtype), R))
    i, f, z, o = raw.split(DH, dim=-1)
    if first:                       # zero initial state: n == 0 everywhere, m_1 = i_1
        m_new = i
        i_p = torch.ones_like(i)
        c = torch.tanh(z)
        n = i_p
    else:
        lf = F.logsigmoid(f) + m
        m_new = torch.maximum(i, lf)
        i_p = torch.exp(i - m_new)
        f_p = torch.exp(lf - m_new)
        c = f_p * c + i_p * torch.tanh(z)
        n = f_p * n + i_p
    y = torch.sigmoid(o) * c / n
    return y, c, n, m_new


_STEP = {"fn": slstm_step}


def compile_slstm_step(**kw):
    """Use a torch.compile'd step function (fuses the pointwise math; the loop stays in Python)."""
    _STEP["fn"] = torch.compile(slstm_step, **kw)


def _slstm_loop(wx, R):
    """wx (S, NH, B, 4DH) float32 -> y (S, NH, B, DH) float32."""
    S, NH, B, G = wx.shape
    DH = G // 4
    step = _STEP["fn"]
    y = wx.new_zeros(NH, B, DH)
    c, n, m = y, y, y
    ys = []
    for t in range(S):
        y, c, n, m = step(wx[t], y, c, n, m, R, t == 0)
        ys.append(y)
    return torch.stack(ys, 0)


def disable_dynamo_on_slstm_loop():
    """When the whole student is compiled, keep dynamo out of the time loop (it would otherwise unroll
    S steps into one graph); the per-step function can still be compiled on its own."""
    global _slstm_loop_impl
    _slstm_loop_impl = torch.compiler.disable(_slstm_loop)


_slstm_loop_impl = _slstm_loop


class SLSTMLayer(nn.Module):
    """§3.1 (fgate -> input gate, igate -> forget gate, NX-AI's swapped names)."""

    def __init__(self, d, nh, k):
        super().__init__()
        self.nh, self.dh = nh, d // nh
        self.conv1d = CausalConv(d, k)
        self.fgate = Headwise(d, nh)
        self.igate = Headwise(d, nh)
        self.zgate = Headwise(d, nh)
        self.ogate = Headwise(d, nh)
        self.R = nn.Parameter(torch.zeros(nh, self.dh, 4 * self.dh))    # cuda layout [h][k][g*DH+j]
        self.bias = nn.Parameter(torch.zeros(nh, 4, self.dh))           # b_ext[h][g][j]
        self.group_norm = MultiHeadNorm(d)

    def forward(self, x):
        B, S, d = x.shape
        NH, DH = self.nh, self.dh
        xc = F.silu(self.conv1d(x))
        wx = torch.stack([self.fgate(xc), self.igate(xc), self.zgate(x), self.ogate(x)], dim=2)
        R = self.R.to(wx.dtype)       # bf16 under autocast (the projections' output type), else as is
        # (B, S, 4, NH, DH) -> (S, NH, B, 4, DH) + bias -> (S, NH, B, 4*DH), float32 for the cell
        wx = f32(wx.view(B, S, 4, NH, DH).permute(1, 3, 0, 2, 4)) + f32(self.bias).unsqueeze(1)
        wx = wx.reshape(S, NH, B, 4 * DH)
        y = _slstm_loop_impl(wx, R)                        # (S, NH, B, DH)
        y = y.permute(2, 1, 0, 3)                          # (B, NH, S, DH)
        return self.group_norm(y)


# ---------------------------------------------------------------------------------------------------
# mLSTM (§4)
# ---------------------------------------------------------------------------------------------------

def mlstm_parallel(q, k, v, ig, fg, eps=MLSTM_EPS):
    """§4.3. q, k, v (B, NH, S, DH); ig, fg (B, NH, S) float32."""
    S, DH = q.shape[-2], q.shape[-1]
    Fc = torch.cumsum(F.logsigmoid(fg), dim=-1)
    log_D = Fc.unsqueeze(-1) - Fc.unsqueeze(-2) + ig.unsqueeze(-2)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    log_D = log_D.masked_fill(~causal, float("-inf"))
    m = log_D.amax(dim=-1, keepdim=True)
    D_p = torch.exp(log_D - m)
    C = f32(q @ k.transpose(-1, -2)) * (D_p / math.sqrt(DH))
    den = torch.maximum(C.sum(-1, keepdim=True).abs(), torch.exp(-m)) + eps
    return (C / den).to(v.dtype) @ v


def mlstm_chunkwise(q, k, v, ig, fg, L=64, eps=MLSTM_EPS):
    """§4.5 chunkwise form (chunk L, S % L == 0): intra-chunk parallel, inter-chunk recurrence over
    S/L chunk states. q is pre-scaled by 1/sqrt(DH)."""
    B, NH, S, DH = q.shape
    assert S % L == 0, "chunkwise mLSTM needs S % chunk == 0"
    NC = S // L
    q = (q / math.sqrt(DH)).view(B, NH, NC, L, DH)
    k = k.view(B, NH, NC, L, DH)
    v = v.view(B, NH, NC, L, DH)
    ig = ig.view(B, NH, NC, L)
    b = torch.cumsum(F.logsigmoid(fg).view(B, NH, NC, L), dim=-1)   # local cumulative log-forget
    g = b[..., -1]                                                   # (B, NH, NC)
    a = ig - b + g.unsqueeze(-1)
    mu = a.amax(-1)                                                  # (B, NH, NC)
    w = torch.exp(a - mu.unsqueeze(-1)).to(k.dtype)
    kw = k * w.unsqueeze(-1)
    KV = kw.transpose(-1, -2) @ v                                    # (B, NH, NC, DH, DH)
    nh = kw.sum(-2)                                                  # (B, NH, NC, DH)
    # inter-chunk states entering each chunk: C_prev, n_prev, m_prev (zeros at chunk 0)
    acc = torch.promote_types(q.dtype, torch.float32)
    C = q.new_zeros(B, NH, DH, DH, dtype=acc)
    nv = q.new_zeros(B, NH, DH, dtype=acc)
    mc = q.new_zeros(B, NH, dtype=acc)
    Cs, ns, ms = [], [], []
    for c in range(NC):
        Cs.append(C)
        ns.append(nv)
        ms.append(mc)
        m_new = torch.maximum(g[..., c] + mc, mu[..., c])
        s_old = torch.exp(g[..., c] + mc - m_new)
        s_new = torch.exp(mu[..., c] - m_new)
        C = s_old[..., None, None] * C + s_new[..., None, None] * f32(KV[:, :, c])
        nv = s_old[..., None] * nv + s_new[..., None] * f32(nh[:, :, c])
        mc = m_new
    C_prev = torch.stack(Cs, 2)                                      # (B, NH, NC, DH, DH)
    n_prev = torch.stack(ns, 2)                                      # (B, NH, NC, DH)
    m_prev = torch.stack(ms, 2)                                      # (B, NH, NC)
    # outputs
    log_D = b.unsqueeze(-1) - b.unsqueeze(-2) + ig.unsqueeze(-2)     # (B, NH, NC, L, L) [tau, sigma]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    log_D = log_D.masked_fill(~causal, float("-inf"))
    inter_log = m_prev.unsqueeze(-1) + b                             # (B, NH, NC, L)
    st = torch.maximum(log_D.amax(-1), inter_log)
    E = f32(q @ k.transpose(-1, -2)) * torch.exp(log_D - st.unsqueeze(-1))
    sc = torch.exp(inter_log - st)                                   # (B, NH, NC, L)
    qC = f32(q @ C_prev.to(q.dtype))                            # (B, NH, NC, L, DH)
    qn = (f32(q) * n_prev.unsqueeze(-2)).sum(-1)                  # (B, NH, NC, L)
    den = torch.maximum((E.sum(-1) + sc * qn).abs(), torch.exp(-st)) + eps
    h = (f32(E.to(v.dtype) @ v) + sc.unsqueeze(-1) * qC) / den.unsqueeze(-1)
    return h.view(B, NH, S, DH)


class MLSTMLayer(nn.Module):
    """§4.1 / §4.2."""

    def __init__(self, d, D, nh, bs, k, form="parallel", chunk=64):
        super().__init__()
        self.D, self.nh, self.form, self.chunk = D, nh, form, chunk
        self.proj_up = nn.Linear(d, 2 * D, bias=False)
        self.conv1d = CausalConv(D, k)
        self.q_proj = Headwise(D, D // bs)
        self.k_proj = Headwise(D, D // bs)
        self.v_proj = Headwise(D, D // bs)
        self.igate = nn.Linear(3 * D, nh, bias=True)
        self.fgate = nn.Linear(3 * D, nh, bias=True)
        self.outnorm = MultiHeadNorm(D)
        self.learnable_skip = nn.Parameter(torch.ones(D))
        self.proj_down = nn.Linear(D, d, bias=False)

    def forward(self, x):
        B, S, _ = x.shape
        x_m, z = self.proj_up(x).split(self.D, dim=-1)
        xc = F.silu(self.conv1d(x_m))
        q, k, v = self.q_proj(xc), self.k_proj(xc), self.v_proj(x_m)
        qkv = torch.cat([q, k, v], dim=-1)
        ig = f32(self.igate(qkv)).transpose(1, 2)     # (B, NH, S)
        fg = f32(self.fgate(qkv)).transpose(1, 2)

        def heads(t):
            return t.view(B, S, self.nh, -1).transpose(1, 2)

        if self.form == "chunkwise":
            h = mlstm_chunkwise(heads(q), heads(k), heads(v), ig, fg, L=self.chunk)
        else:
            h = mlstm_parallel(heads(q), heads(k), heads(v), ig, fg)
        h = self.outnorm(h)
        h = (h + self.learnable_skip * xc) * F.silu(z)
        return self.proj_down(h)


# ---------------------------------------------------------------------------------------------------
# blocks and the LM
# ---------------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, cfg: StudentConfig, is_slstm: bool):
        super().__init__()
        self.is_slstm = is_slstm
        self.xlstm_norm = ResLayerNorm(cfg.d)
        if is_slstm:
            self.xlstm = SLSTMLayer(cfg.d, cfg.slstm_heads, cfg.conv_kernel)
            self.ffn_norm = ResLayerNorm(cfg.d)
            self.ffn = GatedFFN(cfg.d, cfg.ffn_up)
        else:
            self.xlstm = MLSTMLayer(cfg.d, cfg.D, cfg.mlstm_heads, cfg.qkv_blocksize, cfg.conv_kernel,
                                    cfg.mlstm_form, cfg.chunk)

    def forward(self, x):
        x = x + self.xlstm(self.xlstm_norm(x))
        if self.is_slstm:
            x = x + self.ffn(self.ffn_norm(x))
        return x


class Student(nn.Module):
    """forward(idx) -> (logits (B, S, V), [block outputs (B, S, d)]); embedding and head frozen."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d)
        self.blocks = nn.ModuleList([Block(cfg, i in cfg.slstm_at) for i in range(cfg.num_blocks)])
        self.post_blocks_norm = ResLayerNorm(cfg.d)
        self.lm_head = nn.Linear(cfg.d, cfg.vocab_size, bias=False)
        self.embedding.weight.requires_grad_(False)
        self.lm_head.weight.requires_grad_(False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """§5 init (small_init / wang_init, zero norms, sLSTM powerlaw forget bias, R = 0)."""
        cfg = self.cfg
        d, nb = cfg.d, cfg.num_blocks
        small = math.sqrt(2.0 / (5.0 * d))
        wang = 2.0 / (nb * math.sqrt(d))
        for bi, blk in enumerate(self.blocks):
            L = blk.xlstm
            if blk.is_slstm:
                for hw in (L.fgate, L.igate, L.zgate, L.ogate):
                    hw.weight.normal_(0.0, small)
                L.R.zero_()
                L.bias.zero_()
                r = bi / (nb - 1) if nb > 1 else 0.0
                j = torch.arange(L.dh, dtype=torch.float32) / max(L.dh - 1, 1)
                L.bias[:, 1, :] = 5.0 - 12.0 * j ** (0.3 + 1.3 * r)
                blk.ffn.proj_up.weight.normal_(0.0, small)
                blk.ffn.proj_down.weight.normal_(0.0, wang)
            else:
                L.proj_up.weight.normal_(0.0, small)
                for hw in (L.q_proj, L.k_proj, L.v_proj):
                    hw.weight.normal_(0.0, small)
                L.proj_down.weight.normal_(0.0, wang)
                L.igate.weight.zero_()
                L.igate.bias.normal_(0.0, 0.1)
                L.fgate.weight.zero_()
                L.fgate.bias.copy_(torch.linspace(3.0, 6.0, L.nh))
                L.learnable_skip.fill_(1.0)
            # conv weights keep PyTorch's default init (§5); norm weights are zeros already
        self.embedding.weight.normal_(0.0, small)
        self.lm_head.weight.normal_(0.0, small)

    @torch.no_grad()
    def load_frozen_from_teacher(self, emb_weight, head_weight):
        self.embedding.weight.copy_(emb_weight)
        self.lm_head.weight.copy_(head_weight)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, idx):
        x = self.embedding(idx)
        outs = []
        for blk in self.blocks:
            x = blk(x)
            outs.append(x)
        logits = self.lm_head(self.post_blocks_norm(x))
        return logits, outs


def count_params(model: Student):
    trainable = sum(p.numel() for p in model.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
