//! The initramfs boot's decisions, stage by stage, over [`System`]: the side effects (the provisioner, devices,
//! the slot table, mounts) behind a small trait, so what each stage decides is tested without root or a machine.
//!
//! 1. [`provision`]: with a provisioner, the network, the config and node-init's part of it.
//! 2. [`root_source`]: where the verified root comes from: the installed slots, a device, a fresh install into slot
//!    A, or the image fetched into RAM (install mode without a disk).
//! 3. [`mount_root`]: puts it under dm-verity and mounts it; with slots, [`boot_slot`] picks the slot (trust,
//!    kernel, tries) and falls back to the other one.
//! 4. [`mount_state`]: the STATE file system (formatted after a fresh install) or a tmpfs, the /etc and /var
//!    overlays, the directories that live on STATE directly, /tmp.
//! 5. [`configure`]: applies the config and reports `configured` with the slot table.

use std::path::{Path, PathBuf};

use herd_config::node::NodeConfig;
use herd_images::slot::{self, Slot, SlotHeader, SlotReport, SlotState};
use serde_json::Value;

use crate::cmdline::{Cmdline, UsrSource};
use crate::dm::VeritySpec;
use crate::error::SysError;
use crate::ignition::{Applied, ApplyError};
use crate::provision::{Link, Mode, ProvisionError};
use crate::report::BootReport;

/// STATE directories bind-mounted into the new root beside the /var overlay: (directory on STATE, mount point).
/// Programs that stack their own overlays (dockerd's overlay2 graph driver) need theirs on STATE directly: an
/// overlay's upper directory cannot be on another overlay, and dockerd falls back to copying every layer (the vfs
/// driver) when /var/lib/docker is on one.
pub const DIRECT_STATE: [(&str, &str); 1] = [("docker", "var/lib/docker")];

/// Why the boot stops.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A system operation failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// The provisioner, the network or the image it serves.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// The config could not be applied.
    #[error("applying the config")]
    Config(#[from] ApplyError),
    /// The data does not match the root hash.
    #[error(
        "dm-verity: {} does not match root hash {root_hash}; the image is corrupted or not the one the boot server \
         vouches for",
        data.display()
    )]
    Verity {
        /// The data device.
        data: PathBuf,
        /// The hash it was checked against.
        root_hash: String,
        /// What reading it said.
        #[source]
        source: std::io::Error,
    },
    /// A partition without a slot header named as the root without a hash device.
    #[error("{} holds no herd slot header; give herd.usr.hash= for a separate hash device", dev.display())]
    NoSlotHeader {
        /// The device.
        dev: PathBuf,
    },
    /// Every slot failed, or none holds an image.
    #[error("no slot of {disk} could be booted: {}", if reasons.is_empty() { "both failed or were never installed".to_owned() } else { reasons.join("; ") })]
    NoSlot {
        /// The disk.
        disk: String,
        /// Why each slot was passed over.
        reasons: Vec<String>,
    },
    /// The slot table could not be read or written.
    #[error("the slot table of {disk}")]
    Slots {
        /// The disk.
        disk: String,
        /// Why.
        #[source]
        source: slot::SlotError,
    },
}

/// A change to the slot table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotChange {
    /// Spend one try of a slot that has not booted successfully yet.
    SpendTry(Slot),
    /// Mark a slot that failed verification bad.
    MarkBad(Slot),
}

/// A mount of the new root's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mount {
    /// The ext4 STATE device at the state directory.
    State(PathBuf),
    /// A tmpfs there instead (nothing survives the boot).
    StateTmpfs,
    /// A writable overlay over `/etc` or `/var` of the new root, its upper layer on STATE.
    Overlay(&'static str),
    /// A directory of STATE bind-mounted at a path of the new root.
    OnState {
        /// The directory on STATE.
        dir: &'static str,
        /// Where, in the new root.
        at: &'static str,
    },
    /// A tmpfs on the new root's /tmp.
    Tmp,
}

/// The image fetched into RAM, as loop devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamImage {
    /// The squashfs.
    pub data: PathBuf,
    /// Its hash tree.
    pub hash: PathBuf,
    /// The image's root hash.
    pub root_hash: String,
}

