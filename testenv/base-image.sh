#!/usr/bin/env bash
# Makes the base image the tests build Freshet's image on: a minimal Debian bookworm made with
# debootstrap from the Debian mirror and imported into podman (no image registry is needed).
# podman keeps it in its own storage, outside the clone, so a machine makes it once; later calls
# only print its name.
#
#   testenv/base-image.sh       make it if missing; print the image name
set -euo pipefail
image=localhost/debian:bookworm-minbase
mirror=${FRESHET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "testenv: $tool is needed (apt-get install podman runc debootstrap)" >&2; exit 1; }
done
if podman image exists "$image"; then
  echo "$image"
  exit 0
fi
cache=${FRESHET_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/freshet/testenv}
mkdir -p "$cache"
exec 9>"$cache/.image.lock"
flock 9
if podman image exists "$image"; then
  echo "$image"
  exit 0
fi
root=$(mktemp -d "$cache/.rootfs.XXXXXX")
trap 'rm -rf "$root"' EXIT
echo "testenv: making $image with debootstrap from $mirror" >&2
start=$(date +%s)
debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
tar -C "$root" -c . | podman import - "$image" >&2
echo "testenv: made $image in $(($(date +%s) - start)) s" >&2
echo "$image"
