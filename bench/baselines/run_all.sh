#!/usr/bin/env bash
# Runs the three PyTorch baselines, writing OUTDIR/{hf_teacher_forward,torch_distill_step,hf_decode}.json
# and a .log per script. Keeps going when one fails; exits non-zero if any failed.
#
#   bash bench/baselines/run_all.sh OUTDIR
#
# Environment (all optional):
#   PYTHON=python3                      interpreter (the GPU machine's, with torch 2.x and transformers)
#   BASELINES="teacher step decode"     which ones to run, in this order
#   QUICK=1                             pass --quick (tiny shapes) to every script
#   TEACHER_ARGS / STEP_ARGS / DECODE_ARGS   extra arguments for one script (e.g. "--budget-s 300")
set -u
OUT=${1:?usage: run_all.sh OUTDIR}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
Q=""
[ "${QUICK:-0}" = "1" ] && Q="--quick"
fail=0
for b in ${BASELINES:-teacher step decode}; do
  case "$b" in
    teacher) script=hf_teacher_forward; extra=${TEACHER_ARGS:-} ;;
    step)    script=torch_distill_step; extra=${STEP_ARGS:-} ;;
    decode)  script=hf_decode;          extra=${DECODE_ARGS:-} ;;
    *) echo "run_all.sh: unknown baseline '$b'" >&2; fail=1; continue ;;
  esac
  echo "=== $script $Q $extra ($(date -Is))"
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "$PY" "$HERE/$script.py" --out "$OUT/$script.json" $Q $extra 2>&1 | tee "$OUT/$script.log"
  rc=${PIPESTATUS[0]}
  echo "=== $script exit $rc after $(( $(date +%s) - t0 )) s"
  [ "$rc" -ne 0 ] && fail=1
done
exit $fail
