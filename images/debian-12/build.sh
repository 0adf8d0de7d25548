#!/bin/bash
# Build aether's real Debian 12 ("bookworm") cloud-init guest image from Debian packages alone:
# debootstrap a minbase root filesystem with the cloud kernel, cloud-init, openssh-server and
# ifupdown/DHCP, write it into an ext4 filesystem placed directly on the disk (no partition
# table, label "rootfs") with `mkfs.ext4 -d`, and convert that to qcow2. No loop devices, no
# mounts of our own.
#
#   bash images/debian-12/build.sh OUTDIR
#
# Writes OUTDIR/{disk.qcow2,vmlinuz,initrd.img,cmdline,image.toml} (the kernel and initrd are
# the rootfs's own /boot files, so its modules match). Idempotent: when OUTDIR already holds a
# complete build made by this exact recipe (OUTDIR/.build-stamp), nothing is redone; set
# DEBIAN12_FORCE=1 to rebuild anyway. Outputs are replaced atomically, a failed run leaves an
# existing build untouched. Needs root (apt-get, debootstrap). See README.md beside this file.
#
# Environment:
#   DEBIAN12_FORCE=1        rebuild even if OUTDIR is up to date
#   DEBIAN12_DISK_SIZE=2G   virtual size of the base disk (workspaces grow it via overlays)
#   DEBIAN12_CMDLINE=...    kernel command line (default below)
#   DEBIAN12_WORKDIR=DIR    scratch directory (default: a fresh mktemp dir in /tmp; ~1.2 GB)
#   DEBIAN12_KEEP_WORK=1    keep the scratch directory (debootstrap log, rootfs) afterwards
set -euo pipefail

OUT=${1:?usage: build.sh OUTDIR}
DISK_SIZE=${DEBIAN12_DISK_SIZE:-2G}
CMDLINE=${DEBIAN12_CMDLINE:-root=/dev/vda rw console=ttyS0 net.ifnames=0}
IMAGE_NAME=debian-12
SUITE=bookworm
# debootstrap does not resolve virtual packages or follow Recommends: python3-cffi-backend is
# what cloud-init's python3-cryptography needs (virtual python3-cffi-backend-api-*), without it
# cloud-init stays unconfigured and debootstrap fails.
INCLUDE=systemd-sysv,udev,dbus,kmod,cloud-init,python3-cffi-backend,openssh-server,linux-image-cloud-amd64,ifupdown,isc-dhcp-client,iproute2,e2fsprogs,netbase,sudo,procps

log() { printf 'debian-12-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, debootstrap)"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

SELF_HASH=$(sha256sum "$0" | cut -d' ' -f1)
STAMP="$SELF_HASH size=$DISK_SIZE cmdline=$CMDLINE"
if [ "${DEBIAN12_FORCE:-0}" != 1 ] && [ -f "$OUT/.build-stamp" ] &&
    [ "$(head -n1 "$OUT/.build-stamp")" = "$STAMP" ] &&
    [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ] && [ -s "$OUT/cmdline" ] &&
    [ -s "$OUT/image.toml" ] && qemu-img info "$OUT/disk.qcow2" >/dev/null 2>&1; then
    log "$OUT is up to date (set DEBIAN12_FORCE=1 to rebuild)"
    exit 0
fi

# ---------------------------------------------------------------- packages
pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}
missing=()
for p in debootstrap e2fsprogs debian-archive-keyring; do
    pkg_installed "$p" || missing+=("$p")
done
# qemu-img: any version will do (the host may carry a newer qemu-utils than the suite's).
command -v qemu-img >/dev/null || missing+=(qemu-utils)
if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=900 update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq \
        --no-install-recommends "${missing[@]}" >&2
fi
# mkfs.ext4 -d needs e2fsprogs >= 1.43; bookworm has 1.47.
mkfs.ext4 -V 2>&1 | grep -q 'mke2fs 1\.4[3-9]' || die "mkfs.ext4 from e2fsprogs >= 1.43 required"

# The mirror apt already uses (deb822 or one-line sources), read at run time; if none is found,
# debootstrap falls back to its built-in default.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822 stanzas are separated by blank lines; take the first "Types: deb" stanza whose
        # Suites include the bare suite name.
        awk -v suite="$SUITE" '
            function flush() { if (deb && hit && uri != "") { print uri; found = 1; exit } deb = hit = 0; uri = "" }
            /^[[:space:]]*$/ { flush(); next }
            /^[[:space:]]*#/ { next }
            tolower($1) == "types:"  { for (i = 2; i <= NF; i++) if ($i == "deb") deb = 1 }
            tolower($1) == "uris:"   { uri = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) hit = 1 }
            END { if (!found) flush() }' "$f"
    done | head -n1
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '$1 == "deb" { u = ""; s = ""
            for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; continue }
                if (u == "") u = $i; else if (s == "") s = $i }
            if (s == suite) { print u; exit } }' "$f"
    done | head -n1
}
MIRROR=$(apt_mirror | head -n1 || true)