/// The side effects of the boot.
pub trait System {
    /// A line on the console.
    fn say(&mut self, msg: &str);
    /// Milliseconds since the kernel started.
    fn uptime_ms(&self) -> u64;
    /// Brings up the boot NIC with its DHCP lease.
    fn network(&mut self) -> Result<Link, BootError>;
    /// This machine's Ignition config.
    fn config(&mut self) -> Result<Value, BootError>;
    /// Reports a stage to the provisioner, best effort.
    fn phone(&mut self, stage: &str, detail: &str, slots: Option<&SlotReport>);
    /// Partitions `disk` and writes the served image into slot A.
    fn install(&mut self, disk: &Path) -> Result<slot::Installed, BootError>;
    /// Downloads the served image into RAM.
    fn fetch_to_ram(&mut self) -> Result<RamImage, BootError>;
    /// A device path or `PARTLABEL=NAME`, once it exists.
    fn resolve(&mut self, spec: &str) -> Result<PathBuf, BootError>;
    /// The disk with herd's slots, and its slot table.
    fn slot_disk(&mut self) -> Result<(String, Vec<SlotState>), BootError>;
    /// The device node of a slot's partition of `disk`.
    fn slot_partition(&mut self, disk: &str, slot: Slot) -> Result<PathBuf, BootError>;
    /// The slot header at the end of a partition.
    fn slot_header(&mut self, dev: &Path) -> Result<SlotHeader, BootError>;
    /// Changes the slot table of `disk`; returns it as it is now.
    fn change_slots(&mut self, disk: &str, change: SlotChange) -> Result<Vec<SlotState>, BootError>;
    /// Sets up verity and mounts the root read-only (removing the device again when it fails).
    fn mount_verified(&mut self, spec: &VeritySpec) -> Result<(), BootError>;
    /// Formats the STATE device with the verified root's mke2fs.
    fn format_state(&mut self, dev: &Path) -> Result<(), BootError>;
    /// One mount of the new root's layout.
    fn mount(&mut self, m: &Mount) -> Result<(), BootError>;
    /// Applies the config to the new root.
    fn apply_config(&mut self, config: &Value) -> Result<Applied, BootError>;
    /// Trades the join credential for certificates of the machine's keys, kept on the new root's STATE; returns
    /// their fingerprints.
    fn join(
        &mut self,
        config: &Value,
        node: &NodeConfig,
        credential: &str,
    ) -> Result<crate::identity::Joined, BootError>;
}

/// What the provisioner gave this boot.
#[derive(Debug, Clone)]
pub struct Provisioned {
    /// The boot NIC.
    pub link: Link,
    /// The Ignition config.
    pub config: Value,
    /// node-init's part of it.
    pub node: NodeConfig,
}

/// Where the root comes from, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSource {
    /// The slots, or a device.
    pub usr: UsrSource,
    /// A device root's hash (a slot's comes from its header).
    pub root_hash: String,
    /// Whether this boot wrote the disk afresh (its STATE is formatted once the root is mounted).
    pub fresh_install: bool,
}

/// The whole boot up to `switch_root`: returns what the provisioner gave, if one is named (`mode`).
pub fn boot(
    sys: &mut impl System,
    cmd: &Cmdline,
    mode: Option<Mode>,
    report: &mut BootReport,
) -> Result<Option<Provisioned>, BootError> {
    let provisioned = match mode {
        Some(_) => Some(provision(sys, report)?),
        None => None,
    };
    let node = provisioned.as_ref().map(|p| &p.node);
    let source = root_source(sys, cmd, mode.zip(node), report)?;
    let (state_dev, slots) = mount_root(sys, cmd, &source, report)?;
    report.root_mounted_ms = sys.uptime_ms();
    let state = state_device(sys, cmd.state.as_deref(), state_dev)?;
    mount_state(sys, state.as_deref(), source.fresh_install, report)?;
    if let Some(p) = &provisioned {
        configure(sys, &p.config, &p.node, slots.as_ref())?;
    }
    Ok(provisioned)
}

/// Stage 1: the boot NIC, the config and node-init's part of it, each reported.
pub fn provision(sys: &mut impl System, report: &mut BootReport) -> Result<Provisioned, BootError> {
    let link = sys.network()?;
    report.network_ms = sys.uptime_ms();
    let up = format!(
        "{}/{} on {} ({} ms after the kernel)",
        link.lease.address, link.lease.prefix, link.ifname, report.network_ms
    );
    sys.say(&format!("network up: {up}"));
    sys.phone("initramfs", &format!("network up: {up}"), None);
    let config = sys.config()?;
    let node = crate::provision::node_config(&config)?;
    report.config_ms = sys.uptime_ms();
    sys.say(&format!("config for {} ({}) fetched", node.machine, node.role));
    Ok(Provisioned { link, config, node })
}

