#!/usr/bin/env bash
# vmkit image recipe "tiny": a minimal image for fast tests, from Debian packages only.
#
#   vmlinuz        Debian's cloud kernel (the package linux-image-cloud-amd64 depends on)
#   initramfs.img  busybox-static and an /init that loads the virtio, vsock, ACPI
#                  button and pvpanic modules the cloud kernel builds as modules, waits
#                  for root=, mounts it and switch_roots to /sbin/init
#   rootfs.ext4    busybox init, the applets, /usr/bin/vmkit-agent (respawned by init);
#                  mounts the data disk (label vmkit-data) at /data
#   kernel-release the kernel's release string (uname -r in the guest)
#   cmdline        the image's part of the kernel command line
#
# Run by `vmkit image build tiny`, which embeds this file and ../lib.sh, or by hand:
#   OUT=/tmp/out CACHE=/tmp/cache AGENT=path/to/vmkit-agent bash images/tiny/build.sh
#
# Environment:
#   OUT     output directory (must exist and be empty)
#   CACHE   download cache; the kernel .deb and its extracted tree stay there
#   AGENT   the statically linked vmkit-agent binary
# Optional:
#   KERNEL_PACKAGE     kernel package to use instead of the metapackage's dependency
#   ROOTFS_MB          size of rootfs.ext4 in MiB (default 64; grown when too small)
#   SOURCE_DATE_EPOCH  timestamp of every file in the image (default: the kernel's
#                      timestamp in the .deb, so equal inputs give equal images)
#
# Host tools: apt, dpkg, cpio, gzip, e2fsprogs, busybox-static (scripts/install-deps.sh).
set -euo pipefail

RECIPE=tiny
if ! declare -F vmkit_image_lib >/dev/null; then
	# shellcheck source-path=SCRIPTDIR/.. source=lib.sh
	. "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
fi

lib_check_inputs
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vmkit-tiny.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

lib_kernel

# What the cloud kernel builds as modules (=m) and a VM needs early, by purpose;
# the rest (ext4, crc32c, 8250 serial, ACPI, PCI) is built in. Dependencies are
# loaded first, found from each module's depends= field.
WANTED=(
	virtio_pci                 # virtio over PCI (QEMU q35, cloud-hypervisor)
	virtio_mmio                # virtio over MMIO (QEMU microvm)
	virtio_blk                 # root and data disks
	virtio_net                 # network
	virtio_console             # virtio-serial: the agent's channel under QEMU
	vmw_vsock_virtio_transport # vsock: the agent's channel under cloud-hypervisor
	virtio_rng                 # entropy from the host
	button                     # ACPI power button: graceful shutdown from the host
	evdev                      # ... whose events acpid reads from /dev/input
	pvpanic_pci                # reports a kernel panic to the VMM (QEMU's pvpanic-pci)
)
lib_modules "${WANTED[@]}"

lib_initramfs "$OUT/initramfs.img"

# --- root filesystem --------------------------------------------------------------
RD=$WORK/rootfs
mkdir -p "$RD"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,mnt,home,var/log,etc/init.d,etc/acpi/PWRF}
ln -s ../run "$RD/var/run"
chmod 1777 "$RD/tmp"
chmod 0700 "$RD/root"
install -m 0755 "$BUSYBOX" "$RD/bin/busybox"
for a in $("$BUSYBOX" --list-full); do
	[[ $a != bin/busybox && ! -e $RD/$a && ! -L $RD/$a ]] || continue
	up=${a//[!\/]/}       # one ../ per directory level
	ln -s "${up//\//../}bin/busybox" "$RD/$a"
done
install -m 0755 "$AGENT" "$RD/usr/bin/vmkit-agent"

echo tiny >"$RD/etc/hostname"
cat >"$RD/etc/hosts" <<'EOF'
127.0.0.1	localhost
127.0.1.1	tiny
::1	localhost ip6-localhost ip6-loopback
EOF
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$RD/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' >"$RD/etc/group"
printf 'root:*:0:0:99999:7:::\n' >"$RD/etc/shadow"
chmod 0600 "$RD/etc/shadow"
printf 'export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n' >"$RD/etc/profile"
cat >"$RD/etc/os-release" <<'EOF'
NAME="vmkit tiny"
ID=vmkit-tiny
PRETTY_NAME="vmkit tiny (busybox)"
HOME_URL="https://github.com/vmkit/vmkit"
EOF
printf '%s\n' "$REL" >"$RD/etc/vmkit-kernel-release"

cat >"$RD/etc/inittab" <<'EOF'
# busybox init. No getty: the agent is the way in.
::sysinit:/etc/init.d/rcS
::respawn:/usr/bin/vmkit-agent
::shutdown:/etc/init.d/rcK
::restart:/sbin/init
EOF

cat >"$RD/etc/init.d/rcS" <<'EOF'
#!/bin/sh
# vmkit tiny: system initialisation, run once by busybox init.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; }
mounted /proc || mount -t proc -o nosuid,nodev,noexec proc /proc
mounted /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mounted /dev || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
hostname -F /etc/hostname
ip link set lo up

# What udev would do: /dev/virtio-ports/<name> for each named virtio-serial port.
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
	[ -r "$p/name" ] || continue
	name=$(cat "$p/name")
	[ -n "$name" ] && ln -sfn "../${p##*/}" "/dev/virtio-ports/$name"
done

# The data disk, when the VM has one, at /data as in the base image; the agent
# grows it (and /) to its disk when the host asks after a start.
if data=$(findfs LABEL=vmkit-data 2>/dev/null); then
	mkdir -p /data
	mount -t ext4 -o nosuid,nodev "$data" /data || echo "rcS: cannot mount $data on /data" >&2
fi
# The host's ACPI power button (QEMU system_powerdown, cloud-hypervisor power-button).
acpid
EOF
chmod 0755 "$RD/etc/init.d/rcS"

cat >"$RD/etc/init.d/rcK" <<'EOF'
#!/bin/sh
# vmkit tiny: shutdown, run by busybox init before it kills what is left.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
pids=$(pidof vmkit-agent acpid)
# shellcheck disable=SC2086 # a list of pids
[ -z "$pids" ] || kill -TERM $pids
i=0 # give them up to 2s to exit, so that / can be remounted read-only
while [ $i -lt 40 ] && [ -n "$(pidof vmkit-agent acpid)" ]; do
	usleep 50000
	i=$((i + 1))
done
sync
mount -o remount,ro / || echo "rcK: cannot remount / read-only" >&2
umount -a -r 2>/dev/null
EOF
chmod 0755 "$RD/etc/init.d/rcK"
printf '#!/bin/sh\nexec /sbin/poweroff\n' >"$RD/etc/acpi/PWRF/00000080"
chmod 0755 "$RD/etc/acpi/PWRF/00000080"

need_kib=$(du -sk "$RD" | cut -f1)
size_mb=${ROOTFS_MB:-64}
min_mb=$((need_kib / 1024 + 32)) # free space for the guest, plus the journal
((size_mb >= min_mb)) || size_mb=$min_mb
lib_mkfs "$RD" "$OUT/rootfs.ext4" "$size_mb" 6d766b74-7469-6e79-8000-000000000001

lib_kernel_outputs 'root=/dev/vda rw rootfstype=ext4 panic=-1'
log "built: kernel $REL, modules: $(printf '%s ' "${ORDER[@]##*/}")"
