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
const PIPELINE: &str = "herd-images/1";

/// The stages, for progress reporting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Checking the packages against apt metadata.
    Check,
    /// mmdebstrap: the root tree.
    Root,
    /// Unpacking the tree.
    Unpack,
    /// mksquashfs.
    Squash,
    /// veritysetup format.
    Verity,
    /// Writing manifest.json and copying to the output.
    Finish,
}

impl Stage {
    /// All stages in order.
    pub const ALL: [Stage; 6] = [Stage::Check, Stage::Root, Stage::Unpack, Stage::Squash, Stage::Verity, Stage::Finish];

    /// What the stage does, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Stage::Check => "checking packages",
            Stage::Root => "installing the root (mmdebstrap)",
            Stage::Unpack => "unpacking the root",
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
    /// Outputs this build does not make yet.
    pub not_built: Vec<String>,
}

/// The kernel an image boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// The package asked for.
    pub package: String,
    /// The version installed (`uname -r`).
    pub version: String,
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
    #[error("{0}")]
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

/// The cache key of a manifest built at `epoch`.
pub fn key(manifest: &Manifest, epoch: u64) -> String {
    let mut h = Sha256::new();
    h.update(PIPELINE.as_bytes());
    h.update(serde_json::to_vec(manifest).unwrap_or_default());
    h.update(epoch.to_le_bytes());
    hex(&h.finalize())
}

/// Builds the image of `manifest` (or takes it from the cache) and puts its files in `opts.out`.
pub fn build(manifest: &Manifest, opts: &BuildOptions, progress: &dyn Fn(Stage)) -> Result<Built, BuildError> {
    progress(Stage::Check);
    let unknown = manifest::unknown_packages(manifest)?;
    if !unknown.is_empty() {
        return Err(BuildError::UnknownPackages(unknown));
    }
    let key = key(manifest, opts.epoch);
    let entry = opts.cache.join(&key);
    let cached = !opts.no_cache && entry.join("manifest.json").is_file();
    if !cached {
        build_entry(manifest, opts, &key, &entry, progress)?;
    }
    progress(Stage::Finish);
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

    progress(Stage::Root);
    let tar = work.join("root.tar");
    let d = &manifest.debian;
    let kernel = match &manifest.kernel.suite {
        Some(suite) => format!("{}/{suite}", manifest.kernel.package),
        None => manifest.kernel.package.clone(),
    };
    let mut include = manifest.root.packages.clone();
    include.push(kernel);
    let mut mm = Command::new("mmdebstrap");
    mm.env("SOURCE_DATE_EPOCH", &epoch)
        .arg("--quiet")
        .arg(format!("--variant={}", d.variant))
        .arg(format!("--include={}", include.join(",")))
        .arg(format!("--customize-hook=echo 'herd {} {}' > \"$1/etc/herd-release\"", manifest.name, manifest.release))
        .arg(&d.suite)
        .arg(&tar)
        .arg(format!("deb {} {} main", d.mirror, d.suite));
    if let Some(suite) = manifest.kernel.suite.as_ref().filter(|s| **s != d.suite) {
        mm.arg(format!("deb {} {suite} main", d.mirror));
    }
    tool(Stage::Root, &mut mm)?;

    progress(Stage::Unpack);
    let tree = work.join("root");
    std::fs::create_dir_all(&tree)?;
    tool(Stage::Unpack, Command::new("tar").arg("-C").arg(&tree).arg("--numeric-owner").arg("-xpf").arg(&tar))?;
    std::fs::remove_file(&tar)?;
    // The kernel boots from outside the root: take it out of /boot (its modules stay in /usr/lib/modules).
    let version = take_kernel(&tree, &work.join("vmlinuz"))?;

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
    for name in ["vmlinuz", "root.squashfs", "root.verity"] {
        files.insert(name.to_owned(), sha256_file(&work.join(name))?);
    }
    let cmdline = format!("{} herd.verity.roothash={root_hash}", manifest.kernel.cmdline).trim().to_owned();
    let described = ImageManifest {
        name: manifest.name.clone(),
        release: manifest.release.clone(),
        key: key.to_owned(),
        source_date_epoch: opts.epoch,
        files,
        verity: Verity { root_hash, salt, algorithm: "sha256".into(), block_size: 4096 },
        cmdline,
        packages: manifest.root.packages.clone(),
        kernel: KernelInfo { package: manifest.kernel.package.clone(), version },
        not_built: vec!["initramfs".into()],
    };
    let json = serde_json::to_string_pretty(&described)
        .map_err(|e| BuildError::Tool { stage: Stage::Finish.describe(), message: e.to_string() })?;
    std::fs::write(work.join("manifest.json"), json + "\n")?;
    // The entry appears whole or not at all.
    let _ = std::fs::remove_dir_all(entry);
    std::fs::rename(&work, entry)?;
    Ok(())
}
