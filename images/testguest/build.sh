#!/bin/bash
# Build aether's tiny test guest: a Debian cloud kernel plus a busybox + dropbear initramfs that
# reads a NoCloud seed (label "cidata"), keeps the user's home on the persistent disk /dev/vda,
# serves SSH on port 22 and powers off cleanly on an ACPI power-button event.
#
#   bash images/testguest/build.sh OUTDIR
#
# Writes OUTDIR/{vmlinuz,initrd.img,disk.qcow2,cmdline,image.toml}. Idempotent: re-running
# rebuilds vmlinuz/initrd.img/cmdline/image.toml in place and keeps an existing disk.qcow2.
# Needs root (apt-get, mknod). See README.md beside this file for the accepted seed layout.
set -euo pipefail

OUT=${1:?usage: build.sh OUTDIR}
DISK_SIZE=${TESTGUEST_DISK_SIZE:-1G}
CMDLINE=${TESTGUEST_CMDLINE:-console=ttyS0 quiet}
IMAGE_NAME=testguest

log() { printf 'testguest-build: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (installs packages, creates device nodes)"

# ---------------------------------------------------------------- packages
APT_UPDATED=
apt_update_once() {
    if [ -z "$APT_UPDATED" ]; then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=900 update -qq >&2
        APT_UPDATED=1
    fi
}

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

ensure_packages() {
    local missing=() p
    for p in busybox-static dropbear-bin cpio genisoimage e2fsprogs util-linux; do
        pkg_installed "$p" || missing+=("$p")
    done
    # qemu-img: any version will do (the host may carry a newer qemu-utils than the suite's).
    command -v qemu-img >/dev/null || missing+=(qemu-utils)
    if [ ${#missing[@]} -gt 0 ]; then
        apt_update_once
        log "apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq \
            --no-install-recommends "${missing[@]}" >&2
    fi
}

ensure_packages

WORK=$(mktemp -d /tmp/testguest-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- kernel
mkdir -p "$WORK/kernel"
if [ -n "${TESTGUEST_KERNEL_TREE:-}" ]; then
    # Offline rebuild: a directory laid out like the unpacked kernel package
    # (boot/vmlinuz-KVER, lib/modules/KVER/...), e.g. assembled from an earlier build.
    KVER=$(find "$TESTGUEST_KERNEL_TREE/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | head -n 1)
    [ -n "$KVER" ] || die "TESTGUEST_KERNEL_TREE=$TESTGUEST_KERNEL_TREE has no lib/modules/KVER"
    KSRC=$TESTGUEST_KERNEL_TREE
    log "kernel $KVER from $KSRC (no download)"
    cp -a "$TESTGUEST_KERNEL_TREE/." "$WORK/kernel/"
else
    kernel_package() {
        apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\.0-.*-cloud-amd64$/ { print $2; exit }'
    }
    KPKG=$(kernel_package || true)
    if [ -z "$KPKG" ]; then
        apt_update_once
        KPKG=$(kernel_package || true)
    fi
    [ -n "$KPKG" ] || die "apt-cache depends linux-image-cloud-amd64 names no linux-image-6.1.0-*-cloud-amd64"
    KVER=${KPKG#linux-image-}
    KSRC=$KPKG
    log "kernel package $KPKG"

    mkdir -p "$WORK/dl"
    # _apt cannot write into a 0700 mktemp dir; let it (avoids the unsandboxed-download warning).
    chmod 0755 "$WORK" && chmod 0777 "$WORK/dl"
    (cd "$WORK/dl" && apt-get download -qq "$KPKG" >&2) || {
        apt_update_once
        (cd "$WORK/dl" && apt-get download -qq "$KPKG" >&2)
    }
    dpkg -x "$WORK"/dl/"$KPKG"_*.deb "$WORK/kernel"
fi
VMLINUZ="$WORK/kernel/boot/vmlinuz-$KVER"
MODDIR="$WORK/kernel/lib/modules/$KVER"
[ -f "$VMLINUZ" ] || die "no $VMLINUZ in $KSRC"
[ -d "$MODDIR" ] || die "no $MODDIR in $KSRC"

# ---------------------------------------------------------------- modules
# Wanted modules (file base names); their dependencies are added and ordered automatically.
WANT_MODULES="virtio_pci virtio_net virtio_blk virtio_scsi sd_mod sr_mod virtio-rng virtio_console
isofs vfat nls_cp437 nls_iso8859-1 nls_ascii nls_utf8 button evdev"

# busybox depmod writes modules.dep (the package ships none); ordering is done here so the
# guest only needs insmod.
busybox depmod -b "$WORK/kernel" "$KVER"
declare -A DEPS=() PATHOF=() SEEN=()
while IFS= read -r line; do
    mod=${line%%:*}
    base=${mod##*/}; base=${base%.ko*}
    PATHOF[$base]=$mod
    DEPS[$base]=${line#*:}
done <"$MODDIR/modules.dep"

ORDER=()
visit() {
    local name=$1 d dn
    [ -n "${SEEN[$name]:-}" ] && return 0
    SEEN[$name]=1
    for d in ${DEPS[$name]:-}; do
        dn=${d##*/}; dn=${dn%.ko*}
        visit "$dn"
    done
    ORDER+=("$name")
}
for m in $WANT_MODULES; do
    if [ -z "${PATHOF[$m]:-}" ]; then
        # Built into this kernel (or renamed): nothing to ship.
        grep -q "/$m.ko" "$MODDIR/modules.builtin" 2>/dev/null || log "note: module $m not found, skipped"
        continue
    fi
    visit "$m"
done

# ---------------------------------------------------------------- initramfs tree
R="$WORK/root"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc/acpi/PWRF,etc/acpi/PWRB,etc/dropbear,etc/aether}
mkdir -p "$R"/{dev,proc,sys,run,tmp,var/log,root,home,data,mnt/seed}
ln -s ../run "$R/var/run"
chmod 1777 "$R/tmp"
chmod 0700 "$R/root"
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3

cp /bin/busybox "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list-full); do
    [ -e "$R/$applet" ] || ln -s /bin/busybox "$R/$applet"
done

# copy_bin SRC DEST: a dynamically linked program plus every library ldd names.
copy_bin() {
    local src=$1 dest=$2 lib
    rm -f "$R$dest"
    cp -L "$src" "$R$dest"
    for lib in $(ldd "$src" | awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }'); do
        [ -e "$R$lib" ] && continue
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done
}
copy_bin /usr/sbin/dropbear /usr/sbin/dropbear
copy_bin /usr/bin/dropbearkey /usr/bin/dropbearkey
copy_bin "$(readlink -f /usr/bin/dropbearconvert)" /usr/bin/dropbearconvert
copy_bin /sbin/mke2fs /usr/sbin/mke2fs
copy_bin /sbin/e2fsck /usr/sbin/e2fsck
copy_bin /sbin/resize2fs /usr/sbin/resize2fs
copy_bin /sbin/blkid /usr/sbin/blkid
# busybox's symlinks in /sbin would shadow the real programs in /usr/sbin.
for p in mke2fs e2fsck resize2fs blkid; do rm -f "$R/sbin/$p" "$R/bin/$p"; done
ln -sf mke2fs "$R/usr/sbin/mkfs.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$R/etc/mke2fs.conf"

# Kernel modules, in load order.
mkdir -p "$R/lib/modules/$KVER"
: >"$R/etc/aether/modules"
for m in "${ORDER[@]}"; do
    rel=${PATHOF[$m]}
    mkdir -p "$R/lib/modules/$KVER/$(dirname "$rel")"
    cp "$MODDIR/$rel" "$R/lib/modules/$KVER/$rel"
    echo "/lib/modules/$KVER/$rel" >>"$R/etc/aether/modules"
done
log "modules (load order): ${ORDER[*]}"

cat >"$R/etc/passwd" <<'EOF'
root:*:0:0:root:/root:/bin/sh
EOF
cat >"$R/etc/group" <<'EOF'
root:x:0:
EOF
printf '/bin/sh\n/bin/ash\n' >"$R/etc/shells"
echo testguest >"$R/etc/hostname"
printf 'hosts: files dns\npasswd: files\ngroup: files\nshadow: files\n' >"$R/etc/nsswitch.conf"
echo "$KVER" >"$R/etc/aether/kernel-version"

# ---------------------------------------------------------------- /init (PID 1, then busybox init)
cat >"$R/init" <<'EOF'
#!/bin/sh
# aether test guest: minimal PID 1 setup, then busybox init with /etc/inittab.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=000 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
echo "aether-testguest: init"
exec /sbin/init
EOF
chmod 0755 "$R/init"

cat >"$R/etc/inittab" <<'EOF'
::sysinit:/etc/aether/rc.boot
::respawn:/usr/sbin/dropbear -F -E -p 22 -r /etc/dropbear/dropbear_ed25519_host_key
::once:/etc/aether/rc.ready
::shutdown:/etc/aether/rc.shutdown
::ctrlaltdel:/sbin/poweroff
EOF

# ACPI power button (virsh shutdown) -> busybox acpid -> poweroff -> init runs rc.shutdown.
for d in PWRF PWRB; do
    printf '#!/bin/sh\necho "aether-testguest: ACPI power button, powering off"\nexec /sbin/poweroff\n' \
        >"$R/etc/acpi/$d/00000080"
    chmod 0755 "$R/etc/acpi/$d/00000080"
done

cat >"$R/etc/aether/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc hook: $1 is the event, udhcpc exports interface ip subnet broadcast router dns.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound|renew)
    cur=$(ip -4 -o addr show dev "$interface" | awk '{ split($4, a, "/"); print a[1]; exit }')
    if [ "$cur" != "$ip" ]; then
        ip -4 addr flush dev "$interface"
        ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" ${broadcast:+broadcast "$broadcast"}
    fi
    if [ -n "$router" ]; then
        set -- $router
        ip route replace default via "$1" dev "$interface"
    fi
    : >/etc/resolv.conf
    for s in $dns; do echo "nameserver $s" >>/etc/resolv.conf; done
    echo "aether-testguest: dhcp $1 $interface $ip"
    ;;
esac
exit 0
EOF
chmod 0755 "$R/etc/aether/udhcpc.script"

cat >"$R/etc/aether/userdata.awk" <<'EOF'
# Reads the accepted cloud-config subset (see README.md) and writes into directory `out`:
#   hostname        value of top-level `hostname:`
#   user            `name:` of the first entry of `users:`
#   keys            top-level ssh_authorized_keys plus the first user's, one per line
#   ed25519_private the `ssh_keys: ed25519_private: |` block, indentation removed
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t]+$/, "", s); return s }
function unq(s) {
    s = trim(s)
    if (s ~ /^".*"$/ || s ~ /^'.*'$/) s = substr(s, 2, length(s) - 2)
    return s
}
function ind(s) { match(s, /^ */); return RLENGTH }
function after(t, key) { sub("^" key ":", "", t); return unq(t) }
BEGIN { section = ""; nuser = 0; userind = -1; ukeys = 0; inblock = 0 }
{
    sub(/\r$/, "")
    line = $0
    if (inblock) {
        if (line ~ /^[ \t]*$/) next
        i = ind(line)
        if (i > blockind) {
            if (blockstrip < 0) blockstrip = i
            print substr(line, blockstrip + 1) > (out "/ed25519_private")
            next
        }
        inblock = 0
        close(out "/ed25519_private")
    }
    if (line ~ /^[ \t]*#/ || line ~ /^[ \t]*$/) next
    i = ind(line)
    t = substr(line, i + 1)
    if (i == 0) {
        section = ""
        if (t ~ /^users:/) section = "users"
        else if (t ~ /^ssh_authorized_keys:/) section = "topkeys"
        else if (t ~ /^ssh_keys:/) section = "sshkeys"
        else if (t ~ /^hostname:/) print after(t, "hostname") > (out "/hostname")
        next
    }
    if (section == "topkeys") {
        if (t ~ /^- /) print unq(substr(t, 3)) > (out "/keys")
        next
    }
    if (section == "users") {
        if (t ~ /^- / && (userind < 0 || i <= userind)) {
            # a new list entry of users:
            userind = i
            t = trim(substr(t, 3))
            if (unq(t) == "default") next
            nuser++
            ukeys = 0
            i = i + 2
        } else if (ukeys && t ~ /^- /) {
            if (nuser == 1) print unq(substr(t, 3)) > (out "/keys")
            next
        }
        if (nuser != 1) next
        if (t ~ /^name:/) { print after(t, "name") > (out "/user"); ukeys = 0; next }
        if (t ~ /^ssh_authorized_keys:/) { ukeys = 1; next }
        ukeys = 0
        next
    }
    if (section == "sshkeys") {
        if (t ~ /^ed25519_private:/) {
            v = trim(substr(t, length("ed25519_private:") + 1))
            if (v ~ /^\|/) { inblock = 1; blockind = i; blockstrip = -1 }
        }
        next
    }
}
END { if (inblock) close(out "/ed25519_private") }
EOF

cat >"$R/etc/aether/rc.boot" <<'EOF'
#!/bin/sh
# aether test guest boot (busybox init sysinit). Values from the seed are validated before use.
# Debian's busybox ash runs its own applets before searching PATH, so programs that busybox
# also provides (mke2fs) are called by absolute path.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "aether-testguest: $*"; }
umask 022

# 1. kernel modules, in dependency order (computed at build time)
while read -r ko; do
    insmod "$ko" 2>/dev/null || say "insmod failed: $ko"
done </etc/aether/modules
ip link set lo up
hostname testguest

wait_for() { # wait_for TEST ARG TENTHS
    n=0
    while [ "$n" -lt "$3" ]; do
        test "$1" "$2" && return 0
        usleep 100000; n=$((n + 1))
    done
    return 1
}

# 2. NoCloud seed: a filesystem labelled cidata (ISO9660 or vfat), mounted read-only
SEED=/mnt/seed
mkdir -p /run/cloud
seeddev=
n=0
while [ -z "$seeddev" ] && [ "$n" -lt 50 ]; do
    seeddev=$(/usr/sbin/blkid -c /dev/null -o device -t LABEL=cidata 2>/dev/null | head -n 1)
    [ -n "$seeddev" ] || seeddev=$(/usr/sbin/blkid -c /dev/null -o device -t LABEL=CIDATA 2>/dev/null | head -n 1)
    [ -n "$seeddev" ] || { usleep 100000; n=$((n + 1)); }
done
if [ -n "$seeddev" ] && mount -o ro "$seeddev" "$SEED"; then
    say "seed $seeddev"
    [ -f "$SEED/user-data" ] && awk -v out=/run/cloud -f /etc/aether/userdata.awk "$SEED/user-data"
else
    say "warning: no NoCloud seed (label cidata) found"
fi

# 3. hostname: meta-data local-hostname, else user-data hostname, else meta-data instance-id
md_get() {
    [ -f "$SEED/meta-data" ] || return 0
    sed -n "s/^$1:[[:space:]]*//p" "$SEED/meta-data" | head -n 1 | tr -d "\"'\r" | sed 's/[[:space:]]*$//'
}
name=$(md_get local-hostname)
[ -n "$name" ] || name=$(cat /run/cloud/hostname 2>/dev/null | head -n 1)
[ -n "$name" ] || name=$(md_get instance-id)
name=$(printf '%s' "$name" | tr -c 'A-Za-z0-9.-' '-' | cut -c1-63)
[ -n "$name" ] || name=testguest
hostname "$name"
echo "$name" >/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost\n' "$name" >/etc/hosts

# 6. persistent disk /dev/vda -> /data (formatted ext4 if blank); /home lives on it
wait_for -b /dev/vda 30 || true
if [ -b /dev/vda ]; then
    fstype=$(/usr/sbin/blkid -c /dev/null -o value -s TYPE /dev/vda 2>/dev/null || true)
    if [ -z "$fstype" ]; then
        say "formatting blank /dev/vda as ext4"
        /usr/sbin/mke2fs -q -F -t ext4 -L aether-data -m 1 /dev/vda
        fstype=ext4
    fi
    case "$fstype" in
    ext2|ext3|ext4)
        /usr/sbin/e2fsck -p /dev/vda >/dev/null 2>&1
        rc=$?
        [ "$rc" -le 1 ] || say "e2fsck /dev/vda exited $rc"
        ;;
    esac
    if mount -o noatime /dev/vda /data; then
        say "persistent disk /dev/vda ($fstype) on /data"
        # Grow to the volume's size, online as cloud-init does: offline resize2fs refuses a
        # filesystem mounted since its last full check.
        case "$fstype" in
        ext2|ext3|ext4)
            out=$(/usr/sbin/resize2fs /dev/vda 2>&1) || say "resize2fs /dev/vda failed: $(echo "$out" | tail -n 1)"
            ;;
        esac
        mkdir -p /data/home /data/aether
        mount -o bind /data/home /home
    else
        say "warning: could not mount /dev/vda; home is not persistent"
    fi
else
    say "warning: no /dev/vda; home is not persistent"
fi

# 4/5. users and authorized keys
keys=/run/cloud/keys.valid
: >"$keys"
if [ -f /run/cloud/keys ]; then
    grep -E '^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/=]+( .*)?$' \
        /run/cloud/keys | sort -u >"$keys" || true
fi
install_keys() { # install_keys HOME UID GID
    mkdir -p "$1/.ssh"
    cp "$keys" "$1/.ssh/authorized_keys"
    chown "$2:$3" "$1" "$1/.ssh" "$1/.ssh/authorized_keys"
    chmod 0700 "$1/.ssh"
    chmod 0600 "$1/.ssh/authorized_keys"
}
install_keys /root 0 0
chmod 0700 /root
user=$(head -n 1 /run/cloud/user 2>/dev/null || true)
if [ -n "$user" ] && [ "$user" != root ] && printf '%s' "$user" | grep -Eq '^[a-z_][a-z0-9_-]{0,31}$'; then
    echo "$user:*:1000:1000::/home/$user:/bin/sh" >>/etc/passwd
    echo "$user:x:1000:" >>/etc/group
    mkdir -p "/home/$user"
    chmod 0755 "/home/$user"
    install_keys "/home/$user" 1000 1000
    say "user $user ($(wc -l <"$keys") authorized keys)"
elif [ -n "$user" ]; then
    say "warning: ignoring invalid user name"
fi

# 4. SSH host key: the seed's ed25519 key, else one kept on /data, else a fresh one
HK=/etc/dropbear/dropbear_ed25519_host_key
if [ -s /run/cloud/ed25519_private ] &&
    /usr/bin/dropbearconvert openssh dropbear /run/cloud/ed25519_private "$HK" >/dev/null 2>&1; then
    say "host key from seed"
elif [ -s /data/aether/dropbear_ed25519_host_key ]; then
    cp /data/aether/dropbear_ed25519_host_key "$HK"
else
    /usr/bin/dropbearkey -t ed25519 -f "$HK" >/dev/null 2>&1
    [ -d /data/aether ] && cp "$HK" /data/aether/dropbear_ed25519_host_key
    say "generated host key"
fi
chmod 0600 "$HK"
rm -f /run/cloud/ed25519_private
say "host key $(/usr/bin/dropbearkey -y -f "$HK" 2>/dev/null | grep '^ssh-ed25519' | cut -d' ' -f1,2)"

# 1. network: eth0 via DHCP (udhcpc stays in the background for renewals)
if wait_for -e /sys/class/net/eth0 30; then
    ip link set eth0 up
    udhcpc -i eth0 -s /etc/aether/udhcpc.script -t 20 -T 1 -A 2 -b -p /run/udhcpc.eth0.pid \
        -x "hostname:$name" >/dev/null 2>&1 || say "warning: udhcpc failed"
else
    say "warning: no eth0"
fi

# 7. ACPI power button -> clean poweroff
if ls /dev/input/event* >/dev/null 2>&1; then
    acpid -c /etc/acpi -l /dev/console -p /run/acpid.pid || say "warning: acpid failed"
else
    say "warning: no input event devices; ACPI shutdown will not work"
fi
exit 0
EOF
chmod 0755 "$R/etc/aether/rc.boot"

cat >"$R/etc/aether/rc.ready" <<'EOF'
#!/bin/sh
# Announce readiness once dropbear listens on port 22.
n=0
while [ "$n" -lt 300 ]; do
    if netstat -ltn 2>/dev/null | grep -q ':22 '; then
        ip=$(ip -4 -o addr show dev eth0 2>/dev/null | awk '{ split($4, a, "/"); print a[1]; exit }')
        echo "aether-testguest: ready hostname=$(hostname) ip=${ip:-none}"
        exit 0
    fi
    usleep 100000
    n=$((n + 1))
done
echo "aether-testguest: dropbear did not start"
EOF
chmod 0755 "$R/etc/aether/rc.ready"

cat >"$R/etc/aether/rc.shutdown" <<'EOF'
#!/bin/sh
# Run by busybox init on poweroff/reboot, before it kills everything and powers off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
echo "aether-testguest: stopping"
for p in /run/acpid.pid /run/udhcpc.eth0.pid; do
    [ -f "$p" ] && kill "$(cat "$p")" 2>/dev/null
done
killall dropbear 2>/dev/null
kill -TERM -1 2>/dev/null
sleep 1
kill -KILL -1 2>/dev/null
sync
cd /
ok=1
if grep -q ' /home ' /proc/mounts; then umount /home || ok=0; fi
if grep -q ' /data ' /proc/mounts; then
    umount /data || { mount -o remount,ro /data || ok=0; }
fi
mount -o remount,ro /mnt/seed 2>/dev/null
sync
if [ "$ok" = 1 ]; then
    echo "aether-testguest: disks unmounted, powering off"
else
    echo "aether-testguest: warning: unmount failed"
fi
EOF
chmod 0755 "$R/etc/aether/rc.shutdown"

# ---------------------------------------------------------------- outputs
mkdir -p "$OUT"
(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) |
    gzip -n -9 >"$WORK/initrd.img"
cp "$VMLINUZ" "$WORK/vmlinuz"
echo "$CMDLINE" >"$WORK/cmdline"
cat >"$WORK/image.toml" <<EOF
# aether test guest (images/testguest/build.sh)
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
for f in vmlinuz initrd.img cmdline image.toml; do
    mv -f "$WORK/$f" "$OUT/$f"
done
if ! qemu-img info "$OUT/disk.qcow2" >/dev/null 2>&1; then
    qemu-img create -q -f qcow2 "$OUT/disk.qcow2.tmp" "$DISK_SIZE"
    mv -f "$OUT/disk.qcow2.tmp" "$OUT/disk.qcow2"
fi
log "built $OUT: kernel $KVER, initrd $(du -k "$OUT/initrd.img" | cut -f1) KiB"
