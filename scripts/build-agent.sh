#!/usr/bin/env bash
# Builds the guest agent as a static x86_64 binary and prints its path.
#
# Run with: scripts/build-agent.sh
# Honours CARGO_TARGET_DIR (the build goes to "$CARGO_TARGET_DIR/agent", or target/agent).
set -euo pipefail

cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-target}/agent"

# Static glibc: the agent must run in any guest image, whatever libc (if any) it ships.
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build -p vmkit-agent --release --target "$target" --target-dir "$target_dir" >&2

binary="$target_dir/$target/release/vmkit-agent"
if [ ! -x "$binary" ]; then
    echo "build-agent: $binary was not produced" >&2
    exit 1
fi
# A dynamically linked agent would fail in minimal guests; refuse to hand one out.
if command -v file >/dev/null && ! file -L "$binary" | grep -q 'statically linked\|static-pie linked'; then
    echo "build-agent: $binary is not statically linked" >&2
    exit 1
fi
echo "$(cd "$(dirname "$binary")" && pwd)/$(basename "$binary")"
