//! The initramfs stage: node-init as PID 1. Loads the boot modules, finds the root the kernel command line names
//! (an A/B slot of the installed disk, or a device), puts it under dm-verity with a root hash the command line
//! vouches for, mounts it read-only, lays writable overlays over /etc and /var, and `switch_root`s into systemd.
//! Any failure stops the boot with the reason on the console: a machine never boots half-set-up or unverified.
//!
//! The decisions are in [`stages`], over the [`stages::System`] trait; [`Linux`] is that trait on the machine.

pub mod stages;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use herd_images::slot::{self, Slot, SlotState};
use nix::mount::{MsFlags, mount};
use serde_json::Value;

use crate::cmdline::{Cmdline, OnFailure};
use crate::error::{SysError, chain};
use crate::provision::Provisioner;
use crate::report::{BOOT_REPORT, BootReport};
use stages::{BootError, Mount, Provisioned, RamImage, SlotChange, System};

const NEWROOT: &str = "/sysroot";
const STATE: &str = "/run/herd/state";
/// How long block devices get to appear after their drivers load.
const DEVICE_WAIT: Duration = Duration::from_secs(20);

fn say(msg: &str) {
    eprintln!("herd-initrd: {msg}");
}

/// Seconds since the kernel started (CLOCK_BOOTTIME), for the boot timeline.
pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()))
        .map_or(0, |s| (s * 1000.0) as u64)
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), SysError> {
    std::fs::create_dir_all(target).map_err(SysError::with(format!("mkdir {target}")))?;
    mount(Some(src), target, Some(fstype), flags, data)
        .map_err(|e| SysError::sys(format!("mounting {fstype} {src} on {target}"), e.into()))
}

/// Runs the stage; never returns (it execs the real init, or stops the machine).
pub fn run() -> ! {
    let started = Instant::now();
    if let Err(e) = early_mounts() {
        fail(OnFailure::Halt, &chain(&e));
    }
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cmd = match Cmdline::parse(&text) {
        Ok(c) => c,
        Err(e) => fail(OnFailure::Halt, &e.to_string()),
    };
    let prov = match crate::provision::Provisioner::from_cmdline(&cmd) {
        Ok(p) => p,
        Err(e) => fail(cmd.on_failure, &e.to_string()),
    };
    let mut report = start();
    let mut sys = Linux { cmd: &cmd, prov: prov.as_ref() };
    let booted = stages::boot(&mut sys, &cmd, prov.as_ref().map(|p| p.mode), &mut report)
        .and_then(|provisioned| finish(provisioned.as_ref(), &mut report, started));
    if let Err(e) = booted {
        let e = chain(&e);
        if let Some(p) = &prov {
            p.phone("failed", &e);
        }
        fail(cmd.on_failure, &e);
    }
    say(&format!("root verified and mounted ({}); switching to {}", report.source, cmd.init));
    let err = switch_root(&cmd.init);
    fail(cmd.on_failure, &format!("switch_root into {}: {err}", cmd.init))
}

/// The report's start: the image and kernel this initramfs is for, and the modules loaded.
fn start() -> BootReport {
    let info: Value = std::fs::read_to_string("/etc/herd-initrd.json")
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut report = BootReport {
        image: info["name"].as_str().unwrap_or("?").to_owned(),
        kernel: info["kernel"].as_str().unwrap_or("?").to_owned(),
        initrd_started_ms: uptime_ms(),
        ..BootReport::default()
    };
    say(&format!("{} {} starting ({} ms after the kernel)", report.image, report.kernel, report.initrd_started_ms));
    let loaded = load_modules();
    report.modules_loaded_ms = uptime_ms();
    say(&format!("{loaded} modules loaded"));
    report
}

/// After the stages: the boot NIC's address goes, the bond comes, the report is written for the daemon.
fn finish(provisioned: Option<&Provisioned>, report: &mut BootReport, started: Instant) -> Result<(), BootError> {
    if let Some(p) = provisioned {
        // The boot NIC's DHCP address goes: the machine's network is the bond (or networkd's config of this NIC).
        crate::net::release(&p.link.ifname)?;
    }
    early_bond(report);
    report.initrd_ms = started.elapsed().as_millis() as u64;
    report.switch_root_ms = uptime_ms();
    let json = serde_json::to_string(&*report).map_err(|e| SysError::Invalid(format!("the boot report: {e}")))?;
    std::fs::create_dir_all("/run/herd").map_err(SysError::with("mkdir /run/herd"))?;
    std::fs::write(BOOT_REPORT, &json).map_err(SysError::with(BOOT_REPORT))?;
    Ok(())
}

