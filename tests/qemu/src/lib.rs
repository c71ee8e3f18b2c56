//! The QEMU cluster harness: a network namespace with a bridge, the provisioner serving on it, and VMs (TCG) that
//! PXE-boot from it with SeaBIOS + iPXE or OVMF. Serial logs are captured per VM; everything is torn down on drop,
//! and the working directory (logs, state) is kept when the test failed.
//!
//! ```no_run
//! use herd_qemu::{Firmware, Lab, VmSpec};
//! let mut lab = Lab::new("examples/qemu-3.toml".as_ref()).unwrap();
//! lab.boot_assets_test_initramfs().unwrap();
//! lab.start_provisioner().unwrap();
//! let i = lab.start_vm(VmSpec::new("node1", Firmware::SeabiosIpxe, &["52:54:00:99:01:01"])).unwrap();
//! lab.vms()[i].wait_for("HERD-TEST-INIT", std::time::Duration::from_secs(60)).unwrap();
//! ```
//!
//! Needs root (namespaces, taps), QEMU with iPXE ROMs and OVMF, and a kernel at [`KERNEL`]
//! (`scripts/setup-host.sh` installs them all).

pub mod image;
pub mod switch;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use herd_lab::daemon::{Daemon, Spec};
pub use herd_lab::qemu::{
    CABLE_SPEED, DEBIAN_IPXE_DIR, Firmware, KERNEL, Link, OVMF_CODE, OVMF_VARS, VmSpec, add_tap, bridge_netns,
    cable_netdev, ip, pxe_qemu_args, qcow2,
};
use herd_provisioner::daemon::{ApiConfig, ApiReads, DaemonConfig, EtcdAccess, SitePki};
pub use herd_provisioner::dhcp::server::Mode;
use herd_provisioner::dhcp::server::UnknownMacs;
use herd_provisioner::join::JoinPolicy;
use tokio_util::sync::CancellationToken;

/// What the test initramfs prints once it has printed its kernel arguments.
pub const TEST_MARKER: &str = "HERD-TEST-INIT";
/// Prefix of each kernel argument the test initramfs prints, one per line.
pub const TEST_ARG: &str = "HERD-TEST-ARG";
/// What node-init's daemon stage prints, followed by its report as JSON, once the system is up.
pub const NODE_INIT_READY: &str = "herd-node-init: ready";

/// The report on a console line with [`NODE_INIT_READY`]. The console is shared with the kernel and systemd, whose
/// messages can land on the same line after the report (seen in CI), so anything after the first JSON value is
/// ignored.
pub fn ready_report(line: &str) -> anyhow::Result<serde_json::Value> {
    let at = line.find(NODE_INIT_READY).with_context(|| format!("no {NODE_INIT_READY:?} in {line:?}"))?;
    serde_json::Deserializer::from_str(&line[at + NODE_INIT_READY.len()..])
        .into_iter::<serde_json::Value>()
        .next()
        .with_context(|| format!("no report after {NODE_INIT_READY:?} in {line:?}"))?
        .with_context(|| format!("the report in {line:?}"))
}

/// The provisioner's address on the lab bridge (as in examples/qemu-3.toml).
pub const PROVISIONER_IP: &str = "10.99.0.2";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running VM.
#[derive(Debug)]
pub struct Vm {
    /// Its spec.
    pub spec: VmSpec,
    /// Serial console log.
    pub serial: PathBuf,
    /// QEMU, in a process group of its own (with a private `/run`, as every peer daemon of the tests).
    qemu: Daemon,
    started: Instant,
}

impl Vm {
    /// The serial output so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// The kernel arguments the test initramfs printed.
    pub fn test_args(&self) -> Vec<String> {
        let prefix = format!("{TEST_ARG} ");
        self.console().lines().filter_map(|l| l.trim_end().strip_prefix(&prefix).map(str::to_owned)).collect()
    }

