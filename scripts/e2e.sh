#!/usr/bin/env bash
# End-to-end tests: real libvirtd + qemu (TCG), real guests, real SSH. Run as root; called by
# scripts/test.sh. Everything runs inside a network namespace created here (guest traffic
# never leaves it) and a private mount namespace (libvirt's sockets, state and pid files are
# this run's own, so another libvirtd on the machine is neither seen nor disturbed).
#
#   scripts/e2e.sh                 # build guest images if needed, run tests/tests/e2e.rs
#   AETHER_E2E_DEBIAN=0 scripts/e2e.sh   # skip the (slow) real Debian 12 image test
#   AETHER_E2E_FILTER=uefi scripts/e2e.sh  # only the tests whose name contains "uefi"
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ROOT=$PWD
NS=aether-e2e
log() { printf '=== e2e: %s\n' "$*"; }
die() { printf 'e2e: %s\n' "$*" >&2; exit 1; }

if [ "${1:-}" = --inner ]; then
  # ---- inside: ip netns exec $NS unshare --mount
  mount --make-rprivate /
  for d in /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt; do
    mkdir -p "$d"
    mount -t tmpfs -o mode=0755 tmpfs "$d"
  done
  ETC=$(mktemp -d /tmp/aether-e2e-etc.XXXXXX)
  cp -a /etc/libvirt/. "$ETC/"
  # An install of aether on this host (scripts/install.sh) keeps its storage pool, network,
  # filters and domains in /etc/libvirt: this namespace's libvirtd starts without them.
  rm -f "$ETC"/storage/aether.xml "$ETC"/storage/autostart/aether.xml \
    "$ETC"/qemu/networks/aether.xml "$ETC"/qemu/networks/autostart/aether.xml \
    "$ETC"/qemu/aether-*.xml "$ETC"/qemu/autostart/aether-*.xml "$ETC"/nwfilter/aether-*.xml
  mount --bind "$ETC" /etc/libvirt
  mkdir -p /var/lib/libvirt/images /var/log/libvirt/qemu
  # libvirt probes qemu as root (KVM looks present) but checks /dev/kvm as libvirt-qemu; on a
  # host without udev /dev/kvm is root-only and every capability lookup re-probes qemu (~4 s
  # each). Give this namespace a /dev/kvm the kvm group can open, as Debian's udev rule would.
  # Guests still run under TCG: aetherd is configured with accel = "tcg".
  if [ -c /dev/kvm ] && ! su -s /bin/sh libvirt-qemu -c 'test -r /dev/kvm -a -w /dev/kvm' 2>/dev/null; then
    mkdir -p /run/libvirt/dev
    mknod -m 0660 /run/libvirt/dev/kvm c $((16#$(stat -c '%t' /dev/kvm))) $((16#$(stat -c '%T' /dev/kvm)))
    chgrp kvm /run/libvirt/dev/kvm
    mount --bind /run/libvirt/dev/kvm /dev/kvm
  fi
  ip link set lo up
  # A real host has addresses besides the bridge's, so its guests' filters get a list of
  # host addresses (HOST_IP): give this namespace one more (TEST-NET-2, on lo, never routed),
  # or a rule that cannot take a list passes here and fails on every real host.
  ip addr add 198.51.100.1/32 dev lo
  cleanup() {
    set +e
    for p in /run/libvirt/e2e-libvirtd.pid /run/libvirt/e2e-virtlogd.pid; do
      [ -s "$p" ] && kill "$(cat "$p")" 2>/dev/null
    done
    sleep 1
    rm -rf "$ETC"
  }
  trap cleanup EXIT
  virtlogd -d -p /run/libvirt/e2e-virtlogd.pid
  libvirtd -d -p /run/libvirt/e2e-libvirtd.pid
  for _ in $(seq 60); do virsh -c qemu:///system -q version >/dev/null 2>&1 && break; sleep 0.5; done
  virsh -c qemu:///system -q version >/dev/null 2>&1 || die "libvirtd did not answer"
  log "libvirtd up: $(virsh -c qemu:///system version | grep -i 'running hypervisor' | sed 's/.*: //')"
  results=$(mktemp)
  rc=0
  cargo test --offline --locked -p aether-tests --test e2e --test e2e_access --test e2e_network --test e2e_crash --test e2e_suspend -- --ignored --test-threads=1 ${AETHER_E2E_FILTER:-} 2>&1 \
    | tee "$results" || rc=$?
  if [ "$rc" -eq 0 ]; then
    log "benchmark: workspace create time against image size"
    "$ROOT/target/debug/bench-create" || rc=$?
  fi
  awk '/^test result:/ { p += $4; f += $6 } END { printf "\ne2e: %d passed, %d failed\n", p, f }' "$results"
  rm -f "$results"
  exit "$rc"
fi

[ "$(id -u)" -eq 0 ] || die "run as root (it starts libvirtd and creates a network namespace)"

RUNTIME=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils
  dnsmasq-base iptables openssh-client iproute2 util-linux ovmf mtools)
ensure_packages "${RUNTIME[@]}"
ensure_qemu_user

# Guest images come from their recipes through a cache keyed by the recipe's hash.
image() { bash scripts/build-image.sh "$1" || die "image $1 could not be built"; }
export AETHER_E2E_TESTGUEST
AETHER_E2E_TESTGUEST=$(image testguest)
if [ "${AETHER_E2E_DEBIAN:-1}" != 0 ]; then
  export AETHER_E2E_DEBIAN
  AETHER_E2E_DEBIAN=$(image debian-12)
else
  unset AETHER_E2E_DEBIAN
fi

# `aether ui` (the browser test) serves assets embedded at build time.
[ -f ui/dist/index.html ] || build_ui
cargo build --offline --locked --workspace --bins --tests

ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
trap 'ip netns del "$NS" 2>/dev/null || true' EXIT
ip netns exec "$NS" unshare --mount --propagation private -- bash "$ROOT/scripts/e2e.sh" --inner
