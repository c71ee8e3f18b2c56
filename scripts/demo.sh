#!/usr/bin/env bash
# herd's demo: a QEMU cluster on this host, booted by the provisioner (see README.md, "What the demo shows").
#   scripts/demo.sh              bring it up (builds what it needs; the image is cached after the first run)
#   scripts/demo.sh down         stop everything and remove it
#   scripts/demo.sh power-off node2 / power-on node2
# Needs root for namespaces and taps (it uses sudo when not root).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-host.sh >/dev/null
cargo build --quiet --release -p herdctl -p herd-provisioner
node_init=$(scripts/build-node-init.sh)
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo --preserve-env=HERD_DEMO_DIR"
exec $sudo "${CARGO_TARGET_DIR:-target}/release/herdctl" demo --node-init "$node_init" "$@"
