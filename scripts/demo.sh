#!/usr/bin/env bash
# Builds lkvm and the test guest, then boots it: the guest's init prints what it sees (CPUs,
# memory, command line, kernel) and reboots, which ends lkvm. `--shell` gives a busybox shell
# on the console instead (Ctrl-A x quits).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --quiet
./guest/build.sh
extra=""; [ "${1:-}" = "--shell" ] && extra="lkvm.shell"
# The clearcpuid/noxsave parameters keep Linux off instructions that nested KVM hosts which
# emulate guest kernel code cannot run (see shared/GUEST.md); they are harmless elsewhere.
exec ./target/x86_64-unknown-linux-gnu/release/lkvm run -k guest/out/vmlinux -i guest/out/initramfs.cpio -m 128 -c 2 \
  --loglevel info \
  -p "noxsave clearcpuid=popcnt,fsgsbase,smap,rdrand,rdseed,rdpid,invpcid,pcid,cx16 quiet $extra"
