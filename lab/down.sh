#!/usr/bin/env bash
# Removes the lab hosts and their network (the base image stays cached).
# LAB_PREFIX and LAB_HOSTS as in up.sh (defaults: the demo lab).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
prefix=${LAB_PREFIX:-xapi-lab}
read -r -a hosts <<<"${LAB_HOSTS:-frontal encodage lrs}"
for host in "${hosts[@]}"; do
  podman rm -f -t 5 "$prefix-$host" >/dev/null 2>&1 || true
done
podman network rm "$prefix" >/dev/null 2>&1 || true
echo "lab ($prefix): removed"
