#!/usr/bin/env python3
"""Table of distilx's paper-scale numbers (paper_step_bench --out) against the PyTorch
baselines (bench/baselines/*.json from the same run), with ratios, and a plot of the step's
phase breakdown.

    python3 bench/compare.py OUTDIR            # reads OUTDIR/paper_step.json and OUTDIR/*.json baselines
    python3 bench/compare.py OUTDIR --plot step_phases.png
"""
import argparse
import json
import os
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def rows_of(obj):
    return obj.get("rows", []) if obj else []


def pick(rows, **kw):
    for r in rows:
        if all(str(r.get(k)) == str(v) for k, v in kw.items()):
            return r
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--plot", default="")
    a = ap.parse_args()
    ours = load(os.path.join(a.outdir, "paper_step.json"))
    if not ours:
        sys.exit("no paper_step.json in " + a.outdir)
    teacher = rows_of(load(os.path.join(a.outdir, "hf_teacher_forward.json")))
    step = rows_of(load(os.path.join(a.outdir, "torch_distill_step.json")))
    print(f"device: {ours.get('device')}; bf16 GEMM rate in this run (MFU denominator): "
          f"{ours.get('mfu_denominator_tflops', 0):.0f} TFLOP/s\n")
    print("| math | B x T | teacher fwd ms | student fwd ms | loss ms | backward ms | optimizer ms | "
          "Distiller::step ms | tokens/s | MFU | peak allocated GiB (weights) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ours.get("steps", []):
        print(f"| {r['mode']} | {r['B']} x {r['T']} | {r['teacher_forward_ms']:.1f} | {r['student_forward_ms']:.1f} | "
              f"{r['loss_ms']:.1f} | {r['student_backward_ms']:.1f} | {r['optimizer_ms']:.1f} | "
              f"{r['distiller_step_ms']:.1f} | {r['distiller_tokens_per_s']:.0f} | {100 * r['mfu']:.1f}% | "
              f"{r.get('peak_allocated_gib', r.get('peak_reserved_gib', 0)):.1f} "
              f"({r.get('weights_allocated_gib', 0):.1f}) |")
    print("\n| comparison (same run) | distilx | PyTorch | ratio |")
    print("|---|---|---|---|")
    for r in ours.get("steps", []):
        if r["mode"] != "bf16":
            continue
        shape = f"B{r['B']}xT{r['T']}"
        t = pick(teacher, batch=r["B"], seq_len=r["T"])
        if t and t.get("tokens_per_s"):
            print(f"| teacher forward {shape} | {r['teacher_tokens_per_s']:.0f} tok/s | {t['tokens_per_s']:.0f} tok/s (HF) | "
                  f"{r['teacher_tokens_per_s'] / t['tokens_per_s']:.2f}x |")
        for mode in ("eager", "compile"):
            s = pick(step, mode=mode, batch=r["B"], seq_len=r["T"])
            if s and s.get("tokens_per_s"):
                print(f"| distillation step {shape} vs {mode} | {r['distiller_tokens_per_s']:.0f} tok/s | "
                      f"{s['tokens_per_s']:.0f} tok/s | {r['distiller_tokens_per_s'] / s['tokens_per_s']:.1f}x |")
    dec = ours.get("decode", [])
    if dec:
        print("\n| student decode | ms/step | tokens/s | device GiB |")
        print("|---|---|---|---|")
        for d in dec:
            print(f"| batch {d['batch']} at context {d['context']} | {d['ms_per_step']:.3f} | {d['tokens_per_s']:.0f} | "
                  f"{d['used_gib']:.2f} |")
    if a.plot:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("(matplotlib missing: no plot)")
            return
        phases = [("teacher_forward_ms", "teacher forward"), ("student_forward_ms", "student forward"),
                  ("loss_ms", "loss"), ("student_backward_ms", "student backward"), ("optimizer_ms", "optimizer")]
        rs = ours.get("steps", [])
        labels = [f"{r['mode']}\n{r['B']}x{r['T']}" for r in rs]
        fig, ax = plt.subplots(figsize=(1.6 * max(3, len(rs)) + 2, 4))
        bottom = [0.0] * len(rs)
        for key, name in phases:
            vals = [r[key] for r in rs]
            ax.bar(labels, vals, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("ms per 8192-token step")
        ax.set_title(f"distilx paper-scale step on {ours.get('device')}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print("plot:", a.plot)


if __name__ == "__main__":
    main()
