#!/bin/bash
# Smoke test for the aether test guest (run as root):
#
#   bash images/testguest/smoke.sh [IMAGE_DIR]
#
# Builds the image with build.sh (into IMAGE_DIR, default $WORK/image) unless IMAGE_DIR already
# holds one, then, inside a network namespace `aether-tg` and a private mount namespace (so a
# libvirtd of another test run on this machine is neither seen nor disturbed):
#   starts virtlogd + libvirtd, defines a NAT network 192.168.150.0/24 with a static DHCP host,
#   boots the guest (TCG, direct kernel boot, qcow2 overlay as vda, NoCloud seed ISO as vdb),
#   checks SSH with a pinned host key, writes a file, stops it with ACPI (virsh shutdown),
#   starts it again, checks the file survived, then destroys and removes everything.
# Timings are printed at the end. Work dir: $TESTGUEST_SMOKE_WORK (default /tmp/aether-tg-smoke).
set -euo pipefail

NS=aether-tg
NAME=aether-tg
BRIDGE=aethertgbr0
NET_PREFIX=192.168.150
GUEST_IP=$NET_PREFIX.10
GUEST_MAC=52:54:00:aa:00:01
GUEST_HOST=tg-smoke
GUEST_USER=dev
SSH_TIMEOUT=${TESTGUEST_SSH_TIMEOUT:-180}
STOP_TIMEOUT=60

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SELF="$HERE/$(basename "${BASH_SOURCE[0]}")"