fn early_mounts() -> Result<(), SysError> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    mount_fs("proc", "/proc", "proc", nosuid, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("tmpfs", "/run", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    Ok(())
}

fn fail(how: OnFailure, reason: &str) -> ! {
    say(&format!("BOOT STOPPED: {reason}"));
    say("nothing was mounted writable and the root was not started; fix the cause and boot again");
    nix::unistd::sync();
    match how {
        OnFailure::Poweroff => {
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        }
        OnFailure::Reboot => {
            std::thread::sleep(Duration::from_secs(30));
            let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        }
        OnFailure::Halt => {}
    }
    loop {
        std::thread::sleep(Duration::from_secs(600));
        say(&format!("BOOT STOPPED: {reason}"));
    }
}

/// Loads the modules listed in the initramfs's load order (already-loaded ones are fine).
fn load_modules() -> usize {
    let dir = Path::new("/").join(herd_images::initramfs::MODULE_DIR);
    let list = std::fs::read_to_string(Path::new("/").join(herd_images::initramfs::LOAD_ORDER)).unwrap_or_default();
    let mut loaded = 0;
    for name in list.lines().filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        // The bonding driver makes no bond of its own (bond0 in balance-rr mode by default): node-init or networkd
        // creates the one the config describes.
        let params = if name == "bonding.ko" { c"max_bonds=0" } else { c"" };
        let result = File::open(&path).and_then(|f| {
            nix::kmod::finit_module(&f, params, nix::kmod::ModuleInitFlags::empty()).map_err(std::io::Error::from)
        });
        match result.map_err(|e| (e.raw_os_error(), e)) {
            Ok(()) => loaded += 1,
            Err((Some(libc::EEXIST), _)) => {}
            // A driver for hardware (or CPU features) this machine does not have.
            Err((Some(libc::ENODEV), _)) => {}
            Err((_, e)) => say(&format!("module {name}: {e}")),
        }
    }
    loaded
}

/// Polls until `found` returns something, or the deadline passes.
pub fn wait_for<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> Result<T, SysError> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if let Some(t) = found() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            return Err(SysError::Missing { what: what.to_owned(), secs: DEVICE_WAIT.as_secs() });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Block devices (whole disks) the kernel knows.
fn disks() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|d| d.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    names.retain(|n| !["loop", "ram", "dm-", "sr", "zram"].iter().any(|p| n.starts_with(p)));
    names.sort();
    names
}

