#!/usr/bin/env bash
# Debian packages `make demo` and `make test` need (as root), installed only when missing:
# podman + runc + netavark/aardvark-dns (+ iptables, which netavark drives) for the lab
# hosts, debootstrap for their base image, redis-server for the worker's tests.
set -euo pipefail
packages=(podman runc netavark aardvark-dns iptables slirp4netns uidmap fuse-overlayfs
  debootstrap redis-server git make python3-venv ca-certificates)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The worker's tests start their own redis-server on a free port; the packaged one is unused.
if [[ " ${missing[*]} " == *" redis-server "* ]]; then
  systemctl disable --now redis-server >/dev/null 2>&1 || true
fi
