#!/usr/bin/env bash
# Multi-GPU (NCCL) check in two halves, like scripts/gpu-check.sh, because the GPU machine has
# the CUDA toolkit but not the Debian -dev packages distilx builds against:
#   scripts/nccl-check.sh stage   (here)  build the NCCL test binary and the GPU-less plumbing
#                                         tests, copy them with their non-system libraries into
#                                         .gpu-nccl/ (git-ignored; carry it to the GPU machine)
#   scripts/nccl-check.sh run     (GPU)   every multi-GPU test (collectives, start-up mismatch,
#                                         gradients with overlapped buckets, ZeRO-1 vs plain AdamW,
#                                         timeout / watchdog / dead-rank paths, optional Distiller
#                                         equivalence and 2 -> 1 GPU resume), an mpirun smoke test
#                                         when Open MPI is there, and the scaling measurement on
#                                         1, 2 (and 4) GPUs; prints summary tables
# Environment: BUILD_DIR (stage, default build-nccl), NO_CONFIGURE=1 (stage: keep BUILD_DIR's
# configuration), JOBS (stage, default 1), DISTILLER=OFF (stage:
# leave out the Distiller equivalence test), OUT (run: log directory, default /tmp/nccl-check),
# BENCH_CASE (distill-bench | bench), BENCH_PRECISION (default bf16), BENCH_STEPS (default 10),
# BENCH_TF32 (bench only, default 1), BENCH_BATCH / BENCH_SEQ (per GPU, default 16 x 512),
# VARIANTS (default "replicate:1 zero1:1", mode:overlap),
# ONLY=tests or ONLY=bench (run one half, e.g. to stay inside a 10-minute command limit).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
STAGE=${STAGE_DIR:-.gpu-nccl}

if [ "$mode" = stage ]; then
  set -e
  BUILD=${BUILD_DIR:-build-nccl}
  # NO_CONFIGURE=1 reuses a build directory configured elsewhere (e.g. gpu-check's, with
  # -DDISTILX_NCCL_DISTILLER_TEST=ON), so the app and the CUDA sources are compiled once.
  if [ -z "${NO_CONFIGURE:-}" ]; then
    cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DDISTILX_ENABLE_CUDA=ON -DDISTILX_CUDA_TEST_ONLY="test_cuda_ops.cu" \
          -DDISTILX_NCCL_DISTILLER_TEST="${DISTILLER:-ON}" > /dev/null
  fi
  cmake --build "$BUILD" -j "${JOBS:-1}" --target distilx_nccl_tests distilx_parallel_env_tests distilx_app
  rm -rf "$STAGE" && mkdir -p "$STAGE/lib"
  cp "$BUILD/tests/nccl/distilx_nccl_tests" "$BUILD/tests/nccl/distilx_parallel_env_tests" "$STAGE/"
  cp "$BUILD/examples/distilx" "$STAGE/distilx"  # the app: --gpus 2, then resume on 1 GPU
  grep -q "^DISTILX_NCCL_DISTILLER_TEST:BOOL=ON" "$BUILD/CMakeCache.txt" && touch "$STAGE/distiller-enabled"
  for lib in $(ldd "$STAGE"/distilx_nccl_tests "$STAGE"/distilx_parallel_env_tests "$STAGE"/distilx | awk '/=>/ {print $3}' | sort -u); do
    case "$lib" in */libboost*|*/libpcre2*|*/libgomp*) cp -L "$lib" "$STAGE/lib/" ;; esac
  done
  grep -qx '/.gpu*/' .git/info/exclude || echo '/.gpu*/' >> .git/info/exclude
  du -sh "$STAGE"
  echo "now, on a 2-GPU machine: scripts/nccl-check.sh run   (carry $STAGE)"
  exit 0
fi

# ---- run (on the GPU machine) ----
# NVLink multicast must stay off on these machines (it can take the shared GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LD_LIBRARY_PATH=$PWD/$STAGE/lib:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/nccl-check}
mkdir -p "$OUT"
[ -x "$STAGE/distilx_nccl_tests" ] || { echo "no $STAGE/distilx_nccl_tests: run 'scripts/nccl-check.sh stage' first and carry $STAGE"; exit 2; }

