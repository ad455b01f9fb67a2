#!/usr/bin/env bash
# Installs what building lkvm, its test guest and its benchmarks needs on Debian 12 (run as
# root, or with sudo available). Packages already present are skipped.
set -euo pipefail
packages=(linux-source-6.1 build-essential bc flex bison libelf-dev busybox-static python3 python3-venv xz-utils patch cpio libslirp0 iproute2 e2fsprogs curl qemu-utils gdb)
[ "${1:-}" = "--bench" ] && packages+=(qemu-system-x86 hyperfine)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" > /dev/null
fi
command -v cargo > /dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
