#!/usr/bin/env bash
# Builds a lab base image of one Debian release from Debian's mirror (no registry is reachable
# here). Cached per release: does nothing when that release's image already exists.
# Usage: lab/build-image.sh [RELEASE...]   (bookworm = Debian 12, trixie = Debian 13;
# default: both). The image of RELEASE is localhost/xapi-lab-debian:RELEASE-N.
set -euo pipefail
# N names the package set: change it when the list below changes.
tag=1
packages=python3,python3-apt,systemd,systemd-sysv,iproute2,ca-certificates,procps,sudo
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/containers.conf}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
releases=("$@")
[ ${#releases[@]} -gt 0 ] || releases=(bookworm trixie)

build() {
  local release=$1 image=localhost/xapi-lab-debian:$1-$tag root
  case $release in
    bookworm | trixie) ;;
    *) echo "lab/build-image.sh: unsupported release '$release' (bookworm, trixie)" >&2; return 2 ;;
  esac
  if podman image exists "$image"; then
    echo "base image $image: present"
    return 0
  fi
  root=$(mktemp -d /var/tmp/xapi-lab-rootfs.XXXXXX)
  # shellcheck disable=SC2064  # the path is fixed now, on purpose
  trap "rm -rf '$root'" RETURN
  echo "base image $image: building with debootstrap from $mirror"
  debootstrap --variant=minbase --include="$packages" "$release" "$root" "$mirror" >/dev/null
  # Containers have no console: systemd units that wait for one only slow the boot down.
  rm -f "$root"/etc/systemd/system/getty.target.wants/* 2>/dev/null || true
  tar -C "$root" -c . | podman import --change 'CMD ["/sbin/init"]' - "$image" >/dev/null
  echo "base image $image: built"
}

for release in "${releases[@]}"; do
  build "$release"
done
