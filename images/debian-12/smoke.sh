#!/bin/bash
# Smoke test for the Debian 12 cloud-init image (run as root):
#
#   bash images/debian-12/smoke.sh [IMAGE_DIR]
#
# Builds the image with build.sh into IMAGE_DIR (default $WORK/image; a no-op when it is up to
# date), then, inside a network namespace `aether-d12` and a private mount namespace (libvirt's
# sockets, pid files and state are this run's own tmpfs copies):
#   starts virtlogd + libvirtd, defines a NAT network 192.168.151.0/24 (bridge aetherbr1) with a
#   static DHCP host, creates a 4G qcow2 overlay on the image's 2G disk.qcow2, writes a NoCloud
#   seed (vfat labelled "cidata", the layout aetherd's cloudinit.rs writes; DEBIAN12_SEED=iso for
#   an ISO 9660 one) with a generated client key for user `dev` and a generated ed25519 host key,
#   boots it (TCG, direct kernel boot, virtio disks, virtio rng, serial console to a file),
#   logs in with the host key pinned (StrictHostKeyChecking=yes) and checks hostname, grown
#   root filesystem, user, sudo, DHCP address and cloud-init's final status; stops it with ACPI
#   (virsh shutdown, must power off within 60 s); boots it a second time (same host key, no
#   re-provisioning) and stops it again; then removes domain, network, libvirtd and namespace.
#
# Only one libvirtd session per machine is run at a time by convention: this script holds
# /tmp/aether-libvirtd.lock (flock) for its whole libvirtd session and first waits (up to
# DEBIAN12_SMOKE_WAIT seconds, default 1200) for libvirtd processes of other runs to finish;
# after that it proceeds anyway (the private mount namespace keeps the two apart).
#
# Environment: DEBIAN12_SMOKE_WORK (default /tmp/aether-d12-smoke), DEBIAN12_SEED=vfat|iso,
# DEBIAN12_SSH_TIMEOUT (default 300 s), DEBIAN12_SMOKE_MEMORY (MiB, default 1024),
# DEBIAN12_SMOKE_SECOND_BOOT=0 to skip the second boot, DEBIAN12_SMOKE_NO_BUILD=1 to test
# IMAGE_DIR as it is (no build.sh run).
set -euo pipefail

NS=aether-d12
NAME=aether-d12
BRIDGE=aetherbr1
NET_PREFIX=192.168.151
GUEST_IP=$NET_PREFIX.10
GUEST_MAC=52:54:00:aa:01:01
GUEST_HOST=d12-smoke
GUEST_USER=dev
SEED_KIND=${DEBIAN12_SEED:-vfat}
SSH_TIMEOUT=${DEBIAN12_SSH_TIMEOUT:-300}
MEMORY=${DEBIAN12_SMOKE_MEMORY:-1024}
SECOND_BOOT=${DEBIAN12_SMOKE_SECOND_BOOT:-1}
ROOT_SIZE=4G
STOP_TIMEOUT=60
LOCK=/tmp/aether-libvirtd.lock

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"

