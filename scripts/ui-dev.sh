#!/usr/bin/env bash
# For working on the web UI: aetherd against libvirt's in-process test driver (no VMs; a start
# reaches `running` at once) in a temporary dir, a project `demo` with a small test image,
# and `aether ui` on 127.0.0.1, which prints the URL to open. Ctrl-C ends both.
#
#   scripts/ui-dev.sh [PORT]       # builds ui/ (npm) and aether (cargo) first
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-0}
(cd ui && { [ -d node_modules ] || npm ci; } && npm run build)
cargo build -p aetherd -p aether-cli
BIN=${CARGO_TARGET_DIR:-target}/debug
D=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$D"' EXIT
printf '<node><cpu><mhz>2000</mhz><model>x86_64</model><active>8</active><nodes>1</nodes><sockets>1</sockets><cores>8</cores><threads>1</threads></cpu><memory>33554432</memory></node>\n' >"$D/host.xml"
printf 'max_volume_size_gb = 64\ndefault_image = "tiny"\n' >"$D/aetherd.toml"
"$BIN/aetherd" --config "$D/aetherd.toml" --socket "$D/sock" --state-dir "$D/state" \
  --libvirt-uri "test://$D/host.xml" 2>"$D/aetherd.log" &
for _ in $(seq 100); do [ -S "$D/sock" ] && break; sleep 0.1; done
export AETHER_SOCKET=$D/sock
qemu-img create -q -f qcow2 "$D/tiny.qcow2" 1G
"$BIN/aether" image import tiny "$D/tiny.qcow2" >/dev/null
"$BIN/aether" project create demo >/dev/null
echo "aetherd log: $D/aetherd.log" >&2
"$BIN/aether" ui --no-browser --port "$PORT"
