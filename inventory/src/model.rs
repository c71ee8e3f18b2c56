//! The typed inventory model. Values that validation must point back at are [`Spanned`], so a rule broken between
//! two machines can name both places; spans are byte ranges into the source file (empty for generated inventories).

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
pub use toml::Spanned;

use crate::types::{Address, Cidr, DevicePath, DomainName, Hostname, KernelArg, LabelKey, Mac, Name};

/// The inventory format version this herd reads and writes.
pub const FORMAT_VERSION: i64 = 1;

/// Labels: free-form key/value metadata used by unit placement (`MachineMetadata=`) and upgrade batching.
pub type Labels = BTreeMap<LabelKey, String>;

/// A whole, validated inventory: the site, its networks, roles, racks and machines.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inventory {
    /// Format version, always [`FORMAT_VERSION`] once parsed.
    pub version: i64,
    /// Site-wide settings.
    pub site: Site,
    /// The boot/internal network and the optional external one.
    pub network: Networks,
    /// Roles (profiles) by name.
    pub roles: BTreeMap<Name, Role>,
    /// Racks by name.
    pub racks: BTreeMap<Name, Rack>,
    /// Machines in file order.
    pub machines: Vec<Machine>,
    /// The directory of the inventory file, against which role unit paths resolve (None when parsed from text).
    #[serde(skip)]
    pub base_dir: Option<std::path::PathBuf>,
}

/// `[site]`: what every machine shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Short site name, e.g. `fra1`.
    pub name: Name,
    /// DNS domain of the machines; a machine's FQDN is `NAME.DOMAIN`.
    pub domain: DomainName,
    /// Address of the provisioner on the internal (boot) network.
    pub provisioner: Spanned<Address>,
    /// DNS resolvers handed to machines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<Address>,
    /// NTP servers handed to machines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ntp: Vec<Address>,
    /// SSH public keys of the admins, installed on every machine.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

/// `[network]`: the internal network is the boot network (DHCP/PXE served there, machine addresses on the bond);
/// the external network carries traffic on a separate interface of the machines that have one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Networks {
    /// The internal (boot) network.
    pub internal: Network,
    /// The optional external network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<Network>,
}

impl Networks {
    /// The networks with their names, internal first.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Network)> {
        std::iter::once(("internal", &self.internal)).chain(self.external.as_ref().map(|n| ("external", n)))
    }
}

/// One IPv4 network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The subnet.
    pub cidr: Spanned<Cidr>,
    /// The default gateway, if the network has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Spanned<Address>>,
    /// Interface MTU (bond and members on the internal network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Dynamic DHCP pools (for machines not yet in the inventory, and discovery).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<Spanned<Pool>>,
    /// How machines configure their address here: written statically into their network config (default), or
    /// by DHCP, where the provisioner's reservation hands each machine its inventory address.
    #[serde(default, skip_serializing_if = "Addressing::is_static")]
    pub addressing: Addressing,
}

/// How a machine gets its address on a network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Addressing {
    /// The inventory address is written into the machine's network config.
    #[default]
    Static,
    /// The machine asks DHCP; the reservation for its MAC returns the inventory address.
    Dhcp,
}

impl Addressing {
    fn is_static(&self) -> bool {
        *self == Addressing::Static
    }
}

impl Network {
    /// The pool containing `addr`, if any.
    pub fn pool_containing(&self, addr: Ipv4Addr) -> Option<&Spanned<Pool>> {
        self.pools.iter().find(|p| p.get_ref().contains(addr))
    }
}

/// An inclusive range of dynamically leased addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// First address handed out.
    pub start: Address,
    /// Last address handed out.
    pub end: Address,
}

impl Pool {
    /// Whether `addr` is in the pool.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        self.start.0 <= addr && addr <= self.end.0
    }

    /// Whether two pools share an address.
    pub fn overlaps(&self, other: &Pool) -> bool {
        self.start.0 <= other.end.0 && other.start.0 <= self.end.0
    }

    /// Number of addresses in the pool.
    pub fn size(&self) -> u64 {
        (u64::from(u32::from(self.end.0)) + 1).saturating_sub(u64::from(u32::from(self.start.0)))
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// What a machine is to etcd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EtcdRole {
    /// Runs an etcd member; the initial cluster is made of every member in the inventory.
    Member,
    /// Talks to the members as a client.
    #[default]
    Client,
}