/// The device node of the partition called `label` (by the kernel's PARTNAME).
fn partition_by_label(label: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/class/block").ok()?;
    for e in entries.filter_map(Result::ok) {
        let uevent = std::fs::read_to_string(e.path().join("uevent")).unwrap_or_default();
        if uevent.lines().any(|l| l == format!("PARTNAME={label}")) {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

/// The device node of partition `number` of `disk` (vda → vda2, nvme0n1 → nvme0n1p2).
fn partition_node(disk: &str, number: usize) -> PathBuf {
    let sep = if disk.ends_with(|c: char| c.is_ascii_digit()) { "p" } else { "" };
    PathBuf::from(format!("/dev/{disk}{sep}{number}"))
}

/// Finds the disk with herd's layout: the first whose GPT has USR-A and USR-B.
fn find_slot_disk() -> Option<(String, Vec<SlotState>)> {
    for d in disks() {
        let Ok(mut f) = File::open(format!("/dev/{d}")) else { continue };
        if let Ok((_, slots)) = slot::read_slots(&mut f) {
            return Some((d, slots));
        }
    }
    None
}

/// Builds the bond of `/etc/herd/bond.json` in the new root (just written by the config, or kept from an earlier
/// boot), if it describes one. Best effort: if it cannot be built, systemd-networkd builds it later, as it would
/// without this.
fn early_bond(report: &mut BootReport) {
    let path = Path::new(NEWROOT).join(herd_config::node::BOND_CONFIG_PATH.trim_start_matches('/'));
    let Ok(text) = std::fs::read_to_string(&path) else { return };
    let b = match serde_json::from_str::<herd_config::node::BondConfig>(&text) {
        Ok(c) if c.version == 1 => c.bond,
        Ok(c) => {
            return say(&format!(
                "{}: version {} is not 1; systemd-networkd builds the bond",
                path.display(),
                c.version
            ));
        }
        Err(e) => return say(&format!("{}: {e}; systemd-networkd builds the bond", path.display())),
    };
    let Some(b) = b else { return };
    match crate::bond::build(&b) {
        Ok(detail) => {
            report.bond_ms = Some(uptime_ms());
            say(&format!("bond up: {detail} ({} ms after the kernel)", report.bond_ms.unwrap_or_default()));
        }
        Err(e) => {
            say(&format!("{} not built in the initramfs ({}); systemd-networkd will build it", b.name, chain(&e)))
        }
    }
}

/// A device path, or `PARTLABEL=NAME`, once it exists.
fn resolve(spec: &str) -> Result<PathBuf, SysError> {
    match spec.strip_prefix("PARTLABEL=") {
        Some(label) => wait_for(spec, || partition_by_label(label)),
        None => {
            let p = PathBuf::from(spec);
            wait_for(spec, || p.exists().then(|| p.clone()))
        }
    }
}

/// The herd slot header at the end of a partition.
fn slot_header(dev: &Path) -> Result<slot::SlotHeader, BootError> {
    let what = || dev.display().to_string();
    let mut f = File::open(dev).map_err(SysError::with(what()))?;
    let size = f.seek(SeekFrom::End(0)).map_err(SysError::with(what()))?;
    let mut block = vec![0u8; slot::HEADER_BYTES as usize];
    f.seek(SeekFrom::Start(size.saturating_sub(slot::HEADER_BYTES))).map_err(SysError::with(what()))?;
    f.read_exact(&mut block).map_err(SysError::with(format!("{}: reading its slot header", what())))?;
    slot::SlotHeader::parse(&block).ok_or_else(|| BootError::NoSlotHeader { dev: dev.to_owned() })
}

/// Sets up verity on the root and mounts it read-only at /sysroot; on a verity mismatch the device is removed
/// again and the error says so.
fn mount_verified(spec: &crate::dm::VeritySpec) -> Result<(), BootError> {
    let dev = crate::dm::create_verity(spec)?;
    let checked =
        wait_for(&dev.display().to_string(), || dev.exists().then_some(())).map_err(BootError::from).and_then(|()| {
            // Reading the first blocks proves the hash tree and the root hash agree before anything is mounted.
            let mut b = vec![0u8; 64 << 10];
            File::open(&dev).and_then(|mut f| f.read_exact(&mut b)).map_err(|source| BootError::Verity {
                data: spec.data.clone(),
                root_hash: spec.root_hash.clone(),
                source,
            })
        });
    let mounted = checked.and_then(|()| {
        mount_fs(&dev.to_string_lossy(), NEWROOT, "squashfs", MsFlags::MS_RDONLY, None).map_err(BootError::from)
    });
    if mounted.is_err() {
        let _ = crate::dm::remove(&spec.name);
    }
    mounted
}

/// The [`System`] of a machine: node-init as PID 1 in its initramfs.
#[derive(Debug)]
pub struct Linux<'a> {
    cmd: &'a Cmdline,
    prov: Option<&'a Provisioner>,
}

impl Linux<'_> {
    fn prov(&self) -> Result<&Provisioner, BootError> {
        self.prov
            .ok_or_else(|| SysError::Invalid("the command line names no provisioner (herd.provisioner=)".into()).into())
    }
}

impl System for Linux<'_> {
    fn say(&mut self, msg: &str) {
        say(msg);
    }

    fn uptime_ms(&self) -> u64 {
        uptime_ms()
    }

    fn network(&mut self) -> Result<crate::provision::Link, BootError> {
        Ok(self.prov()?.network()?)
    }

    fn config(&mut self) -> Result<Value, BootError> {
        Ok(self.prov()?.config()?)
    }

    fn phone(&mut self, stage: &str, detail: &str, slots: Option<&slot::SlotReport>) {
        let Some(p) = self.prov else { return };
        if let Err(e) = p.try_phone_slots(stage, detail, slots) {
            eprintln!("node-init: could not report {stage} to the provisioner: {}", chain(&e));
        }
    }

    fn install(&mut self, disk: &Path) -> Result<slot::Installed, BootError> {
        Ok(self.prov()?.install(self.cmd, disk)?)
    }

    fn fetch_to_ram(&mut self) -> Result<RamImage, BootError> {
        let (squash, verity, root_hash) = self.prov()?.fetch_to_ram(self.cmd)?;
        let attach = |f: &Path| -> Result<PathBuf, SysError> {
            let file = File::open(f).map_err(SysError::with(f.display().to_string()))?;
            crate::net::loop_attach(&file)
        };
        Ok(RamImage { data: attach(&squash)?, hash: attach(&verity)?, root_hash })
    }

    fn resolve(&mut self, spec: &str) -> Result<PathBuf, BootError> {
        Ok(resolve(spec)?)
    }

    fn slot_disk(&mut self) -> Result<(String, Vec<SlotState>), BootError> {
        Ok(wait_for("a disk with herd's USR-A/USR-B partitions", find_slot_disk)?)
    }

    fn slot_partition(&mut self, disk: &str, slot: Slot) -> Result<PathBuf, BootError> {
        let index = if slot == Slot::A { 1 } else { 2 };
        let name = disk.trim_start_matches("/dev/");
        Ok(wait_for(slot.label(), || {
            let p = partition_node(name, index);
            p.exists().then_some(p)
        })?)
    }

    fn slot_header(&mut self, dev: &Path) -> Result<slot::SlotHeader, BootError> {
        slot_header(dev)
    }

    fn change_slots(&mut self, disk: &str, change: SlotChange) -> Result<Vec<SlotState>, BootError> {
        slot::update(Path::new(disk), |t| match change {
            SlotChange::SpendTry(s) => slot::spend_try(t, s),
            SlotChange::MarkBad(s) => slot::mark_bad(t, s),
        })
        .map_err(|source| BootError::Slots { disk: disk.to_owned(), source })
    }

    fn mount_verified(&mut self, spec: &crate::dm::VeritySpec) -> Result<(), BootError> {
        mount_verified(spec)
    }

    fn format_state(&mut self, dev: &Path) -> Result<(), BootError> {
        Ok(crate::provision::format_state(Path::new(NEWROOT), dev)?)
    }

    fn mount(&mut self, m: &Mount) -> Result<(), BootError> {
        let private = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        match m {
            Mount::State(dev) => {
                std::fs::create_dir_all(STATE).map_err(SysError::with(format!("mkdir {STATE}")))?;
                mount(Some(dev.as_path()), STATE, Some("ext4"), private, None::<&str>).map_err(|e| {
                    SysError::sys(
                        format!("mounting the STATE file system (/etc and /var) from {}", dev.display()),
                        e.into(),
                    )
                })?;
            }
            Mount::StateTmpfs => mount_fs("tmpfs", STATE, "tmpfs", private, Some("mode=0755"))?,
            Mount::Overlay(dir) => {
                let upper = format!("{STATE}/{dir}.upper");
                let work = format!("{STATE}/{dir}.work");
                for d in [&upper, &work] {
                    std::fs::create_dir_all(d).map_err(SysError::with(format!("mkdir {d}")))?;
                }
                let lower = format!("{NEWROOT}/{dir}");
                let data = format!("lowerdir={lower},upperdir={upper},workdir={work}");
                mount(Some("overlay"), lower.as_str(), Some("overlay"), MsFlags::empty(), Some(data.as_str()))
                    .map_err(|e| SysError::sys(format!("overlay on /{dir}"), e.into()))?;
            }
            Mount::OnState { dir, at } => {
                let src = format!("{STATE}/{dir}");
                std::fs::create_dir_all(&src).map_err(SysError::with(format!("mkdir {src}")))?;
                mount_fs(&src, &format!("{NEWROOT}/{at}"), "none", MsFlags::MS_BIND, None)?;
            }
            Mount::Tmp => mount_fs("tmpfs", &format!("{NEWROOT}/tmp"), "tmpfs", private, Some("mode=1777"))?,
        }
        Ok(())
    }

    fn apply_config(&mut self, config: &Value) -> Result<crate::ignition::Applied, BootError> {
        Ok(crate::ignition::apply(config, Path::new(NEWROOT))?)
    }

    fn join(
        &mut self,
        config: &Value,
        node: &herd_config::node::NodeConfig,
        credential: &str,
    ) -> Result<crate::identity::Joined, BootError> {
        let prov = self.prov()?;
        Ok(crate::identity::join(prov, Path::new(NEWROOT), config, &node.machine, node.etcd_member, credential)?)
    }
}

