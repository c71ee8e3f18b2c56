#!/usr/bin/env bash
# herd's test command (README, and CI through .ci/run): prepare the host, then format check, lints, every test,
# and the benchmark figures.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-host.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
cargo bench --locked -p herd-inventory --bench check
cargo bench --locked -p herd-provisioner --bench render
cargo bench --locked -p herd-provisioner --bench dhcp
cargo bench --locked -p herd-provisioner --bench tftp
cargo bench --locked -p herd-provisioner --bench storm
cargo bench --locked -p herd-cluster --bench plan
cargo run --release --locked -q -p herdctl -- bench scheduler --machines 1000 --units 10000 --racks 25
cargo run --release --locked -q -p herdctl -- bench failover --machines 20 --units 200 --ttl 4
