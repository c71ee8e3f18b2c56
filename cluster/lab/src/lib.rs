//! A herd cluster on one machine, for tests, benchmarks and `herdctl demo`; it ships in herdctl, never on a node.
//!
//! [`daemon`] starts peer daemons (Kea, dnsmasq, nginx, tftpd-hpa, etcd, dockerd, docker-registry, sshd, the QEMU
//! VMs) in their own process group with a private, empty `/run`, and stops them with everything they started;
//! [`local`] runs a real etcd cluster, dockerd and a registry on loopback with it; [`bench`](mod@bench) is the
//! hollow-machine benchmarks (the real engine and agent code, a recording executor, a real etcd) behind `herdctl
//! bench`; [`qemu`] the network-booting VMs of `herdctl demo` and the QEMU tests; [`pki`] their site PKI.

pub mod bench;
pub mod daemon;
pub mod local;
pub mod pki;
pub mod qemu;
