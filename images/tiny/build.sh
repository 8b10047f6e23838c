#!/usr/bin/env bash
# vmkit image recipe "tiny": a minimal image for fast tests, from Debian packages only.
#
#   vmlinuz        Debian's cloud kernel (the package linux-image-cloud-amd64 depends on)
#   initramfs.img  busybox-static and an /init that loads the virtio, vsock and ACPI
#                  button modules the cloud kernel builds as modules, waits for root=,
#                  mounts it and switch_roots to /sbin/init
#   rootfs.ext4    busybox init, the applets, /usr/bin/vmkit-agent (respawned by init)
#   kernel-release the kernel's release string (uname -r in the guest)
#   cmdline        the image's part of the kernel command line
#
# Run by `vmkit image build tiny`, which embeds this file, or by hand:
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

log() { printf 'tiny: %s\n' "$*" >&2; }
die() {
	printf 'tiny: error: %s\n' "$*" >&2
	exit 1
}
need() {
	command -v "$1" >/dev/null 2>&1 ||
		die "\`$1\` not found (Debian package $2); run scripts/install-deps.sh"
}

# elf_is_static FILE: true when FILE is an x86-64 ELF without PT_INTERP.
elf_is_static() {
	local f=$1 magic machine phoff phentsize phnum i type
	magic=$(od -An -tx1 -N6 "$f" 2>/dev/null | tr -d ' \n')
	[[ $magic == 7f454c460201 ]] || return 1
	machine=$(od -An -tu2 -j18 -N2 "$f" | tr -d ' ')
	[[ $machine == 62 ]] || return 1
	phoff=$(od -An -tu8 -j32 -N8 "$f" | tr -d ' ')
	phentsize=$(od -An -tu2 -j54 -N2 "$f" | tr -d ' ')
	phnum=$(od -An -tu2 -j56 -N2 "$f" | tr -d ' ')
	for ((i = 0; i < phnum; i++)); do
		type=$(od -An -tu4 -j$((phoff + i * phentsize)) -N4 "$f" | tr -d ' ')
		[[ $type != 3 ]] || return 1 # PT_INTERP: needs a dynamic loader
	done
}

: "${OUT:?OUT must name the (empty) output directory}"
: "${CACHE:?CACHE must name the download cache directory}"
: "${AGENT:?AGENT must name the static vmkit-agent binary}"
[[ -d $OUT ]] || die "OUT=$OUT is not a directory"
[[ -z $(ls -A "$OUT") ]] || die "OUT=$OUT is not empty"
[[ -f $AGENT ]] || die "AGENT=$AGENT does not exist; build it with scripts/build-agent.sh"
elf_is_static "$AGENT" ||
	die "AGENT=$AGENT is not a statically linked x86-64 ELF; build it with scripts/build-agent.sh"

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export LC_ALL=C
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need cpio cpio
need gzip gzip
need mke2fs e2fsprogs
need od coreutils
need busybox busybox-static
BUSYBOX=$(command -v busybox)
elf_is_static "$BUSYBOX" || die "$BUSYBOX is not statically linked; install busybox-static"
[[ $(dpkg --print-architecture) == amd64 ]] || die "the tiny image uses Debian's cloud-amd64 kernel: amd64 hosts only"

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vmkit-tiny.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- kernel -----------------------------------------------------------------------
# The kernel package the metapackage linux-image-cloud-amd64 currently depends on.
resolve_kernel_package() {
	apt-cache depends --no-pre-depends --no-recommends --no-suggests --no-conflicts \
		--no-breaks --no-replaces --no-enhances linux-image-cloud-amd64 2>/dev/null |
		sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p'
}
# The newest cached .deb of package $1 (any version), or nothing.
cached_deb() {
	local debs
	debs=$(find "$CACHE" -maxdepth 1 -name "${1}_*_amd64.deb" | sort -V)
	printf '%s' "${debs##*$'\n'}"
}
apt_update() {
	[[ $(id -u) == 0 ]] || die "apt's package lists are missing or stale: run \`apt-get update\` as root"
	log "apt-get update"
	apt-get update -qq >&2 || die "apt-get update failed"
}
download() {
	local dir sandbox=()
	dir=$(mktemp -d "$CACHE/.download.XXXXXX")
	# Root's apt drops to the _apt user, which cannot write into a private directory.
	[[ $(id -u) != 0 ]] || sandbox=(-o APT::Sandbox::User=root)
	if (cd "$dir" && apt-get download -qq "${sandbox[@]}" "$1" >&2); then
		mv "$dir"/*.deb "$CACHE/"
		rmdir "$dir"
	else
		rm -rf "$dir"
		return 1
	fi
}

pkg=${KERNEL_PACKAGE:-}
deb=
if [[ -z $pkg ]]; then
	pkg=$(resolve_kernel_package | head -n1) || pkg=
	if [[ -z $pkg ]]; then
		# No package lists (fresh machine): a kernel already in the cache will do.
		deb=$(cached_deb 'linux-image-*-cloud-amd64')
		if [[ -z $deb ]]; then
			apt_update
			pkg=$(resolve_kernel_package | head -n1) || pkg=
			[[ -n $pkg ]] || die "apt knows no linux-image-cloud-amd64: is Debian's main archive in apt's sources?"
		fi
	fi
fi
if [[ -z $deb ]]; then
	deb=$(cached_deb "$pkg")
	if [[ -z $deb ]]; then
		log "downloading $pkg"
		download "$pkg" || { apt_update && download "$pkg"; } || die "apt-get download $pkg failed"
		deb=$(cached_deb "$pkg")
		[[ -n $deb ]] || die "apt-get download $pkg left no .deb in $CACHE"
	fi
fi

# The extracted package is cached beside the .deb (dpkg-deb -x takes about a second).
KDIR=${deb%.deb}
if [[ ! -d $KDIR ]]; then
	log "extracting ${deb##*/}"
	tmp=$(mktemp -d "$KDIR.XXXXXX")
	dpkg-deb -x "$deb" "$tmp" || {
		rm -rf "$tmp"
		die "dpkg-deb -x $deb failed (a damaged download? delete it and build again)"
	}
	mv -T "$tmp" "$KDIR" 2>/dev/null || rm -rf "$tmp" # lost a race: same content