log() { printf 'd12-smoke: [%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ====================================================================== inner part
# Runs inside `ip netns exec $NS unshare --mount`.
inner() {
    local WORK=$1 IMG=$2
    local PASS=0 FAIL=0
    ok() { log "ok: $*"; PASS=$((PASS + 1)); }
    bad() { log "FAIL: $*"; FAIL=$((FAIL + 1)); }

    mount --make-rprivate /
    local d
    for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
        mkdir -p "$d"
        mount -t tmpfs -o mode=0755 tmpfs "$d"
    done
    rm -rf "$WORK/etc-libvirt"
    mkdir -p "$WORK/etc-libvirt"
    cp -a /etc/libvirt/. "$WORK/etc-libvirt/"
    mount --bind "$WORK/etc-libvirt" /etc/libvirt
    mkdir -p /var/lib/libvirt/images /var/log/libvirt/qemu
    ip link set lo up

    LIBVIRTD_PID=/run/libvirt/aether-d12-libvirtd.pid VIRTLOGD_PID=/run/libvirt/aether-d12-virtlogd.pid
    cleanup_inner() {
        set +e
        log "cleaning up domain, network, libvirtd"
        virsh -q destroy "$NAME" >/dev/null 2>&1
        virsh -q undefine "$NAME" >/dev/null 2>&1
        virsh -q net-destroy "$NAME" >/dev/null 2>&1
        local p
        for p in "$LIBVIRTD_PID" "$VIRTLOGD_PID"; do
            [ -s "$p" ] && kill "$(cat "$p")" 2>/dev/null
        done
        sleep 1
    }
    trap cleanup_inner EXIT

    log "starting virtlogd and libvirtd in netns $NS"
    virtlogd -d -p "$VIRTLOGD_PID"
    libvirtd -d -p "$LIBVIRTD_PID"
    export LIBVIRT_DEFAULT_URI=qemu:///system
    local i
    for i in $(seq 1 60); do
        virsh -q version >/dev/null 2>&1 && break
        sleep 0.5
    done
    virsh -q version >/dev/null 2>&1 || die "libvirtd did not answer"
    log "libvirtd up: $(virsh version 2>/dev/null | grep -i 'running hypervisor' | sed 's/.*: //')"

    # ---- network (NAT, static DHCP host entry; lives only in this namespace)
    cat >"$WORK/net.xml" <<EOF
<network>
  <name>$NAME</name>
  <forward mode='nat'/>
  <bridge name='$BRIDGE'/>
  <ip address='$NET_PREFIX.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='$NET_PREFIX.100' end='$NET_PREFIX.200'/>
      <host mac='$GUEST_MAC' name='$GUEST_HOST' ip='$GUEST_IP'/>
    </dhcp>
  </ip>
</network>
EOF
    log "creating network $NAME ($NET_PREFIX.0/24, bridge $BRIDGE)"
    virsh -q net-create "$WORK/net.xml" >/dev/null

    # ---- keys and seed: the exact user-data layout aetherd/src/cloudinit.rs writes
    rm -f "$WORK"/id_ed25519* "$WORK"/hostkey* "$WORK/known_hosts"
    ssh-keygen -q -t ed25519 -N '' -C "aether-d12-client" -f "$WORK/id_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C "aether-d12-host" -f "$WORK/hostkey"
    echo "$GUEST_IP $(cut -d' ' -f1,2 "$WORK/hostkey.pub")" >"$WORK/known_hosts"
    rm -rf "$WORK/seed"
    mkdir -p "$WORK/seed"
    cat >"$WORK/seed/meta-data" <<EOF
instance-id: $GUEST_HOST
local-hostname: $GUEST_HOST
EOF
    {
        echo "#cloud-config"
        echo "hostname: $GUEST_HOST"
        echo "users:"
        echo "  - name: $GUEST_USER"
        echo "    shell: /bin/bash"
        echo "    sudo: \"ALL=(ALL) NOPASSWD:ALL\""
        echo "    lock_passwd: true"
        echo "    ssh_authorized_keys:"
        echo "      - \"$(cat "$WORK/id_ed25519.pub")\""
        echo "ssh_pwauth: false"
        echo "ssh_deletekeys: true"
        echo "ssh_keys:"
        echo "  ed25519_private: |"
        sed 's/^/    /' "$WORK/hostkey"
        echo "  ed25519_public: \"$(cat "$WORK/hostkey.pub")\""
        echo "growpart:"
        echo "  mode: auto"
        echo "  devices: [\"/\"]"
        echo "resize_rootfs: true"
    } >"$WORK/seed/user-data"
    rm -f "$WORK/seed.img"
    case $SEED_KIND in
    vfat)
        # 1 MiB FAT12 labelled "cidata" (lower case, as aetherd's fatfs writer does).
        mkfs.vfat -C -n cidata "$WORK/seed.img" 1024 >/dev/null 2>&1
        mcopy -i "$WORK/seed.img" "$WORK/seed/user-data" "$WORK/seed/meta-data" ::
        ;;
    iso)
        (cd "$WORK/seed" && genisoimage -quiet -output "$WORK/seed.img" -volid cidata -joliet -rock user-data meta-data)
        ;;
    *) die "DEBIAN12_SEED must be vfat or iso" ;;
    esac
    log "seed: $SEED_KIND, $(stat -c %s "$WORK/seed.img") bytes"

    # ---- root volume: qcow2 overlay on the image's base disk, bigger than the base
    rm -f "$WORK/root.qcow2" "$WORK/console.log"
    qemu-img create -q -f qcow2 -F qcow2 -b "$IMG/disk.qcow2" "$WORK/root.qcow2" "$ROOT_SIZE"

    cat >"$WORK/domain.xml" <<EOF
