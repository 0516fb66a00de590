#!/usr/bin/env python3
"""Hugging Face parity fixtures for distilx's frozen teacher (include/distilx/teacher/llama.hpp).

Builds tiny random-weight Qwen2 / Llama / Mistral causal LMs with transformers, saves each with
save_pretrained (safetensors, float32; one of them sharded), runs them on the CPU in float32 with the
eager attention path and output_hidden_states=True, and writes the inputs, logits and all hidden states
to <out>/<name>/reference.safetensors. The model directory itself is <out>/<name>/hf/, exactly as
save_pretrained wrote it. Needs torch and transformers (run on the device machine); see
tests/data/teacher/README.md for the command.

Reference file layout (all float32, so any safetensors reader that converts F32 can read it):
  <case>.input_ids       [B, S]     token ids (exact in float32, V <= 256)
  <case>.attention_mask  [B, S]     1 = real token, 0 = padding (absent for unpadded cases)
  <case>.position_ids    [B, S]     only for cases that pass explicit position_ids
  <case>.logits          [B, S, V]
  <case>.hidden_states.<i>  [B, S, d], i = 0 .. L (HF order: embeddings first, last after the final norm)
__metadata__ holds the case names, the layer count and the library versions.
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys
import traceback

import torch

# name -> (architecture, config kwargs, RoPE parameters, max_shard_size in bytes or None, seed)
SPECS = {
    # Qwen2: GQA (6 query / 2 KV heads), q/k/v bias and no o bias, tied embedding and head.
    "qwen2_tied": (
        "qwen2",
        dict(vocab_size=160, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
             bos_token_id=1, eos_token_id=2),
        dict(rope_type="default", rope_theta=10000.0),
        None, 11),
    # Llama: no bias, untied head, explicit head_dim (16 != 48 / 4), llama3 RoPE scaling chosen so that
    # head_dim 16 has frequencies in all three bands (kept, smoothed, divided by factor).
    "llama3_untied": (
        "llama",
        dict(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
             tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=[2, 3]),
        dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=64),
        None, 12),
    # Llama saved in several shards (model.safetensors.index.json); MHA, attention_bias (q/k/v/o) and mlp_bias.
    "llama_sharded_bias": (
        "llama",
        dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
             attention_bias=True, mlp_bias=True, bos_token_id=1, eos_token_id=2),
        dict(rope_type="default", rope_theta=500000.0),
        40_000, 13),
    # Mistral: MQA (1 KV head), tied, sliding window 6 < sequence length, so the window is in use.
    "mistral_window": (
        "mistral",
        dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True,
             sliding_window=6, bos_token_id=1, eos_token_id=2),
        dict(rope_type="default", rope_theta=1000000.0),
        None, 14),
}

PAD_ID = 0


def write_safetensors(path, tensors, metadata):
    """Minimal safetensors writer (F32 only): 8-byte little-endian header length, JSON header, data."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().to(device="cpu", dtype=torch.float32).contiguous()
        data = t.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def make_config(arch, kwargs, rope):
    import transformers

    cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig,
           "mistral": transformers.MistralConfig}[arch]
    try:  # transformers >= 5: one rope_parameters dict
        cfg = cls(**kwargs, rope_parameters=dict(rope))
    except TypeError:  # transformers 4.x: rope_theta + rope_scaling
        r = dict(rope)
        theta = r.pop("rope_theta")
        scaling = None if r["rope_type"] == "default" else r
        cfg = cls(**kwargs, rope_theta=theta, rope_scaling=scaling)
    try:
        cfg._attn_implementation = "eager"
    except Exception as e:  # noqa: BLE001
        print(f"  note: could not set eager attention on the config: {e}")
    return cfg


def make_model(arch, cfg, seed):
    import transformers

    cls = {"qwen2": transformers.Qwen2ForCausalLM, "llama": transformers.LlamaForCausalLM,
           "mistral": transformers.MistralForCausalLM}[arch]
    torch.manual_seed(seed)
    model = cls(cfg)
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
        except Exception as e:  # noqa: BLE001
            print(f"  note: set_attn_implementation('eager') failed: {e}")
    model = model.to(device="cpu", dtype=torch.float32).eval()
    # HF's init (std 0.02, unit norms, zero bias) makes attention nearly uniform and every layer nearly
    # the identity; larger random weights make the parity check sensitive to every term.
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied parameters appear once
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


def make_cases(vocab, seed, plain_len):
    g = torch.Generator().manual_seed(seed + 2000)
    cases = {}
    ids = torch.randint(3, vocab, (2, plain_len), generator=g)
    cases["plain"] = dict(input_ids=ids)
    # Row 0 full, row 1 right-padded (4 pads), row 2 left-padded (3 pads).
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    ids = ids.masked_fill(mask == 0, PAD_ID)
    cases["padded"] = dict(input_ids=ids, attention_mask=mask)
    # Same batch with generate()-style positions: cumsum(mask) - 1, pads set to 1.
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cases["padded_pos"] = dict(input_ids=ids, attention_mask=mask, position_ids=pos)
    return cases


