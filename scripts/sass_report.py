#!/usr/bin/env python3
"""Per-kernel resource and instruction report of a CUDA binary (run where cuobjdump is, e.g. the
GPU machine): registers, stack and local memory (spills), shared memory, and counts of tensor-core
(HMMA / HGMMA), local-memory (LDL / STL) and total SASS instructions, for distilx's kernels.

    python3 scripts/sass_report.py .gpu/paper_step_bench [--filter attention,slstm,mlstm]
"""
import argparse
import collections
import re
import shutil
import subprocess
import sys


def demangle(names):
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name):
    # "void distilx::cuda_backend::kernels::foo<float, 4>(args...)" -> "foo<float, 4>"
    name = re.sub(r"^void ", "", name)
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    return re.sub(r"^(distilx::)?(cuda_backend::)?(kernels::)?(detail::)?", "", name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--filter", default="", help="comma list of substrings of kernel names to keep")
    a = ap.parse_args()
    if not shutil.which("cuobjdump"):
        sys.exit("sass_report: cuobjdump not found (it comes with the full CUDA toolkit)")
    res = subprocess.run(["cuobjdump", "-res-usage", a.binary], capture_output=True, text=True).stdout
    usage = {}
    fn = None
    for line in res.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            usage[fn] = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            fn = None
    sass = subprocess.run(["cuobjdump", "-sass", a.binary], capture_output=True, text=True).stdout
    counts = collections.defaultdict(collections.Counter)
    fn = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            continue
        if fn is None:
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if not m:
            continue
        op = m.group(2).split(".")[0]
        c = counts[fn]
        c["total"] += 1
        if op in ("HMMA", "HGMMA", "IMMA", "DMMA"):
            c[op] += 1
        if op in ("LDL", "STL"):
            c["local"] += 1
    names = sorted(set(usage) | set(counts))
    full = demangle(names)
    keep = [s for s in a.filter.split(",") if s]
    print(f"| kernel | REG | STACK | LOCAL | SHARED | HMMA | HGMMA | LDL/STL | SASS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in names:
        pretty = full.get(n, n)
        if "distilx" not in pretty:
            continue
        if keep and not any(k in pretty for k in keep):
            continue
        u, c = usage.get(n, {}), counts.get(n, collections.Counter())
        print(f"| {short(pretty)[:90]} | {u.get('REG', '?')} | {u.get('STACK', '?')} | {u.get('LOCAL', '?')} | "
              f"{u.get('SHARED', '?')} | {c['HMMA']} | {c['HGMMA']} | {c['local']} | {c['total']} |")


if __name__ == "__main__":
    main()
