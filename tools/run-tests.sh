#!/usr/bin/env bash
# `make test`: every stage runs even when an earlier one failed, so one run shows all that is
# broken; the last line sums them up as "summary: N passed, N failed" (pytest stages count
# their tests, the other stages count as one each). Exit code 0 only when nothing failed.
# The failed tests' lines are repeated just above the summary: CI keeps only the log's tail.
# Usage: tools/run-tests.sh STAGE... where a stage is `name=command`.
set -uo pipefail
log_dir=${TEST_LOG_DIR:-.ansible/test-logs}
mkdir -p "$log_dir"
passed=0
failed=0
report=()
for stage in "$@"; do
  name=${stage%%=*}
  command=${stage#*=}
  log="$log_dir/$name.log"
  echo "=== $name: $command"
  start=$(date +%s)
  bash -c "$command" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  took=$(( $(date +%s) - start ))
  # pytest's own counts, when the stage ran pytest (molecule's verifier does too).
  p=$(grep -aEo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
  f=$(grep -aEo '[0-9]+ (failed|error|errors)' "$log" | awk '{s+=$1} END {print s+0}')
  if [ "$p" -eq 0 ] && [ "$f" -eq 0 ]; then
    if [ "$rc" -eq 0 ]; then p=1; else f=1; fi
  elif [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
    f=1  # the stage failed outside its tests (e.g. converge or idempotence)
  fi
  passed=$((passed + p))
  failed=$((failed + f))
  report+=("$(printf '%-22s rc=%-3s %4s passed %4s failed %5ss' "$name" "$rc" "$p" "$f" "$took")")
done
echo
echo "=== failed tests"
for stage in "$@"; do
  name=${stage%%=*}
  # pytest's short summary lines; molecule's verifier prints them behind a "│" margin.
  # Ansible's "FAILED - RETRYING" lines are no test.
  sed 's/\x1b\[[0-9;]*m//g' "$log_dir/$name.log" | sed -E 's/^ *│ *//' |
    grep -aE '^(FAILED|ERROR) ' | grep -av '^FAILED - RETRYING' | cut -c1-300 |
    sed "s/^/$name: /" || true
done
echo "=== stages"
printf '%s\n' "${report[@]}"
echo "summary: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