<domain type='qemu'>
  <name>$NAME</name>
  <memory unit='MiB'>$MEMORY</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>$IMG/vmlinuz</kernel>
    <initrd>$IMG/initrd.img</initrd>
    <cmdline>$(cat "$IMG/cmdline")</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$WORK/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$WORK/seed.img'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <source network='$NAME'/>
      <mac address='$GUEST_MAC'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='$WORK/console.log' append='on'/>
      <target port='0'/>
    </serial>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
    local t_def
    t_def=$(now)
    virsh -q define "$WORK/domain.xml" >/dev/null
    log "domain defined in $(elapsed "$t_def" "$(now)")s (libvirt probes qemu's capabilities on first use)"

    SSH=(ssh -F /dev/null -i "$WORK/id_ed25519" -o IdentitiesOnly=yes -o BatchMode=yes
        -o StrictHostKeyChecking=yes -o UserKnownHostsFile="$WORK/known_hosts"
        -o ConnectTimeout=3 -o LogLevel=ERROR "$GUEST_USER@$GUEST_IP")

    wait_ssh() { # prints seconds from $1 until an SSH command succeeds
        local t0=$1 deadline
        deadline=$(awk -v a="$t0" -v s="$SSH_TIMEOUT" 'BEGIN { printf "%d", a + s }')
        while [ "$(date +%s)" -lt "$deadline" ]; do
            if "${SSH[@]}" true </dev/null 2>/dev/null; then
                elapsed "$t0" "$(now)"
                return 0
            fi
            sleep 1
        done
        return 1
    }
    acpi_stop() { # prints seconds until "shut off", or nothing
        local t0 j
        t0=$(now)
        virsh -q shutdown "$NAME" >/dev/null
        for j in $(seq 1 $((STOP_TIMEOUT * 5))); do
            if [ "$(virsh -q domstate "$NAME" 2>/dev/null)" = "shut off" ]; then
                elapsed "$t0" "$(now)"
                return 0
            fi
            sleep 0.2
        done
        return 1
    }

    # ---- first boot
    log "booting $NAME (TCG, 1 vCPU, ${MEMORY} MiB)"
    local t0 ssh1 ssh2 stop1 stop2 out size
    t0=$(now)
    virsh -q start "$NAME" >/dev/null
    if ssh1=$(wait_ssh "$t0"); then
        ok "first boot: SSH (host key pinned) answered ${ssh1}s after virsh start"
    else
        bad "first boot: no SSH within ${SSH_TIMEOUT}s"
        log "console (tail):"; tail -n 60 "$WORK/console.log" >&2 || true
        return 1
    fi
    out=$("${SSH[@]}" 'hostname; df -h /; id' </dev/null)
    printf '%s\n' "$out" | sed 's/^/    guest> /' >&2
    [ "$(printf '%s\n' "$out" | head -n1)" = "$GUEST_HOST" ] && ok "hostname $GUEST_HOST" ||
        bad "hostname: got '$(printf '%s\n' "$out" | head -n1)'"
    printf '%s\n' "$out" | grep -q "^uid=[0-9]*($GUEST_USER) gid=[0-9]*($GUEST_USER)" && ok "user $GUEST_USER exists" ||
        bad "id output unexpected"
    # cloud-init's resizefs may still be running when sshd first answers: wait for its end.
    out=$("${SSH[@]}" 'cloud-init status --wait --long 2>&1; echo "rc=$?"' </dev/null || true)
    printf '%s\n' "$out" | sed 's/^/    cloud-init> /' >&2
    printf '%s\n' "$out" | grep -q '^status: done' && ok "cloud-init status: done" ||
        bad "cloud-init did not finish cleanly"
    size=$("${SSH[@]}" 'df -B1 --output=size,source / | tail -n1' </dev/null)
    log "root filesystem: $size"
    # 4 GiB disk: ext4 reports a little less than 4 GiB (metadata); 2G would mean not grown.
    [ "${size%% *}" -gt $((3500 * 1024 * 1024)) ] && ok "root filesystem grown to the 4G overlay ($(("${size%% *}" / 1048576)) MiB, ${size##* })" ||
        bad "root filesystem not grown: ${size%% *} bytes"
    out=$("${SSH[@]}" 'sudo grep -h -E "cc_growpart|cc_resizefs" /var/log/cloud-init.log | tail -n 8' </dev/null 2>&1 || true)
    printf '%s\n' "$out" | sed 's/^/    cloud-init.log> /' >&2
    # `cloud-init schema --system` (22.4) checks the user-data only; the merged configuration
    # (cloud.cfg, cloud.cfg.d, user-data) is checked at boot and logged as a warning.
    out=$("${SSH[@]}" 'sudo cloud-init schema --system 2>&1; echo "rc=$?"; sudo grep -h -E "WARNING|ERROR|Traceback" /var/log/cloud-init.log' </dev/null 2>&1 || true)
    printf '%s\n' "$out" | sed 's/^/    schema> /' >&2
    printf '%s\n' "$out" | grep -q '^rc=0$' && ok "cloud-init schema --system: user-data valid" ||
        bad "cloud-init schema --system reports errors"
    printf '%s\n' "$out" | grep -q -E 'WARNING|ERROR|Traceback' && bad "cloud-init.log has warnings or errors" ||
        ok "cloud-init.log: no warnings or errors (merged config valid)"
    if grep -q 'Will now check root file system ... fsck from' "$WORK/console.log"; then
        ok "initramfs checked the root filesystem: $(grep -a -m1 -o -E '^rootfs: [a-z]+' "$WORK/console.log" | tr -d '\r')"
    else
        bad "initramfs did not fsck the root filesystem ($(grep -a -m1 -o 'fsck not present[^.]*' "$WORK/console.log" | tr -d '\r'))"
    fi
    out=$("${SSH[@]}" 'sudo -n id -un' </dev/null 2>&1 || true)
    [ "$out" = root ] && ok "passwordless sudo" || bad "sudo: got '$out'"
    out=$("${SSH[@]}" 'ip -4 -o addr show dev eth0' </dev/null 2>&1 || true)
    log "guest eth0: $out"
    printf '%s\n' "$out" | grep -q "inet $GUEST_IP/" && ok "guest eth0 has $GUEST_IP (DHCP)" || bad "eth0 address: $out"
    out=$(virsh -q domifaddr "$NAME" --source lease 2>/dev/null | awk '{ print $4 }')
    [ "${out%/*}" = "$GUEST_IP" ] && ok "libvirt DHCP lease $out" || bad "DHCP lease: got '$out'"
    out=$("${SSH[@]}" 'cat /etc/network/interfaces.d/* 2>/dev/null | grep -v "^#" | tr -s "\n" " "; echo; systemctl is-system-running 2>&1; systemctl --failed --no-legend --plain 2>&1 | head -n5' </dev/null 2>&1 || true)
    printf '%s\n' "$out" | sed 's/^/    guest> /' >&2
    out=$("${SSH[@]}" 'uname -r; ls /sys/block; cat /etc/machine-id' </dev/null 2>&1 | tr '\n' ' ')
    log "guest kernel / disks / machine-id: $out"

    # ---- graceful stop (ACPI)
    if stop1=$(acpi_stop); then ok "ACPI shutdown: shut off after ${stop1}s"; else
        bad "ACPI shutdown: still $(virsh -q domstate "$NAME") after ${STOP_TIMEOUT}s"
        virsh -q destroy "$NAME" >/dev/null 2>&1 || true
        stop1=
    fi

    # ---- second boot: same identity, nothing re-provisioned
    if [ "$SECOND_BOOT" = 1 ]; then
        t0=$(now)
        virsh -q start "$NAME" >/dev/null
        if ssh2=$(wait_ssh "$t0"); then
            ok "second boot: SSH (same pinned host key) answered ${ssh2}s after virsh start"
            out=$("${SSH[@]}" 'hostname' </dev/null 2>&1 || true)
            [ "$out" = "$GUEST_HOST" ] && ok "second boot: hostname kept" || bad "second boot hostname: $out"
        else
            bad "second boot: no SSH within ${SSH_TIMEOUT}s"
        fi
        if stop2=$(acpi_stop); then ok "second ACPI shutdown after ${stop2}s"; else
            bad "second ACPI shutdown timed out"
            stop2=
        fi
    fi

    virsh -q destroy "$NAME" >/dev/null 2>&1 || true
    cp "$WORK/console.log" "$WORK/console.last.log" 2>/dev/null || true
    log "console log: $WORK/console.log"
    log "timings: boot1->ssh ${ssh1:-?}s, acpi-stop1 ${stop1:-?}s, boot2->ssh ${ssh2:--}s, acpi-stop2 ${stop2:--}s"
    echo "debian-12 smoke ($SEED_KIND seed): $PASS passed, $FAIL failed"
    [ "$FAIL" = 0 ]
}

