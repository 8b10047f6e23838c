#!/usr/bin/env bash
# Installs the Debian packages vmkit needs on a host (or a fresh CI machine), then
# checks that every program vmkit runs is there and answers: the check runs every
# time, installed or not, and fails naming what is missing.
#
#   qemu-system-x86, qemu-utils   the QEMU backend and qemu-img (qcow2 overlays)
#   cpio, busybox-static          the tiny image's initramfs and root filesystem
#   e2fsprogs                     mkfs.ext4 -d and debugfs for images
#   xfsprogs                      reflink-capable volume filesystems
#   nftables, iproute2            the bridge network backend
#   mmdebstrap                    the Debian base image
#   file                          telling what a binary is
#   openssh-client                ssh, scp, sftp and ssh-keygen: the SSH gateway's tests
#                                 and demo
#   tmux                          driving interactive SSH sessions in the tests
#
# The DNS server and ACME tests (vmkit-net, features `dns` and `https`):
#   dnsutils                      dig, the client the DNS server's tests ask
#   pebble                        the ACME test server the ACME tests get certificates from
#   dnsmasq-base                  dnsmasq, the name server that publishes the custom
#                                 domains' proof records in the tests
#   python3-aiosmtpd              the SMTP server the email sign-in test sends to
# The HTTPS edge's browser test (vmkit-net/tests/https_browser.rs):
#   chromium, chromium-driver     headless Chromium and chromedriver (WebDriver)
#   libnss3-tools                 certutil: the NSS database that trusts the local CA
#
# qemu-utils and qemu-system-x86 come from one QEMU release: a qemu-utils of another
# suite (a newer one from backports, say) makes apt remove it when it installs
# qemu-system-x86, so both are asked for at the same version, in one apt call.
#
# Run with: scripts/install-deps.sh (as root, or a user with sudo)
set -euo pipefail

PACKAGES=(
	qemu-system-x86
	qemu-utils
	cpio
	busybox-static
	e2fsprogs
	xfsprogs
	nftables
	iproute2
	mmdebstrap
	file
	openssh-client
	tmux
	# The DNS server and ACME tests.
	dnsutils
	pebble
	dnsmasq-base
	python3-aiosmtpd
	# The HTTPS edge's browser test: headless Chromium, its WebDriver, certutil.
	chromium
	chromium-driver
	libnss3-tools
)

# Each program vmkit runs: its package, then the command that makes it print a version
# (a command alone, for a program that prints none, is checked to be on the PATH).
PROGRAMS=(
	"qemu-system-x86 qemu-system-x86_64 --version"
	"qemu-utils qemu-img --version"
	"e2fsprogs mkfs.ext4 -V"
	"e2fsprogs debugfs -V"
	"xfsprogs mkfs.xfs -V"
	"nftables nft --version"
	"iproute2 ip -V"
	"mmdebstrap mmdebstrap --version"
	"cpio cpio --version"
	"busybox-static busybox --help"
	"file file --version"
	"openssh-client ssh -V"
	"tmux tmux -V"
	# The DNS server and ACME tests (pebble has no version flag; -help exits 0).
	"dnsutils dig -v"
	"pebble pebble -help"
	"dnsmasq-base dnsmasq --version"
	"python3-aiosmtpd /usr/bin/python3 -m aiosmtpd --version"
	"chromium chromium --version"
	"chromium-driver chromedriver --version"
	"libnss3-tools certutil"
)

sudo=()
if [[ $(id -u) != 0 ]]; then
	sudo=(sudo)
fi

installed_version() { dpkg-query -W -f='${db:Status-Status} ${Version}' "$1" 2>/dev/null | awk '$1 == "installed" {print $2}'; }

# The QEMU release to hold both packages at: the installed emulator's, else the one
# apt would install.
qemu_version() {
	local v
	v=$(installed_version qemu-system-x86)
	[[ -n $v ]] || v=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ {print $2}')
	[[ $v != "(none)" ]] && echo "$v"
}

apt_install() {
	local log
	log=$(mktemp)
	# apt's output is shown only when it fails.
	if ! { "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends --allow-downgrades -o Dpkg::Use-Pty=0 "$@"; } >"$log" 2>&1; then
		cat "$log" >&2
		rm -f "$log"
		echo "install-deps: apt-get install $* failed" >&2
		exit 1
	fi
	rm -f "$log"
}

missing=()
for p in "${PACKAGES[@]}"; do
	[[ -n $(installed_version "$p") ]] || missing+=("$p")
done
if ((${#missing[@]})) || [[ $(installed_version qemu-utils) != "$(installed_version qemu-system-x86)" ]]; then
	# Something will be installed: the version to pin qemu-utils at is read from
	# fresh package lists, or apt would be asked for a version its next update drops
	# (the lists of a machine's image are older than the archive).
	if ((${#sudo[@]})) && ! command -v sudo >/dev/null 2>&1; then
		echo "install-deps: missing or mismatched packages; run this script as root" >&2
		exit 1
	fi
	"${sudo[@]}" apt-get update -qq
fi
qemu=$(qemu_version || true)
if [[ -n $qemu && $(installed_version qemu-utils) != "$qemu" ]]; then
	# Held to the emulator's release, even when that is a downgrade.
	missing=("${missing[@]/qemu-utils/}")
	missing+=("qemu-utils=$qemu")
fi
targets=()
for p in "${missing[@]}"; do [[ -n $p ]] && targets+=("$p"); done
if ((${#targets[@]})); then
	if [[ ${#sudo[@]} -gt 0 ]] && ! command -v sudo >/dev/null 2>&1; then
		echo "install-deps: missing ${targets[*]}; run this script as root" >&2
		exit 1
	fi
	echo "install-deps: installing ${targets[*]}" >&2
	apt_install "${targets[@]}"
fi

# The postcondition: every program runs and says what it is. A program whose package
# dpkg calls installed but that does not run (a file removed by hand, a package
# half-removed by another install) gets its package reinstalled once.
broken_programs() {
	local entry argv
	for entry in "${PROGRAMS[@]}"; do
		read -r -a argv <<<"$entry"
		if ((${#argv[@]} == 2)); then
			PATH="$PATH:/usr/sbin:/sbin" command -v "${argv[1]}" >/dev/null || echo "${argv[0]} ${argv[1]}"
			continue
		fi
		if ! PATH="$PATH:/usr/sbin:/sbin" timeout 20 "${argv[@]:1}" >/dev/null 2>&1; then
			echo "${argv[0]} ${argv[1]}"
		fi
	done
}
broken=$(broken_programs)
if [[ -n $broken ]]; then
	packages=()
	while read -r package _; do
		if [[ $package == qemu-utils && -n $qemu ]]; then package="qemu-utils=$qemu"; fi
		[[ " ${packages[*]} " == *" $package "* ]] || packages+=("$package")
	done <<<"$broken"
	echo "install-deps: not running: $(cut -d' ' -f2 <<<"$broken" | paste -sd' '); reinstalling ${packages[*]}" >&2
	apt_install --reinstall "${packages[@]}"
	broken=$(broken_programs)
fi
if [[ -n $broken ]]; then
	echo "install-deps: these programs are missing or do not run: $(cut -d' ' -f2 <<<"$broken" | paste -sd' ')" >&2
	echo "install-deps: install their packages ($(cut -d' ' -f1 <<<"$broken" | sort -u | paste -sd' ')) and run this script again" >&2
	exit 1
fi