    /// Waits until the serial console shows `marker`; returns the time since the VM started and the line. Gives
    /// up early when the console shows a line that cannot lead there (iPXE "Nothing to boot").
    pub fn wait_for(&self, marker: &str, limit: Duration) -> anyhow::Result<(Duration, String)> {
        loop {
            let mut console = self.console();
            // Only whole lines: the VM may be in the middle of writing the one with the marker.
            console.truncate(console.rfind('\n').map_or(0, |i| i + 1));
            if let Some(line) = console.lines().find(|l| l.contains(marker)) {
                return Ok((self.started.elapsed(), line.to_owned()));
            }
            if self.started.elapsed() > limit || console.contains("Nothing to boot") {
                let tail: Vec<&str> = console.lines().rev().take(15).collect();
                bail!(
                    "{}: no {marker:?} on the console after {limit:?}; last lines:\n{}",
                    self.spec.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A disk attached to a directly booted VM.
#[derive(Debug, Clone)]
pub struct Drive {
    /// The file.
    pub path: PathBuf,
    /// Attached read-only.
    pub readonly: bool,
}

/// A VM booted straight into a kernel and initramfs (no firmware network boot), with virtio disks and no NIC.
#[derive(Debug, Clone)]
pub struct DirectBoot {
    /// Name (for logs).
    pub name: String,
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub append: String,
    /// Disks, in order (vda, vdb, ...).
    pub drives: Vec<Drive>,
    /// RAM in MiB.
    pub memory_mb: u32,
}

impl Vm {
    /// Starts a directly booted VM; its console goes to `dir/NAME.serial.log`.
    pub fn start_direct(boot: &DirectBoot, dir: &Path) -> anyhow::Result<Vm> {
        let serial = dir.join(format!("{}.serial.log", boot.name));
        let mut args: Vec<String> =
            ["-accel", "tcg", "-smp", "1", "-machine", "pc,graphics=off", "-display", "none", "-monitor", "none"]
                .map(str::to_owned)
                .into();
        args.extend(["-m".into(), boot.memory_mb.to_string(), "-no-reboot".into(), "-nic".into(), "none".into()]);
        args.extend([
            "-device".into(),
            "virtio-rng-pci".into(),
            "-serial".into(),
            format!("file:{}", serial.display()),
        ]);
        args.extend(["-kernel".into(), boot.kernel.display().to_string(), "-initrd".into()]);
        args.extend([boot.initrd.display().to_string(), "-append".into(), boot.append.clone()]);
        for d in &boot.drives {
            let ro = if d.readonly { ",readonly=on" } else { "" };
            let format = if herd_images::slot::is_qcow2(&d.path) { "qcow2" } else { "raw" };
            args.extend(["-drive".into(), format!("file={},format={format},if=virtio{ro}", d.path.display())]);
        }
        let qemu = spawn_qemu(&boot.name, None, &args, &dir.join(format!("{}.qemu.log", boot.name)))?;
        let spec = VmSpec::new(&boot.name, Firmware::SeabiosIpxe, &[]);
        Ok(Vm { spec, serial, qemu, started: Instant::now() })
    }

    /// Waits for the VM to power off by itself; false if it still runs after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.qemu.try_wait()?.is_some() {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(false)
    }
}

impl Vm {
    /// Like [`Vm::wait_for`], but allows `within` from now rather than from the VM's start.
    pub fn wait_for_within(&self, marker: &str, within: Duration) -> anyhow::Result<(Duration, String)> {
        self.wait_for(marker, self.started.elapsed() + within)
    }
}

/// Starts `qemu-system-x86_64 ARGS` (in network namespace `netns`, if given) as a peer daemon: its own process group,
/// a private `/run`, its output in `log`; dropping the handle stops it and anything it started.
fn spawn_qemu(name: &str, netns: Option<&str>, args: &[String], log: &Path) -> anyhow::Result<Daemon> {
    let mut spec = Spec::new(name, "qemu-system-x86_64").args(args).log(log);
    if let Some(ns) = netns {
        spec = spec.netns(ns);
    }
    spec.spawn().context("cannot start qemu-system-x86_64 (apt install -t bookworm-backports qemu-system-x86)")
}

/// A lab: namespace, bridge, provisioner, VMs.
#[derive(Debug)]
pub struct Lab {
    /// Working directory (kept on failure).
    pub dir: PathBuf,
    /// The network namespace.
    pub ns: String,
    /// The inventory served.
    pub inventory: PathBuf,
    bridge: String,
    taps: u32,
    provisioner: Option<(CancellationToken, std::thread::JoinHandle<anyhow::Result<()>>)>,
    vms: Vec<Vm>,
    /// Full DHCP (default) or proxyDHCP.
    pub mode: Mode,
    /// How long the machines' certificates are valid (default: the provisioner's, 30 days).
    pub cert_validity: time::Duration,
    /// Whether machines may join (default: open).
    pub join: JoinPolicy,
    /// Who turns etcd's users and roles on (default: the provisioner).
    pub etcd_access: EtcdAccess,
    hosts: Vec<(String, Option<Daemon>)>,
    /// A read-only operator's credential for the operator API (made when the provisioner starts).
    reader: Option<PathBuf>,
    /// An admin operator's credential (etcd and the operator API; made when the provisioner starts).
    admin: Option<PathBuf>,
}

impl Lab {
    /// A namespace with bridge `br0` at 10.99.0.2/24 (and 10.99.0.1 as the "gateway").
    pub fn new(inventory: &Path) -> anyhow::Result<Lab> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 10_000);
        let dir = std::env::temp_dir().join(format!("herd-qemu-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("assets"))?;
        let lab = Lab {
            dir,
            ns: format!("hq{id}"),
            inventory: inventory.canonicalize().with_context(|| format!("no inventory {}", inventory.display()))?,
            bridge: "br0".into(),
            taps: 0,
            provisioner: None,
            vms: Vec::new(),
            mode: Mode::Full,
            cert_validity: herd_provisioner::join::MACHINE_VALIDITY,
            join: JoinPolicy::Open,
            etcd_access: EtcdAccess::Auto,
            hosts: Vec::new(),
            reader: None,
            admin: None,
        };
        bridge_netns(&lab.ns, &lab.bridge, &[&format!("{PROVISIONER_IP}/24"), "10.99.0.1/24"])?;
        Ok(lab)
    }

    /// Writes the test kernel and a tiny busybox initramfs (prints [`TEST_MARKER`] and its command line, then
    /// powers off) as the provisioner's boot assets.
    pub fn boot_assets_test_initramfs(&self) -> anyhow::Result<()> {
        let assets = self.dir.join("assets");
        std::fs::copy(KERNEL, assets.join("vmlinuz"))
            .with_context(|| format!("no test kernel at {KERNEL}; run scripts/setup-host.sh"))?;
        build_test_initramfs(&self.dir.join("initramfs-root"), &assets.join("initramfs"))
    }

    /// Runs `f` on a thread inside the lab's network namespace (to talk to the VMs: etcd, SSH, HTTP).
    pub fn in_netns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
        let ns = format!("/run/netns/{}", self.ns);
        let handle = std::thread::spawn(move || -> anyhow::Result<T> {
            nix::sched::setns(std::fs::File::open(&ns)?, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        });
        handle.join().map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
    }

    /// Sends a QEMU monitor (HMP) command to VM `index`, e.g. `set_link n0 off` (NIC `i` is netdev `ni`).
    pub fn monitor(&self, index: usize, command: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let path = self.dir.join(format!("{}.monitor", self.vms[index].spec.name));
        let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| path.display().to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(format!("{command}\n").as_bytes())?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // The monitor echoes and answers, then waits at its prompt: read until it goes quiet.
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Stops VM `index` as a power cut would (its disk stays).
    pub fn power_off(&mut self, index: usize) {
        self.vms[index].qemu.halt();
    }

    /// Serves a built herd OS image (the output directory of `herdctl image build`) as the boot assets.
    pub fn boot_assets_image(&self, image: &Path) -> anyhow::Result<()> {
        let assets = self.dir.join("assets");
        for name in ["vmlinuz", "initramfs", "root.squashfs", "root.verity", "manifest.json"] {
            let (from, to) = (image.join(name), assets.join(name));
            let _ = std::fs::remove_file(&to);
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).with_context(|| format!("{}", from.display()))?;
            }
        }
        Ok(())
    }

    /// Starts the provisioner (in-process, inside the namespace) on the bridge.
    pub fn start_provisioner(&mut self) -> anyhow::Result<()> {
        let pki = herd_lab::pki::LabPki::make(&self.pki_dir(), PROVISIONER_IP.parse()?)?;
        let config = DaemonConfig {
            inventory: self.inventory.clone(),
            interface: self.bridge.clone(),
            state_dir: self.dir.join("state"),
            ipxe_dir: DEBIAN_IPXE_DIR.into(),
            mode: self.mode,
            unknown: UnknownMacs::Ignore,
            http_port: 80,
            assets_port: 8080,
            lease_secs: 3600,
            tftp_root: None,
            assets: self.dir.join("assets"),
            api: Some(ApiConfig { port: 8443, credentials: pki.server.clone(), tokens: None }),
            api_reads: ApiReads::Operators,
            site_pki: Some(SitePki {
                dir: self.pki_dir(),
                join: self.join,
                cert_validity: self.cert_validity,
                etcd_access: self.etcd_access,
                prune_after: time::Duration::days(30),
            }),
        };
        self.reader = Some(pki.reader);
        self.admin = Some(pki.admin);
        let cancel = CancellationToken::new();
        let run_cancel = cancel.clone();
        let ns = format!("/run/netns/{}", self.ns);
        let handle = std::thread::spawn(move || -> anyhow::Result<()> {
            let file = std::fs::File::open(&ns)?;
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(herd_provisioner::daemon::run(config, run_cancel))
        });
        self.provisioner = Some((cancel, handle));
        // Ready when the HTTP port answers.
        let start = Instant::now();
        loop {
            let probe = Command::new("ip")
                .args(["netns", "exec", &self.ns, "curl", "-s", "-o", "/dev/null", "http://10.99.0.2/metrics"])
                .status()?;
            if probe.success() {
                return Ok(());
            }
            if self.provisioner.as_ref().is_some_and(|(_, h)| h.is_finished()) {
                let (_, handle) = self.provisioner.take().expect("just checked");
                return match handle.join() {
                    Ok(Err(e)) => Err(e.context("provisioner stopped")),
                    _ => bail!("provisioner stopped"),
                };
            }
            if start.elapsed() > Duration::from_secs(15) {
                bail!("provisioner did not answer HTTP within 15 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the provisioner, as a crash or a restart would (its state stays in the lab's directory).
    pub fn stop_provisioner(&mut self) -> anyhow::Result<()> {
        if let Some((cancel, handle)) = self.provisioner.take() {
            cancel.cancel();
            match handle.join() {
                Ok(r) => r?,
                Err(_) => bail!("the provisioner thread panicked"),
            }
        }
        Ok(())
    }

    pub(crate) fn tap(&mut self) -> anyhow::Result<String> {
        self.taps += 1;
        let tap = format!("tap{}", self.taps);
        add_tap(&self.ns, &self.bridge, &tap)?;
        Ok(tap)
    }

    /// Starts a VM on the bridge; returns its index in [`Lab::vms`].
    pub fn start_vm(&mut self, spec: VmSpec) -> anyhow::Result<usize> {
        let taps = (0..spec.macs.len())
            .map(|i| if spec.link(i) == Link::Bridge { self.tap() } else { Ok(String::new()) })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let args = pxe_qemu_args(&spec, &self.dir, &taps)?;
        self.spawn_vm(spec, &args)
    }

    /// Runs `qemu-system-x86_64 ARGS` in the lab's namespace as VM `spec` (console in `NAME.serial.log`, QEMU's own
    /// output in `NAME.qemu.log`); returns its index in [`Lab::vms`].
    pub(crate) fn spawn_vm(&mut self, spec: VmSpec, qemu_args: &[String]) -> anyhow::Result<usize> {
        let serial = self.dir.join(format!("{}.serial.log", spec.name));
        let log = self.dir.join(format!("{}.qemu.log", spec.name));
        let qemu = spawn_qemu(&spec.name, Some(&self.ns), qemu_args, &log)?;
        self.vms.push(Vm { spec, serial, qemu, started: Instant::now() });
        Ok(self.vms.len() - 1)
    }

    /// Adds another host on the bridge (its own namespace, address `cidr`) and runs `command` there, e.g. a DHCP
    /// server herd does not own. Returns the namespace's name.
    pub fn add_host(&mut self, cidr: &str, command: &[&str]) -> anyhow::Result<String> {
        let n = self.hosts.len();
        let ns = format!("{}h{n}", self.ns);
        let (outside, inside) = (format!("hv{n}"), "eth0".to_owned());
        ip(&["netns", "add", &ns])?;
        self.hosts.push((ns.clone(), None));
        ip(&["-n", &self.ns, "link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &ns])?;
        ip(&["-n", &self.ns, "link", "set", &outside, "master", &self.bridge])?;
        ip(&["-n", &self.ns, "link", "set", &outside, "up"])?;
        ip(&["-n", &ns, "addr", "add", cidr, "dev", &inside])?;
        ip(&["-n", &ns, "link", "set", &inside, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        let (program, args) = command.split_first().context("add_host: an empty command")?;
        let child = Spec::new(program, program)
            .args(args)
            .netns(&ns)
            .log(&self.dir.join(format!("host{n}.log")))
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        if let Some(last) = self.hosts.last_mut() {
            last.1 = Some(child);
        }
        Ok(ns)
    }

    /// The VMs started so far.
    pub fn vms(&self) -> &[Vm] {
        &self.vms
    }

    /// The provisioner's /metrics text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sf", &format!("http://{PROVISIONER_IP}/metrics")])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The lab's site PKI (`herdctl pki` layout), made when the provisioner starts.
    pub fn pki_dir(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// An operator credential directory (`etcd-ca.crt etcd.crt etcd.key api-ca.crt api.crt api.key`): the admin's,
    /// or the read-only operator's.
    pub fn credential(&self, admin: bool) -> anyhow::Result<&Path> {
        let cred = if admin { &self.admin } else { &self.reader };
        cred.as_deref().context("the provisioner is not started")
    }

    /// The provisioner's operator API at `path`, read as a read-only operator over its TLS.
    pub fn api(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let cred = self.credential(false)?;
        let file = |f: &str| cred.join(f).display().to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sf", "--cacert", &file("api-ca.crt")])
            .args(["--cert", &file("api.crt"), "--key", &file("api.key")])
            .arg(format!("https://{PROVISIONER_IP}:8443{path}"))
            .output()?;
        if !out.status.success() {
            bail!("GET {path} failed");
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// POSTs `body` (JSON) to the operator API as the lab's admin; returns the answer's body.
    pub fn api_post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<String> {
        let cred = self.credential(true)?;
        let file = |f: &str| cred.join(f).display().to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-sf", "--cacert", &file("api-ca.crt")])
            .args(["--cert", &file("api.crt"), "--key", &file("api.key")])
            .args(["-X", "POST", "-H", "content-type: application/json", "-d", &body.to_string()])
            .arg(format!("https://{PROVISIONER_IP}:8443{path}"))
            .output()?;
        if !out.status.success() {
            bail!("POST {path} failed: {}", String::from_utf8_lossy(&out.stdout));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.vms.clear();
        for (ns, child) in self.hosts.drain(..) {
            drop(child);
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if let Some((cancel, handle)) = self.provisioner.take() {
            cancel.cancel();
            let _ = handle.join();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        if std::thread::panicking() || std::env::var_os("HERD_QEMU_KEEP").is_some() {
            eprintln!("QEMU lab kept for inspection: {} (serial logs, provisioner state)", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Builds a gzip cpio initramfs with static busybox whose /init prints its kernel arguments ([`TEST_ARG`] lines)
/// and then [`TEST_MARKER`], and powers off.
pub fn build_test_initramfs(root: &Path, out: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(root);
    for d in ["bin", "proc", "sys", "dev"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("no /bin/busybox (apt install busybox-static)")?;
    // One argument per line, then the marker: kernel messages may interleave with long lines on the console.
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         for arg in $(/bin/busybox cat /proc/cmdline); do echo \"{TEST_ARG} $arg\"; done\n\
         echo {TEST_MARKER}\n/bin/busybox poweroff -f\n"
    );
    std::fs::write(root.join("init"), init)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("chmod +x init bin/busybox && find . | cpio -o -H newc --quiet | gzip -1 > {}", out.display()))
        .current_dir(root)
        .status()?;
    if !status.success() {
        bail!("building the test initramfs failed (apt install cpio)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_report_is_read_past_console_noise_on_its_line() {
        let r = ready_report(
            r#"[  OK  ] herd-node-init: ready {"usr_writable":false,"slot":"a"}[   14.2] random: crng init done"#,
        );
        assert_eq!(r.unwrap()["slot"], "a");
        assert!(ready_report("herd-node-init: ready {\"usr_writable\":").is_err());
        assert!(ready_report("herd-node-init: started").is_err());
    }
}
