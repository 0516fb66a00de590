#!/usr/bin/env bash
# GPU check in two halves, because the GPU machine has the CUDA toolkit but not the
# Debian -dev packages distilx builds against:
#   scripts/gpu-check.sh stage   (here)  build the CUDA tests and benchmark, copy them with
#                                        their non-system libraries into .gpu/
#   scripts/gpu-check.sh run     (GPU)   run the CUDA test suites, compute-sanitizer
#                                        (memcheck on every suite, racecheck on the kernels
#                                        with shared memory) and the benchmark; print a summary
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
STAGE=${STAGE_DIR:-.gpu}   # where stage puts (and run finds) the binaries
if [ "$mode" = stage ]; then
  set -e
  BUILD=${BUILD_DIR:-build}
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DDISTILX_ENABLE_CUDA=ON > /dev/null
  cmake --build "$BUILD" -j "$(nproc)" --target distilx_cuda_tests cuda_student_bench
  rm -rf "$STAGE" && mkdir -p "$STAGE/lib"
  cp "$BUILD/tests/distilx_cuda_tests" "$BUILD/bench/cuda_student_bench" "$STAGE/"
  for lib in $(ldd "$STAGE"/distilx_cuda_tests "$STAGE"/cuda_student_bench | awk '/=>/ {print $3}' | sort -u); do
    case "$lib" in */libboost*|*/libpcre2*|*/libgomp*) cp -L "$lib" "$STAGE/lib/" ;; esac
  done
  grep -qx '/.gpu*/' .git/info/exclude || echo '/.gpu*/' >> .git/info/exclude
  du -sh "$STAGE"
  exit 0
fi
export LD_LIBRARY_PATH=$PWD/$STAGE/lib:${LD_LIBRARY_PATH:-}
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
T=$STAGE/distilx_cuda_tests
declare -A RESULT
for suite in cuda_ops cuda_slstm cuda_mlstm cuda_student; do
  if $T --run_test=$suite --report_level=short --log_level=message > "$OUT/$suite.log" 2>&1; then RESULT[$suite]=pass
  else RESULT[$suite]="FAIL"; fi
  tail -4 "$OUT/$suite.log"
done
san() {  # san TOOL SUITE [FILTER]
  compute-sanitizer --tool "$1" --error-exitcode 9 $T --run_test="$2" > "$OUT/$1_$2.log" 2>&1
  local rc=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/$1_$2.log" | tail -1
  [ $rc -eq 0 ] && echo clean || echo "errors (rc $rc)"
}
for s in cuda_ops cuda_slstm cuda_mlstm; do RESULT[memcheck_$s]=$(san memcheck $s | tail -1); done
for s in cuda_slstm cuda_mlstm; do RESULT[racecheck_$s]=$(san racecheck $s | tail -1); done
"$STAGE"/cuda_student_bench | tee "$OUT/bench.txt"
echo
echo "| check | result |"
echo "|---|---|"
for k in cuda_ops cuda_slstm cuda_mlstm cuda_student memcheck_cuda_ops memcheck_cuda_slstm memcheck_cuda_mlstm racecheck_cuda_slstm racecheck_cuda_mlstm; do
  echo "| $k | ${RESULT[$k]:-n/a} |"
done
grep -h "worst relative error\|ms" "$OUT"/cuda_*.log | head -30
