#!/usr/bin/env bash
# Brings the lab hosts up as podman containers booting systemd (see inventories/lab).
# Idempotent: hosts already running are left as they are; a host podman calls running but that
# cannot be exec'd into is recreated (a fresh host: make demo provisions it again).
# LAB_PREFIX and LAB_HOSTS let another set of hosts (the benchmark's, bench/) live beside the
# demo lab without touching it; the defaults are the demo lab's.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
# LAB_RELEASE: the Debian release of the hosts (bookworm = 12, trixie = 13).
release=${LAB_RELEASE:-bookworm}
image=localhost/xapi-lab-debian:$release-1
prefix=${LAB_PREFIX:-xapi-lab}
read -r -a hosts <<<"${LAB_HOSTS:-frontal encodage lrs}"
network=$prefix
bash "$here/build-image.sh" "$release"
podman network exists "$network" || podman network create "$network" >/dev/null
for host in "${hosts[@]}"; do
  name=$prefix-$host
  # A container podman reports as running can be dead underneath (the machine rebooted under
  # it: "cannot exec in a stopped container"); nothing can be done in it, so it is recreated.
  if podman container exists "$name" &&
    [ "$(podman inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] &&
    ! podman exec "$name" true >/dev/null 2>&1; then
    echo "lab host $name: podman says running but exec fails (stale after a reboot?): recreating it"
    podman rm -f -t 5 "$name" >/dev/null
  fi
  if podman container exists "$name"; then
    podman start "$name" >/dev/null
  else
    extra=()
    # The broker host runs its own nftables firewall (roles/xapi_broker).
    [ "$host" = frontal ] && extra+=(--cap-add NET_ADMIN)
    podman run -d --name "$name" --hostname "$name" --network "$network" \
      --systemd always "${extra[@]}" "$image" /sbin/init >/dev/null
  fi
  echo "lab host $name: up"
done
# Wait for systemd in each host before Ansible talks to it.
for host in "${hosts[@]}"; do
  for _ in $(seq 60); do
    state=$(podman exec "$prefix-$host" systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 1
  done
done
