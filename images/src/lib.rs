//! Building herd's immutable OS image from Debian packages, and the disk layout of installed nodes.
//!
//! [`manifest`] is the input format (`images/herd-os.toml`); [`build`] the pipeline: check the packages, make the
//! root tree with mmdebstrap (cached on its own), add node-init, make the [`initramfs`], squash the root, compute
//! the verity hash tree, describe the result. Builds are reproducible (`SOURCE_DATE_EPOCH`, a salt and UUID derived
//! from the inputs) and cached by content. [`gpt`] and [`slot`] write and read the A/B disk of installed nodes.

pub mod build;
pub mod gpt;
pub mod initramfs;
pub mod manifest;
pub mod slot;
