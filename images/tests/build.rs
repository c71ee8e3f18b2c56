//! Builds a small image with the real tools (mmdebstrap, mksquashfs, veritysetup): verity holds, the build is
//! reproducible and cached, tampering is detected, bad manifests build nothing. Needs root and the network
//! mirror, as CI has.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use herd_images::build::{BuildOptions, build};
use herd_images::manifest;

const SMALL: &str = r#"
version = 1
name = "herd-test"
release = "0.0.1"

[debian]
suite = "bookworm"
mirror = "http://deb.debian.org/debian"

[root]
packages = ["systemd", "systemd-sysv"]
background = ["getty@.service"]

[kernel]
package = "linux-image-amd64"
suite = "bookworm-backports"
cmdline = "console=ttyS0"
"#;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herd-images-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The static node-init (`$HERD_NODE_INIT`, or built now by scripts/build-node-init.sh).
fn node_init() -> PathBuf {
    if let Some(p) = std::env::var_os("HERD_NODE_INIT") {
        return PathBuf::from(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-node-init.sh");
    let out = Command::new(script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn verify(dir: &Path, hash: &str) -> bool {
    Command::new("veritysetup")
        .arg("verify")
        .arg(dir.join("root.squashfs"))
        .arg(dir.join("root.verity"))
        .arg(hash)
        .status()
        .unwrap()
        .success()
}

#[test]
fn a_small_image_verifies_rebuilds_identically_comes_from_the_cache_and_detects_tampering() {
    let dir = scratch("small");
    let m = manifest::parse("small.toml", SMALL).unwrap();
    let opts = |cache: &str, out: &str| BuildOptions {
        out: dir.join(out),
        cache: dir.join(cache),
        epoch: 1_767_225_600,
        no_cache: false,
        node_init: node_init(),
    };
    let first = build(&m, &opts("cache", "out1"), &|_| {}).unwrap();
    assert!(!first.cached);
    let hash = first.manifest.verity.root_hash.clone();
    assert_eq!(hash.len(), 64);
    assert!(verify(&dir.join("out1"), &hash), "veritysetup verify accepts the built root");
    for (name, entry) in &first.manifest.files {
        let bytes = std::fs::read(dir.join("out1").join(name)).unwrap();
        assert_eq!(bytes.len() as u64, entry.size, "{name}");
    }
    assert!(first.manifest.cmdline.ends_with(&format!("herd.verity.roothash={hash}")));
    // The kernel is the backports one, a bzImage ("HdrS" at 0x202), with its modules in the root.
    assert!(first.manifest.kernel.version.starts_with("6.12"), "{:?}", first.manifest.kernel);
    let vmlinuz = std::fs::read(dir.join("out1/vmlinuz")).unwrap();
    assert_eq!(&vmlinuz[0x202..0x206], b"HdrS");
    let listing = Command::new("unsquashfs").arg("-l").arg(dir.join("out1/root.squashfs")).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    let modules = format!("lib/modules/{}/kernel", first.manifest.kernel.version);
    assert!(listing.contains(&modules), "modules in the root");
    assert!(!listing.lines().any(|l| l.contains("/boot/vmlinuz")), "the kernel is outside the root");
    assert!(listing.lines().any(|l| l.ends_with("/usr/bin/node-init")), "node-init is in the root");
    assert!(listing.lines().any(|l| l.ends_with("/usr/lib/systemd/system/herd-node-init.service")));
    assert!(listing.lines().any(|l| l.ends_with("/usr/lib/systemd/system/getty@.service.d/herd-background.conf")));
    assert!(listing.lines().any(|l| l.ends_with("/usr/lib/sysctl.d/50-herd-nonlocal-bind.conf")));
    // The initramfs: node-init as /init, gzip'd newc that cpio lists.
    let gz = std::fs::read(dir.join("out1/initramfs")).unwrap();
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2_decoder(&gz), &mut raw).unwrap();
    let mut cpio = Command::new("cpio")
        .args(["-t", "--quiet"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut cpio.stdin.take().unwrap(), &raw).unwrap();
    let names = String::from_utf8(cpio.wait_with_output().unwrap().stdout).unwrap();
    assert!(names.lines().any(|l| l == "init"), "{names}");
    assert!(names.lines().any(|l| l == "lib/modules/load-order"), "{names}");
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out1/manifest.json")).unwrap()).unwrap();
    assert_eq!(on_disk["verity"]["root_hash"], hash.as_str());

    // The same manifest again: from the cache, nothing rebuilt.
    let entry = dir.join("cache").join(&first.manifest.key);
    let stamp = std::fs::metadata(entry.join("root.squashfs")).unwrap().modified().unwrap();
    let again = build(&m, &opts("cache", "out2"), &|_| {}).unwrap();
    assert!(again.cached);
    assert_eq!(std::fs::metadata(entry.join("root.squashfs")).unwrap().modified().unwrap(), stamp);

    // From scratch in another cache: the same bytes, the same root hash.
    let fresh = build(&m, &opts("cache2", "out3"), &|_| {}).unwrap();
    assert!(!fresh.cached);
    assert_eq!(fresh.manifest.verity.root_hash, hash, "reproducible: same manifest and epoch, same root hash");
    assert_eq!(fresh.manifest.files, first.manifest.files);

    // One flipped byte in the root is caught.
    let tampered = dir.join("tampered");
    std::fs::create_dir_all(&tampered).unwrap();
    std::fs::copy(dir.join("out1/root.verity"), tampered.join("root.verity")).unwrap();
    let mut data = std::fs::read(dir.join("out1/root.squashfs")).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x01;
    std::fs::write(tampered.join("root.squashfs"), data).unwrap();
    assert!(!verify(&tampered, &hash), "a flipped byte fails verification");
    let _ = std::fs::remove_dir_all(&dir);
}

fn flate2_decoder(gz: &[u8]) -> impl std::io::Read + '_ {
    flate2::read::GzDecoder::new(gz)
}

#[test]
fn unknown_packages_are_named_and_nothing_is_built() {
    let dir = scratch("unknown");
    let m = manifest::parse("m.toml", &SMALL.replace("\"systemd-sysv\"", "\"systemd-sysvv\"")).unwrap();
    let opts = BuildOptions {
        out: dir.join("out"),
        cache: dir.join("cache"),
        epoch: 0,
        no_cache: false,
        node_init: node_init(),
    };
    let err = build(&m, &opts, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("unknown package(s): systemd-sysvv") && err.contains("nothing was built"), "{err}");
    assert!(!dir.join("cache").exists() && !dir.join("out").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
