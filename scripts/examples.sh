#!/usr/bin/env bash
# Runs every example in examples/ (as CI does), each bounded in time, and checks that
# none left a VMM or a scratch directory behind. The examples check their own results
# and exit non-zero when a check fails.
#
# Run with: scripts/examples.sh (as root; after scripts/test-assets.sh, which builds
# the tiny image into $VMKIT_TEST_DATA/images, default target/vmkit-test/images)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
	echo "examples: run as root (the examples boot VMs with QEMU)" >&2
	exit 2
fi
export VMKIT_IMAGES="${VMKIT_IMAGES:-${VMKIT_TEST_DATA:-$PWD/target/vmkit-test}/images}"
if [ ! -f "$VMKIT_IMAGES/tiny/manifest.json" ]; then
	echo "examples: no tiny image in $VMKIT_IMAGES; run scripts/test-assets.sh first" >&2
	exit 1
fi

cargo build -q -p vmkit-examples --examples
bin="${CARGO_TARGET_DIR:-target}/debug/examples"

# Each example's scratch directory goes under this one, so leftovers can be found.
scratch=$(mktemp -d /tmp/vmkit-examples.XXXXXX)
export TMPDIR="$scratch"
failed=()
for example in custom_network embed sandbox events; do
	echo "examples: $example" >&2
	start=$(date +%s)
	# SIGINT first, so the example removes its VMs; SIGKILL 30 s later if it hangs.
	if timeout --signal=INT --kill-after=30 300 "$bin/$example"; then
		echo "examples: $example passed in $(($(date +%s) - start)) s" >&2
	else
		echo "examples: $example FAILED (exit $?) after $(($(date +%s) - start)) s" >&2
		failed+=("$example")
	fi
done

# VMMs outlive the examples: any left running means a clean-up bug.
leaked=$(pgrep -f -- "$scratch/" || true)
if [ -n "$leaked" ]; then
	echo "examples: VMMs left running under $scratch (now killed):" >&2
	ps -o pid=,args= -p "$(echo "$leaked" | paste -sd,)" >&2 || true
	# shellcheck disable=SC2086 # one pid per word
	kill -9 $leaked 2>/dev/null || true
	failed+=("leaked-vmms")
fi
if [ -n "$(ls -A "$scratch")" ]; then
	echo "examples: files left behind in $scratch:" >&2
	ls -la "$scratch" >&2
	failed+=("leaked-files")
fi
rm -rf "$scratch"

if ((${#failed[@]})); then
	echo "examples: failed: ${failed[*]}" >&2
	exit 1
fi
echo "examples: all passed" >&2
