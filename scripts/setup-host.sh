#!/usr/bin/env bash
# Installs every system package herd's build, tests and demo need on a fresh Debian 12 machine.
# Idempotent: installs only what is missing, and touches apt only then. Grows as herd grows.
set -euo pipefail

# protobuf-compiler, libprotobuf-dev: protoc and the well-known .proto files etcd-client (cluster crate) builds with.
# ignition: ignition-validate, the oracle every rendered config must pass.
# ipxe: the iPXE binaries the provisioner serves (undionly.kpxe, ipxe.efi, snponly.efi).
# iproute2: network namespaces and veth pairs for the protocol tests.
# busybox-static (udhcpc), isc-dhcp-client (dhclient), kea-admin (perfdhcp): real DHCP clients and load.
# kea-dhcp4-server, dnsmasq-base: the DHCP peers the benchmark measures herd against.
# atftp, curl: TFTP clients for the tests; tftpd-hpa: the TFTP peer of the benchmark; nginx-light: the HTTP
# peer of the boot-storm benchmark.
# ipxe-qemu, ovmf, cpio: QEMU's iPXE option ROMs, UEFI firmware, and the test initramfs (QEMU itself comes from
# bookworm-backports below).
# etcd-server, etcd-client: the real etcd the cluster tests and benches run a 3-member cluster of; docker.io: the
# Docker Engine the container executor talks to (the tests start dockerd themselves); docker-registry: the local
# registry nodes pre-warm images from. mmdebstrap, squashfs-tools, cryptsetup-bin: the image build (root tree,
# squashfs, dm-verity hash tree); xz-utils, e2fsprogs: the initramfs modules and the STATE file system of installed
# disks; gdisk (sgdisk): the independent check of the partition tables herd writes. openssh-server: the sshd
# herdctl's ssh/status/journal/--tunnel tests log into.
PACKAGES=(protobuf-compiler libprotobuf-dev ignition ipxe iproute2 busybox-static isc-dhcp-client kea-admin kea-dhcp4-server
  dnsmasq-base atftp tftpd-hpa curl ipxe-qemu ovmf cpio zstd ethtool nginx-light etcd-server etcd-client docker.io
  docker-registry openssh-server mmdebstrap squashfs-tools cryptsetup-bin xz-utils e2fsprogs gdisk)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

if ((${#missing[@]})); then
  echo "setup-host: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bookworm-backports: QEMU (bookworm's qemu-system-x86 conflicts with the preinstalled backports qemu-utils) and
# the 6.12 test kernel come from there.
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "setup-host: adding the bookworm-backports suite"
  printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    | $sudo tee /etc/apt/sources.list.d/herd-backports.sources >/dev/null
  $sudo apt-get update -qq
fi
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
  echo "setup-host: installing qemu-system-x86 from bookworm-backports"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    qemu-system-x86 >/dev/null
fi
"$(dirname "$0")/fetch-kernel.sh"

for component in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
    echo "setup-host: adding rust component $component"
    rustup component add "$component"
  fi
done
echo "setup-host: ok (${#PACKAGES[@]} packages present)"