def run_case(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True, use_cache=False)
    return out.logits, list(out.hidden_states)


def shard_by_hand(hf_dir, model, max_bytes):
    """Fallback when save_pretrained wrote one file despite max_shard_size: split the state dict ourselves
    into the layout save_pretrained uses (model-0000i-of-0000n.safetensors + index)."""
    state = {k: v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    groups, cur, size = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * 4
        if cur and size + nbytes > max_bytes:
            groups.append(cur)
            cur, size = {}, 0
        cur[k] = state[k]
        size += nbytes
    groups.append(cur)
    n = len(groups)
    weight_map, total = {}, 0
    for i, grp in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        write_safetensors(os.path.join(hf_dir, fname), grp, {"format": "pt"})
        for k, v in grp.items():
            weight_map[k] = fname
            total += v.numel() * 4
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    os.remove(os.path.join(hf_dir, "model.safetensors"))


def generate(name, out_root):
    import transformers

    arch, kwargs, rope, shard, seed = SPECS[name]
    print(f"== {name} ({arch})")
    cfg = make_config(arch, kwargs, rope)
    model = make_model(arch, cfg, seed)
    print(f"  attn_implementation = {getattr(model.config, '_attn_implementation', '?')}")
    vocab, layers = kwargs["vocab_size"], kwargs["num_hidden_layers"]

    d = os.path.join(out_root, name)
    hf_dir = os.path.join(d, "hf")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(hf_dir)
    if shard is None:
        model.save_pretrained(hf_dir)
    else:
        try:
            model.save_pretrained(hf_dir, max_shard_size=shard)
        except Exception as e:  # noqa: BLE001  (older/newer versions may want a string like "40KB")
            print(f"  note: max_shard_size={shard} refused ({e}); trying '{shard // 1000}KB'")
            model.save_pretrained(hf_dir, max_shard_size=f"{shard // 1000}KB")
    if shard is not None and not os.path.exists(os.path.join(hf_dir, "model.safetensors.index.json")):
        print("  note: save_pretrained wrote one file; sharding by hand")
        shard_by_hand(hf_dir, model, shard)
    if shard is not None:
        with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
            nshards = len(set(json.load(f)["weight_map"].values()))
        print(f"  sharded into {nshards} files")

    # Reload from disk so the fixture is what the saved directory computes.
    cls = type(model)
    try:
        model = cls.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32).eval()
    except TypeError:
        model = cls.from_pretrained(hf_dir, attn_implementation="eager", torch_dtype=torch.float32).eval()
    print(f"  reloaded, attn_implementation = {getattr(model.config, '_attn_implementation', '?')}")

    plain_len = 24 if arch != "mistral" else 20
    cases = make_cases(vocab, seed, plain_len)
    tensors = {}
    for cname, inputs in cases.items():
        logits, hs = run_case(model, inputs)
        assert len(hs) == layers + 1, f"{name}/{cname}: {len(hs)} hidden states, expected {layers + 1}"
        for k, v in inputs.items():
            tensors[f"{cname}.{k}"] = v.float()
        tensors[f"{cname}.logits"] = logits
        for i, h in enumerate(hs):
            tensors[f"{cname}.hidden_states.{i}"] = h
        # Sanity checks printed to the log: the head applied to the last hidden state gives the logits,
        # and a right-padded row equals the same row run alone without padding (masking works as assumed).
        head = model.get_output_embeddings().weight
        print(f"  {cname}: logits {tuple(logits.shape)}, |logits - h_L W^T|max = "
              f"{(logits - hs[-1] @ head.T).abs().max().item():.2e}, nan at pads: {torch.isnan(logits).any().item()}")
        if cname == "padded":
            alone, _ = run_case(model, dict(input_ids=inputs["input_ids"][1:2, :6]))
            print(f"  right-pad row vs alone: {(alone[0] - logits[1, :6]).abs().max().item():.2e}")

    meta = {"cases": ",".join(cases), "num_hidden_layers": layers, "transformers": transformers.__version__,
            "torch": torch.__version__, "pad_token_id": PAD_ID,
            "attn_implementation": getattr(model.config, "_attn_implementation", "?")}
    write_safetensors(os.path.join(d, "reference.safetensors"), tensors, meta)
    with open(os.path.join(hf_dir, "config.json")) as f:
        print("  config.json:", json.dumps(json.load(f), sort_keys=True))
    for fn in sorted(os.listdir(hf_dir)):
        print(f"  {fn}: {os.path.getsize(os.path.join(hf_dir, fn))} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (one sub-folder per model)")
    ap.add_argument("--only", nargs="*", default=None, help="model names to generate (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for name in args.only or SPECS:
        try:  # one failing model must not cost the others (device time is scarce)
            generate(name, args.out)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(name)
    if failed:
        print("FAILED:", ", ".join(failed))
        sys.exit(1)
    print("all fixtures written")


if __name__ == "__main__":
    main()
