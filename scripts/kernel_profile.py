#!/usr/bin/env python3
"""Kernel-by-kernel table of one profiled distillation step.

Input: the CSV that Nsight Compute writes for `paper_step_bench --profile`, e.g.

    ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum \
        --csv --print-units base .gpu/paper_step_bench --profile > step.csv
    scripts/kernel_profile.py step.csv [--top 25]

The bench ends each phase with `phase_marker_kernel(<phase>)`; the kernels before marker 1 are
the teacher's, then the student's forward, the loss, the student's backward and the optimizer.
Per phase it prints the summed device time, the number of launches, and the kernels that took
the most time (grouped by name, template arguments dropped). Times are each kernel alone
(serialised by the profiler), so a phase's sum can exceed its time in a normal run, where
small kernels overlap their neighbours' tails.
"""
import csv
import re
import sys
from collections import defaultdict

PHASES = ["teacher forward", "student forward", "loss", "student backward", "optimizer"]


def short_name(name: str) -> str:
    """A kernel's name without its argument list, return type or the namespaces of the library."""
    n = name
    # Drop the parameter list at the outermost level: the last top-level '(...)'.
    depth = 0
    for i, ch in enumerate(n):
        if ch in "<(":
            if ch == "(" and depth == 0:
                n = n[:i]
                break
            depth += 1
        elif ch in ">)":
            depth -= 1
    n = re.sub(r"^void\s+", "", n)
    n = re.sub(r"\bdistilx::(cuda_backend::)?(detail::)?", "", n)
    n = re.sub(r"\(anonymous namespace\)::", "", n)
    if len(n) > 90:
        n = n[:87] + "..."
    return n


def read_rows(path):
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prefixes its own log lines with ==
    rows = list(csv.DictReader(lines))
    out = []
    for r in rows:
        if r.get("Metric Name") not in (None, "gpu__time_duration.sum"):
            continue
        try:
            ns = float(str(r["Metric Value"]).replace(",", ""))
        except (KeyError, ValueError):
            continue
        out.append((r["Kernel Name"], ns, r.get("Grid Size", ""), r.get("Block Size", "")))
    return out


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    top = 25
    if "--top" in argv:
        top = int(argv[argv.index("--top") + 1])
    rows = read_rows(argv[1])
    if not rows:
        print(f"no gpu__time_duration.sum rows in {argv[1]}")
        return 1
    phase = 0
    per = [defaultdict(lambda: [0.0, 0]) for _ in PHASES]
    totals = [0.0] * len(PHASES)
    launches = [0] * len(PHASES)
    for name, ns, _, _ in rows:
        if "phase_marker_kernel" in name:
            phase = min(phase + 1, len(PHASES) - 1)
            continue
        k = short_name(name)
        per[phase][k][0] += ns
        per[phase][k][1] += 1
        totals[phase] += ns
        launches[phase] += 1
    grand = sum(totals)
    print(f"{len(rows)} kernels profiled, {grand / 1e6:.2f} ms of kernel time in all\n")
    print("| phase | kernel time | launches |")
    print("|---|---|---|")
    for p, name in enumerate(PHASES):
        print(f"| {name} | {totals[p] / 1e6:.2f} ms | {launches[p]} |")
    for p, name in enumerate(PHASES):
        if not per[p]:
            continue
        print(f"\n### {name}: {totals[p] / 1e6:.2f} ms in {launches[p]} launches\n")
        print("| kernel | ms | share | launches | µs per launch |")
        print("|---|---|---|---|---|")
        items = sorted(per[p].items(), key=lambda kv: -kv[1][0])
        for k, (ns, cnt) in items[:top]:
            print(f"| `{k}` | {ns / 1e6:.3f} | {100 * ns / totals[p]:.1f} % | {cnt} | {ns / cnt / 1e3:.1f} |")
        rest = items[top:]
        if rest:
            ns = sum(v[0] for _, v in rest)
            cnt = sum(v[1] for _, v in rest)
            print(f"| ({len(rest)} other kernels) | {ns / 1e6:.3f} | {100 * ns / totals[p]:.1f} % | {cnt} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
