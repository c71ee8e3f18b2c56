//! The herd OS image the QEMU tests boot: `images/herd-os.toml` built by the real pipeline (cached in
//! [`IMAGE_CACHE`], so only the first run of a machine pays for it), with the static node-init of this tree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context as _, bail};
use herd_images::build::{BuildOptions, ImageManifest, build};

/// Where the tests' image builds are cached (the same cache `herdctl image build` uses).
pub const IMAGE_CACHE: &str = "/var/cache/herd/images";

static BUILDING: Mutex<()> = Mutex::new(());

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static node-init: `$HERD_NODE_INIT`, or built now by scripts/build-node-init.sh.
pub fn node_init() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("HERD_NODE_INIT") {
        return Ok(PathBuf::from(p));
    }
    let out = Command::new(workspace().join("scripts/build-node-init.sh")).output()?;
    if !out.status.success() {
        bail!("scripts/build-node-init.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(PathBuf::from(path))
}

/// Builds herd-os (with `release` instead of the manifest's, if given) into `out`; returns its description.
pub fn herd_os(out: &Path, release: Option<&str>) -> anyhow::Result<ImageManifest> {
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = workspace().join("images/herd-os.toml");
    let mut m = herd_images::manifest::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(r) = release {
        m.release = r.to_owned();
    }
    let opts = BuildOptions {
        out: out.to_owned(),
        cache: PathBuf::from(IMAGE_CACHE),
        epoch: 1_767_225_600,
        no_cache: false,
        node_init: node_init()?,
    };
    let started = std::time::Instant::now();
    let built = build(&m, &opts, &|_| {}).with_context(|| format!("building {}", path.display()))?;
    println!(
        "figures: image build {} {}: {} in {:.1} s",
        m.name,
        m.release,
        if built.cached { "from the cache" } else { "built" },
        started.elapsed().as_secs_f64()
    );
    Ok(built.manifest)
}
