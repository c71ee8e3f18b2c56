//! The image build pipeline. Every stage runs a Debian tool (mmdebstrap, tar, mksquashfs, veritysetup) with
//! reproducible settings; the result lands in a cache entry named by the hash of what went in, so an unchanged
//! manifest rebuilds nothing.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{self, Manifest};

/// Bumped when the pipeline changes what it produces (invalidates caches).
const PIPELINE: &str = "herd-images/3";

/// The stages, for progress reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Checking the packages against apt metadata.
    Check,
    /// mmdebstrap: the root tree.
    Root,
    /// Unpacking the tree.
    Unpack,
    /// Adding node-init, relocating /root and /home to /var, trimming modules.
    Customize,
    /// The initramfs (node-init as /init and the boot modules).
    Initramfs,
    /// mksquashfs.
    Squash,
    /// veritysetup format.
    Verity,
    /// Writing manifest.json and copying to the output.
    Finish,
}

impl Stage {
    /// All stages in order.
    pub const ALL: [Stage; 8] = [
        Stage::Check,
        Stage::Root,
        Stage::Unpack,
        Stage::Customize,
        Stage::Initramfs,
        Stage::Squash,
        Stage::Verity,
        Stage::Finish,
    ];

    /// What the stage does, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Stage::Check => "checking packages",
            Stage::Root => "installing the root (mmdebstrap)",
            Stage::Unpack => "unpacking the root",
            Stage::Customize => "adding node-init, trimming modules",
            Stage::Initramfs => "making the initramfs",
            Stage::Squash => "squashing the root (zstd)",
            Stage::Verity => "computing the dm-verity tree",
            Stage::Finish => "writing manifest.json",
        }
    }
}

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Where the outputs go.
    pub out: PathBuf,
    /// The content-addressed cache.
    pub cache: PathBuf,
    /// `SOURCE_DATE_EPOCH`: every timestamp in the image.
    pub epoch: u64,
    /// Rebuild even if the cache has this image.
    pub no_cache: bool,
    /// The static `node-init` binary (scripts/build-node-init.sh): `/init` of the initramfs and the daemon in the
    /// root.
    pub node_init: PathBuf,
}

/// A file of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
}

/// The dm-verity parameters of `root.squashfs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verity {
    /// Root hash, hex: the one value that vouches for every byte of the root.
    pub root_hash: String,
    /// Salt, hex (derived from the build key).
    pub salt: String,
    /// Hash algorithm.
    pub algorithm: String,
    /// Data and hash block size.
    pub block_size: u32,
}

/// `manifest.json`: what was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    /// Image name.
    pub name: String,
    /// Release.
    pub release: String,
    /// The cache key: SHA-256 of the manifest, the epoch and the pipeline version.
    pub key: String,
    /// `SOURCE_DATE_EPOCH` used.
    pub source_date_epoch: u64,
    /// Output files.
    pub files: BTreeMap<String, FileEntry>,
    /// dm-verity of the root.
    pub verity: Verity,
    /// Kernel command line, with the verity root hash for node-init.
    pub cmdline: String,
    /// Packages asked for.
    pub packages: Vec<String>,
    /// The kernel: package and version (`uname -r`); its modules are in the root under /usr/lib/modules.
    pub kernel: KernelInfo,
}

impl ImageManifest {
    /// Reads the `manifest.json` of a built image (the provisioner's assets directory, an image directory).
    pub fn read(path: &Path) -> Result<ImageManifest, ManifestReadError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ManifestReadError::Read { path: path.display().to_string(), source })?;
        serde_json::from_str(&text)
            .map_err(|source| ManifestReadError::Invalid { path: path.display().to_string(), source })
    }

    /// A manifest with these values and placeholders elsewhere: what tests of its readers serve.
    pub fn for_tests(root_hash: &str, cmdline: &str) -> ImageManifest {
        ImageManifest {
            name: "herd-os".into(),
            release: "test".into(),
            key: String::new(),
            source_date_epoch: 0,
            files: BTreeMap::new(),
            verity: Verity {
                root_hash: root_hash.into(),
                salt: String::new(),
                algorithm: "sha256".into(),
                block_size: 4096,
            },
            cmdline: cmdline.into(),
            packages: Vec::new(),
            kernel: KernelInfo { package: String::new(), version: String::new(), initramfs_modules: Vec::new() },
        }
    }
}

