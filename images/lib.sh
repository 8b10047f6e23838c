#!/usr/bin/env bash
# vmkit image recipes: what every recipe shares. Functions only; nothing runs here.
#
# `vmkit image build` runs a recipe as this file followed by the recipe's build.sh (the
# binary embeds both); a recipe run by hand sources this file from beside its directory.
# Every function reports with the recipe's name ($RECIPE) and dies on failure.
#
#   lib_check_inputs       checks OUT, CACHE and AGENT; makes OUT and CACHE absolute
#   lib_kernel             fetches and unpacks Debian's cloud kernel into the cache; sets
#                          REL, VMLINUZ, MODDIR and SOURCE_DATE_EPOCH
#   lib_modules NAME...    resolves modules and their dependencies into ORDER
#   lib_initramfs FILE     writes the busybox initramfs that loads ORDER, mounts root=
#                          and switch_roots to its init
#   lib_mkfs DIR FILE MB UUID
#                          writes DIR as a reproducible ext4 filesystem image
#   lib_kernel_outputs CMDLINE
#                          writes vmlinuz, kernel-release and cmdline into OUT

log() { printf '%s: %s\n' "${RECIPE:-image}" "$*" >&2; }
die() {
	printf '%s: error: %s\n' "${RECIPE:-image}" "$*" >&2
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

# lib_check_inputs: the recipe interface (OUT, CACHE, AGENT) and the host tools every
# recipe needs. Sets BUSYBOX.
lib_check_inputs() {
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
	[[ $(dpkg --print-architecture) == amd64 ]] ||
		die "the $RECIPE image uses Debian's cloud-amd64 kernel: amd64 hosts only"

	mkdir -p "$CACHE"
	CACHE=$(cd "$CACHE" && pwd)
	OUT=$(cd "$OUT" && pwd)
}

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

# lib_kernel: Debian's cloud kernel (KERNEL_PACKAGE overrides the package), cached as
# its .deb and the tree extracted from it. Sets KDIR, VMLINUZ, REL, MODDIR and, unless
# set, SOURCE_DATE_EPOCH (the kernel's timestamp, so equal inputs give equal images).
lib_kernel() {
	local pkg=${KERNEL_PACKAGE:-} deb='' tmp
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
	VMLINUZ=$(find "$KDIR/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | head -n1)
	[[ -n $VMLINUZ ]] || die "no boot/vmlinuz-* in ${deb##*/}"
	REL=${VMLINUZ##*/vmlinuz-}
	MODDIR=$KDIR/lib/modules/$REL
	[[ -d $MODDIR/kernel ]] || die "no lib/modules/$REL in ${deb##*/}"
	: "${SOURCE_DATE_EPOCH:=$(stat -c %Y "$VMLINUZ")}"
	export SOURCE_DATE_EPOCH
	log "kernel $REL"
}

# --- modules ----------------------------------------------------------------------
modcat() {
	case $1 in
	*.ko) cat "$1" ;;
	*.ko.xz) xz -dc "$1" ;;
	*.ko.zst) zstd -qdc "$1" ;;
	esac
}
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
# lib_modules NAME...: the modules NAME... need, dependencies first, as paths below
# MODDIR in ORDER; modules built into the kernel are skipped.
lib_modules() {
	local f n m
	declare -gA MODPATH=() SEEN=()
	ORDER=()
	while IFS= read -r -d '' f; do
		n=${f##*/}
		n=${n%%.ko*}
		MODPATH[${n//-/_}]=${f#"$MODDIR"/}
	done < <(find "$MODDIR/kernel" \( -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' \) -print0)
	BUILTIN=$(sed 's|.*/||; s|\.ko$||; s|-|_|g' "$MODDIR/modules.builtin")
	for m in "$@"; do add_module "$m"; done
}

# --- initramfs --------------------------------------------------------------------
# A newc cpio entry written by hand, so that /dev/console exists before /init runs
# without mknod (which needs root) on the build host.
cpio_entry() { # name mode nlink rdevmajor rdevminor ino
	local namesize=$((${#1} + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$6" "$2" 0 0 "$3" "$SOURCE_DATE_EPOCH" 0 0 0 "$4" "$5" "$namesize" 0
	printf '%s\0' "$1"
	head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}

# lib_initramfs FILE: busybox and an /init that loads the modules in ORDER, waits for
# root=, mounts it and switch_roots to its init. Uses WORK for scratch space.
lib_initramfs() {
	local ird=$WORK/initramfs a p
	mkdir -p "$ird"/{bin,dev,proc,sys,newroot,etc,lib/modules/"$REL"}
	install -m 0755 "$BUSYBOX" "$ird/bin/busybox"
	for a in $("$BUSYBOX" --list); do
		[[ $a == busybox ]] || ln -s busybox "$ird/bin/$a"
	done
	: >"$ird/etc/modules"
	for p in "${ORDER[@]}"; do
		mkdir -p "$ird/lib/modules/$REL/${p%/*}"
		modcat "$MODDIR/$p" >"$ird/lib/modules/$REL/${p%%.ko*}.ko"
		printf '%s\n' "${p%%.ko*}.ko" >>"$ird/etc/modules"
	done
	cat >"$ird/init" <<'EOF'
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
	chmod 0755 "$ird/init"

	find "$ird" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
	{
		cpio_entry dev $((8#040755)) 2 0 0 1
		cpio_entry dev/console $((8#020600)) 1 5 1 2
		cpio_entry 'TRAILER!!!' 0 1 0 0 0
		(cd "$ird" && find . -mindepth 1 | sed 's|^\./||' | sort |
			cpio --quiet -o -H newc -R 0:0 --reproducible)
	} | gzip -n -6 >"$1"
}

# --- root filesystem --------------------------------------------------------------
# lib_mkfs DIR FILE MB UUID: DIR as an ext4 image of MB MiB labelled vmkit-root, every
# timestamp pinned to SOURCE_DATE_EPOCH. A fixed UUID and hash seed keep the image
# reproducible; E2FSPROGS_FAKE_TIME pins the superblock's and new inodes' timestamps.
lib_mkfs() {
	local dir=$1 file=$2 size_mb=$3 uuid=$4
	find "$dir" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
	[[ $(id -u) == 0 ]] || log "warning: not root, so the files in ${file##*/} belong to uid $(id -u)"
	: >"$file"
	E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH mke2fs -q -F -t ext4 -L vmkit-root -U "$uuid" -m 0 \
		-E "hash_seed=$uuid,root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0" \
		-d "$dir" "$file" "${size_mb}M" >&2 || die "mke2fs failed"
	# mke2fs -d copies each file's ctime, which touch cannot set: pin it with debugfs.
	(cd "$dir" && find . -mindepth 1 | sed "s|^\.|set_inode_field |; s|\$| ctime @$SOURCE_DATE_EPOCH|") >"$WORK/ctimes"
	E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH debugfs -w -f "$WORK/ctimes" "$file" >/dev/null 2>&1 ||
		die "debugfs failed"
}

# lib_kernel_outputs CMDLINE: the kernel, its release and the image's command line.
lib_kernel_outputs() {
	install -m 0644 "$VMLINUZ" "$OUT/vmlinuz"
	printf '%s\n' "$REL" >"$OUT/kernel-release"
	printf '%s\n' "$1" >"$OUT/cmdline"
}

# Defined last: a recipe checks for it to know that this file has been read.
vmkit_image_lib() { :; }
