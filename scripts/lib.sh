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