/// Why a built image's `manifest.json` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestReadError {
    /// Not there, or unreadable.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a manifest `herdctl image build` wrote.
    #[error("{path} is not an image manifest of herdctl image build")]
    Invalid {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// The kernel an image boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// The package asked for.
    pub package: String,
    /// The version installed (`uname -r`).
    pub version: String,
    /// The modules the initramfs loads, in order.
    pub initramfs_modules: Vec<String>,
}

/// What a build returns.
#[derive(Debug, Clone)]
pub struct Built {
    /// The description.
    pub manifest: ImageManifest,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// A failed build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The manifest names packages apt does not know.
    #[error(
        "unknown package(s): {}; check the names (apt-cache policy NAME) and that the host lists the suites \
         (scripts/setup-host.sh); nothing was built",
        .0.join(", ")
    )]
    UnknownPackages(Vec<String>),
    /// A tool failed.
    #[error("{stage}: {message}")]
    Tool {
        /// The stage.
        stage: &'static str,
        /// What it said.
        message: String,
    },
    /// I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn tool(stage: Stage, cmd: &mut Command) -> Result<String, BuildError> {
    let out =
        cmd.output().map_err(|e| BuildError::Tool { stage: stage.describe(), message: format!("{cmd:?}: {e}") })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(8).collect();
        return Err(BuildError::Tool {
            stage: stage.describe(),
            message: format!(
                "{:?} failed: {}",
                cmd.get_program(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Moves the one `boot/vmlinuz-VERSION` of the tree to `to`, empties `/boot`, and returns VERSION.
fn take_kernel(tree: &Path, to: &Path) -> Result<String, BuildError> {
    let boot = tree.join("boot");
    let mut kernels: Vec<(String, PathBuf)> = std::fs::read_dir(&boot)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name.strip_prefix("vmlinuz-")?.to_owned();
            Some((version, e.path()))
        })
        .collect();
    kernels.sort();
    let Some((version, path)) = kernels.pop() else {
        return Err(BuildError::Tool {
            stage: Stage::Unpack.describe(),
            message: "the kernel package installed no /boot/vmlinuz-*; is [kernel] package a linux-image?".into(),
        });
    };
    std::fs::copy(&path, to)?;
    for e in std::fs::read_dir(&boot)?.filter_map(Result::ok) {
        let p = e.path();
        if p.is_dir() { std::fs::remove_dir_all(&p)? } else { std::fs::remove_file(&p)? }
    }
    if !tree.join("usr/lib/modules").join(&version).is_dir() && !tree.join("lib/modules").join(&version).is_dir() {
        return Err(BuildError::Tool {
            stage: Stage::Unpack.describe(),
            message: format!("kernel {version} has no modules directory in the root"),
        });
    }
    Ok(version)
}

fn sha256_file(path: &Path) -> std::io::Result<FileEntry> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok(FileEntry { size, sha256: hex(&h.finalize()) })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cache key of a manifest built at `epoch` with the node-init binary whose SHA-256 is `node_init`.
pub fn key(manifest: &Manifest, epoch: u64, node_init: &str) -> String {
    let mut h = Sha256::new();
    h.update(PIPELINE.as_bytes());
    // The files the pipeline puts in every root (images/files/): editing one builds anew.
    for file in [NODE_INIT_UNIT, SSH_HOST_KEYS, ETCD_UNIT, NONLOCAL_BIND, SUDO_GROUP, BACKGROUND_DROPIN] {
        h.update((file.len() as u64).to_le_bytes());
        h.update(file.as_bytes());
    }
    h.update(serde_json::to_vec(manifest).unwrap_or_default());
    h.update(epoch.to_le_bytes());
    h.update(node_init.as_bytes());
    hex(&h.finalize())
}

/// The key of the Debian root tree alone (mmdebstrap's output): what the packages and the epoch decide.
fn root_key(manifest: &Manifest, epoch: u64) -> String {
    let mut h = Sha256::new();
    h.update(b"herd-images-root/1");
    h.update(serde_json::to_vec(&(&manifest.debian, &manifest.root.packages)).unwrap_or_default());
    h.update(serde_json::to_vec(&(&manifest.kernel.package, &manifest.kernel.suite)).unwrap_or_default());
    h.update(epoch.to_le_bytes());
    hex(&h.finalize())
}

/// Builds the image of `manifest` (or takes it from the cache) and puts its files in `opts.out`.
pub fn build(manifest: &Manifest, opts: &BuildOptions, progress: &dyn Fn(Stage)) -> Result<Built, BuildError> {
    progress(Stage::Check);
    match crate::initramfs::is_static_elf(&opts.node_init) {
        Ok(true) => {}
        Ok(false) => {
            return Err(BuildError::Tool {
                stage: Stage::Check.describe(),
                message: format!(
                    "{} is dynamically linked; /init must be static: build it with scripts/build-node-init.sh",
                    opts.node_init.display()
                ),
            });
        }
        Err(e) => {
            return Err(BuildError::Tool {
                stage: Stage::Check.describe(),
                message: format!("{e}; build node-init with scripts/build-node-init.sh (or pass --node-init PATH)"),
            });
        }
    }
    let unknown = manifest::unknown_packages(manifest)?;
    if !unknown.is_empty() {
        return Err(BuildError::UnknownPackages(unknown));
    }
    let node_init = sha256_file(&opts.node_init)?.sha256;
    let key = key(manifest, opts.epoch, &node_init);
    let entry = opts.cache.join(&key);
    let cached = !opts.no_cache && entry.join("manifest.json").is_file();
    if !cached {
        build_entry(manifest, opts, &key, &entry, progress)?;
    }
    progress(Stage::Finish);
    // Mark the entry used (pruning keeps the most recently used ones).
    let _ = std::fs::File::open(entry.join("manifest.json")).and_then(|f| f.set_modified(std::time::SystemTime::now()));
    prune(&opts.cache, KEEP_IMAGES, KEEP_ROOTS)?;
    let text = std::fs::read_to_string(entry.join("manifest.json"))?;
    let described: ImageManifest = serde_json::from_str(&text)
        .map_err(|e| BuildError::Tool { stage: "reading the cache", message: e.to_string() })?;
    std::fs::create_dir_all(&opts.out)?;
    for name in described.files.keys().map(String::as_str).chain(["manifest.json"]) {
        let dst = opts.out.join(name);
        let _ = std::fs::remove_file(&dst);
        if std::fs::hard_link(entry.join(name), &dst).is_err() {
            std::fs::copy(entry.join(name), &dst)?;
        }
    }
    Ok(Built { manifest: described, cached })
}

/// Images the cache keeps (most recently used first); older ones are removed after each build.
pub const KEEP_IMAGES: usize = 6;
/// Root tarballs the cache keeps.
pub const KEEP_ROOTS: usize = 2;

/// Removes all but the `images` most recently used image entries and the `roots` newest root tarballs, and any
/// work directory a killed build left.
pub fn prune(cache: &Path, images: usize, roots: usize) -> std::io::Result<()> {
    let used = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
    let mut entries = Vec::new();
    for e in std::fs::read_dir(cache)?.filter_map(Result::ok) {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".work") {
            // A build of the same key in progress would hold it only while this process builds it.
            if used(&p).elapsed().unwrap_or_default() > std::time::Duration::from_secs(3600) {
                std::fs::remove_dir_all(&p)?;
            }
        } else if p.join("manifest.json").is_file() {
            entries.push((used(&p.join("manifest.json")), p));
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, p) in entries.into_iter().skip(images) {
        std::fs::remove_dir_all(p)?;
    }
    let mut tars: Vec<_> = std::fs::read_dir(cache.join("roots"))
        .map(|d| {
            d.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "tar")).collect()
        })
        .unwrap_or_else(|_| Vec::new());
    tars.sort_by_key(|p| std::cmp::Reverse(used(p)));
    for p in tars.into_iter().skip(roots) {
        std::fs::remove_file(p)?;
    }
    Ok(())
}

