//! The boot files of every image the provisioner has served, kept by verity root hash under `ASSETS/images/HASH/`
//! (`vmlinuz`, `initramfs`, `manifest.json`), so that a machine whose slots hold an older image than the one
//! served now still boots that slot with its own kernel, and its command line can vouch for the root hashes of
//! both of its slots. Only images the provisioner served are ever vouched for: a root hash a machine reports is
//! trusted only if its boot files are kept here.

use std::path::{Path, PathBuf};

/// The directory under the assets directory.
pub const DIR: &str = "images";

/// The files kept per image.
const FILES: [&str; 3] = ["vmlinuz", "initramfs", "manifest.json"];

fn is_root_hash(h: &str) -> bool {
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Where the boot files of the image with root hash `hash` are kept (None for anything that is not a root hash).
pub fn dir_of(assets: &Path, hash: &str) -> Option<PathBuf> {
    is_root_hash(hash).then(|| assets.join(DIR).join(hash))
}

/// Whether the image with root hash `hash` was served (its boot files are kept).
pub fn kept(assets: &Path, hash: &str) -> bool {
    dir_of(assets, hash).is_some_and(|d| FILES.iter().all(|f| d.join(f).is_file()))
}

/// The root hash of the image served now (`ASSETS/manifest.json`), keeping its boot files the first time; None
/// when the assets hold no herd image (a test initramfs) or it cannot be kept (said in the log).
pub fn keep_served(assets: &Path) -> Option<String> {
    let path = assets.join("manifest.json");
    let manifest = match herd_images::build::ImageManifest::read(&path) {
        Ok(m) => m,
        Err(_) if !path.exists() => return None,
        Err(e) => {
            tracing::warn!(error = %crate::report(&e), "not keeping the served image");
            return None;
        }
    };
    let hash = manifest.verity.root_hash;
    let dir = dir_of(assets, &hash)?;
    if kept(assets, &hash) {
        return Some(hash);
    }
    let keep = || -> std::io::Result<()> {
        let tmp = assets.join(DIR).join(format!(".{hash}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        for f in FILES {
            // A copy, not a hard link: a new image copied over the assets in place would change a linked one.
            std::fs::copy(assets.join(f), tmp.join(f))?;
        }
        std::fs::rename(&tmp, &dir)
    };
    match keep() {
        Ok(()) => Some(hash),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "cannot keep the served image's boot files: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_image_is_kept_once_by_its_root_hash() {
        let assets = std::env::temp_dir().join(format!("herd-images-keep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&assets);
        std::fs::create_dir_all(&assets).unwrap();
        let hash = "ab".repeat(32);
        assert_eq!(keep_served(&assets), None, "no image served");
        let manifest = herd_images::build::ImageManifest::for_tests(&hash, "");
        std::fs::write(assets.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
        std::fs::write(assets.join("vmlinuz"), b"kernel 1").unwrap();
        std::fs::write(assets.join("initramfs"), b"initramfs 1").unwrap();
        assert!(!kept(&assets, &hash));
        assert_eq!(keep_served(&assets).as_deref(), Some(hash.as_str()));
        assert!(kept(&assets, &hash));
        // The served image is overwritten in place: the old one's files stay as they were.
        std::fs::write(assets.join("vmlinuz"), b"kernel 2").unwrap();
        assert_eq!(std::fs::read(dir_of(&assets, &hash).unwrap().join("vmlinuz")).unwrap(), b"kernel 1");
        assert!(dir_of(&assets, "../../etc").is_none(), "only root hashes name directories");
        std::fs::remove_dir_all(&assets).unwrap();
    }
}
