//! The initramfs stage: node-init as PID 1. Loads the boot modules, finds the root the kernel command line names
//! (an A/B slot of the installed disk, or a device), puts it under dm-verity with a root hash the command line
//! vouches for, mounts it read-only, lays writable overlays over /etc and /var, and `switch_root`s into systemd.
//! Any failure stops the boot with the reason on the console: a machine never boots half-set-up or unverified.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use herd_images::slot::{self, Slot, SlotState};
use nix::mount::{MsFlags, mount};

use crate::cmdline::{Cmdline, OnFailure, UsrSource};
use crate::provision::{Mode, Provisioner};
use crate::report::{BOOT_REPORT, BootReport};

const NEWROOT: &str = "/sysroot";
const STATE: &str = "/run/herd/state";
/// STATE directories bind-mounted into the new root beside the /var overlay: (directory on STATE, mount point).
const DIRECT_STATE: [(&str, &str); 1] = [("docker", "var/lib/docker")];
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

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    mount(Some(src), target, Some(fstype), flags, data).map_err(|e| format!("mounting {fstype} {src} on {target}: {e}"))
}

/// Runs the stage; never returns (it execs the real init, or stops the machine).
pub fn run() -> ! {
    let started = Instant::now();
    if let Err(e) = early_mounts() {
        fail(OnFailure::Halt, &e);
    }
    let text = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cmd = match Cmdline::parse(&text) {
        Ok(c) => c,
        Err(e) => fail(OnFailure::Halt, &e),
    };
    let prov = match crate::provision::Provisioner::from_cmdline(&cmd) {
        Ok(p) => p,
        Err(e) => fail(cmd.on_failure, &e),
    };
    if let Err(e) = boot(&cmd, prov.as_ref(), started) {
        if let Some(p) = &prov {
            p.phone("failed", &e);
        }
        fail(cmd.on_failure, &e);
    }
    let err = switch_root(&cmd.init);
    fail(cmd.on_failure, &format!("switch_root into {}: {err}", cmd.init))
}

fn early_mounts() -> Result<(), String> {
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
        let result = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
            nix::kmod::finit_module(&f, params, nix::kmod::ModuleInitFlags::empty()).map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => loaded += 1,
            Err(e) if e.contains("EEXIST") => {}
            // A driver for hardware (or CPU features) this machine does not have.
            Err(e) if e.contains("ENODEV") => {}
            Err(e) => say(&format!("module {name}: {e}")),
        }
    }
    loaded
}

