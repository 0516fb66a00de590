#!/usr/bin/env bash
# End-to-end tests of the distilx app: exit codes and messages, config files,
# a short distillation on the bundled demo teacher, exact resume (also after
# Ctrl-C), generate determinism, export -> import round trip, bad input.
# Usage: cli_tests.sh DISTILX_BINARY SOURCE_DIR WORK_DIR
set -u
BIN=$1; SRC=$2; WORK=$3
TEACHER=$SRC/examples/demo/teacher
rm -rf "$WORK"; mkdir -p "$WORK"; cd "$WORK" || exit 1
head -c 60000 "$SRC/examples/demo/data/train.txt" > train.txt
head -c 12000 "$SRC/examples/demo/data/heldout.txt" > val.txt
pass=0; fail=0
ok() { pass=$((pass + 1)); echo "ok   $1"; }
bad() { fail=$((fail + 1)); echo "FAIL $1"; [ -n "${2:-}" ] && sed 's/^/     | /' "$2" | head -20; }
expect() {  # expect NAME RC CMD...  (stdout -> NAME.out, stderr -> NAME.err)
  local name=$1 want=$2; shift 2
  "$@" > "$name.out" 2> "$name.err"; local rc=$?
  if [ "$rc" -eq "$want" ]; then ok "$name (exit $rc)"; else bad "$name: exit $rc, expected $want" "$name.err"; fi
}
has() { if grep -q -- "$2" "$3"; then ok "$1"; else bad "$1: '$2' not in $3" "$3"; fi; }
# Options repeated on the command line are usage errors, so the shared part leaves out what tests vary.
BASE=(--val-data val.txt --batch 2 --seq 32 --grad-accum 1 --blocks 2 --heads 4 --qkv-blocksize 16 --ffn-factor 1.3
      --warmup 2 --keep 5 --seed 3 --threads 1)
SMALL=(--teacher "$TEACHER" --data train.txt --steps 6 --lr 2e-3 --checkpoint-every 3 "${BASE[@]}")

expect help 0 "$BIN" --help;                  has help_text "Usage: distilx" help.out
expect version 0 "$BIN" --version;            has version_text "distilx 0." version.out
expect distill_help 0 "$BIN" distill --help;  has distill_help_text "--teacher" distill_help.out
expect bad_flag 2 "$BIN" distill --no-such-flag; has bad_flag_msg "no-such-flag" bad_flag.err
expect bad_command 2 "$BIN" frobnicate;       has bad_command_msg "unknown command" bad_command.err
expect missing_teacher 1 "$BIN" distill --teacher "$WORK/nope" --data train.txt --out r0
has missing_teacher_msg "does not exist" missing_teacher.err
[ "$(wc -l < missing_teacher.err)" -eq 1 ] && ok "missing_teacher one line" || bad "missing_teacher: not one line" missing_teacher.err

# Device options: usage errors exit 2; a GPU run where there is no GPU (or no CUDA build) fails
# with one clear line (exit 1).
expect bad_device 2 "$BIN" distill "${SMALL[@]}" --out rdev --device tpu; has bad_device_msg "device must be cpu or cuda" bad_device.err
expect precision_on_cpu 2 "$BIN" distill "${SMALL[@]}" --out rdev --precision bf16
has precision_on_cpu_msg "needs --device cuda" precision_on_cpu.err
expect gpus_on_cpu 2 "$BIN" distill "${SMALL[@]}" --out rdev --gpus 2; has gpus_on_cpu_msg "needs --device cuda" gpus_on_cpu.err
expect bad_zero 2 "$BIN" distill "${SMALL[@]}" --out rdev --zero zero3; has bad_zero_msg "zero must be replicate or zero1" bad_zero.err
if ! nvidia-smi -L > /dev/null 2>&1; then
  expect cuda_without_gpu 1 "$BIN" distill "${SMALL[@]}" --out rdev --device cuda
  if grep -q "no CUDA device is visible" cuda_without_gpu.err || grep -q "built without CUDA" cuda_without_gpu.err; then
    ok "cuda_without_gpu message"; else bad "cuda_without_gpu message" cuda_without_gpu.err; fi