# ---------------------------------------------------------------- scratch space
if [ -n "${DEBIAN12_WORKDIR:-}" ]; then
    WORK=$DEBIAN12_WORKDIR
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d /tmp/debian12-build.XXXXXX)
fi
WORK=$(cd "$WORK" && pwd)
ROOTFS=$WORK/rootfs

# debootstrap mounts /proc and /sys (and sometimes /dev/pts) inside the target while it runs
# and may leave them behind if it fails; never recurse into those.
unmount_under() {
    local m
    for m in $(awk -v p="$1/" 'index($2, p) == 1 { print $2 }' /proc/self/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
}
cleanup() {
    local rc=$?
    unmount_under "$ROOTFS"
    if [ "${DEBIAN12_KEEP_WORK:-0}" = 1 ]; then
        log "scratch kept in $WORK"
        return
    fi
    if [ "$rc" != 0 ] && [ -f "$WORK/debootstrap.log" ]; then
        [ -f "$ROOTFS/debootstrap/debootstrap.log" ] &&
            cp "$ROOTFS/debootstrap/debootstrap.log" "$WORK/debootstrap-target.log"
        rm -rf --one-file-system "$ROOTFS" "$WORK/out" "$WORK/base.raw"
        log "failed; logs kept in $WORK (set DEBIAN12_KEEP_WORK=1 to keep the rootfs too)"
        return
    fi
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
unmount_under "$ROOTFS"
rm -rf --one-file-system "$ROOTFS" "$WORK"/out
mkdir -p "$WORK/out"

# ---------------------------------------------------------------- debootstrap
# Written before debootstrap, so that they are in place when the kernel package builds the
# initramfs: initramfs-tools' fsck hook probes the root device's type and, in a build chroot
# without /dev/vda, leaves fsck out ("W: Couldn't identify type of root file system for fsck
# hook"; at boot "fsck not present, so skipping root file system"). FSTYPE=ext4 names it.
# /etc/fstab, /etc/hostname and /etc/resolv.conf are only created by debootstrap when absent
# (it would copy the build host's hostname and resolver).
mkdir -p "$ROOTFS/etc/initramfs-tools/conf.d"
cat >"$ROOTFS/etc/initramfs-tools/conf.d/aether-fstype" <<'EOF'
# aether: the root filesystem is ext4 on /dev/vda, which the build chroot cannot probe
FSTYPE=ext4
EOF
cat >"$ROOTFS/etc/fstab" <<'EOF'
# aether debian-12 image: ext4 directly on the virtio disk (no partition table)
/dev/vda  /  ext4  defaults,errors=remount-ro  0  1
EOF
echo localhost >"$ROOTFS/etc/hostname"
: >"$ROOTFS/etc/resolv.conf"
log "debootstrap $SUITE (minbase) into $ROOTFS${MIRROR:+ from the apt mirror $MIRROR}"
t0=$(date +%s)
# shellcheck disable=SC2086 # $MIRROR is one URI or nothing
if ! nice -n 10 debootstrap --variant=minbase --include="$INCLUDE" \
    "$SUITE" "$ROOTFS" ${MIRROR:+"$MIRROR"} >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2
    [ -f "$ROOTFS/debootstrap/debootstrap.log" ] && tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (full log in $WORK/debootstrap.log)"
fi
t1=$(date +%s)
log "debootstrap took $((t1 - t0)) s"
unmount_under "$ROOTFS"

# ---------------------------------------------------------------- configure the rootfs
R=$ROOTFS
# /etc/fstab was written before debootstrap (see above). The initramfs checks /dev/vda with
# e2fsck, then mounts it rw as the cmdline says; systemd remounts it with these options.
grep -q '^/dev/vda ' "$R/etc/fstab" || die "debootstrap replaced /etc/fstab"

# One identity per workspace: systemd creates machine-id on first boot, cloud-init installs or
# generates the SSH host keys, and the hostname comes from the seed's meta-data.
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
ln -s /etc/machine-id "$R/var/lib/dbus/machine-id"
rm -f "$R"/etc/ssh/ssh_host_*
cat >"$R/etc/hosts" <<'EOF'
127.0.0.1	localhost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
EOF
echo localhost >"$R/etc/hostname"
# Empty until DHCP writes the guest's own.
rm -f "$R/etc/resolv.conf"
: >"$R/etc/resolv.conf"

# Networking: ifupdown. cloud-init renders /etc/network/interfaces.d/50-cloud-init from the
# seed's network-config, or (none given, the usual case) a DHCP fallback for the first NIC,
# which net.ifnames=0 names eth0.
cat >"$R/etc/network/interfaces" <<'EOF'
# The loopback interface; the NIC's stanza is written by cloud-init into interfaces.d.
auto lo
iface lo inet loopback

source /etc/network/interfaces.d/*
EOF
mkdir -p "$R/etc/network/interfaces.d"

echo 'LANG=C.UTF-8' >"$R/etc/default/locale"
cat >"$R/etc/cloud/cloud.cfg.d/90_aether.cfg" <<'EOF'
# aether debian-12 image (images/debian-12/build.sh)
# The seed is a NoCloud disk labelled "cidata"; never probe cloud metadata services.
datasource_list: [NoCloud, None]
# minbase has no locale data (package "locales"): cloud-init's default would run
# "locale-gen en_US.UTF-8", fail and finish in "error". C.UTF-8 is built into libc and matches
# /etc/default/locale, so cc_locale has nothing to do. (`locale: false` also skips it, but
# cloud-init 22.4's schema wants a string and logs "Invalid cloud-config provided".)
locale: C.UTF-8
# Keep the hostname from meta-data/user-data (not /etc/hostname) and make it resolvable.
preserve_hostname: false
manage_etc_hosts: localhost
# The root filesystem sits directly on /dev/vda: growpart finds no partition and skips it,
# resize2fs then grows the filesystem online to the (overlay's) disk size.
growpart:
  mode: auto
  devices: ["/"]
resize_rootfs: true
EOF

# Clean up what the build host and debootstrap leave behind.
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/var/log/*.log \
    "$R"/tmp/* "$R"/var/tmp/* "$R/debootstrap"
rm -rf "$R/var/lib/cloud"

# ---------------------------------------------------------------- kernel, initrd
KERNEL=$(find "$R/boot" -maxdepth 1 -name 'vmlinuz-*-cloud-amd64' -type f | sort -V | tail -n1)
[ -n "$KERNEL" ] || die "no /boot/vmlinuz-*-cloud-amd64 in the rootfs"
KVER=${KERNEL##*/vmlinuz-}
[ -s "$R/boot/initrd.img-$KVER" ] || die "no /boot/initrd.img-$KVER in the rootfs"
[ -d "$R/lib/modules/$KVER" ] || die "no /lib/modules/$KVER in the rootfs"
# (no grep -q: with pipefail, an early exit would fail the pipeline on SIGPIPE)
if ! chroot "$R" lsinitramfs "/boot/initrd.img-$KVER" 2>/dev/null | grep 'sbin/e2fsck$' >/dev/null; then
    log "warning: the initramfs has no e2fsck; the root filesystem will not be checked at boot"
fi
cp "$KERNEL" "$WORK/out/vmlinuz"
cp "$R/boot/initrd.img-$KVER" "$WORK/out/initrd.img"
chmod 0644 "$WORK/out/vmlinuz" "$WORK/out/initrd.img"
log "kernel $KVER"

# ---------------------------------------------------------------- disk image
t2=$(date +%s)
truncate -s "$DISK_SIZE" "$WORK/base.raw"
nice -n 10 mkfs.ext4 -q -L rootfs -d "$R" "$WORK/base.raw"
nice -n 10 qemu-img convert -O qcow2 "$WORK/base.raw" "$WORK/out/disk.qcow2"
rm -f "$WORK/base.raw"
t3=$(date +%s)
log "mkfs.ext4 -d + qemu-img convert took $((t3 - t2)) s"

echo "$CMDLINE" >"$WORK/out/cmdline"
cat >"$WORK/out/image.toml" <<EOF
# aether Debian 12 cloud-init image (images/debian-12/build.sh)
name = "$IMAGE_NAME"
boot = "kernel"
kernel = "vmlinuz"
initrd = "initrd.img"
cmdline_file = "cmdline"
cmdline = "$CMDLINE"
disk = "disk.qcow2"
seed = "nocloud"
kernel_version = "$KVER"
EOF

# ---------------------------------------------------------------- install atomically
rm -f "$OUT/.build-stamp"
for f in disk.qcow2 vmlinuz initrd.img cmdline image.toml; do
    mv -f "$WORK/out/$f" "$OUT/$f"
done
printf '%s\nbuilt %s debootstrap=%ss image=%ss kernel=%s\n' "$STAMP" "$(date -u +%FT%TZ)" \
    "$((t1 - t0))" "$((t3 - t2))" "$KVER" >"$OUT/.build-stamp"
log "built $OUT: $(qemu-img info --output=json "$OUT/disk.qcow2" | awk -F': *' '/"actual-size"/ { gsub(/,/, "", $2); printf "%d MiB on disk", $2 / 1048576 }'), kernel $KVER"
