#!/usr/bin/env bash
# Sets up aether on this Debian/Ubuntu machine and starts the daemon:
#
#   sudo scripts/install.sh
#
# Installs the packages (libvirt, qemu), builds and installs aetherd and aether into
# /usr/local/bin, creates group `aether` (and adds the invoking user to it), writes a default
# /etc/aether/aetherd.toml, then starts libvirtd and aetherd: as systemd services where
# systemd runs, as background processes otherwise (containers, CI machines).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '=== %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0"
command -v cargo >/dev/null || die "cargo not found: aether needs a Rust toolchain >= 1.88 (rustup)"

have_systemd=false
[ -d /run/systemd/system ] && have_systemd=true

PACKAGES=(libvirt-dev pkg-config gcc libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils dnsmasq-base iptables)
$have_systemd && PACKAGES+=(libvirt-daemon-system)

log "installing packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; then
  # A newer qemu-utils from another suite blocks the distribution's qemu-system-x86; take the
  # distribution's qemu-utils, which matches it.
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${PACKAGES[@]}" "qemu-utils/$codename"
fi

log "building aetherd and aether (release)"
cargo build --release --locked -p aetherd -p aether-cli
install -m 0755 target/release/aetherd target/release/aether /usr/local/bin/

log "group aether"
getent group aether >/dev/null || groupadd --system aether
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
  usermod -a -G aether "$SUDO_USER"
  echo "added $SUDO_USER to group aether (log in again for it to apply)"
fi

if [ ! -e /etc/aether/aetherd.toml ]; then
  install -d /etc/aether
  cat > /etc/aether/aetherd.toml <<'TOML'
# aetherd configuration; every key is optional. Flags (--socket, --state-dir,
# --libvirt-uri) override these.
# socket = "/run/aether/aetherd.sock"
# state_dir = "/var/lib/aether"
# libvirt_uri = "qemu:///system"
# max_volume_size_gb = 2048
# stop_timeout_secs = 60
# libvirt_timeout_secs = 30
# accel = "auto"    # auto | kvm | tcg
TOML
fi

if $have_systemd; then
  log "starting libvirtd and aetherd (systemd)"
  install -m 0644 systemd/aetherd.service /etc/systemd/system/aetherd.service
  install -D -m 0644 systemd/aether.sysusers.conf /usr/lib/sysusers.d/aether.conf
  install -D -m 0644 systemd/aether.tmpfiles.conf /usr/lib/tmpfiles.d/aether.conf
  systemctl daemon-reload
  systemctl enable --now libvirtd.service
  systemctl enable aetherd.service
  systemctl restart aetherd.service
else
  log "starting libvirtd and aetherd (no systemd: background processes)"
  # libvirtd's QEMU driver needs the libvirt-qemu user, which libvirt-daemon-system creates.
  getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  id libvirt-qemu >/dev/null 2>&1 ||
    useradd -r -g libvirt-qemu -G kvm -s /usr/sbin/nologin -d /var/lib/libvirt libvirt-qemu
  mkdir -p /var/log/libvirt /var/lib/libvirt/images
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -c qemu:///system version >/dev/null || die "libvirtd did not come up"
  if ! aether host info >/dev/null 2>&1; then
    install -d /run/aether /var/lib/aether
    setsid aetherd >>/var/log/aetherd.log 2>&1 < /dev/null &
    for _ in $(seq 50); do aether host info >/dev/null 2>&1 && break; sleep 0.2; done
  fi
fi

aether host info || die "aetherd is not answering; see /var/log/aetherd.log or journalctl -u aetherd"
log "aetherd is running. Next: aether project create my-app && aether project use my-app"
