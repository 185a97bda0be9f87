#!/usr/bin/env bash
# Install podman (and what it needs to build images offline) from Debian packages, and write the
# /etc/containers/containers.conf these CI hosts need. Idempotent; run as root (CI does, before `make test`).
#
#   sudo deploy/setup-podman.sh            # then: deploy/make-base-image.sh && deploy/build-image.sh
#
# Why the config: crun fails on this cgroup layout (use runc + cgroupfs), podman's default ulimits
# cannot be raised here (set them explicitly), and journald is absent (file events logger).
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  echo "setup-podman.sh: run as root (it uses apt-get and writes /etc/containers)" >&2
  exit 1
fi

PACKAGES=(podman buildah debootstrap uidmap fuse-overlayfs slirp4netns runc)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup-podman.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup-podman.sh: ${PACKAGES[*]} already installed"
fi

CONF=/etc/containers/containers.conf
WANT='# Written by deploy/setup-podman.sh (tlcv).
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
'
mkdir -p /etc/containers
if [[ -f $CONF ]] && [[ "$(cat "$CONF")" == "$(printf '%s' "$WANT")" ]]; then
  echo "setup-podman.sh: $CONF already as needed"
else
  [[ -f $CONF ]] && cp "$CONF" "$CONF.bak.$(date +%s)"
  printf '%s' "$WANT" > "$CONF"
  echo "setup-podman.sh: wrote $CONF"
fi
podman --version
