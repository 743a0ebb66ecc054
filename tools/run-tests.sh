#!/usr/bin/env bash
# `make test`: every stage runs even when an earlier one failed, so one run shows all that is
# broken; the last line sums them up as "summary: N passed, N failed" (pytest stages count
# their tests, the other stages count as one each). Exit code 0 only when nothing failed.
# The failed tests' lines are repeated just above the summary: CI keeps only the log's tail.
# Usage: tools/run-tests.sh STAGE... where a stage is `name=command`.
#
# Up to TEST_JOBS stages (default 3 in the Makefile, 2 here) run at once, started in the order given: most of a
# molecule scenario's time is spent waiting (systemd boots, apt, services settling, faults
# held for their duration), so two at a time on a 2-core machine take about half as long as
# one after the other (measured: README, "Set-up"). TEST_JOBS=1 runs them one by one. Each
# stage's output goes to its own log (TEST_LOG_DIR) and, live, to the terminal with its name
# in front of each line.
set -uo pipefail
log_dir=${TEST_LOG_DIR:-.ansible/test-logs}
jobs_max=${TEST_JOBS:-2}
[[ $jobs_max =~ ^[1-9][0-9]*$ ]] || { echo "run-tests: TEST_JOBS must be a positive number, not '$jobs_max'" >&2; exit 2; }
mkdir -p "$log_dir"
begin=$(date +%s)
names=()
declare -A command_of=() started=() took=() rc_of=()
for stage in "$@"; do
  name=${stage%%=*}
  names+=("$name")
  command_of[$name]=${stage#*=}
  rm -f "$log_dir/$name.log" "$log_dir/$name.rc"
done

# One stage, in the background: its output to its log and, prefixed, to the terminal; its
# exit code to NAME.rc (the pipeline's, not tee's or sed's).
launch() {
  local name=$1
  echo "=== $name: ${command_of[$name]}"
  started[$name]=$(date +%s)
  (
    bash -c "${command_of[$name]}" 2>&1 | tee "$log_dir/$name.log" | sed -u "s/^/[$name] /"
    echo "${PIPESTATUS[0]}" > "$log_dir/$name.rc"
  ) &
  pid_name[$!]=$name
}

declare -A pid_name=()
next=0
running=0
while ((next < ${#names[@]} || running > 0)); do
  while ((running < jobs_max && next < ${#names[@]})); do
    launch "${names[next]}"
    next=$((next + 1))
    running=$((running + 1))
  done
  wait -n -p done_pid
  name=${pid_name[$done_pid]:-}
  [[ -n $name ]] || continue
  unset "pid_name[$done_pid]"
  running=$((running - 1))
  took[$name]=$(($(date +%s) - started[$name]))
  rc_of[$name]=$(cat "$log_dir/$name.rc" 2>/dev/null || echo 1)
  echo "=== $name: done, rc=${rc_of[$name]}, ${took[$name]}s"
done

passed=0
failed=0
report=()
for name in "${names[@]}"; do
  log="$log_dir/$name.log"
  rc=${rc_of[$name]}
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
  report+=("$(printf '%-22s rc=%-3s %4s passed %4s failed %5ss' "$name" "$rc" "$p" "$f" "${took[$name]}")")
done
echo
echo "=== failed tests"
for name in "${names[@]}"; do
  # pytest's short summary lines; molecule's verifier prints them behind a "│" margin.
  # Ansible's "FAILED - RETRYING" lines are no test.
  sed 's/\x1b\[[0-9;]*m//g' "$log_dir/$name.log" | sed -E 's/^ *│ *//' |
    grep -aE '^(FAILED|ERROR) ' | grep -av '^FAILED - RETRYING' | cut -c1-300 |
    sed "s/^/$name: /" || true
done
echo "=== stages ($jobs_max at a time, $(($(date +%s) - begin))s in all)"
printf '%s\n' "${report[@]}"
echo "summary: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