if [ "${1:-}" = "--inner" ]; then
    inner "$2" "$3"
    exit $?
fi

# ====================================================================== outer part
[ "$(id -u)" = 0 ] || die "run as root"

WORK=${DEBIAN12_SMOKE_WORK:-/tmp/aether-d12-smoke}
mkdir -p "$WORK"
chmod 0755 "$WORK"
WORK=$(cd "$WORK" && pwd)
IMG=${1:-$WORK/image}

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for p in libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 dnsmasq-base \
    iptables genisoimage dosfstools mtools openssh-client iproute2 util-linux; do
    pkg_installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    extra=()
    # qemu-system-x86 wants the suite's own qemu-utils; a newer one from backports blocks it.
    if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
        . /etc/os-release
        extra=(--allow-downgrades "qemu-utils/${VERSION_CODENAME:-bookworm}")
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y -qq \
        --no-install-recommends "${missing[@]}" "${extra[@]}"
fi

# libvirtd (without libvirt-daemon-system) needs the user the QEMU driver runs guests as.
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
id libvirt-qemu >/dev/null 2>&1 ||
    useradd -r -g libvirt-qemu -G kvm -s /usr/sbin/nologin -d /var/lib/libvirt libvirt-qemu

# Build (no-op when up to date), unless told to test IMAGE_DIR exactly as it is.
if [ "${DEBIAN12_SMOKE_NO_BUILD:-0}" = 1 ]; then
    [ -f "$IMG/image.toml" ] || die "DEBIAN12_SMOKE_NO_BUILD=1 but $IMG holds no image"
