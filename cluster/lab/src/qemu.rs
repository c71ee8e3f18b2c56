//! QEMU machines on one host, as `herdctl demo` and the QEMU tests run them: TCG VMs that PXE-boot with SeaBIOS +
//! iPXE or OVMF from a bridge in a network namespace, their disks, and cables between two VMs' NICs.
//!
//! Needs root (namespaces, taps), QEMU with iPXE ROMs and OVMF, and a kernel at [`KERNEL`]
//! (`scripts/setup-host.sh` installs them all).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// Where Debian's `ipxe` package puts its binaries (the provisioner's default `--ipxe-dir`).
pub const DEBIAN_IPXE_DIR: &str = "/usr/lib/ipxe";
/// The kernel the tests boot (fetched by `scripts/fetch-kernel.sh`).
pub const KERNEL: &str = "/var/cache/herd/kernel/vmlinuz";
/// OVMF code and variable store templates (Debian `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF variables template.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Runs `ip ARGS`; its stderr is the error.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("cannot run ip (apt install iproute2)")?;
    if !out.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// How a VM boots from the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS with the iPXE ROM of the NIC (DHCP says iPXE: straight to its script).
    SeabiosIpxe,
    /// OVMF with the NIC's iPXE EFI ROM.
    OvmfIpxeRom,
    /// OVMF's own PXE (no option ROM): it loads ipxe.efi over TFTP, which then fetches the script.
    OvmfNativePxe,
}

/// A VM to start.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// Name (for logs).
    pub name: String,
    /// Firmware path.
    pub firmware: Firmware,
    /// NIC MACs, in PCI order.
    pub macs: Vec<String>,
    /// Which NIC boots.
    pub boot_nic: usize,
    /// RAM in MiB.
    pub memory_mb: u32,
    /// A virtio disk (raw or qcow2), if any.
    pub disk: Option<PathBuf>,
    /// What each NIC is plugged into (by index; NICs beyond the list are on the bridge).
    pub links: Vec<Link>,
}

/// What a NIC is plugged into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A tap on the lab's bridge.
    Bridge,
    /// A point-to-point cable to one NIC of another VM: QEMU's `-netdev dgram`, Ethernet frames in UDP datagrams
    /// on the namespace's loopback, from `local` to `remote` (the other end swaps the two ports).
    Cable {
        /// This end's UDP port.
        local: u16,
        /// The other end's UDP port.
        remote: u16,
    },
}

impl VmSpec {
    /// A VM booting from its first NIC with 256 MiB.
    pub fn new(name: &str, firmware: Firmware, macs: &[&str]) -> Self {
        VmSpec {
            name: name.to_owned(),
            firmware,
            macs: macs.iter().map(|m| (*m).to_owned()).collect(),
            boot_nic: 0,
            memory_mb: 256,
            disk: None,
            links: Vec::new(),
        }
    }

    /// With NIC `index` on a cable instead of the bridge.
    pub fn cable(mut self, index: usize, local: u16, remote: u16) -> Self {
        if self.links.len() <= index {
            self.links.resize(index + 1, Link::Bridge);
        }
        self.links[index] = Link::Cable { local, remote };
        self
    }

    /// What NIC `index` is plugged into.
    pub fn link(&self, index: usize) -> Link {
        self.links.get(index).copied().unwrap_or(Link::Bridge)
    }

    /// With a virtio disk.
    pub fn with_disk(mut self, disk: &Path) -> Self {
        self.disk = Some(disk.to_owned());
        self
    }

    /// With `mb` MiB of RAM.
    pub fn memory(mut self, mb: u32) -> Self {
        self.memory_mb = mb;
        self
    }

    /// Boots from NIC `index` instead.
    pub fn boot_from(mut self, index: usize) -> Self {
        self.boot_nic = index;
        self
    }
}

/// Creates an empty 4 GiB qcow2 disk (the size the install layout needs) at `path`.
pub fn qcow2(path: &Path) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("4G")
        .output()
        .context("cannot run qemu-img (apt install qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img create {}: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Creates network namespace `ns` with loopback up and a bridge `bridge` carrying the addresses `cidrs`.
pub fn bridge_netns(ns: &str, bridge: &str, cidrs: &[&str]) -> anyhow::Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "link", "add", bridge, "type", "bridge", "forward_delay", "0"])?;
    for cidr in cidrs {
        ip(&["-n", ns, "addr", "add", cidr, "dev", bridge])?;
    }
    ip(&["-n", ns, "link", "set", bridge, "up"])?;
    // Packets the namespace's own stack sends through the bridge to a tap otherwise leave with a partial UDP
    // checksum (offload); QEMU fixes that up only for packets from port 67, so iPXE would drop the
    // ProxyDHCPACK from port 4011 as corrupt. A physical NIC computes the checksum; here the kernel must.
    let ethtool = Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", bridge, "tx", "off"])
        .output()
        .context("cannot run ethtool (apt install ethtool)")?;
    if !ethtool.status.success() {
        bail!("ethtool -K {bridge} tx off: {}", String::from_utf8_lossy(&ethtool.stderr).trim());
    }
    Ok(())
}

