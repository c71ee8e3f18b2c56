//! The QEMU cluster harness: network namespace and bridge, the provisioner in it, VMs that PXE-boot from it
//! (SeaBIOS + iPXE or OVMF), serial logs kept on failure, teardown on drop.
//!
//! Not implemented yet (issue #8 starts it); the crate exists so the workspace has its final shape.
