//! node-init: the program every herd machine runs, first as PID 1 in the initramfs (bring up the bond, fetch the
//! machine's config, set up the verified root, switch_root), then as a systemd service (etcd, registration, the
//! unit agent).
//!
//! Not implemented yet (issue #5); the crate exists so the workspace has its final shape.