# libnccl.so.2: the system's, the toolkit's, or the one PyTorch's wheel brings.
if ! ldd "$STAGE/distilx_nccl_tests" | grep -q "libnccl.so.2 => /"; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib \
           "$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)"; do
    if [ -n "$d" ] && [ -e "$d/libnccl.so.2" ]; then export LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH; break; fi
  done
fi
ldd "$STAGE/distilx_nccl_tests" | grep "libnccl" | tee "$OUT/nccl-lib.txt"
if ldd "$STAGE/distilx_nccl_tests" | grep -q "libnccl.so.2 => not found"; then
  echo "libnccl.so.2 not found on this machine (set LD_LIBRARY_PATH)"; exit 2
fi
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
NGPU=$("$STAGE/distilx_nccl_tests" --device-count)
echo "GPUs visible: $NGPU; NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1 || true

PLUMB=skipped; TESTS_RC=skipped; MPI=skipped; APP=skipped
if [ "${ONLY:-all}" != bench ]; then
echo; echo "== GPU-less plumbing tests (launcher environments, rendezvous, launch_local, loader resharding) =="
if "$STAGE/distilx_parallel_env_tests" > "$OUT/parallel_env.log" 2>&1; then PLUMB=pass; else PLUMB="FAIL ($OUT/parallel_env.log)"; fi
tail -1 "$OUT/parallel_env.log"

echo; echo "== multi-GPU tests =="
if [ -e "$STAGE/distiller-enabled" ]; then export DISTILX_NCCL_DISTILLER=1; fi
bash tests/nccl/run_nccl_tests.sh "$STAGE/distilx_nccl_tests" "$OUT/tests" | tee "$OUT/tests.txt"
TESTS_RC=${PIPESTATUS[0]}

if [ -x "$STAGE/distilx" ]; then
  # The app end to end: `distill --gpus 2` on the demo teacher, then the run resumed on 1 GPU
  # with the same global batch (2 x 4 rows -> 1 x 8 rows) from its step-10 checkpoint.
  echo; echo "== distilx distill --gpus 2, then --resume on 1 GPU =="
  rm -rf /tmp/app-gpus2
  common=(--device cuda --precision fp32 --teacher examples/demo/teacher --data examples/demo/data/train.txt
          --val-data examples/demo/data/heldout.txt --out /tmp/app-gpus2 --steps 20 --seq 128 --grad-accum 1
          --blocks 4 --heads 4 --qkv-blocksize 16 --ffn-factor 1.3 --checkpoint-every 10 --keep 5 --log-every 5
          --eval-batches 4 --seed 7)
  if timeout 300 "$STAGE/distilx" distill "${common[@]}" --gpus 2 --batch 4 > "$OUT/app_gpus2.log" 2>&1 \
     && rm -f /tmp/app-gpus2/ckpt_20.dxc \
     && timeout 300 "$STAGE/distilx" distill "${common[@]}" --gpus 1 --batch 8 --resume > "$OUT/app_resume1.log" 2>&1; then
    APP=pass
  else APP="FAIL ($OUT/app_gpus2.log, $OUT/app_resume1.log)"; fi
  grep -h "perplexity\|resumed\|error" "$OUT"/app_gpus2.log "$OUT"/app_resume1.log 2>/dev/null | tail -5
fi

if command -v mpirun > /dev/null 2>&1 && mpirun --version 2>&1 | grep -q "Open MPI"; then
  echo; echo "== mpirun -np 2 (Open MPI environment detection, id file keyed by the job) =="
  if timeout 300 mpirun -np 2 --allow-run-as-root --oversubscribe -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH \
       "$STAGE/distilx_nccl_tests" --case=collectives > "$OUT/mpirun.log" 2>&1; then MPI=pass
  else MPI="FAIL ($OUT/mpirun.log)"; fi
  tail -3 "$OUT/mpirun.log"
fi

fi

