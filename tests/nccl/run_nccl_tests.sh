#!/usr/bin/env bash
# Runs every multi-GPU case of distilx_nccl_tests and checks the fault cases' exit codes and
# messages. Exit 0: all passed; 1: a failure; 77: fewer than 2 GPUs (ctest reports "skipped").
#   tests/nccl/run_nccl_tests.sh path/to/distilx_nccl_tests [log dir]
# DISTILX_NCCL_DISTILLER=1 adds the Distiller equivalence cases (binary built with
# -DDISTILX_NCCL_DISTILLER_TEST=ON).
set -uo pipefail
BIN=${1:?usage: run_nccl_tests.sh path/to/distilx_nccl_tests [log dir]}
LOG=${2:-$(mktemp -d -t distilx-nccl-XXXXXX)}
mkdir -p "$LOG"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}   # NVLink multicast stays off (GPU machine requirement)
# Isolated from the caller's launcher variables: the cases start their own ranks.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE DISTILX_LAUNCHED DISTILX_NCCL_ID_FILE OMPI_COMM_WORLD_RANK \
      OMPI_COMM_WORLD_SIZE SLURM_STEP_NUM_TASKS SLURM_PROCID

NGPU=$("$BIN" --device-count 2>/dev/null || echo 0)
if [ "${NGPU:-0}" -lt 2 ]; then
  echo "nccl tests skipped: $NGPU GPU(s) visible, 2 needed"
  exit 77
fi

declare -a NAMES RESULTS
record() { NAMES+=("$1"); RESULTS+=("$2"); printf '%-52s %s\n' "$1" "$2"; }

# Plain cases: exit 0 on every rank.
for c in collectives mismatch gradients zero1; do
  if timeout 600 "$BIN" --case=$c --gpus=2 > "$LOG/$c.log" 2>&1; then record "$c" pass
  else record "$c" "FAIL (rc $?, $LOG/$c.log)"; grep -h "FAIL\|exception" "$LOG/$c.log" | head -5; fi
done

# Where 4 GPUs are visible, the collectives, the gradient reduction (both modes, overlapped
# buckets) and ZeRO-1's sharded AdamW again with 4 ranks (shards of a quarter, odd remainders).
if [ "$NGPU" -ge 4 ]; then
  for c in collectives mismatch gradients zero1; do
    if timeout 600 "$BIN" --case=$c --gpus=4 > "$LOG/${c}_4.log" 2>&1; then record "$c (4 GPUs)" pass
    else record "$c (4 GPUs)" "FAIL (rc $?, $LOG/${c}_4.log)"; grep -h "FAIL\|exception" "$LOG/${c}_4.log" | head -5; fi
  done
fi

# A rank skips a collective: the waiting rank throws within the deadline (checked inside).
t0=$(date +%s)
if DISTILX_NCCL_TIMEOUT=5 timeout 120 "$BIN" --case=timeout --gpus=2 > "$LOG/timeout.log" 2>&1; then
  record "timeout (deadline 5 s, $(( $(date +%s) - t0 )) s)" pass
else record "timeout" "FAIL (rc $?, $LOG/timeout.log)"; grep -h "FAIL\|exception" "$LOG/timeout.log" | head -5; fi
# The main thread is stuck in a CUDA call behind buckets a peer never joins: the watchdog aborts
# and the rank throws its reason (exit 0 after the checks inside), or, where the driver keeps the
# watchdog itself blocked, the process ends with code 86 and a message naming the rank, within
# the deadline plus the abort grace (DISTILX_NCCL_ABORT_GRACE, 10 s here).
t0=$(date +%s)
DISTILX_NCCL_TIMEOUT=5 DISTILX_NCCL_ABORT_GRACE=10 timeout 120 "$BIN" --case=watchdog --gpus=2 > "$LOG/watchdog.log" 2>&1
rc=$?
dt=$(( $(date +%s) - t0 ))
if [ $rc -eq 0 ]; then record "watchdog (deadline 5 s, ${dt} s)" pass
elif [ $rc -eq 86 ] && grep -q "rank 0 of 2" "$LOG/watchdog.log" && [ $dt -lt 60 ]; then
  record "watchdog (rank 0 ended with code 86 after ${dt} s)" pass
  grep -h "exiting with code 86" "$LOG/watchdog.log" | head -1 | cut -c1-200
else record "watchdog" "FAIL (rc $rc, ${dt} s, $LOG/watchdog.log)"; grep -h "FAIL\|exception\|distilx" "$LOG/watchdog.log" | head -5; fi

# Rank 1 exits with code 7 under launch_local: the launcher stops rank 0 and names rank 1.
t0=$(date +%s)
DISTILX_NCCL_TIMEOUT=30 timeout 120 "$BIN" --case=die --gpus=2 > "$LOG/die_launcher.log" 2>&1
rc=$?
dt=$(( $(date +%s) - t0 ))
if [ $rc -eq 7 ] && grep -q "rank 1 of 2 (pid [0-9]*) exited with code 7" "$LOG/die_launcher.log" && [ $dt -lt 60 ]; then
  record "die under launch_local (${dt} s)" pass
else record "die under launch_local" "FAIL (rc $rc, ${dt} s, $LOG/die_launcher.log)"; fi

# Same without a launcher watching (torchrun-style variables, two independent processes):
# rank 0 must end by itself with an nccl_error naming it, within the deadline.
ID=$(mktemp -d)/nccl-id
t0=$(date +%s)
RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 DISTILX_NCCL_ID_FILE=$ID DISTILX_NCCL_TIMEOUT=10 \
  timeout 120 "$BIN" --case=die > "$LOG/die_env_r1.log" 2>&1 &
