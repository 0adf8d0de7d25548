#!/usr/bin/env bash
# Builds guest image NAME with its recipe (images/NAME/build.sh) and prints the directory
# holding the result (disk.qcow2, vmlinuz, initrd.img, cmdline). Builds are kept in a
# machine-wide cache keyed by the recipe's hash, so a changed recipe builds anew and an
# unchanged one is not rebuilt. Run as root (recipes install packages).
#
#   scripts/build-image.sh testguest|debian-12
#   AETHER_IMAGE_CACHE=DIR   cache directory (default /var/cache/aether/images)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: build-image.sh NAME}
[ -f "images/$name/build.sh" ] || { echo "build-image.sh: no recipe images/$name/build.sh" >&2; exit 1; }
cache=${AETHER_IMAGE_CACHE:-/var/cache/aether/images}
key=$(sha256sum "images/$name/build.sh" | cut -c1-16)
dir=$cache/$name-$key
mkdir -p "$cache"
if [ ! -s "$dir/disk.qcow2" ] || [ ! -s "$dir/vmlinuz" ]; then
  echo "=== building image $name (images/$name/build.sh)" >&2
  rm -rf "$dir.tmp"
  if ! bash "images/$name/build.sh" "$dir.tmp" >"$cache/$name-build.log" 2>&1; then
    tail -30 "$cache/$name-build.log" >&2
    echo "build-image.sh: building $name failed (log: $cache/$name-build.log)" >&2
    exit 1
  fi
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi
# qemu (running as its own user) reads the kernel and disk when they are imported by path.
chmod 0755 "$cache" "$dir"
echo "$dir"
