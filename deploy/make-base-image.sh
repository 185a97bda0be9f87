#!/usr/bin/env bash
# Build the Debian bookworm base image that deploy/Dockerfile starts FROM, with no registry:
# debootstrap a minimal rootfs from Debian packages, trust the host's extra CA certificates
# (a TLS-intercepting proxy's CA, so pip works inside `podman build`), import it as an image.
#
#   sudo deploy/make-base-image.sh [IMAGE]      # IMAGE default localhost/tlcv-base:bookworm
#
# Env: MIRROR (default http://deb.debian.org/debian), ENGINE (podman|docker, default: whichever works),
# FORCE=1 to rebuild when the image already exists. Needs root (debootstrap) and ~40 s.
# Where a registry is reachable you can skip this and pass --build-arg BASE_IMAGE=debian:bookworm-slim.
set -euo pipefail

IMAGE=${1:-localhost/tlcv-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
HERE=$(cd "$(dirname "$0")" && pwd)
ENGINE=${ENGINE:-$("$HERE/build-image.sh" --print-engine)}

if [[ -z $ENGINE ]]; then
  echo "make-base-image.sh: no working podman or docker (run deploy/setup-podman.sh as root)" >&2
  exit 1
fi
if [[ ${FORCE:-0} != 1 ]] && $ENGINE image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "make-base-image.sh: $IMAGE already exists (FORCE=1 rebuilds)"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "make-base-image.sh: debootstrap needs root" >&2
  exit 1
fi

ROOTFS=$(mktemp -d /tmp/tlcv-rootfs.XXXXXX)
trap 'rm -rf "$ROOTFS"' EXIT

echo "make-base-image.sh: debootstrap bookworm from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv,python3-pip bookworm "$ROOTFS" "$MIRROR" >/dev/null

# Extra CA certificates of this host (e.g. an intercepting proxy's), so TLS to PyPI works in the build.
shopt -s nullglob
certs=(/usr/local/share/ca-certificates/*.crt)
if ((${#certs[@]})); then
  mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
  cp "${certs[@]}" "$ROOTFS/usr/local/share/ca-certificates/"
  chroot "$ROOTFS" update-ca-certificates >/dev/null
  echo "make-base-image.sh: added ${#certs[@]} CA certificate(s)"
fi
# Keep the image small: apt lists and caches are not needed at run time.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb

tar -C "$ROOTFS" -c . | $ENGINE import --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
echo "make-base-image.sh: imported $IMAGE ($ENGINE)"