/// The Debian root as a tarball: from the root cache, or made by mmdebstrap (and then cached).
fn root_tar(manifest: &Manifest, opts: &BuildOptions, progress: &dyn Fn(Stage)) -> Result<PathBuf, BuildError> {
    let roots = opts.cache.join("roots");
    std::fs::create_dir_all(&roots)?;
    let tar = roots.join(format!("{}.tar", root_key(manifest, opts.epoch)));
    if !opts.no_cache && tar.is_file() {
        let _ = std::fs::File::open(&tar).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        return Ok(tar);
    }
    progress(Stage::Root);
    let partial = tar.with_extension("tar.partial");
    let d = &manifest.debian;
    let kernel = match &manifest.kernel.suite {
        Some(suite) => format!("{}/{suite}", manifest.kernel.package),
        None => manifest.kernel.package.clone(),
    };
    let mut include = manifest.root.packages.clone();
    include.push(kernel);
    let mut mm = Command::new("mmdebstrap");
    mm.env("SOURCE_DATE_EPOCH", opts.epoch.to_string())
        .arg("--quiet")
        .arg(format!("--variant={}", d.variant))
        .arg(format!("--include={}", include.join(",")))
        .arg("--format=tar")
        .arg(&d.suite)
        .arg(&partial)
        .arg(format!("deb {} {} main", d.mirror, d.suite));
    if let Some(suite) = manifest.kernel.suite.as_ref().filter(|s| **s != d.suite) {
        mm.arg(format!("deb {} {suite} main", d.mirror));
    }
    tool(Stage::Root, &mut mm)?;
    std::fs::rename(&partial, &tar)?;
    Ok(tar)
}

