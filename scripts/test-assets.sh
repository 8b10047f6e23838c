#!/usr/bin/env bash
# Prepares what the tests that boot real VMs need: the static guest agent and the
# tiny and base images, in $VMKIT_TEST_DATA (default target/vmkit-test). Cached: an image is
# rebuilt only when its recipe or the agent changes.
#
# Run with: scripts/test-assets.sh
set -euo pipefail
cd "$(dirname "$0")/.."

data="${VMKIT_TEST_DATA:-$PWD/target/vmkit-test}"
mkdir -p "$data"
agent=$(scripts/build-agent.sh)
cargo build -q -p vmkit
cli="${CARGO_TARGET_DIR:-target}/debug/vmkit"
"$cli" --data-dir "$data" image build tiny --agent "$agent"
"$cli" --data-dir "$data" image build base --agent "$agent"