/// Adds tap device `tap` to `bridge` in namespace `ns`, up.
pub fn add_tap(ns: &str, bridge: &str, tap: &str) -> anyhow::Result<()> {
    ip(&["-n", ns, "tuntap", "add", tap, "mode", "tap"])?;
    ip(&["-n", ns, "link", "set", tap, "master", bridge])?;
    ip(&["-n", ns, "link", "set", tap, "up"])
}

/// The arguments of `qemu-system-x86_64` for a TCG VM that boots from the network: one NIC per MAC of `spec` on
/// the tap of the same index, console to `dir/NAME.serial.log`, HMP monitor on `dir/NAME.monitor`, the OVMF
/// variable store copied to `dir/NAME.vars.fd`.
pub fn pxe_qemu_args(spec: &VmSpec, dir: &Path, taps: &[String]) -> anyhow::Result<Vec<String>> {
    let serial = dir.join(format!("{}.serial.log", spec.name));
    let mut args: Vec<String> = vec![
        "-accel".into(),
        "tcg".into(),
        "-smp".into(),
        "1".into(),
        "-m".into(),
        spec.memory_mb.to_string(),
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        format!("unix:{},server,nowait", dir.join(format!("{}.monitor", spec.name)).display()),
        "-serial".into(),
        format!("file:{}", serial.display()),
        "-no-reboot".into(),
        // Entropy from the host: TCG's CPU has no RDRAND, and the kernel's pool would take minutes.
        "-device".into(),
        "virtio-rng-pci".into(),
    ];
    match spec.firmware {
        Firmware::SeabiosIpxe => args.extend(["-machine".into(), "pc,graphics=off".into()]),
        Firmware::OvmfIpxeRom | Firmware::OvmfNativePxe => {
            let vars = dir.join(format!("{}.vars.fd", spec.name));
            std::fs::copy(OVMF_VARS, &vars).with_context(|| format!("no {OVMF_VARS} (apt install ovmf)"))?;
            args.extend([
                "-machine".into(),
                "q35".into(),
                "-nodefaults".into(),
                "-drive".into(),
                format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,file={}", vars.display()),
            ]);
        }
    }
    for (i, mac) in spec.macs.iter().enumerate() {
        let netdev = match spec.link(i) {
            Link::Bridge => {
                let tap = taps.get(i).with_context(|| format!("no tap for NIC {i}"))?;
                format!("tap,id=n{i},ifname={tap},script=no,downscript=no")
            }
            Link::Cable { local, remote } => cable_netdev(&format!("n{i}"), local, remote),
        };
        args.extend(["-netdev".into(), netdev]);
        let mut device = format!("virtio-net-pci,netdev=n{i},mac={mac}");
        if spec.link(i) != Link::Bridge {
            // The bonding driver aggregates only ports with a known speed and duplex (802.3ad keys on them).
            device.push_str(CABLE_SPEED);
        }
        if i == spec.boot_nic {
            device.push_str(",bootindex=1");
        }
        if spec.firmware == Firmware::OvmfNativePxe {
            device.push_str(",romfile=");
        }
        args.extend(["-device".into(), device]);
    }
    if let Some(disk) = &spec.disk {
        let format = if herd_images::slot::is_qcow2(disk) { "qcow2" } else { "raw" };
        args.extend(["-drive".into(), format!("file={},format={format},if=virtio", disk.display())]);
    }
    Ok(args)
}

/// The `virtio-net-pci` properties of a cabled NIC: 10GbE, full duplex (virtio reports neither by default).
pub const CABLE_SPEED: &str = ",speed=10000,duplex=full";

/// The `-netdev` value of a cable end (see [`Link::Cable`]).
pub fn cable_netdev(id: &str, local: u16, remote: u16) -> String {
    format!(
        "dgram,id={id},local.type=inet,local.host=127.0.0.1,local.port={local},\
         remote.type=inet,remote.host=127.0.0.1,remote.port={remote}"
    )
}
