#!/usr/bin/env bash
# Make a local Debian bookworm base image without any image registry: debootstrap a minimal root file
# system from Debian's package archive and `docker import` it. Debian 12's python3 is 3.11, the Python
# the wheelhouse is built for, and redis-server, curl and tini come from Debian too, so the image build
# itself needs no network.
#
#   scripts/docker-base.sh [TAG]        (default vessa-base:bookworm; FORCE=1 rebuilds an existing one)
#
# Where Docker Hub is reachable, `python:3.11-slim-bookworm` does the same job (see docs/deploy.md).
set -euo pipefail
TAG=${1:-vessa-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${DEBIAN_SUITE:-bookworm}
if [ -z "${FORCE:-}" ] && docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "base image $TAG exists (FORCE=1 to rebuild)"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
fi
root=$(mktemp -d /var/tmp/vessa-rootfs.XXXXXX)
cleanup() {
  umount "$root/proc" 2>/dev/null || true
  rm -rf "$root"
}
trap cleanup EXIT
start=$(date +%s)
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$root" "$MIRROR"
# No service may start inside the chroot while packages are installed (redis-server would).
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
  python3 python3-venv redis-server curl tini procps
chroot "$root" apt-get clean
umount "$root/proc"
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/tmp/* "$root"/usr/share/doc/* \
  "$root"/usr/share/man/*
tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$TAG"
echo "base image $TAG built in $(($(date +%s) - start)) s: $(docker image inspect -f '{{.Size}}' "$TAG") bytes"
