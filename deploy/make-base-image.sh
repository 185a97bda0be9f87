#!/usr/bin/env bash
# Build the Debian bookworm base image that deploy/Dockerfile starts FROM, with no registry:
# debootstrap a minimal rootfs from Debian packages, trust the host's extra CA certificates
# (a TLS-intercepting proxy's CA, so pip works inside `podman build`), import it as an image.
#
#   sudo deploy/make-base-image.sh [IMAGE]      # IMAGE default localhost/tlcv-base:bookworm
#   deploy/make-base-image.sh --print-mirror     # the Debian mirror it would use, and nothing else
#
# The mirror is this machine's own: the first enabled `deb` source for bookworm with component main in
# its apt sources (/etc/apt/sources.list, sources.list.d/*.list one-line and *.sources deb822 files),
# else the first .../debian archive of any plain suite (not -security/-updates) with main (a Debian host of
# another release). This repository names no mirror.
# Env: MIRROR (overrides that), APT_ETC (where the sources are, default /etc/apt), ENGINE (podman|docker,
# default: whichever works), FORCE=1 to rebuild when the image already exists. Needs root (debootstrap), ~40 s.
# Where a registry is reachable you can skip this and pass --build-arg BASE_IMAGE=debian:bookworm-slim.
set -euo pipefail

SUITE=bookworm

# "URI SUITE COMPONENT..." for every enabled deb source, in apt's file order.
apt_sources() {
  local etc=${APT_ETC:-/etc/apt} f
  shopt -s nullglob
  for f in "$etc/sources.list" "$etc"/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    sed -e 's/#.*//' -e 's/\[[^]]*\]//g' "$f" | awk '$1 == "deb" && NF >= 3 { $1 = ""; print substr($0, 2) }'
  done
  for f in "$etc"/sources.list.d/*.sources; do
    awk 'BEGIN { RS = ""; FS = "\n" }
      {
        split("", f); key = ""
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^#/) continue
          if (line ~ /^[ \t]/ && key != "") { f[key] = f[key] " " line; continue }
          if (match(line, /^[A-Za-z0-9-]+:/)) { key = tolower(substr(line, 1, RLENGTH - 1)); f[key] = substr(line, RLENGTH + 1) }
        }
        if (tolower(f["enabled"]) ~ /no/ || (" " f["types"] " ") !~ /[ \t]deb[ \t]/) next
        nu = split(f["uris"], u, /[ \t]+/); ns = split(f["suites"], s, /[ \t]+/)
        for (a = 1; a <= nu; a++) for (b = 1; b <= ns; b++) if (u[a] != "" && s[b] != "") print u[a], s[b], f["components"]
      }' "$f"
  done
}

host_mirror() {
  apt_sources | awk -v suite="$SUITE" '
    { line = " " $0 " "; gsub(/[ \t]+/, " ", line) }
    $2 == suite && line ~ / main / && exact == "" { exact = $1 }
    $2 !~ /-/ && $1 ~ /\/debian\/?$/ && line ~ / main / && plain == "" { plain = $1 }
    END { m = exact != "" ? exact : plain; sub(/\/+$/, "", m); print m }' | while read -r m; do
    if [[ $m == mirror+file:* ]]; then  # apt's mirror method: a file listing mirrors; take its first
      m=$(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "${m#mirror+file:}" 2>/dev/null | awk 'NR == 1 { print $1 }')
      m=${m%/}
    fi
    echo "$m"
  done
}

if [[ ${1:-} == --print-mirror ]]; then
  m=${MIRROR:-$(host_mirror)}
  [[ -n $m ]] && echo "$m"
  [[ -n $m ]]
  exit
fi

IMAGE=${1:-localhost/tlcv-base:bookworm}
MIRROR=${MIRROR:-$(host_mirror)}
if [[ -z $MIRROR ]]; then
  echo "make-base-image.sh: no enabled deb source with component main in ${APT_ETC:-/etc/apt}/sources.list*;" \
       "set MIRROR to a Debian mirror's URL (the directory holding dists/$SUITE)" >&2
  exit 1
fi
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

echo "make-base-image.sh: debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include=ca-certificates,python3,python3-venv,python3-pip "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null

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
