#!/usr/bin/env bash
# Prints the path of promtool, from Debian's `prometheus` package unpacked into a cache
# directory, never installed: installing the package would start a Prometheus server.
# Used by tests/test_prometheus_rules.py (`promtool check rules`, `promtool test rules`).
#   tools/promtool.sh            -> .ansible/promtool/usr/bin/promtool (downloaded once)
# PROMTOOL_CACHE moves the cache directory.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache=${PROMTOOL_CACHE:-$root/.ansible/promtool}
promtool=$cache/usr/bin/promtool
if [ ! -x "$promtool" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # apt-get download fetches the .deb of the candidate version into the current directory,
  # as root and unsandboxed (its _apt user cannot write here): say nothing of that.
  if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
    apt-get update -qq
    (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null)
  fi
  dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
  mkdir -p "$cache/usr/bin"
  mv "$tmp/usr/bin/promtool" "$promtool.tmp"
  mv "$promtool.tmp" "$promtool"
fi
echo "$promtool"
