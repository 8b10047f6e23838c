#!/usr/bin/env bash
# vmkit image recipe "base": the image users live in. Debian bookworm with systemd,
# OpenSSH, apt and sudo, a default user, and the agent as a systemd unit.
#
#   vmlinuz        Debian's cloud kernel, as for the tiny image
#   initramfs.img  the tiny image's initramfs (virtio, vsock, ACPI and pvpanic modules, mount
#                  root=, switch_root), here to systemd
#   rootfs.ext4    Debian from mmdebstrap (variant apt) with the packages below, the
#                  kernel's modules, /usr/local/bin/vmkit-agent and its unit, the user
#                  `vmkit` (no password, sudo without one), an ed25519 sshd host key
#                  made at first boot, a serial getty on ttyS0 (none on the
#                  virtual terminals), fstab for / and an optional data disk (label
#                  vmkit-data, at /data, mounted when its device appears; both grown to
#                  their disks at boot), no swap, no apt lists; the timers, units and
#                  generators a VM does not use masked, so that sshd takes logins soon
#                  after the agent's hello (`cargo bench -p vmkit-benches --bench
#                  base_boot` measures it)
#   kernel-release the kernel's release string
#   cmdline        the image's part of the kernel command line (root mounted read-only,
#                  checked and remounted by systemd)
#
# The mmdebstrap tarball is cached in $CACHE under a hash of the package list and the
# sources, so a rebuild after an agent change takes seconds; BASE_REFRESH=1 fetches the
# packages again (security updates).
#
# Run by `vmkit image build base`, which embeds this file and ../lib.sh, or by hand:
#   OUT=/tmp/out CACHE=/tmp/cache AGENT=path/to/vmkit-agent bash images/base/build.sh
#
# Environment:
#   OUT     output directory (must exist and be empty)
#   CACHE   download cache: the kernel .deb and the package tarball stay there
#   AGENT   the statically linked vmkit-agent binary
# Optional:
#   MIRROR             Debian mirror (default http://deb.debian.org/debian)
#   SECURITY_MIRROR    security mirror (default http://deb.debian.org/debian-security)
#   BASE_REFRESH       set to 1 to build the package tarball again
#   KERNEL_PACKAGE     kernel package to use instead of the metapackage's dependency
#   ROOTFS_MB          size of rootfs.ext4 in MiB (default: the content plus room; the
#                      guest grows the filesystem to its disk at boot)
#   SOURCE_DATE_EPOCH  timestamp of every file in the image (default: the kernel's)
#
# Host tools: those of the tiny image, mmdebstrap and tar; must run as root (mmdebstrap,
# chroot, files owned by their users).
set -euo pipefail

RECIPE=base
if ! declare -F vmkit_image_lib >/dev/null; then
	# shellcheck source-path=SCRIPTDIR/.. source=lib.sh
	. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
fi

[[ $(id -u) == 0 ]] || die "the base image is built as root (mmdebstrap, chroot, file owners)"
lib_check_inputs
need mmdebstrap mmdebstrap
need tar tar
need chroot coreutils
need useradd passwd

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vmkit-base.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

SUITE=bookworm
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PACKAGES=(
	systemd systemd-sysv udev dbus libpam-systemd # init, devices, logind
	openssh-server sudo                           # the way in
	apt ca-certificates curl                      # installing more
	iproute2 iputils-ping netbase                 # networking tools
	kmod e2fsprogs procps less                    # modules, fsck, ps, a pager
)
SOURCES=(
	"deb $MIRROR $SUITE main"
	"deb $MIRROR $SUITE-updates main"
	"deb $SECURITY_MIRROR $SUITE-security main"
)
DEFAULT_USER=vmkit

lib_kernel
# The same early modules as the tiny image; the rest come from the root filesystem.
lib_modules virtio_pci virtio_mmio virtio_blk virtio_net virtio_console \
	vmw_vsock_virtio_transport virtio_rng button evdev pvpanic_pci
lib_initramfs "$OUT/initramfs.img"

# --- packages (cached) ------------------------------------------------------------
# Bump when the way the tarball is made changes.
TARBALL_FORMAT=1
key=$(printf '%s\n' "$TARBALL_FORMAT" "$SUITE" "${PACKAGES[@]}" "${SOURCES[@]}" |
	sha256sum | cut -c1-16)
tarball=$CACHE/base-$SUITE-$key.tar
if [[ ! -f $tarball || ${BASE_REFRESH:-} == 1 ]]; then
	log "mmdebstrap $SUITE (${#PACKAGES[@]} packages; a minute or two)"
	include=$(
		IFS=,
		printf '%s' "${PACKAGES[*]}"
	)
	mmdebstrap --quiet --mode=root --variant=apt --format=tar --include="$include" \
		"$SUITE" "$tarball.tmp" "${SOURCES[@]}" >&2 ||
		{
			rm -f "$tarball.tmp"
			die "mmdebstrap failed (its output above says why)"
		}
	mv -f "$tarball.tmp" "$tarball"
	find "$CACHE" -maxdepth 1 -name "base-$SUITE-*.tar" ! -name "${tarball##*/}" -delete
