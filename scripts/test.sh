#!/usr/bin/env bash
# herd's test command (README, and CI through .ci/run): prepare the host, then format check, lints, every test,
# and the benchmark figures. Every peer daemon a test or benchmark starts (Kea, dnsmasq, nginx, tftpd-hpa, etcd,
# dockerd, docker-registry, sshd) runs with a private, empty /run (herd_lab::daemon), so nothing here depends on the
# runtime directories a package's systemd units would have made; README's newcomer paths (the demo through
# scripts/demo.sh, the inventory tour) are tests.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-host.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# node-init is the initramfs's /init: a static binary, built for the image tests (HERD_NODE_INIT).
HERD_NODE_INIT=$(scripts/build-node-init.sh)
export HERD_NODE_INIT
cargo test --workspace --locked --exclude herd-qemu
# The QEMU tests print their figures (boot times, image sizes and build times). The demo test runs README's
# ./scripts/demo.sh, which builds the release herdctl and provisioner: built here first (the benches use them too).
cargo build --release --locked -p herdctl -p herd-provisioner
cargo test --locked -p herd-qemu -- --show-output
cargo bench --locked -p herd-inventory --bench check
cargo bench --locked -p herd-config --bench render
cargo bench --locked -p herd-provisioner --bench dhcp
cargo bench --locked -p herd-provisioner --bench tftp
cargo bench --locked -p herd-provisioner --bench storm
cargo bench --locked -p herd-cluster --bench plan
cargo run --release --locked -q -p herdctl -- bench scheduler --machines 1000 --units 10000 --racks 25 --tls
cargo run --release --locked -q -p herdctl -- bench scheduler --machines 5000 --units 50000 --racks 50
cargo run --release --locked -q -p herdctl -- bench failover --machines 20 --units 200 --ttl 4
