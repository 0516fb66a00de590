#!/usr/bin/env python3
"""Baseline (c): Hugging Face Qwen2 teacher greedy decoding with its KV cache (DynamicCache).

Qwen2.5-1.5B shapes, random init, bf16, sdpa. For each (batch, context): prefill the context in one
forward (logits_to_keep=1), then greedy-decode --new-tokens tokens one at a time with
past_key_values (the same model forward generate() calls per token, without its logits processors).
Only the decode part is timed (CUDA events; 2 untimed decode steps first). Batches 1 and 64,
contexts 1k, 8k, 32k. Next to it, where the batch prefills in one piece, model.generate()'s decode
step time: (t(generate 65 tokens) - t(generate 1 token)) / 64; and once, at batch 1 and the smallest
context, the same with cache_implementation="static" (transformers then torch.compiles the step).

Memory: if the prefill of the whole batch runs out of memory, the context is prefilled in
sub-batches (halving) and the per-layer K/V are concatenated into one DynamicCache, so the decode
still runs at the requested batch; if the decode itself runs out of memory the batch is halved
(reported as oom_at_batch).

    python3 bench/baselines/hf_decode.py --out decode.json
    python3 bench/baselines/hf_decode.py --quick
"""

import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as cm  # noqa: E402


def _forward(model, ids, cache, keep_last):
    kw = dict(input_ids=ids, past_key_values=cache, use_cache=True)
    if keep_last:
        try:
            return model(**kw, logits_to_keep=1)
        except TypeError:
            pass
    return model(**kw)


