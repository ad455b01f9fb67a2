#!/usr/bin/env bash
# The whole test suite: unit tests, fast KVM payload tests, and Linux boots of the test guest.
# With arguments, they go to `cargo test` as they are. Without, the test binaries run two at a
# time, longest first: a guest's vCPU keeps one core busy (its kernel code is emulated where
# KVM is nested), so two binaries take about the time of one; each binary still boots one
# guest at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# Formatting and lints first: they fail in seconds, before any guest boots.
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
./guest/build.sh
if [ $# -gt 0 ]; then
  exec cargo test --release "$@"
fi

built=$(cargo test --release --no-run 2>&1 | tee /dev/stderr)
binaries=$(sed -n 's/^ *Executable .*(\(.*\))$/\1/p' <<< "$built")
# Longest first (measured); binaries not named here run last.
order="rootfs linux api fork net fleets snapshot qcow2 gdb control payload seccomp cli_errors"
queue=()
for name in $order; do
  queue+=($(grep "/$name-[0-9a-f]*$" <<< "$binaries" || true))
done
for binary in $binaries; do
  [[ " ${queue[*]} " == *" $binary "* ]] || queue+=("$binary")
done

logs=$(mktemp -d)
run_one() {
  local binary=$1 logs=$2 log
  log="$logs/$(basename "$binary").log"
  local start=$SECONDS status=0
  "$binary" > "$log" 2>&1 || status=$?
  { echo "=== $(basename "$binary"): exit $status after $((SECONDS - start)) s"; cat "$log"; } | flock "$logs" cat
  return $status
}
export -f run_one
status=0
printf '%s\n' "${queue[@]}" | xargs -P 2 -I{} bash -c 'run_one "$1" "$2"' _ {} "$logs" || status=$?
rm -rf "$logs"
[ $status -eq 0 ] && echo "all test binaries passed" || echo "FAILED: see the binaries with a non-zero exit above"
exit $status
