//! node-init's configuration (`/etc/herd/node-init.json`, version 1): the contract between the provisioner, which
//! renders it from the inventory into each machine's Ignition config, and node-init, which reads it. It lives here,
//! in the config crate both depend on, so node-init (a static binary) does not link the provisioner.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where the file is on a machine.
pub const NODE_CONFIG_PATH: &str = "/etc/herd/node-init.json";

/// Where a machine keeps its keys and certificates (on STATE): `etcd-ca.crt`, `api-ca.crt`, `machine.key` and
/// `machine.crt` (its etcd client identity), and on an etcd member `member.key` and `member.crt` (its peer and
/// server identity).
pub const TLS_DIR: &str = "/var/lib/herd/tls";

/// node-init's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Format version.
    pub version: u32,
    /// The machine's short name.
    pub machine: String,
    /// The machine's FQDN.
    pub fqdn: String,
    /// The machine's role.
    pub role: String,
    /// The machine's rack.
    pub rack: String,
    /// Base URL of the provisioner (phone-home, health reports).
    pub provisioner_url: String,
    /// Whether this machine runs an etcd member.
    pub etcd_member: bool,
    /// Client URLs of every etcd member.
    pub etcd_endpoints: Vec<String>,
    /// The machine's effective labels.
    pub labels: BTreeMap<String, String>,
    /// The machine's internal address (what herdctl's ssh, status and journal reach it at).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The disk herd installs to (`USR-A`, `USR-B`, `STATE`); none: diskless, the image runs from RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

impl NodeConfig {
    /// Whether the cluster's etcd speaks mutual TLS (its endpoints are `https://`): the machine then connects with
    /// its certificate from [`TLS_DIR`].
    pub fn etcd_tls(&self) -> bool {
        self.etcd_endpoints.iter().any(|e| e.starts_with("https://"))
    }
}

/// Where the provisioner writes [`BondConfig`]. A file of its own rather than a field of node-init.json: a
/// node-init older than it refuses unknown fields there, and a machine not yet upgraded must still boot the
/// configs the provisioner renders now; an older node-init just installs this file and ignores it.
pub const BOND_CONFIG_PATH: &str = "/etc/herd/bond.json";

/// The bond node-init builds in the initramfs (`/etc/herd/bond.json`), so the machine's address works from
/// `switch_root` on; systemd-networkd, whose files say the same, takes it over once udev has seen the NICs.
/// Written for every machine, `bond: null` when there is nothing to build early (no bond, or a DHCP address,
/// which is left to networkd): each boot rewrites it, so a config that stops describing a bond stops it being
/// built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BondConfig {
    /// Format version (1).
    pub version: u32,
    /// The bond, if node-init is to build one.
    pub bond: Option<EarlyBond>,
}

/// The name of the systemd-networkd file that makes the NIC with MAC `mac` a member of bond `bond`: the
/// provisioner writes it, node-init adds a runtime drop-in to it when it built the bond itself.
pub fn bond_member_network(bond: &str, mac: &str) -> String {
    format!("20-{bond}-{}.network", mac.replace(':', ""))
}

/// A bond as node-init builds it before systemd starts (see [`BondConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyBond {
    /// Interface name (`bond0`).
    pub name: String,
    /// Bonding mode; its driver settings are [`herd_inventory::BondMode::settings`].
    pub mode: herd_inventory::BondMode,
    /// The bond's MAC (the boot NIC's, as networkd's `MACAddress=`).
    pub mac: String,
    /// Member NICs by permanent MAC, in the inventory's order.
    pub members: Vec<String>,
    /// The active-backup primary, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// MTU of the bond and its members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The internal address with its prefix length (`10.0.0.11/24`).
    pub address: String,
    /// The default gateway, when the bond carries the default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

/// The bytes of percent-encoded text (the contents of a `data:,` URL, as the provisioner writes config files).
pub fn percent_decode_bytes(text: &str) -> Result<Vec<u8>, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            out.push(hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or("bad percent escape in data URL")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}
