#!/usr/bin/env bash
# Builds the lab's Debian 12 base image from Debian's mirror (no registry is reachable here).
# Cached: does nothing when the image already exists. Usage: lab/build-image.sh [IMAGE]
set -euo pipefail
# The tag names the package set: change it when the list below changes.
image=${1:-${LAB_IMAGE:-localhost/xapi-lab-debian:bookworm-1}}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/containers.conf}
if podman image exists "$image"; then
  echo "base image $image: present"
  exit 0
fi
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d /var/tmp/xapi-lab-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "base image $image: building with debootstrap from $mirror"
debootstrap --variant=minbase \
  --include=python3,python3-apt,systemd,systemd-sysv,iproute2,ca-certificates,procps,sudo \
  bookworm "$root" "$mirror" >/dev/null
# Containers have no console: systemd units that wait for one only slow the boot down.
rm -f "$root"/etc/systemd/system/getty.target.wants/* 2>/dev/null || true
tar -C "$root" -c . | podman import --change 'CMD ["/sbin/init"]' - "$image" >/dev/null
echo "base image $image: built"