def cache_kv(cache):
    """Per-layer (keys, values) of a DynamicCache: `.layers[i].keys` in transformers 5,
    `.key_cache[i]` in 4.x."""
    if hasattr(cache, "layers"):
        return [(lay.keys, lay.values) for lay in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def prefill(model, ctx, sub_batch):
    """Prefill ctx (B, T) in sub-batches of `sub_batch`; returns (DynamicCache, next tokens (B, 1))."""
    from transformers import DynamicCache
    B = ctx.shape[0]
    if sub_batch >= B:
        cache = DynamicCache()
        out = _forward(model, ctx, cache, True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return out.past_key_values if out.past_key_values is not None else cache, nxt
    parts, toks = [], []
    for s in range(0, B, sub_batch):
        c = DynamicCache()
        out = _forward(model, ctx[s:s + sub_batch], c, True)
        c = out.past_key_values if out.past_key_values is not None else c
        toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
        del out
        parts.append([list(kv) for kv in cache_kv(c)])
        del c
    cache = DynamicCache()
    n_layers = len(parts[0])
    for li in range(n_layers):
        k = torch.cat([p[li][0] for p in parts], 0)
        v = torch.cat([p[li][1] for p in parts], 0)
        for p in parts:                       # free the pieces of this layer as we go
            p[li] = None
        if k.is_cuda:
            torch.cuda.empty_cache()
        cache.update(k, v, li)
        del k, v
    return cache, torch.cat(toks, 0)


def kv_gib(cache):
    tot = 0
    for k, v in cache_kv(cache):
        tot += k.numel() * k.element_size() + v.numel() * v.element_size()
    return round(tot / 2**30, 3)


def generate_decode_ms(model, ctx, new_tokens, dev, **extra):
    """Per-step decode time of model.generate(): (t(new_tokens + 1) - t(1)) / new_tokens, both
    greedy with the default cache unless `extra` says otherwise; the prefill cancels out."""
    kw = dict(do_sample=False, pad_token_id=0, **extra)
    times = {}
    with torch.no_grad():
        for n in (1, new_tokens + 1):
            cm.sync(dev)
            t0 = time.perf_counter()
            out = model.generate(ctx, max_new_tokens=n, min_new_tokens=n, **kw)
            cm.sync(dev)
            times[n] = time.perf_counter() - t0
            got = int(out.shape[1] - ctx.shape[1])
            del out
    return (times[new_tokens + 1] - times[1]) * 1e3 / new_tokens, times, got


def run_one(model, B, T, new_tokens, V, dev, sub_batch, phase, with_generate=False):
    gen = torch.Generator(device="cpu").manual_seed(0)
    ctx = torch.randint(0, V, (B, T), generator=gen).to(dev)
    cm.reset_peak(dev)
    t0 = time.perf_counter()
    phase["where"] = "prefill"
    with torch.no_grad():
        cache, tok = prefill(model, ctx, sub_batch)
        phase["where"] = "decode"
        cm.sync(dev)
        prefill_s = time.perf_counter() - t0
        prefill_peak = cm.peak_gib(dev)
        kv0 = kv_gib(cache)
        cm.reset_peak(dev)
        for _ in range(2):                    # untimed decode steps
            out = _forward(model, tok, cache, False)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            del out
        tm = cm.PhaseTimer(dev)
        w0 = time.perf_counter()
        tm.start()
        for _ in range(new_tokens):
            out = _forward(model, tok, cache, False)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            del out
        tm.mark("decode")
        ms = tm.result_ms()["decode"]
        wall = (time.perf_counter() - w0) * 1e3
        kv1 = kv_gib(cache)
        seq = cache.get_seq_length()
    dec_peak = cm.peak_gib(dev)
    del cache, tok
    row = _decode_row(B, T, new_tokens, ms, wall, prefill_s, sub_batch, kv0, kv1, seq, prefill_peak, dec_peak)
    if with_generate and sub_batch >= B:      # the whole batch prefills in one piece: compare generate()
        phase["where"] = "generate"
        try:
            ms_step, times, got = generate_decode_ms(model, ctx, new_tokens, dev)
            row.update({"generate_ms_per_token_step": round(ms_step, 3),
                        "generate_tokens_per_s": round(B * 1e3 / ms_step, 1),
                        "generate_total_s": {str(k): round(v, 3) for k, v in times.items()},
                        "generate_new_tokens": got})
        except Exception as e:  # noqa: BLE001
            row["generate_error"] = f"{type(e).__name__}: {e}"[:300]
            cm.free_memory(dev)
    del ctx
    return row


def _decode_row(B, T, new_tokens, ms, wall, prefill_s, sub_batch, kv0, kv1, seq, prefill_peak, dec_peak):
    return {
        "batch": B, "context": T, "new_tokens": new_tokens,
        "decode_ms": round(ms, 2), "ms_per_token_step": round(ms / new_tokens, 3),
        "tokens_per_s": round(B * new_tokens / (ms / 1e3), 1),
        "tokens_per_s_per_sequence": round(new_tokens / (ms / 1e3), 2),
        "decode_wall_ms": round(wall, 1),
        "prefill_s": round(prefill_s, 2), "prefill_sub_batch": min(sub_batch, B),
        "prefill_tokens_per_s": round(B * T / prefill_s, 0),
        "kv_cache_gib_after_prefill": kv0, "kv_cache_gib_end": kv1, "final_seq_len": seq,
        "peak_mem_decode_gib": dec_peak, "peak_mem_prefill_gib": prefill_peak,
    }


def main(argv=None) -> int:
    ap = cm.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--batches", default=None, help="comma list (default 1,64)")
    ap.add_argument("--contexts", default=None, help="comma list (default 1024,8192,32768)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-generate", action="store_true",
                    help="skip the model.generate() timing next to the manual loop")
    ap.add_argument("--no-static-check", action="store_true",
                    help="skip the generate(cache_implementation='static') row (auto torch.compile)")
    args = ap.parse_args(argv)
    dev = cm.pick_device(args)
    res = cm.Results("hf_decode", args, dev)
    if not cm.have_transformers():
        res.note("transformers is not installed; nothing to measure")
        return 2
    shape = dict(cm.QWEN_TINY if args.quick else cm.QWEN25_15B)
    shape["max_position_embeddings"] = 131072 if not args.quick else 8192
    batches = [int(b) for b in (args.batches or ("1,4" if args.quick else "1,64")).split(",")]
    contexts = [int(c) for c in (args.contexts or ("64,256" if args.quick else "1024,8192,32768")).split(",")]
    if args.quick:
        args.new_tokens = min(args.new_tokens, 8)
    model = cm.build_teacher(shape, dev)
    res.set("teacher", cm.teacher_description(model))
    res.set("method", "prefill (logits_to_keep=1) then a manual greedy loop model(input_ids=next, "
                      "past_key_values=DynamicCache, use_cache=True); eager, no torch.compile; decode timed "
                      "with CUDA events after 2 untimed steps")
    V = shape["vocab_size"]
    kv_bytes_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * 2
    res.set("kv_bytes_per_token", kv_bytes_per_token)
    rows = []
    for B0 in batches:
        for T in contexts:
            if res.time_left() < 20:
                row = {"batch": B0, "context": T, "skipped": "time budget exhausted"}
                res.add(row)
                rows.append(row)
                continue
            # first prefill piece: at most 512k tokens (larger ones run out of memory on 80 GB)
            sub0 = max(1, min(B0, 524288 // T))
            B, sub, oom_at, notes, row = B0, sub0, [], [], None
            while B >= 1:
                err = None
                phase = {"where": "setup"}
                try:
                    row = run_one(model, B, T, args.new_tokens, V, dev, sub, phase,
                                  with_generate=not args.no_generate and res.time_left() > 60)
                except Exception as e:  # noqa: BLE001
                    err = (cm.is_oom(e), f"{type(e).__name__}: {e}"[:500], traceback.format_exc()[-3000:],
                           phase["where"])
                if err is None:
                    break
                cm.free_memory(dev)
                if err[0]:
                    if err[3] == "prefill" and sub > 1:
                        sub //= 2
                        notes.append(f"prefill OOM at sub-batch {sub * 2}")
                        continue
                    oom_at.append(B)
                    B //= 2
                    sub = min(sub, B) if B else 0
                    continue
                row = {"batch": B, "context": T, "error": err[1], "traceback": err[2]}
                print(err[2], flush=True)
                break
            if row is None:
                row = {"batch": 0, "context": T, "error": "out of memory even at batch 1"}
            row["requested_batch"] = B0
            if oom_at:
                row["oom_at_batch"] = oom_at
            if notes:
                row["prefill_notes"] = notes
            res.add(row)
            rows.append(row)
            cm.print_table([row], _COLS)
            cm.free_memory(dev)

    # what an HF user gets from generate() with a static cache: transformers compiles the decode
    # forward automatically (torch.compile); batch 1, the smallest context
    if not args.no_static_check and res.time_left() > 150:
        T = contexts[0]
        row = {"check": "generate(cache_implementation='static'), auto torch.compile", "batch": 1,
               "context": T}
        try:
            ctx = torch.randint(0, V, (1, T), device=dev)
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ctx, max_new_tokens=args.new_tokens + 1, min_new_tokens=args.new_tokens + 1,
                               do_sample=False, pad_token_id=0, cache_implementation="static")
            cm.sync(dev)
            row["first_call_s_incl_compile"] = round(time.perf_counter() - t0, 1)
            ms_step, times, got = generate_decode_ms(model, ctx, args.new_tokens, dev,
                                                     cache_implementation="static")
            row.update({"generate_ms_per_token_step": round(ms_step, 3),
                        "generate_tokens_per_s": round(1e3 / ms_step, 1),
                        "generate_total_s": {str(k): round(v, 3) for k, v in times.items()},
                        "generate_new_tokens": got})
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:500]
            row["traceback"] = traceback.format_exc()[-3000:]
        res.add(row)
        rows.append(row)

    cm.print_table([r for r in rows if "check" not in r], _COLS,
                   title=f"HF Qwen2 greedy decode with DynamicCache ({res.obj['device_name']})")
    for r in rows:
        if "check" in r:
            print(r["check"] + ":", {k: v for k, v in r.items() if k not in ("check", "traceback")})
    return 0


_COLS = [("B", "batch", "d"), ("ctx", "context", "d"), ("req B", "requested_batch", "d"),
         ("tok/s", "tokens_per_s", ",.1f"), ("tok/s/seq", "tokens_per_s_per_sequence", ".1f"),
         ("ms/step", "ms_per_token_step", ".2f"), ("KV GiB", "kv_cache_gib_end", ".2f"),
         ("peak dec GiB", "peak_mem_decode_gib", ".2f"), ("peak pre GiB", "peak_mem_prefill_gib", ".2f"),
         ("prefill s", "prefill_s", ".1f"), ("pre sub-B", "prefill_sub_batch", "d"),
         ("generate() ms/step", "generate_ms_per_token_step", ".2f"),
         ("error", "error", None), ("skipped", "skipped", None)]


if __name__ == "__main__":
    sys.exit(main())
