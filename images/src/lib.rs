//! Building herd's immutable OS image from Debian packages: kernel, initramfs, `root.squashfs` under dm-verity,
//! `manifest.json`, and the A/B disk layout of installed nodes.
//!
//! Not implemented yet (issue #4); the crate exists so the workspace has its final shape.
