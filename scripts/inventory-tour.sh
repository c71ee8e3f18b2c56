#!/usr/bin/env bash
# A tour of the inventory tooling on the examples (no root, no VMs):
# check, show, generate a 5,000-machine fleet, and the plan for a change. Works from any directory.
#   HERDCTL=path/to/herdctl scripts/inventory-tour.sh    uses that binary instead of building one (the tests do)
# Exits non-zero if any step does not do what README.md says it does.
set -euo pipefail
cd "$(dirname "$0")/.."

herdctl=${HERDCTL:-}
if [ -z "$herdctl" ]; then
  scripts/setup-host.sh >/dev/null
  cargo build --quiet --release -p herdctl
  herdctl=${CARGO_TARGET_DIR:-target}/release/herdctl
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The copies below name their role unit files relative to themselves, as the originals do: they come along.
cp -r examples/units "$work/units"

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$herdctl" inventory check examples/site-450.toml examples/qemu-3.toml
step "$herdctl" inventory show examples/qemu-3.toml

"$herdctl" inventory gen --machines 5000 --masters 5 > "$work/fleet-5000.toml"
printf '\n\033[1m$ herdctl inventory gen --machines 5000 --masters 5 > fleet-5000.toml\033[0m\n'
step "$herdctl" inventory check "$work/fleet-5000.toml"

# A change an admin might make: move a worker's address and relabel a rack.
sed -e 's/^internal = "10.20.2.15"$/internal = "10.20.2.115"/' \
    -e '0,/labels = { "topology.herd.io\/zone" = "a" }/s//labels = { "topology.herd.io\/zone" = "a", power = "feed-b" }/' \
    examples/site-450.toml > "$work/site-450-changed.toml"
step "$herdctl" inventory diff examples/site-450.toml "$work/site-450-changed.toml"

# A mistake: the same MAC on two machines, and an address inside the DHCP pool.
sed -e '0,/"0c:c4:7a:00:00:0c"/s//"0c:c4:7a:00:00:08"/' -e 's/^internal = "10.20.3.11"$/internal = "10.20.250.7"/' \
    examples/site-450.toml > "$work/site-450-broken.toml"
# Run from the scratch directory, so the errors name the file as README.md shows them.
status=0
(cd "$work" && step "$herdctl" inventory check site-450-broken.toml) || status=$?
if [ "$status" -ne 1 ]; then
  echo "inventory-tour: the broken copy should have been refused with exit status 1, got $status" >&2
  exit 1
fi
echo "(exit status 1: problems found, nothing was applied)"