/// The systemd unit of node-init's daemon stage.
const NODE_INIT_UNIT: &str = include_str!("../files/herd-node-init.service");

/// ssh.service drop-in: the host key is made on the node (before sshd's config test), never shipped in the image.
/// Ed25519 only: an RSA key takes seconds to generate under emulation, and every herd client speaks Ed25519.
const SSH_HOST_KEYS: &str = include_str!("../files/ssh-host-keys.conf");

/// herd's etcd.service, in place of the package's: the same service (Debian's settings, `/etc/default/etcd` from
/// the node's Ignition), started as soon as its data is mounted and the kernel settings apply. The package orders
/// etcd after network.target, which waits for sysinit.target (udev's coldplug, name resolution: seconds under
/// emulation), and herd waited for network-online too; the whole cluster join waited for both. A member needs
/// neither: it listens on the node's address before networkd has configured it (see [`NONLOCAL_BIND`]), reads its
/// data and elects itself (a one-member cluster) or reaches its peers as soon as the bond carries the address.
/// It comes back after any failure (a peer not up yet, a full disk freed).
const ETCD_UNIT: &str = include_str!("../files/etcd.service");

/// sysctl.d: a service may listen on an address the node's network has not configured yet. etcd listens on the
/// node's internal address; without this it could start only once networkd had built the bond and given it the
/// address (seconds into the boot under emulation), and the whole cluster join waited for it.
const NONLOCAL_BIND: &str = include_str!("../files/50-herd-nonlocal-bind.conf");

/// sudoers.d: members of group `sudo` (the config's `herd` user) become root without a password, as Fedora CoreOS's
/// `core` user does: they log in with SSH keys only and have no password to give.
const SUDO_GROUP: &str = include_str!("../files/herd-sudo-group");

/// A `[root] background` service's drop-in: it gets a tenth of a default service's CPU share while the machine
/// boots.
const BACKGROUND_DROPIN: &str = include_str!("../files/herd-background.conf");