/// Stage 2: where the root comes from. Without a provisioner, the command line says; a provisioned boot runs the
/// slots, after writing the image into slot A in install mode, or (install mode, no disk) from RAM.
pub fn root_source(
    sys: &mut impl System,
    cmd: &Cmdline,
    provisioned: Option<(Mode, &NodeConfig)>,
    report: &mut BootReport,
) -> Result<RootSource, BootError> {
    let from_cmdline = RootSource { usr: cmd.usr.clone(), root_hash: cmd.root_hashes[0].clone(), fresh_install: false };
    let Some((mode, node)) = provisioned else { return Ok(from_cmdline) };
    let slots = RootSource { usr: UsrSource::Slots, ..from_cmdline };
    if mode != Mode::Install {
        return Ok(slots);
    }
    match &node.disk {
        Some(disk) => {
            let disk = sys.resolve(disk)?;
            sys.phone("installing", &format!("writing the image into slot a of {}", disk.display()), None);
            sys.say(&format!("installing to {}", disk.display()));
            let done = sys.install(&disk)?;
            report.installed_ms = Some(sys.uptime_ms());
            let detail = format!("{} {} in slot a of {}", done.header.name, done.header.release, disk.display());
            sys.say(&format!("installed {detail}"));
            sys.phone("installed", &detail, None);
            Ok(RootSource { fresh_install: true, ..slots })
        }
        None => {
            sys.say("no install disk: running the image from RAM");
            let ram = sys.fetch_to_ram()?;
            report.installed_ms = Some(sys.uptime_ms());
            let usr =
                UsrSource::Device { data: ram.data.display().to_string(), hash: Some(ram.hash.display().to_string()) };
            Ok(RootSource { usr, root_hash: ram.root_hash, fresh_install: false })
        }
    }
}

/// Stage 3: the verified root mounted read-only. Returns the STATE partition of a slot disk (the default for
/// /etc and /var) and the slot table as the slot choice left it.
pub fn mount_root(
    sys: &mut impl System,
    cmd: &Cmdline,
    source: &RootSource,
    report: &mut BootReport,
) -> Result<(Option<PathBuf>, Option<SlotReport>), BootError> {
    match &source.usr {
        UsrSource::Device { data, hash } => {
            let data_path = sys.resolve(data)?;
            let (hash_path, hash_offset) = match hash {
                Some(h) => (sys.resolve(h)?, 0),
                // A slot-formatted partition: its header says where the hash tree starts.
                None => (data_path.clone(), sys.slot_header(&data_path)?.hash_offset),
            };
            sys.mount_verified(&VeritySpec {
                name: "herd-usr".into(),
                data: data_path,
                hash: hash_path,
                hash_offset,
                root_hash: source.root_hash.clone(),
            })?;
            report.source = format!("device {data}");
            report.root_hash = source.root_hash.clone();
            Ok((None, None))
        }
        UsrSource::Slots => {
            let (disk, slots) = sys.slot_disk()?;
            let dev = format!("/dev/{disk}");
            report.disk = Some(dev.clone());
            let (booted, slots) = boot_slot(sys, cmd, &dev, slots, report)?;
            report.slot = Some(booted);
            report.source = format!("slot {booted} of {dev}");
            let state = sys.resolve("PARTLABEL=STATE")?;
            Ok((Some(state), Some(SlotReport { disk: dev, booted, slots })))
        }
    }
}

