#!/usr/bin/env bash
# Builds the test guest kernel (ELF vmlinux with a PVH note, bzImage, and System.map for the gdb
# test: vmlinux is stripped) into $1 (default guest/out).
# Debian's linux-source-6.1 + tinyconfig + our fragment + our patches. When the fragment and
# patches are byte-identical to ../shared/guest/acpi's (the variant with ACPI and the VM
# generation ID driver) and its prebuilt kernel's checksums match, that prebuilt kernel is used
# instead; a built kernel is cached by the hash of its recipe.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/out}
shared=${LKVM_SHARED_GUEST:-$here/../../shared/guest/acpi}
mkdir -p "$out"

recipe_hash=$(cat "$here/kernel/kernel-6.1-min.fragment" "$here"/kernel/*.patch | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/lkvm-guest/kernel-$recipe_hash

. "$here/install-if-changed.sh"
use_kernel() {
  for file in vmlinux bzImage System.map; do install_if_changed "$1/$file" "$out/$file"; done
  echo "guest kernel: $2"
}

if [ -f "$cache/vmlinux" ] && [ -f "$cache/bzImage" ] && [ -f "$cache/System.map" ]; then
  use_kernel "$cache" "cached build $cache"; exit 0
fi

same_as_shared() {
  [ -f "$shared/SHA256SUMS" ] || return 1
  cmp -s "$here/kernel/kernel-6.1-min.fragment" "$shared/kernel-6.1-min.fragment" || return 1
  for p in "$here"/kernel/*.patch; do cmp -s "$p" "$shared/patches/$(basename "$p")" || return 1; done
  (cd "$shared" && sha256sum --quiet -c SHA256SUMS)
}
if same_as_shared; then
  mkdir -p "$cache"
  xz -dc "$shared/vmlinux-6.1-min.xz" > "$cache/vmlinux"
  cp "$shared/bzImage-6.1-min" "$cache/bzImage"
  cp "$shared/System.map-6.1-min" "$cache/System.map"
  use_kernel "$cache" "prebuilt from $shared"; exit 0
fi

src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "missing $src_tar: apt-get install linux-source-6.1" >&2; exit 1; }
work=$(mktemp -d "${TMPDIR:-/tmp}/lkvm-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building guest kernel in $work (about 5 minutes on 2 cores)"
tar -C "$work" -xf "$src_tar"
cd "$work"/linux-source-6.1
for p in "$here"/kernel/*.patch; do patch -p1 -s < "$p"; done
make -s tinyconfig
scripts/kconfig/merge_config.sh -m .config "$here/kernel/kernel-6.1-min.fragment" > /dev/null
make -s olddefconfig
make -s -j"$(nproc)" bzImage
mkdir -p "$cache.tmp"
strip -o "$cache.tmp/vmlinux" vmlinux
cp arch/x86/boot/bzImage "$cache.tmp/bzImage"
cp .config "$cache.tmp/config"
cp System.map "$cache.tmp/System.map"
rm -rf "$cache" && mv "$cache.tmp" "$cache"
use_kernel "$cache" "built $cache"
