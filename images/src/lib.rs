//! Building herd's immutable OS image from Debian packages: `root.squashfs` under dm-verity and `manifest.json`
//! (this far), then kernel, initramfs and the A/B disk layout of installed nodes (still to come: issue #4).
//!
//! [`manifest`] is the input format (`images/herd-os.toml`); [`build`] the pipeline: check the packages, make the
//! root tree with mmdebstrap, squash it, compute the verity hash tree, describe the result. Builds are
//! reproducible (`SOURCE_DATE_EPOCH`, a salt and UUID derived from the manifest) and cached by content.

pub mod build;
pub mod manifest;
