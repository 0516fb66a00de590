#!/usr/bin/env python3
"""PNG curves from distilx runs: loss terms, perplexity, schedules.

Usage: plot_metrics.py RUN_DIR [RUN_DIR...] [--out DIR]
Reads each run's metrics.csv (written by `distilx distill`); several runs are overlaid,
labelled by their directory names. Needs matplotlib (Debian: python3-matplotlib).
"""
import argparse
import csv
import math
import os
import sys


def load(run):
    path = os.path.join(run, "metrics.csv")
    if not os.path.exists(path):
        sys.exit(f"plot_metrics: {path} not found (is {run} a distilx run directory?)")
    steps, evals = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            (steps if row["kind"] == "step" else evals).append(row)
    return steps, evals


def col(rows, key):
    out = []
    for r in rows:
        try:
            out.append(float(r[key]))
        except (ValueError, KeyError, TypeError):
            out.append(math.nan)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out")
    a = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_metrics: matplotlib is missing (Debian: apt-get install python3-matplotlib)")
    out = a.out or a.runs[0]
    os.makedirs(out, exist_ok=True)
    data = {os.path.basename(os.path.normpath(r)) or r: load(r) for r in a.runs}

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for (name, (st, _)), in zip(data.items()):
        x = col(st, "step")
        for ax, key in zip(axes.flat, ["total", "kl", "ce", "alignment"]):
            ax.plot(x, col(st, key), label=name, linewidth=1)
            ax.set_title(key if key != "total" else "total loss")
            ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "losses.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (st, ev) in data.items():
        ax.plot(col(st, "step"), col(st, "perplexity"), label=f"{name}: train (batch)", linewidth=0.8, alpha=0.7)
        if ev:
            ax.plot(col(ev, "step"), col(ev, "student_ppl"), "o-", label=f"{name}: held-out")
            tp = col(ev, "teacher_ppl")
            ax.axhline(tp[-1], linestyle="--", color="gray", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("perplexity (dashed: teacher, held-out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "perplexity.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (st, _) in data.items():
        x = col(st, "step")
        for key in ["tau", "w_kl", "w_al", "w_ce"]:
            axes[0].plot(x, col(st, key), label=f"{name}: {key}", linewidth=1)
        axes[1].plot(x, col(st, "lr"), label=name, linewidth=1)
    axes[0].set_title("Δ-distillation schedules")
    axes[0].legend(fontsize=7)
    axes[1].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "schedules.png"), dpi=110)
    plt.close(fig)
    print(f"wrote {out}/losses.png, perplexity.png, schedules.png")


if __name__ == "__main__":
    main()