/// Makes the tree a herd root: node-init and its unit (enabled in /usr, since /etc is the node's), the writable
/// homes moved under /var, modules of hardware no server has removed.
fn customize(tree: &Path, manifest: &Manifest, opts: &BuildOptions, version: &str) -> Result<(), BuildError> {
    let bin = tree.join("usr/bin/node-init");
    std::fs::copy(&opts.node_init, &bin)?;
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let units = tree.join("usr/lib/systemd/system");
    std::fs::write(units.join("herd-node-init.service"), NODE_INIT_UNIT)?;
    let wants = units.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants)?;
    let link = wants.join("herd-node-init.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("../herd-node-init.service", &link)?;
    // Only /etc and /var are writable on a node: root's and users' homes live in /var.
    for (dir, to) in [("root", "var/roothome"), ("home", "var/home")] {
        let from = tree.join(dir);
        let dest = tree.join(to);
        if from.is_dir() && !from.is_symlink() {
            std::fs::rename(&from, &dest)?;
        } else {
            std::fs::create_dir_all(&dest)?;
        }
        let _ = std::fs::remove_file(&from);
        std::os::unix::fs::symlink(to, &from)?;
    }
    for unit in &manifest.root.disable {
        for dir in std::fs::read_dir(tree.join("etc/systemd/system"))?.filter_map(Result::ok) {
            let link = dir.path().join(unit);
            if dir.path().is_dir() && link.is_symlink() {
                std::fs::remove_file(&link)?;
            }
        }
    }
    // Every node gets its own SSH host keys (made at first start, kept in /etc on STATE), never the image's.
    if tree.join("etc/ssh").is_dir() {
        for e in std::fs::read_dir(tree.join("etc/ssh"))?.filter_map(Result::ok) {
            if e.file_name().to_string_lossy().starts_with("ssh_host_") {
                std::fs::remove_file(e.path())?;
            }
        }
        let dropin = units.join("ssh.service.d");
        std::fs::create_dir_all(&dropin)?;
        std::fs::write(dropin.join("herd-host-keys.conf"), SSH_HOST_KEYS)?;
    }
    relocate_tmpfiles(tree)?;
    std::fs::write(tree.join("etc/hostname"), "herd\n")?;
    std::fs::write(tree.join("etc/herd-release"), format!("herd {} {}\n", manifest.name, manifest.release))?;
    std::fs::write(tree.join("etc/machine-id"), "")?;
    let moddir = tree.join("usr/lib/modules").join(version);
    for t in &manifest.kernel.trim {
        let p = moddir.join(t.trim_start_matches('/'));
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
        }
    }
    for r in &manifest.root.remove {
        let p = tree.join(r);
        if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)?;
        } else if p.symlink_metadata().is_ok() {
            std::fs::remove_file(&p)?;
        }
    }
    if units.join("etcd.service").exists() {
        std::fs::write(units.join("etcd.service"), ETCD_UNIT)?;
    }
    let sysctl = tree.join("usr/lib/sysctl.d");
    std::fs::create_dir_all(&sysctl)?;
    std::fs::write(sysctl.join("50-herd-nonlocal-bind.conf"), NONLOCAL_BIND)?;
    let sudoers = tree.join("etc/sudoers.d");
    if sudoers.is_dir() {
        let path = sudoers.join("herd-sudo-group");
        std::fs::write(&path, SUDO_GROUP)?;
        // sudo ignores a sudoers file that others may read or anyone but root may write.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o440))?;
    }
    for unit in &manifest.root.background {
        let dir = units.join(format!("{unit}.d"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("herd-background.conf"), BACKGROUND_DROPIN)?;
    }
    if !manifest.kernel.blacklist.is_empty() {
        let dir = tree.join("usr/lib/modprobe.d");
        std::fs::create_dir_all(&dir)?;
        let lines: String = manifest.kernel.blacklist.iter().map(|m| format!("blacklist {m}\n")).collect();
        std::fs::write(dir.join("herd-blacklist.conf"), format!("# herd-os.toml [kernel] blacklist\n{lines}"))?;
    }
    if !manifest.kernel.trim.is_empty() {
        // The root's own depmod (kmod is in every herd root), so the host needs no kmod.
        tool(Stage::Customize, Command::new("chroot").arg(tree).args(["/usr/sbin/depmod", version]))?;
    }
    Ok(())
}

/// Points systemd-tmpfiles' lines for /home and /root (now links into /var) at their new places.
fn relocate_tmpfiles(tree: &Path) -> Result<(), BuildError> {
    let dir = tree.join("usr/lib/tmpfiles.d");
    if !dir.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(&dir)?.filter_map(Result::ok) {
        let text = std::fs::read_to_string(e.path())?;
        let mut changed = false;
        let lines: Vec<String> = text
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let Some(path) = fields.get(1).copied().filter(|_| !line.starts_with('#')) else {
                    return line.to_owned();
                };
                let moved = [("/home", "/var/home"), ("/root", "/var/roothome")].iter().find_map(|(from, to)| {
                    let rest = path.strip_prefix(from)?;
                    (rest.is_empty() || rest.starts_with('/')).then(|| format!("{to}{rest}"))
                });
                match moved {
                    Some(p) => {
                        changed = true;
                        let mut out = vec![fields[0], p.as_str()];
                        out.extend_from_slice(&fields[2..]);
                        out.join(" ")
                    }
                    None => line.to_owned(),
                }
            })
            .collect();
        if changed {
            std::fs::write(e.path(), lines.join("\n") + "\n")?;
        }
    }
    Ok(())
}

