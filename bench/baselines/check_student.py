#!/usr/bin/env python3
"""Checks the benchmark student (torch_student.py) against the project's float64 reference
tests/reference/xlstm_ref.py: same weights -> same logits, block outputs and gradients (float64,
CPU), for the parallel and the chunkwise mLSTM forms. Runs in a few seconds with torch 1.13+.

    python3 bench/baselines/check_student.py
"""

import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "reference"))

import torch_student as ts  # noqa: E402
import xlstm_ref as ref     # noqa: E402


def copy_into_reference(st: ts.Student, rm: "ref.xLSTMLMModel"):
    """Map the benchmark student's parameters onto the reference's NX-AI state_dict names."""
    sd = {}
    for i, blk in enumerate(st.blocks):
        p = f"xlstm_block_stack.blocks.{i}."
        sd[p + "xlstm_norm.weight"] = blk.xlstm_norm.weight
        L = blk.xlstm
        if blk.is_slstm:
            sd[p + "xlstm.conv1d.conv.weight"] = L.conv1d.conv.weight
            sd[p + "xlstm.conv1d.conv.bias"] = L.conv1d.conv.bias
            for g in ("fgate", "igate", "zgate", "ogate"):
                sd[p + f"xlstm.{g}.weight"] = getattr(L, g).weight
            sd[p + "xlstm.slstm_cell._recurrent_kernel_"] = L.R
            sd[p + "xlstm.slstm_cell._bias_"] = L.bias        # (NH, 4, DH) = [h][g][j]
            sd[p + "xlstm.group_norm.weight"] = L.group_norm.weight
            sd[p + "ffn_norm.weight"] = blk.ffn_norm.weight
            sd[p + "ffn.proj_up.weight"] = blk.ffn.proj_up.weight
            sd[p + "ffn.proj_down.weight"] = blk.ffn.proj_down.weight
        else:
            sd[p + "xlstm.learnable_skip"] = L.learnable_skip
            sd[p + "xlstm.proj_up.weight"] = L.proj_up.weight
            for g in ("q_proj", "k_proj", "v_proj"):
                sd[p + f"xlstm.{g}.weight"] = getattr(L, g).weight
            sd[p + "xlstm.conv1d.conv.weight"] = L.conv1d.conv.weight
            sd[p + "xlstm.conv1d.conv.bias"] = L.conv1d.conv.bias
            sd[p + "xlstm.mlstm_cell.igate.weight"] = L.igate.weight
            sd[p + "xlstm.mlstm_cell.igate.bias"] = L.igate.bias
            sd[p + "xlstm.mlstm_cell.fgate.weight"] = L.fgate.weight
            sd[p + "xlstm.mlstm_cell.fgate.bias"] = L.fgate.bias
            sd[p + "xlstm.mlstm_cell.outnorm.weight"] = L.outnorm.weight
            sd[p + "xlstm.proj_down.weight"] = L.proj_down.weight
    sd["xlstm_block_stack.post_blocks_norm.weight"] = st.post_blocks_norm.weight
    sd["token_embedding.weight"] = st.embedding.weight
    sd["lm_head.weight"] = st.lm_head.weight
    shapes = {k: v.shape for k, v in rm.state_dict().items()}
    rm.load_state_dict({k: v.detach().clone().reshape(shapes[k]) for k, v in sd.items()}, strict=True)
    return sd


def randomise(st: ts.Student, gen):
    """O(1) random weights so every path carries signal (R != 0, norms != 0)."""
    with torch.no_grad():
        for name, p in st.named_parameters():
            if name.endswith(".R"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 / math.sqrt(p.shape[1]))
            elif name.endswith("fgate.bias") and p.numel() == st.cfg.mlstm_heads:
                p.copy_(torch.linspace(3, 6, p.numel(), dtype=p.dtype)
                        + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif "norm" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            elif p.dim() >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(fan_in))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def main() -> int:
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    ok = True
    for form in ("parallel", "chunkwise"):
        cfg = ts.StudentConfig(vocab_size=53, d=32, num_blocks=4, slstm_at=[0, 2], mlstm_heads=4,
                               slstm_heads=4, qkv_blocksize=8, ffn_proj_factor=1.7, mlstm_form=form, chunk=4)
        st = ts.Student(cfg)
        randomise(st, gen)
        rcfg = ref.XLSTMConfig(vocab_size=53, embedding_dim=32, num_blocks=4, slstm_at=[0, 2],
                               mlstm_num_heads=4, slstm_num_heads=4, mlstm_qkv_proj_blocksize=8,
                               ffn_proj_factor=1.7, context_length=16)
        rm = ref.xLSTMLMModel(rcfg)
        copy_into_reference(st, rm)
        idx = torch.randint(0, 53, (2, 12), generator=gen)
        g_l = torch.randn(2, 12, 53, generator=gen)
        ls, outs = st(idx)
        lr, outr = rm(idx)
        (ls * g_l).sum().add(sum(o.sum() for o in outs)).backward()
        (lr * g_l).sum().add(sum(o.sum() for o in outr)).backward()
        e_logits = rel(ls, lr)
        e_blocks = max(rel(a, b) for a, b in zip(outs, outr))
        sd_ref = dict(rm.named_parameters())
        # gradients: compare every trainable parameter under its reference name
        mapping = copy_into_reference(st, ref.xLSTMLMModel(rcfg))
        e_grad = 0.0
        for name, p_st in mapping.items():
            if not p_st.requires_grad:
                continue
            g_ref = sd_ref[name].grad
            g_st = p_st.grad.reshape(g_ref.shape)
            e_grad = max(e_grad, rel(g_st, g_ref))
        tol = 1e-10 if form == "parallel" else 1e-5   # chunkwise: eps/stabiliser placement differs
        good = e_logits < tol and e_blocks < tol and e_grad < tol
        ok &= good
        print(f"[{'PASS' if good else 'FAIL'}] student ({form} mLSTM) vs xlstm_ref: rel err logits "
              f"{e_logits:.1e}, block outputs {e_blocks:.1e}, grads {e_grad:.1e} (tol {tol:g})")
    # paper config parameter counts: one block of each kind (small), embedding/head counted analytically
    torch.set_default_dtype(torch.float32)
    cfg = ts.StudentConfig()
    n_s = sum(p.numel() for p in ts.Block(cfg, True).parameters())
    n_m = sum(p.numel() for p in ts.Block(cfg, False).parameters())
    n_sl = len(cfg.slstm_at)
    tr = n_sl * n_s + (cfg.num_blocks - n_sl) * n_m + cfg.d
    tot = tr + 2 * cfg.vocab_size * cfg.d
    good = (tr == 84175968 and tot == 550923360)
    ok &= good
    print(f"[{'PASS' if good else 'FAIL'}] paper config: {tr:,} trainable / {tot:,} total "
          f"(want 84,175,968 / 550,923,360)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
