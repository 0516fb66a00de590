#!/usr/bin/env bash
# GPU check in two halves, because the GPU machine has the CUDA toolkit but not the
# Debian -dev packages distilx builds against:
#   STAGE_TARGETS=all scripts/gpu-check.sh stage   (here)  build the CUDA tests, benchmarks and
#                                        the app; copy them with their non-system libraries into .gpu/
#   scripts/gpu-check.sh run     (GPU)   run the CUDA test suites and compute-sanitizer (memcheck
#                                        on the op suites, racecheck on small cases of the kernels
#                                        with shared memory); print a summary table
#   scripts/gpu-check.sh bench   (GPU)   the benchmarks, and the demo on the GPU next to the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
STAGE=${STAGE_DIR:-.gpu}   # where stage puts (and run finds) the binaries
if [ "$mode" = stage ]; then
  set -e
  BUILD=${BUILD_DIR:-build}
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DDISTILX_ENABLE_CUDA=ON -DDISTILX_BUILD_CUDA_BENCH=ON > /dev/null
  # STAGE_TARGETS=all: the tests, every CUDA benchmark and the app (the full check).
  targets=${STAGE_TARGETS:-"distilx_cuda_tests cuda_student_bench"}
  [ "$targets" = all ] && targets="distilx_cuda_tests cuda_student_bench cuda_loss_bench cuda_teacher_bench paper_step_bench distilx_app"
  cmake --build "$BUILD" -j "$(nproc)" --target $targets
  rm -rf "$STAGE" && mkdir -p "$STAGE/lib"
  for f in "$BUILD/tests/distilx_cuda_tests" "$BUILD"/bench/cuda_*_bench "$BUILD/bench/paper_step_bench" \
           "$BUILD/examples/distilx"; do
    [ -x "$f" ] && cp "$f" "$STAGE/"
  done
  for lib in $(ldd "$STAGE"/* 2>/dev/null | awk '/=>/ {print $3}' | sort -u); do
    case "$lib" in */libboost*|*/libpcre2*|*/libgomp*) cp -L "$lib" "$STAGE/lib/" ;; esac
  done
  grep -qx '/.gpu*/' .git/info/exclude || echo '/.gpu*/' >> .git/info/exclude
  du -sh "$STAGE"
  exit 0
fi
export LD_LIBRARY_PATH=$PWD/$STAGE/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
# The app links NCCL: the system's, the toolkit's, or the one PyTorch's wheel brings.
if [ -x "$STAGE/distilx" ] && ldd "$STAGE/distilx" | grep -q "libnccl.so.2 => not found"; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib \
           "$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)"; do
    if [ -n "$d" ] && [ -e "$d/libnccl.so.2" ]; then export LD_LIBRARY_PATH=$d:$LD_LIBRARY_PATH; break; fi
  done
