#!/usr/bin/env bash
# herd's test command (README, and CI through .ci/run): prepare the host, then format check, lints, every test,
# and the benchmark figures. Every peer daemon a test or benchmark starts (Kea, dnsmasq, nginx, tftpd-hpa, etcd,
# dockerd, docker-registry, sshd) runs with a private, empty /run (herd_lab::daemon), so nothing here depends on the
# runtime directories a package's systemd units would have made; README's newcomer paths (the demo through
# scripts/demo.sh, the inventory tour) are tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each step's wall time, printed as it ends and once more at the end (where the suite's time goes).
took=()
step() {
    local started=$SECONDS
    "$@"
    took+=("$(printf '%6d s  %s' $((SECONDS - started)) "$*")")
    echo "test.sh: ${took[-1]}" >&2
}
trap 'printf "test.sh: steps (wall)\n"; printf "%s\n" "${took[@]}"; echo "test.sh: total $SECONDS s"' EXIT

step scripts/setup-host.sh
step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets --locked -- -D warnings
# node-init is the initramfs's /init: a static binary, built for the image tests (HERD_NODE_INIT).
started=$SECONDS
HERD_NODE_INIT=$(scripts/build-node-init.sh)
export HERD_NODE_INIT
took+=("$(printf '%6d s  %s' $((SECONDS - started)) "scripts/build-node-init.sh")")
step cargo test --workspace --locked --exclude herd-qemu
# The QEMU tests print their figures (boot times, image sizes and build times). The demo test runs README's
# ./scripts/demo.sh, which builds the release herdctl and provisioner: built here first (the benches use them too).
step cargo build --release --locked -p herdctl -p herd-provisioner
step cargo test --locked -p herd-qemu -- --show-output
step cargo bench --locked -p herd-inventory --bench check
step cargo bench --locked -p herd-config --bench render
step cargo bench --locked -p herd-provisioner --bench dhcp
step cargo bench --locked -p herd-provisioner --bench tftp
step cargo bench --locked -p herd-provisioner --bench storm
step cargo bench --locked -p herd-cluster --bench plan
step cargo run --release --locked -q -p herdctl -- bench scheduler --machines 1000 --units 10000 --racks 25 --tls
step cargo run --release --locked -q -p herdctl -- bench scheduler --machines 5000 --units 50000 --racks 50
step cargo run --release --locked -q -p herdctl -- bench failover --machines 20 --units 200 --ttl 4
