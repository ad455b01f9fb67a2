#!/usr/bin/env bash
# The whole test suite: unit tests, fast KVM payload tests, and Linux boots of the test guest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./guest/build.sh
cargo test --release "$@"