fi

# Config files: unknown keys are usage errors; --print-config round-trips.
printf 'steps = 5\nbogus-key = 1\n' > bad.ini
expect config_unknown_key 2 "$BIN" distill --config bad.ini --print-config; has config_unknown_msg "bogus-key" config_unknown_key.err
expect print_config 0 "$BIN" distill "${SMALL[@]}" --out run1 --print-config
cp print_config.out round.ini
expect print_config_again 0 "$BIN" distill --config round.ini --print-config
if cmp -s print_config.out print_config_again.out; then ok "print-config round trip"; else bad "print-config round trip differs" print_config_again.out; fi
printf 'steps = 9\n' > steps.ini
expect config_cli_wins 0 "$BIN" distill --config steps.ini --steps 4 --print-config; has config_cli_wins_value "steps = 4" config_cli_wins.out

# A short distillation.
expect distill_run 0 "$BIN" distill "${SMALL[@]}" --out run1
[ -f run1/student.safetensors ] && [ -f run1/student.config.json ] && ok "student exported" || bad "no student.safetensors" distill_run.err
[ "$(grep -c '^step,' run1/metrics.csv)" -eq 6 ] && ok "metrics.csv has 6 step rows" || bad "metrics.csv rows" run1/metrics.csv
[ "$(grep -c '"kind":"step"' run1/metrics.jsonl)" -eq 6 ] && ok "metrics.jsonl has 6 step rows" || bad "metrics.jsonl rows" run1/metrics.jsonl
has distill_summary "held-out perplexity" distill_run.out
expect rerun_refused 1 "$BIN" distill "${SMALL[@]}" --out run1; has rerun_msg "already holds a run" rerun_refused.err

# Exact resume: drop the last checkpoint and continue from step 3; the student must be identical.
cp -r run1 run2 && rm -f run2/ckpt_6.dxc run2/student.safetensors
expect resume 0 "$BIN" distill "${SMALL[@]}" --out run2 --resume; has resume_msg "resumed from" resume.err
cmp -s run1/student.safetensors run2/student.safetensors && ok "resumed student identical" || bad "resumed student differs" resume.err
expect resume_other_config 1 "$BIN" distill --teacher "$TEACHER" --data train.txt --steps 6 --lr 1e-3 \
  --checkpoint-every 3 "${BASE[@]}" --out run2 --resume
has resume_other_msg "different configuration" resume_other_config.err

# Ctrl-C: stops after the current step, saves a checkpoint, exits 130; --resume continues.
"$BIN" distill --teacher "$TEACHER" --data train.txt --steps 100000 --lr 2e-3 --checkpoint-every 0 "${BASE[@]}" \
  --out run3 > sigint.out 2> sigint.err &
pid=$!
for _ in $(seq 1 100); do grep -q "step 2/" sigint.err 2>/dev/null && break; sleep 0.2; done
kill -INT $pid; wait $pid; rc=$?
[ $rc -eq 130 ] && ok "ctrl-c exit 130" || bad "ctrl-c exit $rc" sigint.err
has sigint_msg "checkpoint saved" sigint.err
ls run3/ckpt_*.dxc > /dev/null 2>&1 && ok "ctrl-c checkpoint written" || bad "no checkpoint after ctrl-c" sigint.err

# Pre-tokenized shards as data (absolute paths are recorded, so resume works from anywhere).
expect tokenize 0 "$BIN" tokenize --tokenizer "$TEACHER/tokenizer.json" --out tok/train train.txt
has tokenize_msg "tokens in" tokenize.out
expect shards_run 0 "$BIN" distill --teacher "$TEACHER" --data tok/train.json --steps 3 --lr 2e-3 --checkpoint-every 1 "${BASE[@]}" --out run8
rm -f run8/ckpt_3.dxc
( cd / && "$BIN" distill --teacher "$TEACHER" --data "$WORK/tok/train.json" --steps 3 --lr 2e-3 --checkpoint-every 1 \
    "${BASE[@]/val.txt/$WORK/val.txt}" --out "$WORK/run8" --resume ) > shards_resume.out 2> shards_resume.err; rc=$?
