#!/usr/bin/env bash
# Runs every check and test of aether. This is the README's test command, and what CI runs.
#
#   sudo scripts/test.sh        # as root: installs the Debian/Ubuntu packages it needs first
#
# Steps: system packages (apt-get) -> the web UI's assets (npm) -> cargo fmt --check ->
# cargo clippy -D warnings -> cargo build --workspace -> cargo test --workspace (unit +
# integration tests against libvirt's in-process test driver, the web UI in Chromium) ->
# bench-scale -> scripts/e2e.sh (real VMs; root only).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

log() { printf '\n=== %s\n' "$*"; }

# Packages needed to build (the virt crate links libvirt) and to run the integration tests
# (libvirt's test driver is part of libvirt0, which libvirt-dev pulls in).
BUILD_PACKAGES=(libvirt-dev pkg-config gcc qemu-utils openssh-client)

ensure_packages "${BUILD_PACKAGES[@]}"
# The web UI's browser tests drive Debian's Chromium with Playwright (ui/tests).
[ "$(id -u)" -eq 0 ] && ensure_packages chromium

log "web UI assets (ui/: npm ci, vite build)"
build_ui

if ! command -v cargo >/dev/null; then
  echo "cargo not found: aether needs a Rust toolchain >= 1.89 (rustup)" >&2
  exit 1
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo build --workspace"
cargo build --workspace --locked

if [ "$(id -u)" -eq 0 ]; then
  # The multi-user tests (authorization, quotas) act as these; without root they are skipped.
  ensure_test_users
  export AETHER_TEST_USERS=1
  # Chromium is installed above: the browser tests must run.
  export AETHER_TEST_BROWSER=1
fi

log "cargo test --workspace"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
cargo test --workspace --locked 2>&1 | tee "$results"
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "\ntests: %d passed, %d failed\n", p, f }' "$results"

log "benchmark: what many workspaces cost the daemon (test driver)"
target/debug/bench-scale

# End-to-end tests: real libvirtd + qemu + guests, inside a network namespace. Needs root.
if [ "$(id -u)" -eq 0 ]; then
  log "end-to-end tests (scripts/e2e.sh)"
  bash scripts/e2e.sh
else
  echo "skipping the end-to-end tests: they need root (sudo $0)" >&2
fi