else
    bash "$HERE/build.sh" "$IMG"
fi
chmod 0755 "$IMG"
# libvirt runs qemu as libvirt-qemu: it must reach the image and the work dir.
chmod o+r "$IMG"/disk.qcow2 "$IMG"/vmlinuz "$IMG"/initrd.img

# One libvirtd session at a time: our lock, plus patience with runs that do not use it.
exec 9>"$LOCK"
log "waiting for $LOCK"
flock 9
WAIT=${DEBIAN12_SMOKE_WAIT:-1200}
waited=0
while pids=$(pgrep -x libvirtd || true) && [ -n "$pids" ]; do
    if [ "$waited" -ge "$WAIT" ]; then
        log "libvirtd of another run still active after ${WAIT}s ($(echo "$pids" | tr '\n' ' ')); proceeding in a private mount namespace"
        break
    fi
    [ $((waited % 60)) = 0 ] && log "another libvirtd is running ($(pgrep -a -x libvirtd | tr '\n' ';')); waiting"
    sleep 10
    waited=$((waited + 10))
done

if ip netns list | grep -qw "^$NS"; then
    pids=$(ip netns pids "$NS" || true)
    [ -z "$pids" ] || die "namespace $NS exists and has processes ($pids); a smoke run may be active"
    ip netns delete "$NS"
fi

cleanup_outer() {
    set +e
    local pids p
    pids=$(ip netns pids "$NS" 2>/dev/null)
    for p in $pids; do kill "$p" 2>/dev/null; done
    [ -n "$pids" ] && sleep 1
    pids=$(ip netns pids "$NS" 2>/dev/null)
    for p in $pids; do kill -9 "$p" 2>/dev/null; done
    ip netns delete "$NS" 2>/dev/null
}
trap cleanup_outer EXIT

log "creating network namespace $NS"
ip netns add "$NS"
rc=0
# fd 9 (the lock) stays with this shell only: daemons must not keep it after we exit.
ip netns exec "$NS" unshare --mount --propagation private -- bash "$SELF" --inner "$WORK" "$IMG" 9>&- || rc=$?
exit $rc
