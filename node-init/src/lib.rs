//! node-init: the program every herd machine runs, first as PID 1 in the initramfs ([`initrd`]: load modules,
//! verify and mount the root from an A/B slot or a device, overlay /etc and /var, switch_root into systemd), then
//! as a systemd service ([`daemon`]: report, commit the slot; etcd, registration and the unit agent next).

pub mod bond;
pub mod cmdline;
pub mod daemon;
pub mod dhcp;
pub mod dm;
pub mod error;
pub mod identity;
pub mod ignition;
pub mod initrd;
pub mod log;
pub mod member;
pub mod net;
pub mod provision;
pub mod report;
pub mod trust;