else
	log "packages from ${tarball##*/}"
fi

# --- root filesystem --------------------------------------------------------------
RD=$WORK/rootfs
mkdir -p "$RD"
tar -xf "$tarball" -C "$RD" --numeric-owner --xattrs --xattrs-include='*' ||
	die "cannot unpack $tarball (delete it and build again)"

# The kernel's modules, for what the initramfs does not load (Docker's netfilter and
# overlay modules, say). Not a package: the kernel comes from outside the image.
mkdir -p "$RD/usr/lib/modules"
cp -a "$MODDIR" "$RD/usr/lib/modules/$REL"
chroot "$RD" depmod -a "$REL" || die "depmod failed"
printf '%s\n' "$REL" >"$RD/etc/vmkit-kernel-release"

# The agent and its unit: early, before the network (it configures it), restarted
# whatever the reason it stopped (an upgrade exits on purpose).
install -m 0755 "$AGENT" "$RD/usr/local/bin/vmkit-agent"
cat >"$RD/etc/systemd/system/vmkit-agent.service" <<'EOF'
[Unit]
Description=vmkit guest agent
Documentation=https://github.com/vmkit/vmkit
DefaultDependencies=no
After=local-fs.target
Before=network.target shutdown.target
Conflicts=shutdown.target
StartLimitIntervalSec=0

[Service]
ExecStart=/usr/local/bin/vmkit-agent
Restart=always
RestartSec=500ms
# Commands started through the agent outlive a restart of the agent (an upgrade).
KillMode=process
Environment=VMKIT_AGENT_LOG=info

[Install]
WantedBy=sysinit.target
EOF
mkdir -p "$RD/etc/systemd/system/sysinit.target.wants"
ln -s ../vmkit-agent.service "$RD/etc/systemd/system/sysinit.target.wants/vmkit-agent.service"

# sshd's host key is made on each VM's first boot, never shipped in the image: ed25519
# only. `ssh-keygen -A` would make an RSA-3072 key too, which takes seconds under TCG
# while ssh.service waits; an ecdsa key, though quick to compute, is one more start of
# ssh-keygen that kept sshd waiting past basic.target (`cargo bench -p vmkit-benches
# --bench base_boot`), for clients older than OpenSSH 6.5 only. sshd is told to use
# just this key. The unit makes the key only when it is missing, so it may be started
# again at any time (then it does nothing).
rm -f "$RD"/etc/ssh/ssh_host_*
cat >"$RD/etc/ssh/sshd_config.d/10-vmkit-host-keys.conf" <<'EOF'
# Made at first boot by vmkit-ssh-keygen.service (no RSA or ecdsa key: slow to make).
HostKey /etc/ssh/ssh_host_ed25519_key
EOF
cat >"$RD/etc/systemd/system/vmkit-ssh-keygen.service" <<'EOF'
[Unit]
Description=Generate a missing SSH host key (ed25519)
DefaultDependencies=no
After=local-fs.target
Before=ssh.service ssh.socket shutdown.target
Conflicts=shutdown.target
ConditionFileNotEmpty=|!/etc/ssh/ssh_host_ed25519_key
ConditionFileNotEmpty=|!/etc/ssh/ssh_host_ed25519_key.pub

[Service]
Type=oneshot
ExecStart=/bin/rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub
ExecStart=/usr/bin/ssh-keygen -q -t ed25519 -N "" -C "" -f /etc/ssh/ssh_host_ed25519_key

[Install]
WantedBy=ssh.service ssh.socket
EOF
mkdir -p "$RD/etc/systemd/system/ssh.service.wants"
ln -s ../vmkit-ssh-keygen.service "$RD/etc/systemd/system/ssh.service.wants/vmkit-ssh-keygen.service"

# A login prompt on the serial console, none on the virtual terminals (a VM has no
# screen).
rm -f "$RD"/etc/systemd/system/getty.target.wants/getty@*.service
mkdir -p "$RD/etc/systemd/system/getty.target.wants"
ln -sf /usr/lib/systemd/system/serial-getty@.service \
	"$RD/etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service"
# Nothing may wait for an answer on the console at first boot.
ln -sf /dev/null "$RD/etc/systemd/system/systemd-firstboot.service"

