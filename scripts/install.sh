#!/usr/bin/env bash
# Sets up aether on this Debian/Ubuntu machine and starts the daemon:
#
#   sudo scripts/install.sh
#
# Installs the packages (libvirt, qemu), builds and installs aetherd and aether into
# /usr/local/bin (with shell completions and man pages under /usr/local/share), creates group `aether` (and adds the invoking user to it), writes a default
# /etc/aether/aetherd.toml, starts libvirtd and aetherd (as systemd services where systemd
# runs, as background processes otherwise), then builds a guest image from its recipe in
# images/ and imports it as the default image:
#
#   AETHER_IMAGE=debian-12 (default)  real Debian 12 with cloud-init and OpenSSH (~3 min build)
#   AETHER_IMAGE=testguest            tiny busybox + dropbear guest (~10 s build, boots in ~5 s)
#   AETHER_IMAGE=ubuntu-22.04         any other name: pulled from the image catalog (online;
#                                     see aether image catalog), verified by its checksum
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

log() { printf '=== %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: sudo $0"
command -v cargo >/dev/null || die "cargo not found: aether needs a Rust toolchain >= 1.89 (rustup)"

have_systemd=false
[ -d /run/systemd/system ] && have_systemd=true

IMAGE=${AETHER_IMAGE:-debian-12}
case "$IMAGE" in
  *[!a-z0-9._-]* | "") die "invalid AETHER_IMAGE $IMAGE: an image name (see images/ and aether image catalog)" ;;
esac

PACKAGES=(libvirt-dev pkg-config gcc libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils dnsmasq-base iptables openssh-client)
$have_systemd && PACKAGES+=(libvirt-daemon-system)

ensure_packages "${PACKAGES[@]}"

log "building the web UI (ui/, npm)"
build_ui
log "building aetherd and aether (release)"
cargo build --release --locked -p aetherd -p aether-cli
install -m 0755 target/release/aetherd target/release/aether /usr/local/bin/
# Shell completions and man pages, generated from the CLI's own definitions.
install -d /usr/local/share/bash-completion/completions /usr/local/share/zsh/site-functions \
  /usr/local/share/fish/vendor_completions.d
/usr/local/bin/aether completions bash >/usr/local/share/bash-completion/completions/aether
/usr/local/bin/aether completions zsh >/usr/local/share/zsh/site-functions/_aether
/usr/local/bin/aether completions fish >/usr/local/share/fish/vendor_completions.d/aether.fish
/usr/local/bin/aether man --dir /usr/local/share/man/man1

log "group aether"
getent group aether >/dev/null || groupadd --system aether
if [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
  usermod -a -G aether "$SUDO_USER"
  echo "added $SUDO_USER to group aether (log in again for it to apply)"
fi

if [ ! -e /etc/aether/aetherd.toml ]; then
  install -d /etc/aether
  cat > /etc/aether/aetherd.toml <<TOML
# aetherd configuration; every key is optional. Flags (--socket, --state-dir,
# --libvirt-uri) override these.
# socket = "/run/aether/aetherd.sock"
# state_dir = "/var/lib/aether"
# libvirt_uri = "qemu:///system"
# max_volume_size_gb = 2048
# stop_timeout_secs = 60
# libvirt_timeout_secs = 30
# accel = "auto"    # auto | kvm | tcg
# network_cidr = "192.168.150.0/24"   # unset: a /24 that collides with no route
# boot_timeout_secs = 300             # unset: 120 with KVM, 300 with TCG
default_image = "$IMAGE"
TOML
fi

log "/dev/kvm"
ensure_kvm_device

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
  ensure_qemu_user
  mkdir -p /var/log/libvirt /var/lib/libvirt/images
  pgrep -x virtlogd >/dev/null || virtlogd -d
  pgrep -x libvirtd >/dev/null || libvirtd -d
  for _ in $(seq 50); do virsh -c qemu:///system version >/dev/null 2>&1 && break; sleep 0.2; done
  virsh -c qemu:///system version >/dev/null || die "libvirtd did not come up"
  # An aetherd still running from an earlier install serves the old binary: stop it (the
  # VMs keep running; the new one reconciles them), as systemctl restart does.
  if pids=$(pgrep -x aetherd); then
    echo "stopping the running aetherd ($pids) to start the new build"
    kill $pids
    for _ in $(seq 100); do pgrep -x aetherd >/dev/null || break; sleep 0.1; done
    pgrep -x aetherd >/dev/null && die "the old aetherd ($pids) did not stop"
  fi
  if ! aether host info >/dev/null 2>&1; then
    install -d /run/aether
    install -d -m 0750 /var/lib/aether
    # The log names workspaces, addresses and users: root's alone, like the state dir.
    [ -e /var/log/aetherd.log ] || install -m 0600 /dev/null /var/log/aetherd.log
    chmod 0600 /var/log/aetherd.log
    setsid aetherd >>/var/log/aetherd.log 2>&1 < /dev/null &
    for _ in $(seq 50); do aether host info >/dev/null 2>&1 && break; sleep 0.2; done
  fi
fi

aether host info || die "aetherd is not answering; see /var/log/aetherd.log or journalctl -u aetherd"

if aether image list | awk 'NR > 1 { print $1 }' | grep -qx "$IMAGE"; then
  :
elif [ -f "images/$IMAGE/build.sh" ]; then
  out=$(bash scripts/build-image.sh "$IMAGE")
  aether image import "$IMAGE" "$out/disk.qcow2" --kernel "$out/vmlinuz" \
    --initrd "$out/initrd.img" --cmdline "$(cat "$out/cmdline")"
else
  log "pulling $IMAGE from the image catalog"
  aether image pull "$IMAGE" || die "cannot pull $IMAGE (aether image catalog lists what can be pulled; this machine must reach its publisher)"
fi
log "aetherd is running with image $IMAGE. Next:"
cat <<'NEXT'
  aether project create my-app && aether project use my-app
  aether workspace create
  aether workspace start ws-xxxxxx      # the id printed by create
  aether workspace ssh ws-xxxxxx
NEXT
