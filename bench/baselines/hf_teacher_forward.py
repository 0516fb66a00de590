#!/usr/bin/env python3
"""Baseline (a): Hugging Face Qwen2ForCausalLM forward with all hidden states, the distillation
teacher's job.

Qwen2.5-1.5B shapes (28 layers, hidden 1536, FFN 8960, 12 query / 2 KV heads of 128, vocab 151936,
tied, rope_theta 1e6, RMS eps 1e-6), random init, bf16, attn_implementation "sdpa",
output_hidden_states=True, torch.no_grad(), eager (no torch.compile). B 16 x T 512 and B 4 x T 2048.
Warm-up, then timed iterations between CUDA events. TFLOP/s use performance.md's FLOPs per token
(3.131 G at T 512, 3.263 G at T 2048, LM head and attention included).

    python3 bench/baselines/hf_teacher_forward.py --out teacher.json
    python3 bench/baselines/hf_teacher_forward.py --quick
"""

import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as cm  # noqa: E402


def measure(model, B, T, V, dev, warmup, iters):
    gen = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, V, (B, T), generator=gen).to(dev)
    with torch.no_grad():
        for _ in range(warmup):
            out = model(input_ids=idx, output_hidden_states=True)
            del out
        cm.reset_peak(dev)
        base = cm.allocated_gib(dev)
        times = []
        n_hidden = None
        for _ in range(iters):
            tm = cm.PhaseTimer(dev)
            tm.start()
            out = model(input_ids=idx, output_hidden_states=True)
            tm.mark("fwd")
            n_hidden = len(out.hidden_states)
            logits_dtype = str(out.logits.dtype)
            del out
            times.append(tm.result_ms()["fwd"])
    return cm.median(times), min(times), cm.peak_gib(dev), base, n_hidden, logits_dtype


def main(argv=None) -> int:
    ap = cm.base_parser(__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None, help="comma list BxT (default 16x512,4x2048)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    dev = cm.pick_device(args)
    res = cm.Results("hf_teacher_forward", args, dev)
    if not cm.have_transformers():
        res.note("transformers is not installed; nothing to measure")
        return 2
    shape = cm.QWEN_TINY if args.quick else cm.QWEN25_15B
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = [(2, 64), (1, 128)] if args.quick else [(16, 512), (4, 2048)]
    if args.quick:
        args.warmup, args.iters = 1, 2
    if dev.type == "cuda":
        res.set("gemm_bf16_8192_tflops", cm.measure_gemm_tflops(dev))
    t0 = time.time()
    model = cm.build_teacher(shape, dev)
    res.set("teacher", cm.teacher_description(model))
    res.set("build_s", round(time.time() - t0, 1))
    res.set("mode", "eager, torch.no_grad(), bf16 weights, output_hidden_states=True")
    V = shape["vocab_size"]
    rows = []
    for B0, T in shapes:
        B, oom_at, row = B0, [], None
        while B >= 1:
            err = None
            try:
                med, best, peak, base, nh, ldt = measure(model, B, T, V, dev, args.warmup, args.iters)
                fpt = cm.teacher_fwd_flops_per_token(shape, T)
                row = {"batch": B, "seq_len": T, "tokens": B * T, "ms": round(med, 2), "ms_min": round(best, 2),
                       "tokens_per_s": round(B * T / (med / 1e3), 1),
                       "tflops_per_s": round(fpt * B * T / (med / 1e3) / 1e12, 1),
                       "flops_per_token_G": round(fpt / 1e9, 3),
                       "peak_mem_gib": peak, "weights_and_inputs_gib": base,
                       "hidden_states_returned": nh, "logits_dtype": ldt,
                       "warmup": args.warmup, "iters": args.iters}
                g = res.obj.get("gemm_bf16_8192_tflops")
                if g:
                    row["mfu_vs_measured_gemm"] = round(row["tflops_per_s"] / g, 3)
            except Exception as e:  # noqa: BLE001
                err = (cm.is_oom(e), f"{type(e).__name__}: {e}"[:500], traceback.format_exc()[-3000:])
            if err is None:
                break
            cm.free_memory(dev)
            if err[0]:
                oom_at.append(B)
                B //= 2
                continue
            row = {"batch": B, "seq_len": T, "error": err[1], "traceback": err[2]}
            print(err[2], flush=True)
            break
        if row is None:
            row = {"batch": 0, "seq_len": T, "error": "out of memory even at batch 1"}
        row["requested_batch"] = B0
        if oom_at:
            row["oom_at_batch"] = oom_at
        res.add(row)
        rows.append(row)
        cm.free_memory(dev)
    cm.print_table(rows, [("B", "batch", "d"), ("T", "seq_len", "d"), ("ms", "ms", ".2f"),
                          ("tok/s", "tokens_per_s", ",.0f"), ("TFLOP/s", "tflops_per_s", ".1f"),
                          ("MFU(gemm)", "mfu_vs_measured_gemm", ".2f"), ("peak GiB", "peak_mem_gib", ".2f"),
                          ("error", "error", None)],
                   title=f"HF {res.obj['teacher']['class']} forward + hidden states "
                         f"({res.obj['device_name']}, GEMM ceiling {res.obj.get('gemm_bf16_8192_tflops')} TFLOP/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