fn build_entry(
    manifest: &Manifest,
    opts: &BuildOptions,
    key: &str,
    entry: &Path,
    progress: &dyn Fn(Stage),
) -> Result<(), BuildError> {
    let work = opts.cache.join(format!("{key}.work"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let epoch = opts.epoch.to_string();

    let tar = root_tar(manifest, opts, progress)?;
    progress(Stage::Unpack);
    let tree = work.join("root");
    std::fs::create_dir_all(&tree)?;
    tool(Stage::Unpack, Command::new("tar").arg("-C").arg(&tree).arg("--numeric-owner").arg("-xpf").arg(&tar))?;
    // The kernel boots from outside the root: take it out of /boot (its modules stay in /usr/lib/modules).
    let version = take_kernel(&tree, &work.join("vmlinuz"))?;

    progress(Stage::Customize);
    customize(&tree, manifest, opts, &version)?;

    progress(Stage::Initramfs);
    let info = serde_json::json!({"name": manifest.name, "release": manifest.release, "kernel": version});
    let (initramfs, modules) = crate::initramfs::build(&crate::initramfs::Contents {
        node_init: opts.node_init.clone(),
        moddir: tree.join("usr/lib/modules").join(&version),
        modules: manifest.kernel.modules.clone(),
        info: info.to_string(),
        mtime: opts.epoch,
    })
    .map_err(|message| BuildError::Tool { stage: Stage::Initramfs.describe(), message })?;
    std::fs::write(work.join("initramfs"), initramfs)?;
    // Every file of the tree gets the epoch as its time (the ones this build wrote included).
    tool(
        Stage::Customize,
        Command::new("find")
            .arg(&tree)
            .args(["-newermt", &format!("@{epoch}"), "-exec", "touch", "-h", "-d"])
            .arg(format!("@{epoch}"))
            .args(["{}", "+"]),
    )?;

    progress(Stage::Squash);
    let squash = work.join("root.squashfs");
    tool(
        Stage::Squash,
        Command::new("mksquashfs").env("SOURCE_DATE_EPOCH", &epoch).arg(&tree).arg(&squash).args([
            "-comp",
            "zstd",
            "-noappend",
            "-no-progress",
            "-quiet",
        ]),
    )?;
    std::fs::remove_dir_all(&tree)?;

    progress(Stage::Verity);
    let salt = hex(&Sha256::digest(format!("salt:{key}").as_bytes()));
    let u = &key[..32];
    let uuid = format!("{}-{}-{}-{}-{}", &u[..8], &u[8..12], &u[12..16], &u[16..20], &u[20..32]);
    let verity_file = work.join("root.verity");
    let out = tool(
        Stage::Verity,
        Command::new("veritysetup")
            .arg("format")
            .arg(&squash)
            .arg(&verity_file)
            .arg(format!("--salt={salt}"))
            .arg(format!("--uuid={uuid}"))
            .args(["--hash=sha256", "--data-block-size=4096", "--hash-block-size=4096"]),
    )?;
    let root_hash =
        out.lines().find_map(|l| l.strip_prefix("Root hash:").map(|h| h.trim().to_owned())).ok_or_else(|| {
            BuildError::Tool { stage: Stage::Verity.describe(), message: format!("no root hash in {out:?}") }
        })?;

    let mut files = BTreeMap::new();
    for name in ["vmlinuz", "initramfs", "root.squashfs", "root.verity"] {
        files.insert(name.to_owned(), sha256_file(&work.join(name))?);
    }
    let cmdline = format!("{} ro herd.verity.roothash={root_hash}", manifest.kernel.cmdline).trim().to_owned();
    let described = ImageManifest {
        name: manifest.name.clone(),
        release: manifest.release.clone(),
        key: key.to_owned(),
        source_date_epoch: opts.epoch,
        files,
        verity: Verity { root_hash, salt, algorithm: "sha256".into(), block_size: 4096 },
        cmdline,
        packages: manifest.root.packages.clone(),
        kernel: KernelInfo { package: manifest.kernel.package.clone(), version, initramfs_modules: modules },
    };
    let json = serde_json::to_string_pretty(&described)
        .map_err(|e| BuildError::Tool { stage: Stage::Finish.describe(), message: e.to_string() })?;
    std::fs::write(work.join("manifest.json"), json + "\n")?;
    // The entry appears whole or not at all.
    let _ = std::fs::remove_dir_all(entry);
    std::fs::rename(&work, entry)?;
    Ok(())
}
