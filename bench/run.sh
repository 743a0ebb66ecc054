#!/usr/bin/env bash
# `make bench`: the deployed pipeline benchmark on hosts of its own (containers
# xapi-bench-*, the demo lab is not touched), then docs/benchmarks.md regenerated.
# Arguments go to bench/pipeline.py (e.g. --n 200 --phases b,c for a quick try).
# BENCH_KEEP=1 leaves the bench hosts running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
# Facts of the bench hosts apart from the demo lab's (same inventory host names).
export ANSIBLE_CACHE_PLUGIN_CONNECTION=$PWD/.ansible/bench-facts
export BENCH_COMMAND=${BENCH_COMMAND:-make bench}
# The helpers shared with the tests (testsupport/README.md).
export PYTHONPATH=$PWD/testsupport${PYTHONPATH:+:$PYTHONPATH}
python bench/pipeline.py "$@"
# This run's results (bench-<UTC time>.json, the newest).
.venv-bench/bin/python bench/report.py "$(ls -t bench/results/bench-*.json | head -n 1)"
if [ "${BENCH_KEEP:-0}" != 1 ]; then
  LAB_PREFIX=xapi-bench LAB_HOSTS="frontal encodage encodage2 lrs" bash lab/down.sh
fi
