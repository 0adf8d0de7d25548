# Shared shell helpers for aether's scripts. Source it: . "$(dirname "$0")/lib.sh"

# ensure_packages PKG...: installs with apt-get those of PKG that are not installed yet
# (apt-get update first). Needs root when anything is missing.
ensure_packages() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]}; run as root (sudo) or install them" >&2
    return 1
  fi
  printf '=== installing %s\n' "${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    # A newer qemu-utils from another suite (backports) blocks the distribution's
    # qemu-system-x86; take the distribution's qemu-utils, which matches it.
    local codename
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]}" "qemu-utils/$codename"
  fi
  # apt-get may have removed an installed package to make room (the distribution's
  # qemu-system-x86 removes a backported qemu-utils): put back what was asked for.
  missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    local codename
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    apt-get install -y -qq --no-install-recommends --allow-downgrades "${missing[@]/%/\/$codename}"
  fi
}

# ensure_test_users: local users the multi-user tests act as (tests/tests/users.rs): two
# members of group aether and one outsider. System accounts without a home or a login shell;
# created once, idempotently. Root only.
TEST_USERS_MEMBERS=(aether-t-alice aether-t-bob)
TEST_USER_OUTSIDER=aether-t-eve
ensure_test_users() {
  getent group aether >/dev/null || groupadd -r aether
  local u
  for u in "${TEST_USERS_MEMBERS[@]}"; do
    id "$u" >/dev/null 2>&1 || useradd -r -M -d /nonexistent -s /usr/sbin/nologin -G aether "$u"
    id -nG "$u" | tr ' ' '\n' | grep -qx aether || usermod -a -G aether "$u"
  done
  id "$TEST_USER_OUTSIDER" >/dev/null 2>&1 ||
    useradd -r -M -d /nonexistent -s /usr/sbin/nologin "$TEST_USER_OUTSIDER"
}

# ensure_qemu_user: the user libvirtd's QEMU driver runs guests as (libvirt-daemon-system
# creates it; without that package libvirtd 9.0 refuses to start the QEMU driver).
ensure_qemu_user() {
  getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  id libvirt-qemu >/dev/null 2>&1 ||
    useradd -r -g libvirt-qemu -G kvm -s /usr/sbin/nologin -d /var/lib/libvirt libvirt-qemu
}

# ensure_kvm_device: /dev/kvm usable by group kvm (root:kvm 0660), as Debian's udev rule makes
# it. Without udev it is root:root 0600: libvirt probes qemu as root (KVM looks present) but
# checks /dev/kvm as the qemu user, finds its capability cache stale and probes qemu again on
# every lookup (11-12 s each), so a workspace create runs past aetherd's 30 s libvirt timeout.
# Says what it changed. Where systemd runs without udev, a tmpfiles rule keeps it so across
# reboots; without either, run the install again after a reboot.
ensure_kvm_device() {
  [ -c /dev/kvm ] || return 0
  getent group kvm >/dev/null || groupadd -r kvm
  local was
  was=$(stat -c '%U:%G %a' /dev/kvm)
  if [ "$was" != "root:kvm 660" ]; then
    chgrp kvm /dev/kvm
    chmod 0660 /dev/kvm
    echo "/dev/kvm was $was; now root:kvm 660, as udev would make it (libvirt re-probed qemu on every call)"
  fi
  if [ -d /run/systemd/system ] && [ ! -S /run/udev/control ] &&
    [ ! -e /etc/tmpfiles.d/aether-kvm.conf ]; then
    echo 'z /dev/kvm 0660 root kvm - -' >/etc/tmpfiles.d/aether-kvm.conf
    echo "wrote /etc/tmpfiles.d/aether-kvm.conf (no udev here: keeps /dev/kvm so after a reboot)"
  fi
}

# build_ui: the web UI's assets (ui/dist), which `cargo build` embeds in `aether`. Needs
# Node.js >= 18 and npm: the machine's own when it has them, else Debian's (apt-get).
build_ui() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    ensure_packages nodejs npm
  fi
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  if [ "$major" -lt 18 ]; then
    echo "the web UI needs Node.js >= 18 to build; this machine has $(node --version)" >&2
    return 1
  fi
  (cd ui && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
}