p1=$!
RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 DISTILX_NCCL_ID_FILE=$ID DISTILX_NCCL_TIMEOUT=10 \
  timeout 120 "$BIN" --case=die > "$LOG/die_env_r0.log" 2>&1
rc0=$?
wait $p1
rc1=$?
dt=$(( $(date +%s) - t0 ))
if [ $rc1 -eq 7 ] && [ $rc0 -ne 0 ] && [ $rc0 -ne 124 ] && grep -q "rank 0 of 2" "$LOG/die_env_r0.log" && [ $dt -lt 60 ]; then
  record "die without a launcher (rank 0 rc $rc0, ${dt} s)" pass
  grep -h "rank 0 of 2" "$LOG/die_env_r0.log" | head -1 | cut -c1-200
else record "die without a launcher" "FAIL (rc $rc0/$rc1, ${dt} s, $LOG/die_env_r0.log)"; fi

# The end-to-end Distiller: N GPUs reproduce 1 GPU; ZeRO-1 matches plain data parallel;
# a run checkpointed on 2 GPUs resumes on 1.
if [ "${DISTILX_NCCL_DISTILLER:-0}" = 1 ]; then
  D=$LOG/distiller
  rm -rf "$D" && mkdir -p "$D"
  run() {  # name, args...
    local name=$1; shift
    if timeout 900 "$BIN" --case=distiller "$@" > "$D/$name.log" 2>&1; then record "distiller: $name" pass
    else record "distiller: $name" "FAIL (rc $?, $D/$name.log)"; grep -h "FAIL\|exception\|error" "$D/$name.log" | head -5; fi
  }
  run "1 GPU reference, 20 steps" --gpus=1 --max-steps=20 --out=$D/ref.txt
  run "2 GPUs match 1 GPU (1e-5)" --gpus=2 --max-steps=20 --out=$D/dp.txt --reference=$D/ref.txt
  run "2 GPUs ZeRO-1 match plain DP" --gpus=2 --zero1=1 --max-steps=20 --out=$D/z.txt --reference=$D/dp.txt
  run "2 GPUs checkpoint at step 10" --gpus=2 --max-steps=20 --stop-at=10 --run-dir=$D/ck2 --out=$D/first10.txt --reference=$D/ref.txt
  # Same global batch (4 rows on 1 GPU): the resumed curve must continue the reference's.
  run "resume the 2-GPU checkpoint on 1 GPU (global batch kept)" --gpus=1 --max-steps=20 --resume=$D/ck2 --out=$D/resumed.txt --reference=$D/ref.txt
  # Same rows per GPU on 1 GPU halves the global batch: refused, naming the global batch and the fix.
  run "2 GPUs x 2 rows, checkpoint at step 10" --gpus=2 --rank-batch=2 --max-steps=20 --stop-at=10 --run-dir=$D/ckb
  if timeout 300 "$BIN" --case=distiller --gpus=1 --rank-batch=2 --max-steps=20 --resume=$D/ckb > "$D/resb.log" 2>&1; then
    record "resume it on 1 GPU x 2 rows is refused" "FAIL (it resumed; $D/resb.log)"
  elif grep -q "data.batch_size: 4 -> 2" "$D/resb.log" && grep -q "keep it: give each rank" "$D/resb.log"; then
    record "resume it on 1 GPU x 2 rows is refused (global batch 4 -> 2)" pass
  else record "resume it on 1 GPU x 2 rows is refused" "FAIL (no clear message; $D/resb.log)"; fi
  run "2 GPUs ZeRO-1 checkpoint at step 10" --gpus=2 --zero1=1 --max-steps=20 --stop-at=10 --run-dir=$D/ckz --out=$D/z10.txt --reference=$D/ref.txt
  run "resume the ZeRO-1 checkpoint on 1 GPU" --gpus=1 --max-steps=20 --resume=$D/ckz --out=$D/zres.txt --reference=$D/ref.txt
  if [ "$NGPU" -ge 4 ]; then
    # One row per rank: the same global batch of 4 on 4 GPUs.
    run "4 GPUs match 1 GPU (1e-5)" --gpus=4 --max-steps=20 --out=$D/dp4.txt --reference=$D/ref.txt
    run "4 GPUs ZeRO-1 match plain DP" --gpus=4 --zero1=1 --max-steps=20 --out=$D/z4.txt --reference=$D/dp4.txt
    run "4 GPUs ZeRO-1 checkpoint at step 10" --gpus=4 --zero1=1 --max-steps=20 --stop-at=10 --run-dir=$D/ckz4 --out=$D/z4_10.txt --reference=$D/ref.txt
    # Optimizer shards of a quarter regathered and cut in halves.
    run "resume the 4-GPU ZeRO-1 checkpoint on 2 GPUs (ZeRO-1)" --gpus=2 --zero1=1 --max-steps=20 --resume=$D/ckz4 --out=$D/z4res2.txt --reference=$D/ref.txt
  fi
fi

echo
echo "| NCCL test | result |"
echo "|---|---|"
fail=0
for i in "${!NAMES[@]}"; do
  echo "| ${NAMES[$i]} | ${RESULTS[$i]} |"
  case "${RESULTS[$i]}" in pass) ;; *) fail=1 ;; esac
done
echo "logs: $LOG"
exit $fail
