#!/usr/bin/env bash
# Runs every check and test of the project on a fresh machine: installs the Debian
# packages it needs, builds the test assets (static agent, tiny image), then fmt,
# clippy, the whole test suite (including the tests that boot real VMs and the
# doctests), the examples, the documentation build, packaging of the library crates,
# the Debian package (built, installed, its unit verified) and a bounded fuzzing run
# of the agent protocol's decoders.
#
# Run with: scripts/test.sh (as root)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "test.sh: run as root (VM, network namespace and loop-mount tests need it)" >&2
    exit 2
fi
export PATH="$HOME/.cargo/bin:$PATH"
start=$(date +%s)
step() { echo "==> [$(( $(date +%s) - start ))s] $*"; }

step "installing Debian packages"
scripts/install-deps.sh
step "building test assets (static agent, tiny image)"
scripts/test-assets.sh
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "building binaries"
cargo build --workspace --bins
step "cargo test"
cargo test --workspace
step "examples"
scripts/examples.sh
step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps
step "cargo package (the library crates, as crates.io would get them)"
cargo package --no-verify --allow-dirty \
    -p vmkit-guest -p vmkit-core -p vmkit-hv -p vmkit-net -p vmkit-store
step "Debian package: release build, cargo deb, install, systemd-analyze verify"
scripts/package.sh
step "fuzzing the agent protocol (bounded: 15 s per target)"
scripts/fuzz.sh 15
step "done"