# Nothing a VM does not use: package lists fetched and upgrades run behind the user's
# back (they hold apt's lock and a TCG guest's only CPU for minutes), a daily backup of
# dpkg's state, and e2scrub (it checks LVM snapshots; a VM has no LVM). fstrim.timer
# stays: the host's disks pass discards through, so a weekly trim returns freed space.
for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
	e2scrub_all.timer e2scrub_reap.service; do
	rm -f "$RD"/etc/systemd/system/*.wants/"$unit"
	ln -sf /dev/null "$RD/etc/systemd/system/$unit"
done
# Nor what sysinit.target would start for hardware or features a VM lacks, each a
# process or a module load that a TCG guest pays for before any service: pstore (no
# firmware store), repartitioning (the disks are made by the host; it also loads the
# loop and device-mapper modules), DRM (no display), hugetlbfs, configfs, and the
# fuse control mount (fuse itself still loads when /dev/fuse is opened).
for unit in systemd-pstore.service systemd-repart.service modprobe@drm.service \
	dev-hugepages.mount sys-kernel-config.mount sys-fs-fuse-connections.mount; do
	rm -f "$RD"/etc/systemd/system/*.wants/"$unit"
	ln -sf /dev/null "$RD/etc/systemd/system/$unit"
done
# sshd checks its configuration as it starts; the separate `sshd -t` before it is one
# more start of sshd on the way to the first login (reloads still check first).
mkdir -p "$RD/etc/systemd/system/ssh.service.d"
printf '[Service]\nExecStartPre=\n' >"$RD/etc/systemd/system/ssh.service.d/50-vmkit.conf"
# Generators for what a VM's disks never hold (encrypted, integrity or verity volumes,
# GPT partitions to mount by type, a hibernation image): each is a program run before
# any unit at every boot.
mkdir -p "$RD/etc/systemd/system-generators"
for generator in systemd-cryptsetup-generator systemd-integritysetup-generator \
	systemd-veritysetup-generator systemd-gpt-auto-generator \
	systemd-hibernate-resume-generator; do
	ln -sf /dev/null "$RD/etc/systemd/system-generators/$generator"
done

# The journal stays small on small disks.
mkdir -p "$RD/etc/systemd/journald.conf.d"
printf '[Journal]\nSystemMaxUse=64M\n' >"$RD/etc/systemd/journald.conf.d/50-vmkit.conf"

# Root and the optional data disk, each grown to its disk by systemd-growfs when
# it is mounted (the host grows only the disks; the agent grows them too when the
# host asks after a start). No swap. The data disk is mounted when its device shows
# up (wanted by the device, not by local-fs.target): a VM made without one would
# otherwise wait 90 s at every boot for it, the agent and sshd with it, since the
# growfs unit of a nofail mount is still ordered before local-fs.target.
mkdir -p "$RD/data"
cat >"$RD/etc/fstab" <<'EOF'
# <file system>  <mount point> <type> <options> <dump> <pass>
LABEL=vmkit-root /             ext4   defaults,errors=remount-ro,x-systemd.growfs 0 1
LABEL=vmkit-data /data         ext4   defaults,nofail,x-systemd.growfs,x-systemd.wanted-by=dev-disk-by\x2dlabel-vmkit\x2ddata.device 0 2
EOF

# The default user: sudo without a password, no password of its own (SSH keys only,
# installed by the agent). The agent reads its name from /etc/vmkit/default-user.
useradd --root "$RD" --create-home --shell /bin/bash --user-group --groups sudo "$DEFAULT_USER" ||
	die "useradd $DEFAULT_USER failed"
printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$DEFAULT_USER" >"$RD/etc/sudoers.d/90-vmkit"
chmod 0440 "$RD/etc/sudoers.d/90-vmkit"
mkdir -p "$RD/etc/vmkit"
printf '%s\n' "$DEFAULT_USER" >"$RD/etc/vmkit/default-user"

# Identity: set by the agent (host name) and by systemd at first boot (machine id).
echo vmkit >"$RD/etc/hostname"
cat >"$RD/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	vmkit
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
EOF
: >"$RD/etc/machine-id"
rm -f "$RD/var/lib/dbus/machine-id"
# Written by the agent from the host's network configuration.
printf '# Written by the vmkit agent when the host configures the network.\n' >"$RD/etc/resolv.conf"
chmod 0644 "$RD/etc/resolv.conf"

# No package lists or caches (apt update fetches them), no logs of the build.
rm -rf "$RD"/var/lib/apt/lists/* "$RD"/var/cache/apt/*.bin "$RD"/var/cache/apt/archives/*.deb \
	"$RD"/var/log/*.log "$RD"/var/log/apt/* "$RD"/tmp/* "$RD"/var/tmp/*
mkdir -p "$RD/var/lib/apt/lists/partial"

cat >"$RD/etc/motd" <<'EOF'

This is a vmkit VM: Debian with systemd, sshd and apt. `sudo` needs no password.
EOF

# Size: the content plus room for the guest and the journal, at least 25% more.
need_mb=$(($(du -sk "$RD" | cut -f1) / 1024))
min_mb=$((need_mb + need_mb / 4 + 128))
size_mb=${ROOTFS_MB:-$min_mb}
((size_mb >= min_mb)) || size_mb=$min_mb
lib_mkfs "$RD" "$OUT/rootfs.ext4" "$size_mb" 6d766b74-6261-7365-8000-000000000001

lib_kernel_outputs 'root=/dev/vda ro rootfstype=ext4 panic=-1'
log "built: kernel $REL, ${need_mb} MiB of files in a ${size_mb} MiB filesystem"
