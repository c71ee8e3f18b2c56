#!/usr/bin/env bash
# Installs every system package herd's build, tests and demo need on a fresh Debian 12 machine.
# Idempotent: installs only what is missing, and touches apt only then. Grows as herd grows.
set -euo pipefail

# protobuf-compiler: protoc, needed at build time by etcd-client (cluster crate).
# ignition: ignition-validate, the oracle every rendered config must pass.
PACKAGES=(protobuf-compiler ignition)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "setup-host: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    echo "setup-host: adding rust component $component"
    rustup component add "$component"
  fi
done
echo "setup-host: ok (${#PACKAGES[@]} packages present)"
