#!/usr/bin/python3
"""Generate float64 reference fixtures for distilx from the PyTorch reference (xlstm_ref.py).

Usage: /usr/bin/python3 tests/reference/gen_fixtures.py --out DIR [--only NAME ...] [-v] [--no-verify]

Writes DIR/xlstm_<name>.safetensors per config, each holding the parameters (NX-AI state_dict names),
input tokens, the random loss cotangents, the forward outputs, the loss, and autograd gradients of
    L = sum(logits * g_logits) + sum_i sum(block_out_i * g_block_i)
for every parameter except token_embedding.weight / lm_head.weight (frozen in distilx).
See tests/reference/README.md.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.dont_write_bytecode = True   # keep the source tree clean when ctest runs this
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xlstm_ref as ref  # noqa: E402

FROZEN = ("token_embedding.weight", "lm_head.weight")

# name -> (model config, batch, seq_len, sLSTM layout written to the file, seed)
CONFIGS = {
    # NX-AI README-style defaults, scaled down; R/bias written in the *vanilla* layout.
    "nxdefault": (ref.XLSTMConfig(vocab_size=97, embedding_dim=32, num_blocks=4, slstm_at=[1, 3],
                                  mlstm_num_heads=4, mlstm_qkv_proj_blocksize=4, mlstm_proj_factor=2.0,
                                  mlstm_conv1d_kernel_size=4, slstm_num_heads=4, slstm_conv1d_kernel_size=4,
                                  ffn_proj_factor=1.3, tie_weights=False, context_length=16),
                  2, 9, "vanilla", 1001),
    # The paper's layout (sLSTM first, blocks 0,2,4), scaled down: D = 128 (DH 32), sLSTM DH 12.
    "paper": (ref.XLSTMConfig(vocab_size=101, embedding_dim=48, num_blocks=6, slstm_at=[0, 2, 4],
                              mlstm_num_heads=4, mlstm_qkv_proj_blocksize=8, mlstm_proj_factor=2.0,
                              mlstm_conv1d_kernel_size=4, slstm_num_heads=4, slstm_conv1d_kernel_size=4,
                              ffn_proj_factor=1.7, tie_weights=False, context_length=16),
              2, 7, "cuda", 1002),
    # Tied embedding / lm_head.
    "tied": (ref.XLSTMConfig(vocab_size=50, embedding_dim=16, num_blocks=2, slstm_at=[1],
                             mlstm_num_heads=2, mlstm_qkv_proj_blocksize=4, mlstm_proj_factor=2.0,
                             mlstm_conv1d_kernel_size=4, slstm_num_heads=2, slstm_conv1d_kernel_size=4,
                             ffn_proj_factor=1.3, tie_weights=True, context_length=16),
             2, 6, "cuda", 1003),
}


def to_file_layout(name: str, t: torch.Tensor, layout: str, num_heads: int) -> torch.Tensor:
    """The model holds sLSTM R/bias in cuda layout (§3.3); convert a parameter (or its gradient, which
    is indexed identically) to the layout written to the file."""
    if layout == "cuda":
        return t
    if name.endswith("slstm_cell._recurrent_kernel_"):
        return ref.slstm_R_cuda_to_vanilla(t)
    if name.endswith("slstm_cell._bias_"):
        return ref.slstm_bias_cuda_to_vanilla(t, num_heads)
    return t


def build_fixture(name: str):
    cfg, B, S, layout, seed = CONFIGS[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ref.xLSTMLMModel(cfg, slstm_layout="cuda")
    ref.fixture_init_(model, gen)
    for pname, p in model.named_parameters():
        p.requires_grad_(pname not in FROZEN)

    tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=gen, dtype=torch.int64)
    g_logits = torch.randn(B, S, cfg.vocab_size, generator=gen)
    g_blocks = [torch.randn(B, S, cfg.embedding_dim, generator=gen) for _ in range(cfg.num_blocks)]

    logits, block_outs = model(tokens)
    loss = (logits * g_logits).sum() + sum((o * g).sum() for o, g in zip(block_outs, g_blocks))
    loss.backward()

    tensors = {}
    # parameters: every state_dict key (tied: both keys, identical data)
    for pname, t in model.state_dict().items():
        tensors[pname] = to_file_layout(pname, t, layout, cfg.slstm_num_heads)
    tensors["input.tokens"] = tokens
    tensors["loss.g_logits"] = g_logits
    for i, g in enumerate(g_blocks):
        tensors[f"loss.g_block.{i}"] = g
    tensors["out.logits"] = logits.detach()
    for i, o in enumerate(block_outs):
        tensors[f"out.block.{i}"] = o.detach()
    tensors["out.loss"] = loss.detach().reshape(1)
    for pname, p in model.named_parameters():
        if pname in FROZEN:
            continue
        tensors[f"grad.{pname}"] = to_file_layout(pname, p.grad, layout, cfg.slstm_num_heads)

    cfg_json = cfg.json_dict()
    cfg_json.update({"batch": B, "seq_len": S})
    metadata = {"config": json.dumps(cfg_json), "slstm_layout": layout,
                "generator": "tests/reference/gen_fixtures.py"}

    # sanity: everything finite
    for tname, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RuntimeError(f"{name}: non-finite values in {tname}")
    return tensors, metadata


def verify_fixture(path: str) -> float:
    """Re-read a written file, rebuild the model in the file's sLSTM layout (vanilla files exercise the
    reference's vanilla-layout code path), reload the parameters strictly and recompute outputs, loss and
    gradients.  Returns the largest relative deviation from the stored values."""
    tensors, meta = ref.read_safetensors(path)
    c = json.loads(meta["config"])
    cfg = ref.XLSTMConfig(**{k: v for k, v in c.items() if k not in ("batch", "seq_len")})
    model = ref.xLSTMLMModel(cfg, slstm_layout=meta["slstm_layout"])
    sd_keys = list(model.state_dict().keys())
    model.load_state_dict({k: tensors[k] for k in sd_keys}, strict=True)
    for pname, p in model.named_parameters():
        p.requires_grad_(pname not in FROZEN)
    logits, outs = model(tensors["input.tokens"])
    loss = (logits * tensors["loss.g_logits"]).sum() + sum(
        (o * tensors[f"loss.g_block.{i}"]).sum() for i, o in enumerate(outs))
    loss.backward()
    pairs = [(logits, tensors["out.logits"]), (loss.reshape(1), tensors["out.loss"])]
    pairs += [(o, tensors[f"out.block.{i}"]) for i, o in enumerate(outs)]
    pairs += [(p.grad, tensors[f"grad.{n}"]) for n, p in model.named_parameters() if n not in FROZEN]
    expected = set(sd_keys) | {"input.tokens", "loss.g_logits", "out.logits", "out.loss"}
    expected |= {f"{p}.{i}" for p in ("loss.g_block", "out.block") for i in range(cfg.num_blocks)}
    expected |= {f"grad.{n}" for n, _ in model.named_parameters() if n not in FROZEN}
    if set(tensors) != expected:
        raise RuntimeError(f"{path}: unexpected tensor set {sorted(set(tensors) ^ expected)}")
    return max(float((a.detach() - b).abs().max() / b.abs().max()) for a, b in pairs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Generate distilx xLSTM reference fixtures (float64).")
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="subset of configs")
    ap.add_argument("-v", "--verbose", action="store_true", help="list tensor names and shapes")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip re-reading each written file and recomputing it in its own sLSTM layout")
    args = ap.parse_args(argv)

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)   # bitwise-reproducible reductions; the configs are tiny
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    for name in (args.only or list(CONFIGS)):
        t1 = time.time()
        tensors, metadata = build_fixture(name)
        path = os.path.join(args.out, f"xlstm_{name}.safetensors")
        ref.write_safetensors(path, tensors, metadata)
        n_params = sum(1 for k in tensors if k.split(".")[0] not in ("input", "loss", "out", "grad"))
        n_grads = sum(1 for k in tensors if k.startswith("grad."))
        print(f"wrote {path}: {len(tensors)} tensors ({n_params} parameters, {n_grads} gradients), "
              f"loss {float(tensors['out.loss'][0]):.6f}, {time.time() - t1:.2f}s")
        if args.verbose:
            for k, t in tensors.items():
                print(f"  {k:70s} {str(t.dtype).replace('torch.', ''):8s} {list(t.shape)}")
        if args.verify:
            err = verify_fixture(path)
            print(f"  verify (reloaded, {metadata['slstm_layout']} layout): max rel deviation {err:.1e}")
            if err > 1e-12:
                print("  VERIFY FAILED")
                return 1
    print(f"done in {time.time() - t0:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
