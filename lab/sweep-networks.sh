#!/usr/bin/env bash
# Clears what a killed podman run can leave behind on the host: an aardvark-dns table or a
# bridge of a network that no running container uses any more. netavark removes both when the
# last container of a network stops; when podman itself is killed it does not, and the next
# network of the same name then inherits the old table (old addresses and gateway: names stop
# resolving between the lab hosts) or a new subnet, because the old bridge still holds the
# gateway. Touches podman's bridges (podman*) and aardvark tables only, and only unused ones.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export CONTAINERS_CONF=${CONTAINERS_CONF:-$here/containers.conf}
tables=/run/containers/networks/aardvark-dns

# Networks with a running container, and the bridge of each network.
mapfile -t in_use < <(podman ps --format '{{.Networks}}' | tr ',' '\n' | sed '/^$/d' | sort -u)
declare -A bridge_in_use=()
while read -r name iface; do
  for used in "${in_use[@]}"; do
    [[ $used == "$name" ]] && bridge_in_use[$iface]=1
  done
done < <(podman network ls --format '{{.Name}} {{.NetworkInterface}}')

if [[ -d $tables ]]; then
  for table in "$tables"/*; do
    name=$(basename "$table")
    [[ -f $table && $name != aardvark.pid ]] || continue
    used=""
    for network in "${in_use[@]}"; do [[ $network == "$name" ]] && used=1; done
    if [[ -z $used ]]; then
      echo "sweep: stale aardvark-dns table $name removed"
      rm -f -- "$table"
    fi
  done
  if [[ ${#in_use[@]} -eq 0 && -f $tables/aardvark.pid ]]; then
    pid=$(cat "$tables/aardvark.pid")
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == aardvark-dns ]]; then
      echo "sweep: idle aardvark-dns (pid $pid) stopped"
      kill "$pid" || true
    fi
    rm -f -- "$tables/aardvark.pid"
  fi
fi

while read -r link; do
  if [[ -z ${bridge_in_use[$link]:-} ]]; then
    echo "sweep: unused bridge $link removed"
    ip link delete "$link"
  fi
done < <(ip -o link show type bridge | awk -F': ' '{sub(/@.*/, "", $2); print $2}' | grep '^podman' || true)