fi
vmlinuz=$(find "$KDIR/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | head -n1)
[[ -n $vmlinuz ]] || die "no boot/vmlinuz-* in ${deb##*/}"
REL=${vmlinuz##*/vmlinuz-}
MODDIR=$KDIR/lib/modules/$REL
[[ -d $MODDIR/kernel ]] || die "no lib/modules/$REL in ${deb##*/}"
: "${SOURCE_DATE_EPOCH:=$(stat -c %Y "$vmlinuz")}"
export SOURCE_DATE_EPOCH
log "kernel $REL"

# --- modules ----------------------------------------------------------------------
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
)
declare -A MODPATH=() SEEN=()
while IFS= read -r -d '' f; do
	n=${f##*/}
	n=${n%%.ko*}
	MODPATH[${n//-/_}]=${f#"$MODDIR"/}
done < <(find "$MODDIR/kernel" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' \) -print0)
BUILTIN=$(sed 's|.*/||; s|\.ko$||; s|-|_|g' "$MODDIR/modules.builtin")
modcat() {
	case $1 in
	*.ko) cat "$1" ;;
	*.ko.xz) xz -dc "$1" ;;
	*.ko.zst) zstd -qdc "$1" ;;
	esac
}
ORDER=()
add_module() {
	local n=${1//-/_} path deps d
	[[ -z ${SEEN[$n]:-} ]] || return 0
	SEEN[$n]=1
	path=${MODPATH[$n]:-}
	if [[ -z $path ]]; then
		grep -qx "$n" <<<"$BUILTIN" || die "$REL has no module $n, built in or not"
		return 0
	fi
	deps=$(modcat "$MODDIR/$path" | tr '\0' '\n' | sed -n 's/^depends=//p')
	for d in ${deps//,/ }; do add_module "$d"; done
	ORDER+=("$path")
}
for m in "${WANTED[@]}"; do add_module "$m"; done

# --- initramfs --------------------------------------------------------------------
IRD=$WORK/initramfs
mkdir -p "$IRD"/{bin,dev,proc,sys,newroot,etc,lib/modules/"$REL"}
install -m 0755 "$BUSYBOX" "$IRD/bin/busybox"
for a in $("$BUSYBOX" --list); do
	[[ $a == busybox ]] || ln -s busybox "$IRD/bin/$a"
done
: >"$IRD/etc/modules"
for p in "${ORDER[@]}"; do
	mkdir -p "$IRD/lib/modules/$REL/${p%/*}"
	modcat "$MODDIR/$p" >"$IRD/lib/modules/$REL/${p%%.ko*}.ko"
	printf '%s\n' "${p%%.ko*}.ko" >>"$IRD/etc/modules"
done
cat >"$IRD/init" <<'EOF'
#!/bin/sh
# vmkit tiny initramfs: load the virtio modules, mount root=, switch_root to its init.
# Kernel parameters read here: root= (default /dev/vda; also UUID=... or LABEL=...),
# rootfstype= (ext4), rootflags=, ro/rw (rw), init= (/sbin/init),
# rootwait= (seconds to wait for the root device, 10), rdshell (a shell on failure).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

root=/dev/vda fstype=ext4 flags='' mode=rw init=/sbin/init wait=10 rdshell=''
# shellcheck disable=SC2013 # the command line is words, not lines
for arg in $(cat /proc/cmdline); do
	case $arg in
	root=*) root=${arg#root=} ;;
	rootfstype=*) fstype=${arg#rootfstype=} ;;
	rootflags=*) flags=${arg#rootflags=} ;;
	init=*) init=${arg#init=} ;;
	rootwait=*) wait=${arg#rootwait=} ;;
	ro | rw) mode=$arg ;;
	rdshell) rdshell=1 ;;
	esac
done

fail() {
	echo "initramfs: $*" >&2
	if [ -n "$rdshell" ]; then exec sh; fi
	exit 1 # init exits: the kernel panics, and panic=-1 ends the VM
}

# Modules of the kernel this initramfs was built for; a kernel with everything
# built in (kernel/config-fragment) has no such directory and needs none.
rel=$(uname -r)
if [ -d "/lib/modules/$rel" ]; then
	while read -r m; do
		insmod "/lib/modules/$rel/$m" || echo "initramfs: insmod $m failed" >&2
	done </etc/modules
fi

i=0
while :; do
	case $root in
	UUID=* | LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
	*) dev=$root ;;
	esac
	[ -n "$dev" ] && [ -b "$dev" ] && break
	[ $i -lt $((wait * 100)) ] || fail "root device $root did not appear in ${wait}s"
	usleep 10000
	i=$((i + 1))
done

mount -t "$fstype" -o "$mode${flags:+,$flags}" "$dev" /newroot || fail "cannot mount $dev on /"
[ -x "/newroot$init" ] || [ -L "/newroot$init" ] || fail "no $init on $dev"
mount --move /dev /newroot/dev || fail "cannot move /dev"
umount /sys /proc
exec switch_root -c /dev/console /newroot "$init"
EOF
chmod 0755 "$IRD/init"

# A newc cpio entry written by hand, so that /dev/console exists before /init runs
# without mknod (which needs root) on the build host.
cpio_entry() { # name mode nlink rdevmajor rdevminor ino
	local namesize=$((${#1} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$6" "$2" 0 0 "$3" "$SOURCE_DATE_EPOCH" 0 0 0 "$4" "$5" "$namesize" 0
	printf '%s\0' "$1"
	head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}
find "$IRD" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
{
	cpio_entry dev $((8#040755)) 2 0 0 1
	cpio_entry dev/console $((8#020600)) 1 5 1 2
	cpio_entry 'TRAILER!!!' 0 1 0 0 0
	(cd "$IRD" && find . -mindepth 1 | sed 's|^\./||' | sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible)
} | gzip -n -6 >"$OUT/initramfs.img"

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
find "$RD" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
[[ $(id -u) == 0 ]] || log "warning: not root, so the files in rootfs.ext4 belong to uid $(id -u)"
# A fixed UUID and hash seed keep the image reproducible; E2FSPROGS_FAKE_TIME pins
# the superblock's and new inodes' timestamps.
uuid=6d766b74-7469-6e79-8000-000000000001
: >"$OUT/rootfs.ext4"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -F -t ext4 -L vmkit-root -U "$uuid" -m 0 \
	-E "hash_seed=$uuid,root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0" \
	-d "$RD" "$OUT/rootfs.ext4" "${size_mb}M" >&2 || die "mke2fs failed"
# mke2fs -d copies each file's ctime, which touch cannot set: pin it with debugfs.
(cd "$RD" && find . -mindepth 1 | sed "s|^\.|set_inode_field |; s|\$| ctime @$SOURCE_DATE_EPOCH|") >"$WORK/ctimes"
E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$WORK/ctimes" "$OUT/rootfs.ext4" >/dev/null 2>&1 ||
	die "debugfs failed"

install -m 0644 "$vmlinuz" "$OUT/vmlinuz"
printf '%s\n' "$REL" >"$OUT/kernel-release"
printf '%s\n' 'root=/dev/vda rw rootfstype=ext4 panic=-1' >"$OUT/cmdline"
log "built: kernel $REL, modules: $(printf '%s ' "${ORDER[@]##*/}")"
