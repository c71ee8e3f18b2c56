//! The herd provisioner: one daemon that answers DHCP (full and proxyDHCP, port 4011), TFTP and HTTP for every
//! machine of the inventory, renders each machine's Ignition config, and records its boot timeline.
//!
//! [`dhcp`] serves DHCP (full and proxy, port 4011) with [`boot`] deciding what each firmware loads and [`store`]
//! keeping leases and machine state crash-safe; [`ipxe`] writes each machine's boot script; [`tftp`] and [`http`]
//! (with [`assets`] for the large files) serve what the firmware and the initramfs fetch, and the configs
//! `herd-config` renders; [`machines`] is the machine state machine and boot timeline; [`daemon`] runs it all with
//! its [`daemon::Settings`]. The HTTP interface's types are `herd-api`'s.

/// An error and its sources, once each, `: `-separated: what logs and HTTP answers print (the types' `Display`
/// says only their own part).
pub fn report(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

pub mod access;
pub mod assets;
pub mod boot;
pub mod daemon;
pub mod dhcp;
pub mod files;
pub mod http;
pub mod images;
pub mod ipxe;
pub mod join;
pub mod machines;
pub mod metrics;
pub mod operator;
pub mod ra;
pub mod rotation;
pub mod store;
pub mod tftp;
