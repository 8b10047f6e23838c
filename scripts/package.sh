#!/usr/bin/env bash
# Builds the release binaries and the `vmkit` Debian package (daemon, CLI, static guest
# agent, systemd unit, sample config, operator guide), installs it with dpkg, checks
# what it installed, and verifies the unit with `systemd-analyze verify` where that
# exists. Installs cargo-deb when it is missing. The package is removed again at the
# end unless it was installed before or --keep-installed is given.
#
# Run with: scripts/package.sh [--keep-installed]   (as root)
# The package lands in $CARGO_TARGET_DIR/debian (default target/debian).
set -euo pipefail
cd "$(dirname "$0")/.."

keep=false
case "${1:-}" in
--keep-installed) keep=true ;;
"") ;;
*)
	echo "package: unknown argument $1; usage: scripts/package.sh [--keep-installed]" >&2
	exit 2
	;;
esac
if [ "$(id -u)" != 0 ]; then
	echo "package: run as root (it installs the package with dpkg)" >&2
	exit 2
fi
export PATH="$HOME/.cargo/bin:$PATH"
target="${CARGO_TARGET_DIR:-$PWD/target}"
say() { echo "package: $*" >&2; }
fail() {
	echo "package: FAILED: $*" >&2
	exit 1
}

if ! cargo deb --version >/dev/null 2>&1; then
	say "installing cargo-deb"
	cargo install --locked cargo-deb >&2
fi

say "building the static guest agent"
agent=$(scripts/build-agent.sh)
say "release build of vmkit-gateway and vmkit"
start=$(date +%s)
# Without default features: the shipped daemon links none of the testing fakes.
cargo build --release --locked --no-default-features -p vmkit-gateway -p vmkit >&2
say "release build took $(($(date +%s) - start)) s"
# cargo-deb takes binaries from target/release; the agent is built elsewhere.
install -m 755 "$agent" "$target/release/vmkit-agent"

say "building the .deb"
start=$(date +%s)
mkdir -p "$target/debian"
deb=$(cargo deb -p vmkit-gateway --no-build --output "$target/debian" | tail -n 1)
say "cargo deb took $(($(date +%s) - start)) s: $deb"
[ -f "$deb" ] || fail "cargo deb reported $deb, which does not exist"

contents=$(dpkg-deb --contents "$deb")
for file in ./usr/bin/vmkit-gateway ./usr/bin/vmkit ./usr/lib/vmkit/vmkit-agent \
	./etc/vmkit/gateway.toml ./usr/lib/systemd/system/vmkit-gateway.service \
	./usr/share/doc/vmkit/operator-guide.md ./usr/share/doc/vmkit/copyright; do
	grep -q " $file\$" <<<"$contents" || fail "$file is not in the package"
done
dpkg-deb --info "$deb" conffiles | grep -qx /etc/vmkit/gateway.toml ||
	fail "/etc/vmkit/gateway.toml is not a conffile"

was=$(dpkg-query -W -f='${db:Status-Status}' vmkit 2>/dev/null || true)
say "installing $deb"
dpkg -i "$deb" >&2 || fail "dpkg -i $deb (missing dependencies? run scripts/install-deps.sh)"

/usr/bin/vmkit-gateway --version >&2 || fail "the installed vmkit-gateway does not run"
/usr/bin/vmkit --version >&2 || fail "the installed vmkit does not run"
file -L /usr/lib/vmkit/vmkit-agent | grep -q 'statically linked\|static-pie linked' ||
	fail "the installed agent is not statically linked"
# The shipped daemon has no fakes: --fake-backends is refused, saying why.
scratch=$(mktemp -d)
if refused=$(VMKIT_SSH_LISTEN= VMKIT_HTTPS_LISTEN= /usr/bin/vmkit-gateway --config /dev/null --data-dir "$scratch" --fake-backends 2>&1); then
	rm -rf "$scratch"
	fail "the installed vmkit-gateway accepted --fake-backends: it links the testing fakes"
fi
rm -rf "$scratch"
grep -q 'built without the fake-backends feature' <<<"$refused" ||
	fail "the installed vmkit-gateway failed on --fake-backends for another reason: $refused"
# The installed sample config must parse and change nothing.
installed=$(/usr/bin/vmkit-gateway --print-config) || fail "the installed config does not load"
defaults=$(/usr/bin/vmkit-gateway --config /dev/null --print-config)
[ "$installed" = "$defaults" ] || fail "the installed /etc/vmkit/gateway.toml changes the defaults"

unit=/usr/lib/systemd/system/vmkit-gateway.service
[ -f "$unit" ] || fail "$unit was not installed"
grep -qx 'Type=notify' "$unit" || fail "$unit is not Type=notify"
if command -v systemd-analyze >/dev/null; then
	say "systemd-analyze verify $unit"
	# It exits 0 on settings it cannot parse ("..., ignoring"): what it says about
	# this unit counts as a failure too.
	verdict=$(systemd-analyze verify "$unit" 2>&1) || fail "systemd-analyze verify $unit: $verdict"
	[ -z "$verdict" ] || echo "$verdict" >&2
	if grep -q 'vmkit-gateway' <<<"$verdict"; then
		fail "systemd-analyze verify found problems in $unit"
	fi
else
	echo "package: ######################################################################" >&2
	echo "package: SKIPPED: systemd-analyze is not installed; the unit was NOT verified" >&2
	echo "package: ######################################################################" >&2
fi

if [ "$was" = installed ] || $keep; then
	say "leaving vmkit installed"
else
	say "removing vmkit again (it was not installed before; --keep-installed keeps it)"
	dpkg --purge vmkit >&2
fi
say "ok: $deb"