log() { printf 'smoke: [%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ====================================================================== inner part
# Runs inside `ip netns exec $NS unshare --mount`: everything below shares one private mount
# namespace, so libvirt's sockets, state and pid files are this run's own.
inner() {
    local WORK=$1 IMG=$2
    local PASS=0 FAIL=0
    if [ -n "${TESTGUEST_SMOKE_TRACE:-}" ]; then PS4='+[$(date +%T.%N | cut -c1-12)] '; set -x; fi
    ok() { log "ok: $*"; PASS=$((PASS + 1)); }
    bad() { log "FAIL: $*"; FAIL=$((FAIL + 1)); }

    mount --make-rprivate /
    for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
        mkdir -p "$d"
        mount -t tmpfs -o mode=0755 tmpfs "$d"
    done
    mkdir -p "$WORK/etc-libvirt"
    cp -a /etc/libvirt/. "$WORK/etc-libvirt/"
    mount --bind "$WORK/etc-libvirt" /etc/libvirt
    mkdir -p /var/lib/libvirt/images /var/log/libvirt/qemu
    # libvirt 9.0 probes QEMU with CAP_DAC_OVERRIDE (so KVM looks present) but then checks
    # /dev/kvm as the libvirt-qemu user; on a host without udev /dev/kvm is root-only 0600, the
    # two disagree and every capability lookup re-probes QEMU (~4 s each, ~50 s per virsh define).
    # Give this namespace a /dev/kvm the kvm group can open, as Debian's udev rule would; the
    # guest still runs under TCG (<domain type='qemu'>). The host's /dev/kvm is not changed.
    if [ -c /dev/kvm ] && ! su -s /bin/sh libvirt-qemu -c 'test -r /dev/kvm -a -w /dev/kvm' 2>/dev/null; then
        mkdir -p /run/libvirt/dev
        mount -t tmpfs -o mode=0755 tmpfs /run/libvirt/dev
        mknod -m 0660 /run/libvirt/dev/kvm c $((16#$(stat -c '%t' /dev/kvm))) $((16#$(stat -c '%T' /dev/kvm)))
        chgrp kvm /run/libvirt/dev/kvm
        mount --bind /run/libvirt/dev/kvm /dev/kvm
    fi
    ip link set lo up

    LIBVIRTD_PID=/run/libvirt/aether-tg-libvirtd.pid VIRTLOGD_PID=/run/libvirt/aether-tg-virtlogd.pid
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

    log "starting virtlogd and libvirtd"
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
    log "creating network $NAME ($NET_PREFIX.0/24)"
    virsh -q net-create "$WORK/net.xml" >/dev/null

    # ---- keys and seed
    log "network up; writing keys, seed ISO, overlay, domain"
    rm -f "$WORK"/id_ed25519* "$WORK"/hostkey*
    ssh-keygen -q -t ed25519 -N '' -C "aether-smoke-client" -f "$WORK/id_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C "aether-smoke-host" -f "$WORK/hostkey"
    echo "$GUEST_IP $(cut -d' ' -f1,2 "$WORK/hostkey.pub")" >"$WORK/known_hosts"
    mkdir -p "$WORK/seed"
    cat >"$WORK/seed/meta-data" <<EOF
instance-id: iid-$GUEST_HOST
local-hostname: $GUEST_HOST
EOF
    {
        echo "#cloud-config"
        echo "users:"
        echo "  - name: $GUEST_USER"
        echo "    shell: /bin/sh"
        echo "    ssh_authorized_keys:"
        echo "      - $(cat "$WORK/id_ed25519.pub")"
        echo "ssh_keys:"
        echo "  ed25519_private: |"
        sed 's/^/    /' "$WORK/hostkey"
        echo "  ed25519_public: $(cat "$WORK/hostkey.pub")"
    } >"$WORK/seed/user-data"
    rm -f "$WORK/seed.iso"
    (cd "$WORK/seed" && genisoimage -quiet -output "$WORK/seed.iso" -volid cidata -joliet -rock user-data meta-data)

    # ---- root volume: qcow2 overlay on the image's base disk, grown to 2 GiB
    rm -f "$WORK/root.qcow2" "$WORK/console.log"
    qemu-img create -q -f qcow2 -F qcow2 -b "$IMG/disk.qcow2" "$WORK/root.qcow2" 2G

    cat >"$WORK/domain.xml" <<EOF
<domain type='qemu'>
  <name>$NAME</name>
  <memory unit='MiB'>256</memory>
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
      <source file='$WORK/seed.iso'/>
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
    virsh -q define "$WORK/domain.xml" >/dev/null
    log "domain defined"

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
    ready_time() { # seconds from $1 until the Nth ready line ($2) appears in the console log
        local t0=$1 n=$2 j
        for j in $(seq 1 600); do
            if [ "$(grep -c 'aether-testguest: ready' "$WORK/console.log" 2>/dev/null || true)" -ge "$n" ]; then
                elapsed "$t0" "$(now)"
                return 0
            fi
            sleep 0.2
        done
        echo "?"
    }

    # ---- first boot
    log "booting $NAME"
    local t0 ssh1 ssh2 ready1 ready2 stop1 out token
    t0=$(now)
    virsh -q start "$NAME" >/dev/null
    out=$(ps -o args= -C qemu-system-x86_64 | grep -F -- "guest=$NAME," |
        grep -o -- '-accel [a-z]*\|accel=[a-z:]*' | head -n 1 || true)
    case "$out" in *tcg*) ok "qemu runs with TCG ($out)" ;; *) bad "qemu accelerator: '$out'" ;; esac
    ready1=$(ready_time "$t0" 1)
    if ssh1=$(wait_ssh "$t0"); then
        ok "first boot: SSH answered ${ssh1}s after virsh start (ready line at ${ready1}s)"
    else
        bad "first boot: no SSH within ${SSH_TIMEOUT}s"
        log "console:"; cat "$WORK/console.log" >&2 || true
        return 1
    fi
    out=$("${SSH[@]}" cat /etc/hostname </dev/null)
    if [ "$out" = "$GUEST_HOST" ]; then ok "hostname is $out (host key pinned)"; else bad "hostname: got '$out'"; fi
    out=$(virsh -q domifaddr "$NAME" --source lease 2>/dev/null | awk '{ print $4 }')
    [ "${out%/*}" = "$GUEST_IP" ] && ok "DHCP lease $out" || bad "DHCP lease: got '$out'"
    token="persist-$(date +%s%N)"
    "${SSH[@]}" "echo $token > ~/persist.txt && sync" </dev/null
    out=$("${SSH[@]}" 'df -k /home | tail -n 1' </dev/null)
    log "guest /home: $out"

    # ---- graceful stop (ACPI)
    t0=$(now)
    virsh -q shutdown "$NAME" >/dev/null
    stop1=
    for i in $(seq 1 $((STOP_TIMEOUT * 5))); do
        if [ "$(virsh -q domstate "$NAME" 2>/dev/null)" = "shut off" ]; then
            stop1=$(elapsed "$t0" "$(now)")
            break
        fi
        sleep 0.2
    done
    if [ -n "$stop1" ]; then ok "ACPI shutdown: shut off after ${stop1}s"; else bad "ACPI shutdown: still $(virsh -q domstate "$NAME") after ${STOP_TIMEOUT}s"; virsh -q destroy "$NAME" >/dev/null; fi
    if grep -q 'aether-testguest: disks unmounted' "$WORK/console.log"; then ok "guest unmounted its disks"; else bad "no clean-unmount line in console log"; fi

    # ---- second boot: data survived
    t0=$(now)
    virsh -q start "$NAME" >/dev/null
    ready2=$(ready_time "$t0" 2)
    if ssh2=$(wait_ssh "$t0"); then
        ok "second boot: SSH answered ${ssh2}s after virsh start (ready line at ${ready2}s)"
        out=$("${SSH[@]}" 'cat "$HOME/persist.txt"' </dev/null 2>&1 || true)
        if [ "$out" = "$token" ]; then ok "file in home survived stop/start"; else bad "persisted file: got '$out'"; fi
    else
        bad "second boot: no SSH within ${SSH_TIMEOUT}s"
    fi

    # ---- hard stop (virsh destroy), third boot: the journal recovers, the file is still there
    local ssh3=
    virsh -q destroy "$NAME" >/dev/null
    t0=$(now)
    virsh -q start "$NAME" >/dev/null
    if ssh3=$(wait_ssh "$t0"); then
        out=$("${SSH[@]}" 'cat "$HOME/persist.txt"' </dev/null 2>&1 || true)
        if [ "$out" = "$token" ]; then ok "file survived virsh destroy (boot3 SSH ${ssh3}s)"; else bad "after destroy: got '$out'"; fi
    else
        bad "third boot (after destroy): no SSH within ${SSH_TIMEOUT}s"
    fi

    virsh -q destroy "$NAME" >/dev/null 2>&1 || true
    log "console log: $WORK/console.log"
    log "timings: boot1->ssh ${ssh1:-?}s (ready ${ready1}s), acpi-stop ${stop1:-?}s, boot2->ssh ${ssh2:-?}s (ready ${ready2:-?}s), boot3 (after destroy)->ssh ${ssh3:-?}s"
    echo "testguest smoke: $PASS passed, $FAIL failed"
    [ "$FAIL" = 0 ]
}

if [ "${1:-}" = "--inner" ]; then
    inner "$2" "$3"
    exit $?
fi

# ====================================================================== outer part
[ "$(id -u)" = 0 ] || die "run as root"

WORK=${TESTGUEST_SMOKE_WORK:-/tmp/aether-tg-smoke}
mkdir -p "$WORK"
chmod 0755 "$WORK"
WORK=$(cd "$WORK" && pwd)
IMG=${1:-$WORK/image}

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing=()
for p in libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 dnsmasq-base \
    iptables genisoimage openssh-client iproute2 util-linux; do
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

if [ ! -f "$IMG/image.toml" ] || [ ! -f "$IMG/initrd.img" ]; then
    log "building image into $IMG"
    bash "$HERE/build.sh" "$IMG"
fi
chmod 0755 "$IMG"

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
    sleep 1
    pids=$(ip netns pids "$NS" 2>/dev/null)
    for p in $pids; do kill -9 "$p" 2>/dev/null; done
    ip netns delete "$NS" 2>/dev/null
}
trap cleanup_outer EXIT

log "creating network namespace $NS"
ip netns add "$NS"
rc=0
ip netns exec "$NS" unshare --mount --propagation private -- bash "$SELF" --inner "$WORK" "$IMG" || rc=$?
exit $rc