/// Moves the API file systems into the new root, makes it `/`, frees the initramfs and execs `init`.
fn switch_root(init: &str) -> String {
    for m in ["/dev", "/proc", "/sys", "/run"] {
        let target = format!("{NEWROOT}{m}");
        if let Err(e) = mount(Some(m), target.as_str(), None::<&str>, MsFlags::MS_MOVE, None::<&str>) {
            return format!("moving {m}: {e}");
        }
    }
    free_initramfs();
    if let Err(e) = std::env::set_current_dir(NEWROOT) {
        return format!("chdir {NEWROOT}: {e}");
    }
    if let Err(e) = mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>) {
        return format!("moving the new root to /: {e}");
    }
    if let Err(e) = nix::unistd::chroot(".") {
        return format!("chroot: {e}");
    }
    let _ = std::env::set_current_dir("/");
    let Ok(path) = std::ffi::CString::new(init) else { return "init path has a NUL".into() };
    match nix::unistd::execv(&path, &[path.as_c_str()]) {
        Ok(never) => match never {},
        Err(e) => e.to_string(),
    }
}

/// Deletes the initramfs's own files (everything on the root's device): the memory is the kernel's again.
fn free_initramfs() {
    use std::os::unix::fs::MetadataExt;
    let Ok(root_dev) = std::fs::metadata("/").map(|m| m.dev()) else { return };
    let Ok(entries) = std::fs::read_dir("/") else { return };
    for e in entries.filter_map(Result::ok) {
        let p = e.path();
        let same_fs = std::fs::symlink_metadata(&p).map(|m| m.dev() == root_dev).unwrap_or(false);
        if !same_fs || p == Path::new(NEWROOT) {
            continue;
        }
        let _ = if p.is_dir() && !p.is_symlink() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
    }
}