fi
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
if [ "$mode" = bench ]; then
  # What the compiler made of the kernels: registers, spills (LOCAL, LDL/STL), tensor-core instructions.
  if command -v cuobjdump > /dev/null && [ -x "$STAGE/paper_step_bench" ]; then
    python3 scripts/sass_report.py "$STAGE/paper_step_bench" > "$OUT/sass.md" 2>&1
    echo "== kernel resources and SASS (paper_step_bench): $(grep -c '^| [a-z_]' "$OUT/sass.md") kernels"
    grep -E "attention|slstm|mlstm|distill_rows" "$OUT/sass.md" | head -40
  fi
  export DISTILX_DEMO_DIR=$PWD/examples/demo
  # DEMO=0 / PAPER=0 leave out the demo runs / paper_step_bench (to split the work over calls).
  # The demo on the CPU (same binary, most cores) runs beside the GPU work.
  [ "${DEMO:-1}" = 1 ] && (OMP_NUM_THREADS=10 "$STAGE/distilx" demo --device cpu --out /tmp/demo-cpu > "$OUT/demo_cpu.txt" 2>&1; echo "exit $?" >> "$OUT/demo_cpu.txt") &
  export OMP_NUM_THREADS=4
  for b in ${BENCHES:-cuda_student_bench cuda_loss_bench cuda_teacher_bench}; do
    [ -x "$STAGE/$b" ] && { echo "== $b"; "$STAGE/$b" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$b.txt"; }
  done
  # The PyTorch baselines in the same lease (bench/baselines; BASELINES="teacher step decode").
  [ -n "${BASELINES:-}" ] && BASELINES="$BASELINES" bash bench/baselines/run_all.sh "$OUT" > "$OUT/baselines.txt" 2>&1
  if [ "${DEMO:-1}" = 1 ]; then
    for p in fp32 bf16; do
      "$STAGE/distilx" demo --device cuda --precision $p --out /tmp/demo-gpu-$p > "$OUT/demo_gpu_$p.txt" 2>&1
      echo "demo on the GPU ($p): exit $?"
    done
  fi
  [ "${PAPER:-1}" = 1 ] && "$STAGE/paper_step_bench" --out "$OUT/paper_step.json" ${PAPER_ARGS:---short-decode} 2>&1 | tee "$OUT/paper_step.txt"
  wait
  [ -e "$OUT/paper_step.json" ] && python3 bench/compare.py "$OUT" --plot "$OUT/step_phases.png" 2>&1 | tee "$OUT/compare.txt"
  [ "${DEMO:-1}" = 1 ] || exit 0
  echo
  echo "| demo run | distilled ppl | CE-only ppl | teacher ppl | time |"
  echo "|---|---|---|---|---|"
  for f in demo_cpu demo_gpu_fp32 demo_gpu_bf16; do
    d=$(grep "delta-distillation" "$OUT/$f.txt" | awk '{print $(NF-3)}'); c=$(grep "CE only" "$OUT/$f.txt" | awk '{print $(NF-3)}')
    t=$(grep "teacher (Qwen2" "$OUT/$f.txt" | awk '{print $(NF-3)}'); s=$(grep "delta-distillation" "$OUT/$f.txt" | awk '{print $NF}')
    echo "| $f | $d | $c | $t | $s |"
  done
  exit 0
fi
T=$STAGE/distilx_cuda_tests
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
declare -A RESULT
SUITES=${SUITES:-"cuda_ops cuda_slstm cuda_mlstm cuda_student cuda_loss cuda_teacher cuda_precision cuda_distill"}
for suite in $SUITES; do
  if $T --run_test=$suite --report_level=short --log_level=message > "$OUT/$suite.log" 2>&1; then RESULT[$suite]=pass
  else RESULT[$suite]="FAIL"; fi
  echo "== $suite: ${RESULT[$suite]}"; grep -E "worst|error|fail" "$OUT/$suite.log" | head -8
done
san() {  # san TOOL TEST-FILTER
  local log="$OUT/$1_${2//\//_}.log"
  compute-sanitizer --tool "$1" --error-exitcode 9 $T --run_test="$2" > "$log" 2>&1
  local rc=$?
  [ $rc -eq 0 ] && echo "clean ($(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1))" || echo "errors (rc $rc, $log)"
}
if [ -z "${NO_SANITIZERS:-}" ]; then
  # memcheck on the op suites; racecheck on the kernels with shared memory, on small cases
  # (a whole suite under racecheck takes far longer than the GPU lease allows).
  export DISTILX_SKIP_LARGE=1  # the loss suite's paper-size case is too slow under the sanitizers
  for f in cuda_ops cuda_loss cuda_precision cuda_teacher "cuda_slstm/matches_cpu_small_float" \
           "cuda_mlstm/matches_cpu_float_small"; do RESULT[memcheck:$f]=$(san memcheck "$f"); done
  for f in "cuda_slstm/matches_cpu_small_float" "cuda_mlstm/matches_cpu_float_small" \
           "cuda_loss/distill_rows*,alignment*" "cuda_teacher/attention_exact_matches_cpu,attention_tensor_cores_match_cpu" \
           "cuda_ops/headwise_forward_backward*,conv1d_forward_backward_step*"; do
    RESULT[racecheck:$f]=$(san racecheck "$f")
  done
fi
echo
echo "| check | result |"
echo "|---|---|"
for k in $(printf '%s\n' "${!RESULT[@]}" | sort); do echo "| $k | ${RESULT[$k]} |"; done
