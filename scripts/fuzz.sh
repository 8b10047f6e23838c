#!/usr/bin/env bash
# Fuzzes what reads untrusted bytes (the agent protocol's frames and messages, from the
# host's and the agent's side) for a bounded time per target. Installs cargo-fuzz when
# it is missing; runs on stable Rust through RUSTC_BOOTSTRAP=1 (cargo-fuzz passes
# nightly-only sanitizer flags).
#
# Run with: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#   default: 30 seconds for each of the targets in fuzz/Cargo.toml
# Findings (crashing inputs) land in fuzz/artifacts/<target>/; the corpus grows in
# fuzz/corpus/<target>/. Exits 1 when a target finds a crash, 2 when one does not build.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-30}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]]; then
	echo "fuzz: $seconds is not a number of seconds" >&2
	exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "fuzz: installing cargo-fuzz" >&2
	cargo install --locked cargo-fuzz >&2
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
	mapfile -t targets < <(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz list)
fi

export RUSTC_BOOTSTRAP=1
for target in "${targets[@]}"; do
	(cd fuzz && cargo fuzz build "$target") || {
		echo "fuzz: building $target failed" >&2
		exit 2
	}
done
failed=()
for target in "${targets[@]}"; do
	echo "fuzz: $target for ${seconds}s" >&2
	mkdir -p "fuzz/corpus/$target"
	if ! (cd fuzz && cargo fuzz run "$target" -- -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
		-print_final_stats=1); then
		failed+=("$target")
	fi
done
if ((${#failed[@]})); then
	echo "fuzz: crashes found in ${failed[*]}; inputs are in fuzz/artifacts/" >&2
	exit 1
fi
echo "fuzz: no crash in ${targets[*]} (${seconds}s each)" >&2