/// Polls until `found` returns something, or the deadline passes.
pub fn wait_for<T>(what: &str, mut found: impl FnMut() -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if let Some(t) = found() {
            return Ok(t);
        }
        if Instant::now() > deadline {
            return Err(format!("{what} did not appear within {} s", DEVICE_WAIT.as_secs()));
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

/// Sets up verity on the root and mounts it read-only at /sysroot; on a verity mismatch the device is removed
/// again and the error says so.
fn mount_verified(spec: &crate::dm::VeritySpec) -> Result<(), String> {
    let dev = crate::dm::create_verity(spec)?;
    let checked = wait_for(&dev.display().to_string(), || dev.exists().then_some(())).and_then(|()| {
        // Reading the first blocks proves the hash tree and the root hash agree before anything is mounted.
        let mut b = vec![0u8; 64 << 10];
        File::open(&dev).and_then(|mut f| f.read_exact(&mut b)).map_err(|e| {
            format!(
                "dm-verity: {} does not match root hash {} ({e}); the image is corrupted or not the one the boot \
                 server vouches for",
                spec.data.display(),
                spec.root_hash
            )
        })
    });
    let mounted = checked.and_then(|()| {
        mount_fs(&dev.to_string_lossy(), NEWROOT, "squashfs", MsFlags::MS_RDONLY, None)
            .map_err(|e| format!("{e} (dm-verity refuses blocks that do not match the root hash)"))
    });
    if mounted.is_err() {
        let _ = crate::dm::remove(&spec.name);
    }
    mounted
}

fn boot(cmd: &Cmdline, prov: Option<&Provisioner>, started: Instant) -> Result<(), String> {
    let info: serde_json::Value = std::fs::read_to_string("/etc/herd-initrd.json")
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

    // With a provisioner: network, config, and (install mode) the image onto the disk or into RAM.
    let mut link = None;
    let mut config = None;
    let mut fresh_install = false;
    let mut usr = cmd.usr.clone();
    let mut device_hash = cmd.root_hashes[0].clone();
    if let Some(p) = prov {
        let l = p.network()?;
        report.network_ms = uptime_ms();
        let up = format!(
            "{}/{} on {} ({} ms after the kernel)",
            l.lease.address, l.lease.prefix, l.ifname, report.network_ms
        );
        say(&format!("network up: {up}"));
        p.phone("initramfs", &format!("network up: {up}"));
        let c = p.config()?;
        let node = crate::provision::node_config(&c)?;
        report.config_ms = uptime_ms();
        say(&format!("config for {} ({}) fetched", node.machine, node.role));
        config = Some(c);
        link = Some(l);
        usr = UsrSource::Slots;
        if p.mode == Mode::Install {
            match &node.disk {
                Some(disk) => {
                    let disk = resolve(disk)?;
                    p.phone("installing", &format!("writing the image into slot a of {}", disk.display()));
                    say(&format!("installing to {}", disk.display()));
                    let done = p.install(cmd, &disk)?;
                    report.installed_ms = Some(uptime_ms());
                    let detail =
                        format!("{} {} in slot a of {}", done.header.name, done.header.release, disk.display());
                    say(&format!("installed {detail}"));
                    p.phone("installed", &detail);
                    fresh_install = true;
                }
                None => {
                    say("no install disk: running the image from RAM");
                    let (squash, verity, hash) = p.fetch_to_ram(cmd)?;
                    device_hash = hash;
                    report.installed_ms = Some(uptime_ms());
                    let attach = |f: &Path| {
                        std::fs::File::open(f).map_err(|e| e.to_string()).and_then(|f| Ok(crate::net::loop_attach(&f)?))
                    };
                    usr = UsrSource::Device {
                        data: attach(&squash)?.display().to_string(),
                        hash: Some(attach(&verity)?.display().to_string()),
                    };
                }
            }
        }
    }

    let state_dev = match &usr {
        UsrSource::Device { data, hash } => {
            let data_path = resolve(data)?;
            let (hash_path, hash_offset) = match hash {
                Some(h) => (resolve(h)?, 0),
                // A slot-formatted partition: its header says where the hash tree starts.
                None => (data_path.clone(), slot_header(&data_path)?.hash_offset),
            };
            let root_hash = device_hash.clone();
            mount_verified(&crate::dm::VeritySpec {
                name: "herd-usr".into(),
                data: data_path,
                hash: hash_path,
                hash_offset,
                root_hash: root_hash.clone(),
            })?;
            report.source = format!("device {data}");
            report.root_hash = root_hash;
            None
        }
        UsrSource::Slots => {
            let (disk, slots) = wait_for("a disk with herd's USR-A/USR-B partitions", find_slot_disk)?;
            report.disk = Some(format!("/dev/{disk}"));
            let booted = boot_slot(cmd, &disk, &slots, &mut report)?;
            report.slot = Some(booted);
            report.source = format!("slot {booted} of /dev/{disk}");
            Some(wait_for("the STATE partition", || partition_by_label("STATE"))?)
        }
    };
    report.root_mounted_ms = uptime_ms();

    let state = match cmd.state.as_deref() {
        Some("tmpfs") => None,
        Some(label) if label.starts_with("PARTLABEL=") => {
            let name = label.trim_start_matches("PARTLABEL=");
            Some(wait_for(name, || partition_by_label(name))?)
        }
        Some(dev) => Some(PathBuf::from(dev)),
        None => state_dev,
    };
    if fresh_install && let Some(dev) = &state {
        crate::provision::format_state(Path::new(NEWROOT), dev)?;
        say(&format!("STATE formatted ({})", dev.display()));
    }
    match &state {
        Some(dev) => {
            mount_fs(&dev.to_string_lossy(), STATE, "ext4", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, None)
                .map_err(|e| format!("{e}: the STATE file system (/etc and /var) cannot be mounted"))?;
            report.state = dev.display().to_string();
        }
        None => {
            mount_fs("tmpfs", STATE, "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
            report.state = "tmpfs".into();
        }
    }
    for dir in ["etc", "var"] {
        let upper = format!("{STATE}/{dir}.upper");
        let work = format!("{STATE}/{dir}.work");
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(|e| format!("mkdir {d}: {e}"))?;
        }
        let lower = format!("{NEWROOT}/{dir}");
        mount(
            Some("overlay"),
            lower.as_str(),
            Some("overlay"),
            MsFlags::empty(),
            Some(format!("lowerdir={lower},upperdir={upper},workdir={work}").as_str()),
        )
        .map_err(|e| format!("overlay on /{dir}: {e}"))?;
    }
    // Directories of programs that stack their own overlays (dockerd's overlay2 graph driver) live on STATE
    // directly: an overlay's upper directory cannot be on another overlay, and dockerd falls back to copying
    // every layer (the vfs driver) when /var/lib/docker is on one.
    for (dir, at) in DIRECT_STATE {
        let src = format!("{STATE}/{dir}");
        std::fs::create_dir_all(&src).map_err(|e| format!("mkdir {src}: {e}"))?;
        let target = format!("{NEWROOT}/{at}");
        mount_fs(&src, &target, "none", MsFlags::MS_BIND, None).map_err(|e| format!("{e}: {at} on STATE"))?;
    }
    // Scratch space: systemd's sandboxing (PrivateDevices=, PrivateTmp=) makes its directories in /tmp.
    mount_fs("tmpfs", &format!("{NEWROOT}/tmp"), "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    if let (Some(c), Some(p)) = (&config, prov) {
        let done = crate::ignition::apply(c, Path::new(NEWROOT)).map_err(|e| format!("applying the config: {e}"))?;
        let detail = format!(
            "{} files, {} directories, {} links, {} users, {} units",
            done.files, done.directories, done.links, done.users, done.units
        );
        say(&format!("config applied: {detail}"));
        // With the slot table as the slot choice left it (a try spent, a bad slot marked).
        let slots = report.disk.as_deref().zip(report.slot).and_then(|(disk, booted)| {
            let (_, slots) = slot::read_slots(&mut File::open(disk).ok()?).ok()?;
            Some(slot::SlotReport { disk: disk.to_owned(), booted, slots })
        });
        if let Err(e) = p.try_phone_slots("configured", &detail, slots.as_ref()) {
            eprintln!("node-init: could not report configured to the provisioner: {e}");
        }
    }
    if let Some(l) = &link {
        // The boot NIC's DHCP address goes: the machine's network is the bond (or networkd's config of this NIC).
        crate::net::release(&l.ifname)?;
    }
    early_bond(&mut report);
    report.initrd_ms = started.elapsed().as_millis() as u64;
    report.switch_root_ms = uptime_ms();
    let json = serde_json::to_string(&report).map_err(|e| e.to_string())?;
    std::fs::create_dir_all("/run/herd").map_err(|e| e.to_string())?;
    std::fs::write(BOOT_REPORT, &json).map_err(|e| format!("{BOOT_REPORT}: {e}"))?;
    say(&format!("root verified and mounted ({}); switching to {}", report.source, cmd.init));
    Ok(())
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
        Err(e) => say(&format!("{} not built in the initramfs ({e}); systemd-networkd will build it", b.name)),
    }
}

/// A device path, or `PARTLABEL=NAME`, once it exists.
fn resolve(spec: &str) -> Result<PathBuf, String> {
    match spec.strip_prefix("PARTLABEL=") {
        Some(label) => wait_for(spec, || partition_by_label(label)),
        None => {
            let p = PathBuf::from(spec);
            wait_for(spec, || p.exists().then(|| p.clone()))
        }
    }
}

/// The herd slot header at the end of a partition.
fn slot_header(dev: &Path) -> Result<slot::SlotHeader, String> {
    let mut f = File::open(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    let size = f.seek(SeekFrom::End(0)).map_err(|e| e.to_string())?;
    let mut block = vec![0u8; slot::HEADER_BYTES as usize];
    f.seek(SeekFrom::Start(size.saturating_sub(slot::HEADER_BYTES))).map_err(|e| e.to_string())?;
    f.read_exact(&mut block).map_err(|e| format!("{}: {e}", dev.display()))?;
    slot::SlotHeader::parse(&block).ok_or_else(|| {
        format!("{} holds no herd slot header; give herd.usr.hash= for a separate hash device", dev.display())
    })
}

/// Picks, spends a try of, and mounts the best slot; a slot that fails verification is marked bad and the next
/// one is tried. Returns the slot mounted.
fn boot_slot(cmd: &Cmdline, disk: &str, slots: &[SlotState], report: &mut BootReport) -> Result<Slot, String> {
    let order = slot::boot_order(slots);
    if order.is_empty() {
        return Err(format!("/dev/{disk} has no bootable slot (both failed or were never installed)"));
    }
    let dev = format!("/dev/{disk}");
    let update = |change: &dyn Fn(&mut herd_images::gpt::Table)| -> Result<(), String> {
        let mut f = OpenOptions::new().read(true).write(true).open(&dev).map_err(|e| format!("{dev}: {e}"))?;
        let (mut table, _) = slot::read_slots(&mut f).map_err(|e| e.to_string())?;
        change(&mut table);
        table.write(&mut f).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())
    };
    let mut errors = Vec::new();
    for s in order {
        let Some(state) = slots.iter().find(|x| x.slot == s) else { continue };
        let Some(header) = &state.header else { continue };
        if !cmd.trusts(&header.root_hash) {
            errors.push(format!(
                "slot {s} holds {} {} (root hash {}), which the command line does not vouch for",
                header.name, header.release, header.root_hash
            ));
            continue;
        }
        if header.kernel_version != report.kernel {
            errors.push(format!(
                "slot {s} is for kernel {}, this is {}; the boot server must serve that slot's kernel",
                header.kernel_version, report.kernel
            ));
            continue;
        }
        if !state.flags.successful {
            update(&|t| slot::spend_try(t, s))?;
            report.tried = true;
        }
        let index = if s == Slot::A { 1 } else { 2 };
        let part = wait_for(s.label(), || {
            let p = partition_node(disk, index);
            p.exists().then_some(p)
        })?;
        say(&format!("booting slot {s}: {} {} (flags {:?})", header.name, header.release, state.flags));
        let spec = crate::dm::VeritySpec {
            name: format!("herd-usr-{s}"),
            data: part.clone(),
            hash: part,
            hash_offset: header.hash_offset,
            root_hash: header.root_hash.clone(),
        };
        match mount_verified(&spec) {
            Ok(()) => {
                report.release = header.release.clone();
                report.root_hash = header.root_hash.clone();
                report.failed_slots = errors;
                return Ok(s);
            }
            Err(e) => {
                say(&format!("slot {s} failed: {e}; marking it bad"));
                update(&|t| slot::mark_bad(t, s))?;
                errors.push(format!("slot {s}: {e}"));
            }
        }
    }
    Err(format!("no slot of /dev/{disk} could be booted: {}", errors.join("; ")))
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