[ $rc -eq 0 ] && ok "resume with shard data from another directory" || bad "shard resume exit $rc" shards_resume.err
[ "$(grep -c '^step,' run8/metrics.csv)" -eq 3 ] && ok "metrics not duplicated after resume" || bad "metrics rows after resume" run8/metrics.csv
expect bad_divergence 2 "$BIN" distill --teacher "$TEACHER" --data train.txt --divergence kl2 --out run9
has bad_divergence_msg "kl2" bad_divergence.err

# generate: deterministic for a seed.
GEN=(generate --student run1/student.safetensors --tokenizer "$TEACHER/tokenizer.json" --prompt "And God said" --max-tokens 20 --temperature 0.9 --top-k 50)
expect gen1 0 "$BIN" "${GEN[@]}" --seed 11
expect gen2 0 "$BIN" "${GEN[@]}" --seed 11
cmp -s gen1.out gen2.out && [ -s gen1.out ] && ok "generate deterministic" || bad "generate differs" gen2.out
expect gen_greedy 0 "$BIN" generate --student run1/student.safetensors --tokenizer "$TEACHER/tokenizer.json" --prompt "In the beginning" --max-tokens 10 --greedy
has gen_prompt_echo "In the beginning" gen_greedy.out

# export -> import round trip gives identical logits (identical evaluation numbers).
expect export 0 "$BIN" export --run run1 --out exported.safetensors
[ -f exported.config.json ] && grep -q '"slstm_block"' exported.config.json && ok "NX-AI config written" || bad "export config" export.err
expect import 0 "$BIN" import --in exported.safetensors --out imported.safetensors
expect eval_exported 0 "$BIN" eval --teacher "$TEACHER" --student exported.safetensors --data val.txt --seq 32 --batch 4
expect eval_imported 0 "$BIN" eval --teacher "$TEACHER" --student imported.safetensors --data val.txt --seq 32 --batch 4
cmp -s eval_exported.out eval_imported.out && ok "export/import round trip identical" || bad "round trip differs" eval_imported.out
has eval_output "student perplexity" eval_exported.out

# Bad input: empty data, invalid UTF-8, teacher without tokenizer.json, a full disk during a checkpoint.
: > empty.txt
expect empty_data 1 "$BIN" distill --teacher "$TEACHER" --data empty.txt --steps 6 "${BASE[@]}" --out run4; has empty_msg "no tokens" empty_data.err
printf 'valid text \xff\xfe broken\n' > latin1.txt
expect bad_utf8 1 "$BIN" distill --teacher "$TEACHER" --data latin1.txt --steps 6 "${BASE[@]}" --out run5; has bad_utf8_msg "UTF-8" bad_utf8.err
mkdir -p notok && cp "$TEACHER/config.json" "$TEACHER/model.safetensors" notok/
expect no_tokenizer 1 "$BIN" distill --teacher notok --data train.txt --steps 6 "${BASE[@]}" --out run6; has no_tokenizer_msg "tokenizer" no_tokenizer.err
( trap '' XFSZ; ulimit -f 600; exec "$BIN" distill "${SMALL[@]}" --out run7 ) > disk.out 2> disk.err; rc=$?
[ $rc -eq 1 ] && ok "disk full exit 1" || bad "disk full exit $rc" disk.err
has disk_msg "File too large" disk.err
[ -z "$(ls run7/*.tmp 2>/dev/null)" ] && ok "no temp file left" || bad "temp file left" disk.err
[ "$(grep -c '^step,' run7/metrics.csv)" -ge 3 ] && ok "metrics kept after failed checkpoint" || bad "metrics lost" disk.err

echo "cli: $pass passed, $fail failed"
[ $fail -eq 0 ]
