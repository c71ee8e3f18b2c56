#!/usr/bin/env bash
# Builds node-init as a static binary (it is the initramfs's /init, where no libc exists) and prints its path.
# The image build (herdctl image build --node-init, default: this path) puts it into the initramfs and the root.
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS='-C target-feature=+crt-static -C strip=symbols' cargo build --quiet --locked --release -p herd-node-init \
  --target x86_64-unknown-linux-gnu
echo "${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-gnu/release/node-init"