impl fmt::Display for EtcdRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EtcdRole::Member => "member",
            EtcdRole::Client => "client",
        })
    }
}

/// `[roles.NAME]`: a profile shared by machines, e.g. `master` and `worker`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// What the role is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Whether machines of this role are etcd members or clients.
    #[serde(default)]
    pub etcd: EtcdRole,
    /// Extra kernel command-line arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<KernelArg>,
    /// Labels every machine of the role carries.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// systemd unit files every machine of the role runs, as paths relative to the inventory file; the unit is
    /// named after the file (`units/herd-dhcp.service` installs `herd-dhcp.service`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Spanned<String>>,
    /// Files written on every machine of the role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<RoleFile>,
}

/// A file a role writes on its machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleFile {
    /// Absolute path on the machine.
    pub path: Spanned<String>,
    /// The file's contents.
    pub contents: String,
    /// Permissions as an octal string, e.g. "0644" (a string, so it cannot be mistaken for decimal).
    #[serde(default = "default_file_mode")]
    pub mode: Spanned<String>,
}

fn default_file_mode() -> Spanned<String> {
    Spanned::new(0..0, "0644".to_owned())
}

impl RoleFile {
    /// The mode as a number, if `mode` is a valid octal permission string.
    pub fn mode_bits(&self) -> Option<u32> {
        let digits = self.mode.get_ref().trim_start_matches("0o");
        if digits.is_empty() || digits.len() > 5 {
            return None;
        }
        u32::from_str_radix(digits, 8).ok().filter(|m| *m <= 0o7777)
    }
}

/// `[racks.NAME]`: a rack; upgrades batch by rack and the scheduler spreads across racks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rack {
    /// Where the rack is (hall, row, position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Labels every machine in the rack carries.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

/// The bonding mode of a machine's NIC pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BondMode {
    /// IEEE 802.3ad dynamic link aggregation (LACP); needs switch support.
    #[serde(rename = "802.3ad")]
    Lacp,
    /// One active link, the others on standby; works with any switch.
    #[serde(rename = "active-backup")]
    ActiveBackup,
}

impl fmt::Display for BondMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BondMode::Lacp => "802.3ad",
            BondMode::ActiveBackup => "active-backup",
        })
    }
}

/// One bonding driver setting, spelled for both places that apply it: systemd-networkd's `[Bond]` section, and the
/// kernel's `/sys/class/net/BOND/bonding/` attribute node-init writes when it builds the bond in the initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BondSetting {
    /// networkd key and value.
    pub networkd: (&'static str, &'static str),
    /// sysfs attribute and value.
    pub sysfs: (&'static str, &'static str),
}

const fn setting(networkd: (&'static str, &'static str), sysfs: (&'static str, &'static str)) -> BondSetting {
    BondSetting { networkd, sysfs }
}

impl BondMode {
    /// The driver settings herd gives a bond of this mode, the mode first (the kernel takes the others only once
    /// the mode is set): link checks every 100 ms; LACP at the fast rate, hashing on addresses and ports;
    /// active-backup back on the primary NIC as soon as its link returns.
    pub fn settings(self) -> &'static [BondSetting] {
        const LACP: [BondSetting; 4] = [
            setting(("Mode", "802.3ad"), ("mode", "802.3ad")),
            setting(("MIIMonitorSec", "100ms"), ("miimon", "100")),
            setting(("LACPTransmitRate", "fast"), ("lacp_rate", "fast")),
            setting(("TransmitHashPolicy", "layer3+4"), ("xmit_hash_policy", "layer3+4")),
        ];
        const ACTIVE_BACKUP: [BondSetting; 3] = [
            setting(("Mode", "active-backup"), ("mode", "active-backup")),
            setting(("MIIMonitorSec", "100ms"), ("miimon", "100")),
            setting(("PrimaryReselectPolicy", "always"), ("primary_reselect", "always")),
        ];
        match self {
            BondMode::Lacp => &LACP,
            BondMode::ActiveBackup => &ACTIVE_BACKUP,
        }
    }
}

/// A machine's bond: the internal address lives on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bond {
    /// The bonding mode.
    pub mode: BondMode,
    /// The member NICs, by MAC; each must be one of the machine's `macs`.
    pub members: Spanned<Vec<Spanned<Mac>>>,
}