/// Picks, spends a try of, and mounts the best slot of `disk`; a slot that fails verification is marked bad and the
/// next one is tried. A slot whose image the command line does not vouch for, or that is for another kernel, is
/// passed over (and left as it is). Returns the slot mounted and the slot table as it is now.
pub fn boot_slot(
    sys: &mut impl System,
    cmd: &Cmdline,
    disk: &str,
    mut slots: Vec<SlotState>,
    report: &mut BootReport,
) -> Result<(Slot, Vec<SlotState>), BootError> {
    let mut reasons = Vec::new();
    for s in slot::boot_order(&slots) {
        let Some(state) = slots.iter().find(|x| x.slot == s).cloned() else { continue };
        let Some(header) = &state.header else { continue };
        if !cmd.trusts(&header.root_hash) {
            reasons.push(format!(
                "slot {s} holds {} {} (root hash {}), which the command line does not vouch for",
                header.name, header.release, header.root_hash
            ));
            continue;
        }
        if header.kernel_version != report.kernel {
            reasons.push(format!(
                "slot {s} is for kernel {}, this is {}; the boot server must serve that slot's kernel",
                header.kernel_version, report.kernel
            ));
            continue;
        }
        if !state.flags.successful {
            slots = sys.change_slots(disk, SlotChange::SpendTry(s))?;
            report.tried = true;
        }
        let part = sys.slot_partition(disk, s)?;
        sys.say(&format!("booting slot {s}: {} {} (flags {:?})", header.name, header.release, state.flags));
        let spec = VeritySpec {
            name: format!("herd-usr-{s}"),
            data: part.clone(),
            hash: part,
            hash_offset: header.hash_offset,
            root_hash: header.root_hash.clone(),
        };
        match sys.mount_verified(&spec) {
            Ok(()) => {
                report.release = header.release.clone();
                report.root_hash = header.root_hash.clone();
                report.failed_slots = reasons;
                return Ok((s, slots));
            }
            Err(e) => {
                let e = crate::error::chain(&e);
                sys.say(&format!("slot {s} failed: {e}; marking it bad"));
                slots = sys.change_slots(disk, SlotChange::MarkBad(s))?;
                reasons.push(format!("slot {s}: {e}"));
            }
        }
    }
    Err(BootError::NoSlot { disk: disk.to_owned(), reasons })
}

/// What holds /etc and /var: `herd.state=` (`tmpfs`, a device, `PARTLABEL=NAME`), else the slot disk's STATE
/// partition, else a tmpfs (None).
pub fn state_device(
    sys: &mut impl System,
    spec: Option<&str>,
    slot_state: Option<PathBuf>,
) -> Result<Option<PathBuf>, BootError> {
    Ok(match spec {
        Some("tmpfs") => None,
        Some(label) if label.starts_with("PARTLABEL=") => Some(sys.resolve(label)?),
        Some(dev) => Some(PathBuf::from(dev)),
        None => slot_state,
    })
}

/// Stage 4: STATE (formatted first after a fresh install) or a tmpfs, then the overlays and binds on it, and /tmp.
pub fn mount_state(
    sys: &mut impl System,
    state: Option<&Path>,
    fresh_install: bool,
    report: &mut BootReport,
) -> Result<(), BootError> {
    match state {
        Some(dev) => {
            if fresh_install {
                sys.format_state(dev)?;
                sys.say(&format!("STATE formatted ({})", dev.display()));
            }
            sys.mount(&Mount::State(dev.to_owned()))?;
            report.state = dev.display().to_string();
        }
        None => {
            sys.mount(&Mount::StateTmpfs)?;
            report.state = "tmpfs".into();
        }
    }
    for dir in ["etc", "var"] {
        sys.mount(&Mount::Overlay(dir))?;
    }
    for (dir, at) in DIRECT_STATE {
        sys.mount(&Mount::OnState { dir, at })?;
    }
    // Scratch space: systemd's sandboxing (PrivateDevices=, PrivateTmp=) makes its directories in /tmp.
    sys.mount(&Mount::Tmp)
}

/// Stage 5: the config applied to the new root, reported with the slot table as the slot choice left it (a try
/// spent, a bad slot marked).
pub fn configure(
    sys: &mut impl System,
    config: &Value,
    node: &NodeConfig,
    slots: Option<&SlotReport>,
) -> Result<(), BootError> {
    let mut config = config.clone();
    // The credential never reaches a file; a failed join is reported and the boot goes on (the machine may hold
    // valid certificates from an earlier boot; etcd decides whether it may in).
    if let Some(credential) = crate::identity::take_credential(&mut config) {
        match sys.join(&config, node, &credential) {
            Ok(joined) => {
                let mut detail = format!("machine:{} {}", node.machine, joined.machine);
                if let Some(m) = &joined.member {
                    detail.push_str(&format!(", member:{} {m}", node.machine));
                }
                sys.say(&format!("joined: {detail}"));
                sys.phone("joined", &detail, None);
            }
            Err(e) => {
                let why = crate::error::chain(&e);
                sys.say(&format!("join failed: {why}"));
                sys.phone("join-failed", &why, None);
            }
        }
    }
    let done = sys.apply_config(&config)?;
    let detail = format!(
        "{} files, {} directories, {} links, {} users, {} units",
        done.files, done.directories, done.links, done.users, done.units
    );
    sys.say(&format!("config applied: {detail}"));
    sys.phone("configured", &detail, slots);
    Ok(())
}

#[cfg(test)]
mod tests;
