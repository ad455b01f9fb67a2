#!/usr/bin/env bash
# Builds the test guest into guest/out: vmlinux and bzImage (build-kernel.sh), init, and
# initramfs.cpio (uncompressed: our static init as /init, plus static busybox for a shell).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/out
mkdir -p "$out"

"$here/build-kernel.sh" "$out"

RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
  --manifest-path "$here/init/Cargo.toml" --target x86_64-unknown-linux-gnu
init_bin=$here/init/target/x86_64-unknown-linux-gnu/release/lkvm-guest-init

. "$here/install-if-changed.sh"

# Also on its own, for tests that boot a directory over 9p with it as /sbin/init.
install_if_changed "$init_bin" "$out/init"

busybox=/bin/busybox
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
  echo "missing static busybox: apt-get install busybox-static" >&2
  exit 1
fi

python3 "$here/mkcpio.py" "$out/initramfs.cpio.new.$$" \
  dir:dev char:dev/console=5,1 char:dev/null=1,3 dir:proc dir:sys dir:tmp dir:bin \
  file:init="$init_bin" file:bin/busybox="$busybox" link:bin/sh=busybox
install_if_changed "$out/initramfs.cpio.new.$$" "$out/initramfs.cpio"
rm -f "$out/initramfs.cpio.new.$$"
echo "guest initramfs: $out/initramfs.cpio ($(stat -c %s "$out/initramfs.cpio") bytes)"