declare -A TPS STEP MEM
# VARIANTS limits the scaling runs (mode:overlap pairs, e.g. "replicate:1 replicate:0 zero1:1").
VARIANT_LIST=()
for v in ${VARIANTS:-replicate:1 zero1:1}; do VARIANT_LIST+=("${v/:/ }"); done
counts="1"
if [ "${ONLY:-all}" != tests ]; then
# BENCH_CASE=distill-bench (default): the whole paper-scale distillation step (Qwen2.5-1.5B-shaped
# teacher, paper student, vocabulary loss; BENCH_PRECISION, default bf16); BENCH_CASE=bench: the
# student's training step alone (BENCH_TF32).
BENCH_CASE=${BENCH_CASE:-distill-bench}
[ -e "$STAGE/distiller-enabled" ] || BENCH_CASE=bench
echo; echo "== scaling ($BENCH_CASE): per-GPU batch ${BENCH_BATCH:-16} x ${BENCH_SEQ:-512} =="
for g in 2 4 8; do [ "$NGPU" -ge $g ] && counts="$counts $g"; done
for variant in "${VARIANT_LIST[@]}"; do
  set -- $variant
  m=$1; ov=$2
  for g in $counts; do
    if [ "$BENCH_CASE" = bench ]; then prec=(--tf32=${BENCH_TF32:-1}); else prec=(--precision=${BENCH_PRECISION:-bf16}); fi
    line=$(timeout 600 "$STAGE/distilx_nccl_tests" --case=$BENCH_CASE --gpus=$g --zero1=$([ "$m" = zero1 ] && echo 1 || echo 0) \
             --overlap=$ov "${prec[@]}" --steps=${BENCH_STEPS:-10} --warmup=2 --batch=${BENCH_BATCH:-16} \
             --seq=${BENCH_SEQ:-512} 2>&1 | tee "$OUT/bench_${m}_ov${ov}_g${g}.log" | grep "^RESULT")
    echo "${line:-no result (see $OUT/bench_${m}_ov${ov}_g${g}.log)}"
    k="$m/$ov/$g"
    TPS[$k]=$(sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p' <<< "$line")
    STEP[$k]=$(sed -n 's/.*step_ms=\([0-9.]*\).*/\1/p' <<< "$line")
    MEM[$k]=$(sed -n 's/.*mem_gib=\([0-9.]*\).*/\1/p' <<< "$line")
  done
done
fi

if [ "${ONLY:-all}" != tests ]; then
echo
echo "| mode | overlap | GPUs | step ms | tokens/s | speedup | efficiency | GPU mem GiB |"
echo "|---|---|---|---|---|---|---|---|"
for variant in "${VARIANT_LIST[@]}"; do
  set -- $variant
  base=${TPS[$1/$2/1]:-}
  for g in $counts; do
    t=${TPS[$1/$2/$g]:-}
    if [ -n "$t" ] && [ -n "$base" ]; then
      read -r sp ef <<< "$(awk -v t="$t" -v b="$base" -v g="$g" 'BEGIN { printf "%.2f %.1f%%", t / b, 100 * t / b / g }')"
    else sp=n/a; ef=n/a; fi
    echo "| $1 | $([ "$2" = 1 ] && echo on || echo off) | $g | ${STEP[$1/$2/$g]:-n/a} | ${t:-n/a} | ${sp} | ${ef} | ${MEM[$1/$2/$g]:-n/a} |"
  done
done
echo "targets: >= 1.8x on 2 GPUs, >= 3.4x on 4 GPUs (replicate, overlap on)"
fi

echo
echo "| check | result |"
echo "|---|---|"
echo "| plumbing (GPU-less) | $PLUMB |"
case "$TESTS_RC" in 0) T=pass ;; 77|skipped) T=skipped ;; *) T="FAIL (rc $TESTS_RC)" ;; esac
echo "| multi-GPU tests | $T |"
echo "| mpirun smoke test | $MPI |"
echo "| app: distill --gpus 2, resume on 1 GPU | $APP |"
echo "logs: $OUT"
