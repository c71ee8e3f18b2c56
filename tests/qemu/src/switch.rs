//! A top-of-rack switch for 802.3ad tests: a small VM (herd's kernel, static busybox) whose first two NICs form
//! an LACP port-channel (the Linux bonding driver in 802.3ad mode, as a switch's LAG) bridged with its third NIC,
//! which sits on the lab's bridge. A machine cabled to the first two reaches the lab through it, and the switch's
//! console reports its active aggregator (`SWITCH-LACP ...` whenever it changes).
//!
//! Linux's bonding driver sends nothing on 802.3ad ports without an LACP partner, and firmware and initramfs
//! speak no LACP, so the switch starts in "LACP fallback" (port 1 forwarding on its own, as datacenter switches
//! offer for PXE) and forms the port-channel when told ([`Lab::switch_to_lag`]), e.g. once the machine's root
//! is up and its own bond about to start.
//!
//! The host's kernel has no bonding driver here, so the partner has to be a VM; it is the same driver a machine's
//! bond runs, speaking LACP on real (virtual) links.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use herd_images::initramfs::{Cpio, closure, module_bytes, module_name};

use crate::{CABLE_SPEED, Lab, Link, VmSpec, cable_netdev};

/// Printed once the bridge is up (port 1 forwarding on its own: the LACP fallback).
pub const SWITCH_READY: &str = "SWITCH-READY";
/// Printed once the two ports form the port-channel.
pub const SWITCH_LAG: &str = "SWITCH-LAG";
/// Prefix of the active aggregator's line: `SWITCH-LACP Number of ports: N Partner Mac Address: MAC`.
pub const SWITCH_LACP: &str = "SWITCH-LACP";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "SWITCH-ERROR insmod $m"; done
# LACP fallback, as top-of-rack switches offer it for PXE: until told "lag", port 1 (eth0) forwards on its own
# (a machine's firmware and initramfs speak no LACP); then eth0 + eth1 form the port-channel (802.3ad, fast LACP,
# MII monitoring). eth2 is the uplink.
echo 802.3ad > /sys/class/net/bond0/bonding/mode
echo fast > /sys/class/net/bond0/bonding/lacp_rate
echo 100 > /sys/class/net/bond0/bonding/miimon
brctl addbr br0
brctl addif br0 eth0
brctl addif br0 eth2
ip link set eth0 up
ip link set eth2 up
ip link set br0 up
echo SWITCH-READY
while read -r cmd; do
  if [ "$cmd" = lag ]; then break; fi
done
brctl delif br0 eth0
ip link set eth0 down
echo +eth0 > /sys/class/net/bond0/bonding/slaves
echo +eth1 > /sys/class/net/bond0/bonding/slaves
brctl addif br0 bond0
ip link set bond0 up
echo SWITCH-LAG
last=""
while true; do
  now=$(grep -A6 "Active Aggregator Info" /proc/net/bonding/bond0 | grep -E "Number of ports|Partner Mac" | tr -s '\t\n' '  ')
  if [ "$now" != "$last" ]; then echo "SWITCH-LACP $now"; last="$now"; fi
  sleep 1
done
"#;

