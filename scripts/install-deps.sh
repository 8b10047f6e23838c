#!/usr/bin/env bash
# Installs the Debian packages vmkit needs on a host (or a fresh CI machine).
# Idempotent: does nothing, quietly, when everything is installed; runs
# `apt-get update` only when something is missing. Needs root (or sudo).
#
#   qemu-system-x86, qemu-utils   the QEMU backend and qemu-img (qcow2 overlays)
#   cpio, busybox-static          the tiny image's initramfs and root filesystem
#   e2fsprogs                     mkfs.ext4 -d and debugfs for images
#   xfsprogs                      reflink-capable volume filesystems
#   nftables, iproute2            the bridge network backend
#   mmdebstrap                    the Debian base image
#   file                          telling what a binary is
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
)

missing=()
for p in "${PACKAGES[@]}"; do
	status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
	[[ $status == installed ]] || missing+=("$p")
done
((${#missing[@]})) || exit 0

sudo=()
if [[ $(id -u) != 0 ]]; then
	command -v sudo >/dev/null 2>&1 ||
		{ echo "install-deps: missing ${missing[*]}; run this script as root" >&2 && exit 1; }
	sudo=(sudo)
fi

echo "install-deps: installing ${missing[*]}" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# apt's output is shown only when it fails.
if ! { "${sudo[@]}" apt-get update -qq &&
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends -o Dpkg::Use-Pty=0 "${missing[@]}"; } >"$log" 2>&1; then
	cat "$log" >&2
	echo "install-deps: apt-get failed" >&2
	exit 1
fi
