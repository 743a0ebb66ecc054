#!/usr/bin/env bash
# Builds the bundled worker's wheel on the controller (tasks/venv.yml) with exactly the
# hashed build dependencies of its lock, never whatever setuptools an index serves that day:
#   build-worker-wheel.sh PYTHON SOURCE_DIR BUILD_LOCK WHEEL_DIR FILE...
# FILE... are the package's own files, relative to SOURCE_DIR: only they are copied, so no
# build/ or egg-info leftover of the source tree reaches the wheel.
# A throwaway venv holds the build dependencies (installed with --require-hashes, wheels
# only: no build code runs to get them) and builds without isolation, so pip fetches nothing
# else. SOURCE_DATE_EPOCH (1980-01-01 unless given) makes the wheel reproducible: the same
# files give the same bytes, the sha256 that tests/test_supply_chain.py compares.
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: $0 PYTHON SOURCE_DIR BUILD_LOCK WHEEL_DIR FILE..." >&2
  exit 2
fi
python=$1 source=$2 lock=$3 wheel_dir=$4
shift 4
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}
export PIP_DISABLE_PIP_VERSION_CHECK=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/src"
(cd "$source" && cp --parents -- "$@" "$tmp/src")
"$python" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install --quiet --require-hashes --no-deps --only-binary=:all: \
  -r "$lock"
# Into the temporary directory first: WHEEL_DIR gets the wheel whole or not at all, and the
# role's `creates:` never sees half a file.
"$tmp/venv/bin/python" -m pip wheel --quiet --no-deps --no-build-isolation \
  --wheel-dir "$tmp/out" "$tmp/src"
mkdir -p "$wheel_dir"
mv "$tmp"/out/*.whl "$wheel_dir"/
