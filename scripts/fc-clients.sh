#!/usr/bin/env bash
# Real Firecracker clients from PyPI against lkvm: installs firecracker-python and pyrecracker
# into target/fc-clients-venv, builds lkvm and the test guest, and runs each client's boot,
# pause, snapshot and load flow (scripts/fc_clients.py). Two Linux boots and two restores.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --quiet
./guest/build.sh
venv=target/fc-clients-venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet firecracker-python==0.0.5
  # pyrecracker asks for Python 3.12 and runs on Debian 12's 3.11.
  "$venv/bin/pip" install --quiet --ignore-requires-python pyrecracker==0.6.4
fi
for client in firecracker-python pyrecracker; do
  echo "== $client"
  "$venv/bin/python" scripts/fc_clients.py "$client"
done