/// A machine's external (traffic) interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct External {
    /// The NIC, by MAC; one of the machine's `macs` and not a bond member.
    pub mac: Spanned<Mac>,
    /// Its address, in the external network.
    pub address: Spanned<Address>,
}

/// The keys every `[[machines]]` entry must have (the fields of [`Machine`] without a default).
pub(crate) const MACHINE_REQUIRED_KEYS: [&str; 5] = ["name", "role", "rack", "macs", "internal"];

/// `[[machines]]`: one server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Short host name (one DNS label), unique in the inventory.
    pub name: Spanned<Hostname>,
    /// The role (profile) it plays.
    pub role: Spanned<Name>,
    /// The rack it sits in.
    pub rack: Spanned<Name>,
    /// Every NIC's MAC, the boot NIC first.
    pub macs: Spanned<Vec<Spanned<Mac>>>,
    /// The bonded NIC pair carrying the internal address; without it the address is on the boot NIC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bond: Option<Bond>,
    /// The static address on the internal network.
    pub internal: Spanned<Address>,
    /// The external interface, if the machine has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<External>,
    /// The disk an install writes the A/B slots to; diskless when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DevicePath>,
    /// The BMC (IPMI/Redfish) address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc: Option<Spanned<Address>>,
    /// Labels of this machine (override rack and role labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Kernel arguments added after the role's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_args: Vec<KernelArg>,
    /// Unit files added to the role's (a unit of the same name replaces the role's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<Spanned<String>>,
    /// Files added to the role's (a file at the same path replaces the role's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<RoleFile>,
}

impl Machine {
    /// The boot NIC's MAC (the first one listed). Validation guarantees there is one.
    pub fn boot_mac(&self) -> Option<Mac> {
        self.macs.get_ref().first().map(|m| *m.get_ref())
    }

    /// Every MAC of the machine.
    pub fn macs(&self) -> impl Iterator<Item = Mac> + '_ {
        self.macs.get_ref().iter().map(|m| *m.get_ref())
    }

    /// The short host name.
    pub fn name(&self) -> &Hostname {
        self.name.get_ref()
    }
}

impl Inventory {
    /// The machine with this name.
    pub fn machine(&self, name: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.name.get_ref().as_str() == name)
    }

    /// The machine that owns this MAC.
    pub fn machine_by_mac(&self, mac: Mac) -> Option<&Machine> {
        self.machines.iter().find(|m| m.macs().any(|x| x == mac))
    }

    /// The role of a machine. Validation guarantees it exists.
    pub fn role_of(&self, machine: &Machine) -> Option<&Role> {
        self.roles.get(machine.role.get_ref())
    }

    /// The machines that run an etcd member, in file order.
    pub fn etcd_members(&self) -> impl Iterator<Item = &Machine> {
        self.machines.iter().filter(|m| self.role_of(m).is_some_and(|r| r.etcd == EtcdRole::Member))
    }

    /// A machine's effective labels: role labels, overridden by rack labels, overridden by the machine's own, plus
    /// `herd.io/role`, `herd.io/rack` and `herd.io/hostname`, which cannot be overridden.
    pub fn labels_of(&self, machine: &Machine) -> Labels {
        let mut labels = Labels::new();
        if let Some(role) = self.role_of(machine) {
            labels.extend(role.labels.clone());
        }
        if let Some(rack) = self.racks.get(machine.rack.get_ref()) {
            labels.extend(rack.labels.clone());
        }
        labels.extend(machine.labels.clone());
        for (key, value) in [
            ("herd.io/role", machine.role.get_ref().as_str()),
            ("herd.io/rack", machine.rack.get_ref().as_str()),
            ("herd.io/hostname", machine.name.get_ref().as_str()),
        ] {
            if let Ok(key) = key.parse() {
                labels.insert(key, value.to_owned());
            }
        }
        labels
    }

    /// Where a role's unit file path resolves to.
    pub fn resolve(&self, relative: &str) -> std::path::PathBuf {
        match &self.base_dir {
            Some(dir) => dir.join(relative),
            None => std::path::PathBuf::from(relative),
        }
    }

    /// A machine's fully qualified domain name.
    pub fn fqdn(&self, machine: &Machine) -> String {
        format!("{}.{}", machine.name.get_ref(), self.site.domain)
    }
}
