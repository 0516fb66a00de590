#!/usr/bin/env bash
# The paper's ablations at demo scale, each with the same token budget and seed:
#   Δ-schedule vs fixed α and T; with vs without the alignment (Frobenius) term;
#   2 vs 4 vs 6 student blocks (without alignment: the demo teacher has 4 layers, and the
#   ratio grouping needs at least as many teacher layers as student blocks); and a CE-only
#   student for reference. Runs whose results already exist in OUT are kept (resumable).
# Writes OUT/ablations.md (Markdown table) and overlay plots (OUT/*.png).
# Usage: bench/ablations.sh [DISTILX_BINARY] [OUT_DIR] [STEPS]
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$SRC/build/examples/distilx}
OUT=${2:-ablations}
STEPS=${3:-250}
DEMO=$SRC/examples/demo
mkdir -p "$OUT"
COMMON=(--teacher "$DEMO/teacher" --data "$DEMO/data/train.txt" --val-data "$DEMO/data/heldout.txt"
        --steps "$STEPS" --batch 8 --seq 128 --grad-accum 1 --lr 3e-3 --warmup 0.05 --min-lr-ratio 0.1
        --weight-decay 0.01 --heads 4 --qkv-blocksize 16 --ffn-factor 1.3 --checkpoint-every 0 --keep 1
        --log-every 25 --seed 7 --delta 0.05)
declare -A ARGS=(
  [delta_4blocks]="--blocks 4"
  [fixed_4blocks]="--blocks 4 --schedule fixed"
  [no_alignment_4blocks]="--blocks 4 --alignment none"
  [delta_2blocks]="--blocks 2"
  [no_alignment_2blocks]="--blocks 2 --alignment none"
  [no_alignment_6blocks]="--blocks 6 --alignment none"
  [ce_only_4blocks]="--blocks 4 --schedule fixed --kl-weight 0 --alignment none"
)
ORDER=(delta_4blocks fixed_4blocks no_alignment_4blocks delta_2blocks no_alignment_2blocks no_alignment_6blocks ce_only_4blocks)
for name in "${ORDER[@]}"; do
  if grep -q '"kind":"eval"' "$OUT/$name/metrics.jsonl" 2>/dev/null && [ -f "$OUT/$name.seconds" ]; then
    echo "== $name: kept" >&2
    continue
  fi
  rm -rf "${OUT:?}/$name"
  echo "== $name: ${ARGS[$name]}" >&2
  start=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$BIN" distill "${COMMON[@]}" ${ARGS[$name]} --out "$OUT/$name" > "$OUT/$name.log" 2> "$OUT/$name.err"
  end=$(date +%s.%N)
  python3 -c "print($end - $start)" > "$OUT/$name.seconds"
done
{
  echo "| run | options | held-out ppl | KL(teacher‖student) | top-1 | wall time |"
  echo "|---|---|---|---|---|---|"
  for name in "${ORDER[@]}"; do
    line=$(grep '"kind":"eval"' "$OUT/$name/metrics.jsonl" | tail -1)
    python3 - "$name" "${ARGS[$name]}" "$line" "$(cat "$OUT/$name.seconds")" <<'PY'
import json, sys
name, opts, line, secs = sys.argv[1:5]
e = json.loads(line)
print(f"| {name} | `{opts}` | {e['student_ppl']:.2f} | {e['kl_tau1']:.4f} | {e['top1']:.3f} | {float(secs):.0f} s |")
PY
  done
  t=$(grep '"kind":"eval"' "$OUT/delta_4blocks/metrics.jsonl" | tail -1 | python3 -c 'import json,sys; print("%.2f" % json.loads(sys.stdin.read())["teacher_ppl"])')
  echo
  echo "Teacher (Qwen2, 2.0M parameters) held-out perplexity: $t. $STEPS optimizer steps of 8 × 128 tokens per run, seed 7."
} > "$OUT/ablations.md"
PY=python3; [ -x /usr/bin/python3 ] && PY=/usr/bin/python3
$PY "$SRC/scripts/plot_metrics.py" $(for n in "${ORDER[@]}"; do echo "$OUT/$n"; done) --out "$OUT" >&2 || echo "(plots skipped: matplotlib missing)" >&2
cat "$OUT/ablations.md"
