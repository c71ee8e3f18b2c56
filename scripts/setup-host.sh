#!/usr/bin/env bash
# Installs every system package herd's build, tests and demo need on a fresh Debian 12 machine.
# Idempotent: installs only what is missing, and touches apt only then. Grows as herd grows.
set -euo pipefail

# protobuf-compiler: protoc, needed at build time by etcd-client (cluster crate).
# ignition: ignition-validate, the oracle every rendered config must pass.
# ipxe: the iPXE binaries the provisioner serves (undionly.kpxe, ipxe.efi, snponly.efi).
# iproute2: network namespaces and veth pairs for the protocol tests.
# busybox-static (udhcpc), isc-dhcp-client (dhclient), kea-admin (perfdhcp): real DHCP clients and load.
# kea-dhcp4-server, dnsmasq-base: the DHCP peers the benchmark measures herd against.
# atftp, curl: TFTP clients for the tests; tftpd-hpa: the TFTP peer of the benchmark.
PACKAGES=(protobuf-compiler ignition ipxe iproute2 busybox-static isc-dhcp-client kea-admin kea-dhcp4-server
  dnsmasq-base atftp tftpd-hpa curl)

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
