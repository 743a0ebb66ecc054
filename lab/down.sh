#!/usr/bin/env bash
# Removes the lab hosts and their network (the base image stays cached).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
for host in frontal encodage lrs; do
  podman rm -f -t 5 "xapi-lab-$host" >/dev/null 2>&1 || true
done
podman network rm xapi-lab >/dev/null 2>&1 || true
echo "lab: removed"