/// Builds the switch's initramfs at `out` from a built herd OS image directory (its kernel's modules: virtio
/// networking, bonding, bridge, decompressed, in dependency order).
pub fn build_initramfs(image: &Path, scratch: &Path, out: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(scratch);
    let st = Command::new("unsquashfs")
        .args(["-q", "-n", "-d"])
        .arg(scratch)
        .arg(image.join("root.squashfs"))
        .arg("usr/lib/modules")
        .stdout(Stdio::null())
        .status()
        .context("cannot run unsquashfs (apt install squashfs-tools)")?;
    if !st.success() {
        bail!("unsquashfs of {} failed", image.display());
    }
    let moddir = std::fs::read_dir(scratch.join("usr/lib/modules"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("modules.dep").exists())
        .context("no kernel modules in the image")?;
    let wanted: Vec<String> = ["virtio_pci", "virtio_net", "bonding", "bridge"].map(str::to_owned).to_vec();
    let order = closure(&moddir, &wanted).map_err(anyhow::Error::msg)?;
    let mut cpio = Cpio::new(0);
    for d in ["bin", "dev", "modules", "proc", "sys"] {
        cpio.dir(d);
    }
    cpio.file("bin/busybox", 0o755, &std::fs::read("/bin/busybox").context("no /bin/busybox (busybox-static)")?);
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut names = Vec::new();
    for rel in &order {
        let file = format!("{}.ko", module_name(rel));
        cpio.file(&format!("modules/{file}"), 0o644, &module_bytes(&moddir.join(rel)).map_err(anyhow::Error::msg)?);
        names.push(file);
    }
    cpio.file("modules/order", 0o644, format!("{}\n", names.join("\n")).as_bytes());
    std::fs::write(out, cpio.finish()?)?;
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}

impl Lab {
    /// Tells switch `index` (from [`Lab::start_switch`]) to end its LACP fallback: its two ports form the
    /// port-channel from now on (`SWITCH-LAG` on its console).
    pub fn switch_to_lag(&self, index: usize) -> anyhow::Result<()> {
        use std::io::Write as _;
        let path = self.dir.join(format!("{}.console", self.vms[index].spec.name));
        let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| path.display().to_string())?;
        s.write_all(b"lag\r\n")?;
        Ok(())
    }

    /// Starts the switch (kernel `kernel`, initramfs from [`build_initramfs`]) with its port-channel on the two
    /// cables `ports` (each `(local, remote)` UDP ports, the machine's ends swapped) and its uplink on the bridge.
    /// Returns its index in [`Lab::vms`]; its monitor is `NAME.monitor` as for any VM.
    pub fn start_switch(
        &mut self,
        name: &str,
        kernel: &Path,
        initrd: &Path,
        ports: [(u16, u16); 2],
    ) -> anyhow::Result<usize> {
        let serial = self.dir.join(format!("{name}.serial.log"));
        let monitor = self.dir.join(format!("{name}.monitor"));
        let uplink = self.tap()?;
        let mut args: Vec<String> = Vec::new();
        for a in
            ["-accel", "tcg", "-smp", "1", "-m", "256", "-machine", "pc,graphics=off", "-display", "none", "-no-reboot"]
        {
            args.push(a.into());
        }
        args.extend(["-monitor".into(), format!("unix:{},server,nowait", monitor.display())]);
        // The console: logged to the file, and its input on a socket (the test's "lag" command).
        let socket = self.dir.join(format!("{name}.console"));
        args.extend([
            "-chardev".into(),
            format!("socket,id=console,path={},server=on,wait=off,logfile={}", socket.display(), serial.display()),
            "-serial".into(),
            "chardev:console".into(),
        ]);
        args.extend(["-kernel".into(), kernel.display().to_string(), "-initrd".into(), initrd.display().to_string()]);
        args.extend(["-append".into(), "console=ttyS0 panic=-1 quiet".into()]);
        for (i, (local, remote)) in ports.iter().enumerate() {
            args.extend(["-netdev".into(), cable_netdev(&format!("p{i}"), *local, *remote)]);
            args.extend([
                "-device".into(),
                format!("virtio-net-pci,netdev=p{i},mac=52:54:00:5e:00:0{}{CABLE_SPEED}", i + 1),
            ]);
        }
        args.extend(["-netdev".into(), format!("tap,id=up,ifname={uplink},script=no,downscript=no")]);
        args.extend(["-device".into(), "virtio-net-pci,netdev=up,mac=52:54:00:5e:00:09".into()]);
        let mut spec = VmSpec::new(name, crate::Firmware::SeabiosIpxe, &[]);
        spec.links = ports.iter().map(|&(local, remote)| Link::Cable { local, remote }).collect();
        self.spawn_vm(spec, &args)
    }
}
