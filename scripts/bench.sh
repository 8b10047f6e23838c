#!/usr/bin/env bash
# Runs every criterion bench of the project (boot latency on real QEMU with its
# breakdown and the orchestration overhead against a bare QEMU, the base image's time
# from the agent's hello to sshd and to a first command through SSH, volume cloning,
# control-plane rate, ls latency and daemon memory per VM on the fake backends) and
# keeps the printed results in target/bench-results.txt.
#
# Run with: scripts/bench.sh (as root; installs what it needs, builds the test assets)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "bench.sh: run as root (the boot bench starts VMs and loop-mounts images)" >&2
    exit 2
fi
export PATH="$HOME/.cargo/bin:$PATH"
scripts/install-deps.sh
scripts/test-assets.sh
mkdir -p target
cargo bench -p vmkit-benches 2>&1 | tee target/bench-results.txt
echo "==> results kept in target/bench-results.txt"
