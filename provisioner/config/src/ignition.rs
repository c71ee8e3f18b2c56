//! Rendering each machine's Ignition config (spec 3.3.0, the newest Debian's `ignition-validate` accepts) from the
//! inventory and the machine's role.
//!
//! What a machine gets: its hostname; systemd-networkd files for the bond (802.3ad with MII monitoring and fast
//! LACP, or active-backup with the boot NIC primary; members matched by permanent MAC) and `max_bonds=0` so the
//! bonding module does not create a stray `bond0`; its internal address on the bond (or on the boot NIC without a
//! bond); its external interface with the default route; the admins' SSH keys on the `herd` user; etcd member
//! settings (`/etc/default/etcd`, read by Debian's etcd unit) on members; node-init's config with the cluster's
//! etcd endpoints and the machine's labels; the role's files and units.
//!
//! Rendering is pure apart from reading the role's unit files. Output is deterministic (sorted paths), so golden
//! tests can pin it.

use std::collections::BTreeMap;

use herd_inventory::{Addressing, BondMode, EtcdRole, Inventory, Mac, Machine, RoleFile};
use ignition_config::v3_3 as ign;

/// The Ignition spec version herd emits.
pub const SPEC_VERSION: &str = "3.3.0";
/// The admin user that carries the site's SSH keys.
pub const ADMIN_USER: &str = "herd";
/// Where node-init reads its config on the machine.
pub const NODE_CONFIG_PATH: &str = crate::node::NODE_CONFIG_PATH;
/// Where the bond node-init builds in the initramfs is described.
pub const BOND_CONFIG_PATH: &str = crate::node::BOND_CONFIG_PATH;
/// etcd's client and peer ports.
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// etcd's peer port.
pub const ETCD_PEER_PORT: u16 = 2380;
const BOND: &str = "bond0";

/// Why a machine's config cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// No machine of that name.
    #[error("no machine named {0:?} in the inventory; `herdctl inventory show` lists them")]
    UnknownMachine(String),
    /// The inventory has no etcd member, so nobody can join a cluster.
    #[error(
        "the inventory has no etcd member (no machine has a role with etcd = \"member\"); a cluster needs 1, 3 or 5"
    )]
    NoEtcdMembers,
    /// A role's or machine's unit file could not be read.
    #[error("{owner}: cannot read unit file {path}")]
    UnitFile {
        /// The role or machine.
        owner: String,
        /// The resolved path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A role's unit cannot be enabled.
    #[error(
        "{owner}: unit {unit} has no [Install] section, so it cannot be enabled; add `[Install]` with `WantedBy=multi-user.target`"
    )]
    UnitWithoutInstall {
        /// The role or machine.
        owner: String,
        /// The unit's name.
        unit: String,
    },
}

pub use crate::node::{BondConfig, EarlyBond, NodeConfig};

/// What a config says beyond the inventory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// etcd with mutual TLS on client and peer URLs (the provisioner holds a site PKI, and every machine gets its
    /// certificates at its join): `https://` everywhere, members requiring a certificate from the etcd CA of
    /// every client and peer, with the keys and certificates in [`crate::node::TLS_DIR`].
    pub etcd_tls: bool,
}

/// Renders the Ignition config of the machine named `name`.
pub fn render_machine(inv: &Inventory, name: &str) -> Result<ign::Config, RenderError> {
    render_machine_with(inv, name, RenderOptions::default())
}

/// [`render_machine`] with `options`.
pub fn render_machine_with(inv: &Inventory, name: &str, options: RenderOptions) -> Result<ign::Config, RenderError> {
    let machine = inv.machine(name).ok_or_else(|| RenderError::UnknownMachine(name.to_owned()))?;
    render_with(inv, machine, options)
}

/// Renders one machine's Ignition config.
pub fn render(inv: &Inventory, machine: &Machine) -> Result<ign::Config, RenderError> {
    render_with(inv, machine, RenderOptions::default())
}

/// [`render`] with `options`.
pub fn render_with(inv: &Inventory, machine: &Machine, options: RenderOptions) -> Result<ign::Config, RenderError> {
    let members: Vec<&Machine> = inv.etcd_members().collect();
    if members.is_empty() {
        return Err(RenderError::NoEtcdMembers);
    }
    let role = inv.role_of(machine);
    let role_name = machine.role.get_ref().to_string();
    let mut files: Vec<ign::File> = Vec::new();

    files.push(file("/etc/hostname", &format!("{}\n", machine.name()), 0o644));
    networkd(inv, machine, &mut files);

    let etcd_member = role.is_some_and(|r| r.etcd == EtcdRole::Member);
    if etcd_member {
        files.push(file("/etc/default/etcd", &etcd_environment(inv, machine, &members, options.etcd_tls), 0o644));
    }
    let node = NodeConfig {
        version: 1,
        machine: machine.name().to_string(),
        fqdn: inv.fqdn(machine),
        role: role_name.clone(),
        rack: machine.rack.get_ref().to_string(),
        provisioner_url: format!("http://{}", inv.site.provisioner.get_ref()),
        etcd_member,
        etcd_endpoints: members
            .iter()
            .map(|m| format!("{}://{}:{ETCD_CLIENT_PORT}", scheme(options.etcd_tls), m.internal.get_ref()))
            .collect(),
        labels: inv.labels_of(machine).into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        disk: machine.disk.as_ref().map(|d| d.as_str().to_owned()),
        address: Some(machine.internal.get_ref().to_string()),
    };
    // Serializing a struct of strings, bools and maps with string keys cannot fail.
    let node_json = serde_json::to_string(&node).unwrap_or_default() + "\n";
    files.push(file(NODE_CONFIG_PATH, &node_json, 0o644));
    let bond = BondConfig { version: 1, bond: early_bond(inv, machine) };
    let bond_json = serde_json::to_string(&bond).unwrap_or_default() + "\n";
    files.push(file(BOND_CONFIG_PATH, &bond_json, 0o644));

    let mut units = vec![enabled_unit("systemd-networkd.service"), enabled_unit("herd-node-init.service")];
    if etcd_member {
        units.push(enabled_unit("etcd.service"));
    }
    // The role's files and units, then the machine's: the same path or unit name replaces the role's.
    let mut extra_files: BTreeMap<&str, &RoleFile> = BTreeMap::new();
    let mut extra_units: BTreeMap<String, (String, std::path::PathBuf)> = BTreeMap::new();
    let owners = role.map(|r| (format!("role {role_name}"), &r.files, &r.units)).into_iter().chain(std::iter::once((
        format!("machine {}", machine.name()),
        &machine.files,
        &machine.units,
    )));
    for (owner, role_files, role_units) in owners {
        for extra in role_files {
            extra_files.insert(extra.path.get_ref(), extra);
        }
        for unit_path in role_units {
            let path = inv.resolve(unit_path.get_ref());
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            extra_units.insert(name, (owner.clone(), path));
        }
    }
    for extra in extra_files.into_values() {
        files.retain(|f| f.path != *extra.path.get_ref());
        files.push(file(extra.path.get_ref(), &extra.contents, extra.mode_bits().unwrap_or(0o644)));
    }
    for (name, (owner, path)) in extra_units {
        let contents = std::fs::read_to_string(&path).map_err(|source| RenderError::UnitFile {
            owner: owner.clone(),
            path: path.display().to_string(),
            source,
        })?;
        if !has_install_section(&contents) {
            return Err(RenderError::UnitWithoutInstall { owner, unit: name });
        }
        units.retain(|u| u.name != name);
        units.push(ign::Unit { contents: Some(contents), dropins: None, enabled: Some(true), mask: None, name });
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    units.sort_by(|a, b| a.name.cmp(&b.name));

    let users = if inv.site.ssh_authorized_keys.is_empty() {
        Vec::new()
    } else {
        vec![admin_user(inv.site.ssh_authorized_keys.clone())]
    };
    let config = assemble(files, units, users);
    Ok(config)
}

/// A spec 3.3.0 config with these files, units and users; empty lists are left out.
pub(crate) fn assemble(files: Vec<ign::File>, units: Vec<ign::Unit>, users: Vec<ign::User>) -> ign::Config {
    let mut config = ign::Config::default();
    config.ignition.version = Some(SPEC_VERSION.to_owned());
    if !files.is_empty() {
        config.storage = Some(ign::Storage {
            directories: None,
            disks: None,
            files: Some(files),
            filesystems: None,
            links: None,
            luks: None,
            raid: None,
        });
    }
    if !units.is_empty() {
        config.systemd = Some(ign::Systemd { units: Some(units) });
    }
    if !users.is_empty() {
        config.passwd = Some(ign::Passwd { groups: None, users: Some(users) });
    }
    config
}

/// Adds a file to a rendered config (what the provisioner adds per boot: the site's CA certificates, the join
/// credential), replacing one at the same path.
pub fn add_file(config: &mut ign::Config, path: &str, contents: &str, mode: u32) {
    let storage = config.storage.get_or_insert_with(Default::default);
    let files = storage.files.get_or_insert_with(Vec::new);
    files.retain(|f| f.path != path);
    files.push(file(path, contents, mode));
}

/// Serializes a config as pretty JSON with a trailing newline, leaving out unset (null) fields.
pub fn to_json(config: &ign::Config) -> String {
    // The Ignition models serialize to JSON without fallible parts (string keys, no floats).
    let mut value = serde_json::to_value(config).unwrap_or_default();
    strip_nulls(&mut value);
    serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
}

fn strip_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Whether a unit file has an `[Install]` section (so `enabled` means something).
pub fn has_install_section(contents: &str) -> bool {
    contents.lines().any(|l| l.trim() == "[Install]")
}

/// The admin user (`herd`, as CoreOS's `core`): in `sudo`, and in the groups that read every journal (`adm`,
/// `systemd-journal`) and drive the Docker Engine (`docker`), so `herdctl status/journal` work over SSH.
fn admin_user(keys: Vec<String>) -> ign::User {
    ign::User {
        gecos: Some("herd admin".to_owned()),
        groups: Some(["sudo", "adm", "systemd-journal", "docker"].map(str::to_owned).to_vec()),
        home_dir: None,
        name: ADMIN_USER.to_owned(),
        no_create_home: None,
        no_log_init: None,
        no_user_group: None,
        password_hash: None,
        primary_group: None,
        shell: Some("/bin/bash".to_owned()),
        should_exist: None,
        ssh_authorized_keys: Some(keys),
        system: None,
        uid: None,
    }
}

fn enabled_unit(name: &str) -> ign::Unit {
    ign::Unit { contents: None, dropins: None, enabled: Some(true), mask: None, name: name.to_owned() }
}

fn file(path: &str, contents: &str, mode: u32) -> ign::File {
    ign::File {
        append: None,
        contents: Some(ign::Resource {
            compression: None,
            http_headers: None,
            source: Some(data_url(contents)),
            verification: None,
        }),
        group: None,
        mode: Some(i64::from(mode)),
        overwrite: Some(true),
        path: path.to_owned(),
        user: None,
    }
}

/// An RFC 2397 `data:` URL with percent-encoded contents (readable in the JSON for small text files).
pub fn data_url(contents: &str) -> String {
    let mut out = String::with_capacity(contents.len() + 6);
    out.push_str("data:,");
    for b in contents.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/=:@+".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text of a `data:,` URL's percent-encoded contents (the inverse of [`data_url`]'s encoding).
pub fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = crate::node::percent_decode_bytes(text)?;
    String::from_utf8(bytes).map_err(|_| "data URL is not UTF-8 text".to_owned())
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// A file with inline contents, for tests elsewhere in the crate.
    pub(crate) fn file(path: &str, contents: &str) -> super::ign::File {
        super::file(path, contents, 0o644)
    }
}

/// Whether the machine has an external interface, which then carries the default route (the internal one none).
fn has_external(inv: &Inventory, machine: &Machine) -> bool {
    machine.external.is_some() && inv.network.external.is_some()
}

/// The bond node-init builds in the initramfs: the same interface, settings and static address as the networkd
/// files of [`networkd`] (none for a DHCP address, or a machine without a bond).
fn early_bond(inv: &Inventory, machine: &Machine) -> Option<EarlyBond> {
    let bond = machine.bond.as_ref()?;
    let net = &inv.network.internal;
    if net.addressing != Addressing::Static {
        return None;
    }
    let has_external = has_external(inv, machine);
    let members: Vec<Mac> = bond.members.get_ref().iter().map(|m| *m.get_ref()).collect();
    let boot = machine.boot_mac()?;
    Some(EarlyBond {
        name: BOND.to_owned(),
        mode: bond.mode,
        mac: boot.to_string(),
        members: members.iter().map(Mac::to_string).collect(),
        primary: (bond.mode == BondMode::ActiveBackup && members.contains(&boot)).then(|| boot.to_string()),
        mtu: net.mtu.map(u32::from),
        address: format!("{}/{}", machine.internal.get_ref(), net.cidr.get_ref().prefix()),
        gateway: if has_external { None } else { net.gateway.as_ref().map(|g| g.get_ref().to_string()) },
    })
}

/// systemd-networkd files: the bond and its members (or the boot NIC), and the external interface.
fn networkd(inv: &Inventory, machine: &Machine, files: &mut Vec<ign::File>) {
    let internal_net = &inv.network.internal;
    let cidr = internal_net.cidr.get_ref();
    let address = format!("{}/{}", machine.internal.get_ref(), cidr.prefix());
    let mtu = internal_net.mtu;
    let has_external = has_external(inv, machine);

    let mut network = String::from("[Network]\n");
    match internal_net.addressing {
        Addressing::Static => {
            network.push_str(&format!("Address={address}\n"));
            if !has_external && let Some(gw) = &internal_net.gateway {
                network.push_str(&format!("Gateway={}\n", gw.get_ref()));
            }
            for dns in &inv.site.dns {
                network.push_str(&format!("DNS={dns}\n"));
            }
            for ntp in &inv.site.ntp {
                network.push_str(&format!("NTP={ntp}\n"));
            }
        }
        // The provisioner's reservation for the boot MAC (which the bond carries) returns the inventory address,
        // gateway, DNS and NTP.
        Addressing::Dhcp => {
            network.push_str("DHCP=ipv4\n");
        }
    }
    network.push_str(&format!("Domains={}\n", inv.site.domain));
    network.push_str("LinkLocalAddressing=no\nIPv6AcceptRA=no\n");
    let link = mtu.map(|m| format!("\n[Link]\nMTUBytes={m}\n")).unwrap_or_default();
    if has_external && internal_net.addressing == Addressing::Dhcp {
        // One default route: the external interface's. Ignore the one DHCP offers on the bond.
        network.push_str("\n[DHCPv4]\nUseRoutes=no\n");
    }

    match &machine.bond {
        Some(bond) => {
            // The bond carries the boot NIC's MAC, so DHCP reservations and switch tables see one stable address.
            let boot_mac = machine.boot_mac().map(|m| format!("MACAddress={m}\n")).unwrap_or_default();
            let mut netdev = format!("[NetDev]\nName={BOND}\nKind=bond\n{boot_mac}");
            if let Some(m) = mtu {
                netdev.push_str(&format!("MTUBytes={m}\n"));
            }
            netdev.push_str("\n[Bond]\n");
            for s in bond.mode.settings() {
                netdev.push_str(&format!("{}={}\n", s.networkd.0, s.networkd.1));
            }
            files.push(file(&format!("/etc/systemd/network/10-{BOND}.netdev"), &netdev, 0o644));
            let boot = machine.boot_mac();
            for member in bond.members.get_ref() {
                let mac = *member.get_ref();
                let mut unit = format!("[Match]\nPermanentMACAddress={mac}\n\n[Network]\nBond={BOND}\n");
                if bond.mode == BondMode::ActiveBackup && Some(mac) == boot {
                    unit.push_str("PrimarySlave=true\n");
                }
                unit.push_str(&link);
                let name = crate::node::bond_member_network(BOND, &mac.to_string());
                files.push(file(&format!("/etc/systemd/network/{name}"), &unit, 0o644));
            }
            let mut network = network.clone();
            if internal_net.addressing == Addressing::Static {
                // node-init built this bond with this address in the initramfs (BondConfig): networkd takes
                // it over as it is rather than dropping the address and route it finds.
                network = network.replacen("[Network]\n", "[Network]\nKeepConfiguration=static\n", 1);
            }
            let unit = format!("[Match]\nName={BOND}\n\n{network}");
            files.push(file(&format!("/etc/systemd/network/30-{BOND}.network"), &unit, 0o644));
            files.push(file("/etc/modprobe.d/herd-bonding.conf", "options bonding max_bonds=0\n", 0o644));
        }
        None => {
            if let Some(mac) = machine.boot_mac() {
                let unit = format!("[Match]\nPermanentMACAddress={mac}\n\n{network}{link}");
                files.push(file("/etc/systemd/network/30-internal.network", &unit, 0o644));
            }
        }
    }

    if let (Some(ext), Some(net)) = (&machine.external, &inv.network.external) {
        let mut unit = format!(
            "[Match]\nPermanentMACAddress={}\n\n[Network]\nAddress={}/{}\n",
            ext.mac.get_ref(),
            ext.address.get_ref(),
            net.cidr.get_ref().prefix()
        );
        if let Some(gw) = &net.gateway {
            unit.push_str(&format!("Gateway={}\n", gw.get_ref()));
        }
        unit.push_str("LinkLocalAddressing=no\nIPv6AcceptRA=no\n");
        files.push(file("/etc/systemd/network/40-external.network", &unit, 0o644));
    }
}

fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// `/etc/default/etcd` for a member: the initial cluster is every member of the inventory, on internal addresses.
/// With `tls`, client and peer URLs are `https://` and both require a certificate from the etcd CA (the member's
/// own, `member.crt`, serves both); etcd reads its certificate files at every new connection, so a renewal is an
/// atomic swap of the files.
fn etcd_environment(inv: &Inventory, machine: &Machine, members: &[&Machine], tls: bool) -> String {
    let ip = machine.internal.get_ref();
    let s = scheme(tls);
    let initial: Vec<String> =
        members.iter().map(|m| format!("{}={s}://{}:{ETCD_PEER_PORT}", m.name(), m.internal.get_ref())).collect();
    let mut text = format!(
        "# Rendered by herd from the inventory: every etcd member of site {site}.\n\
         ETCD_NAME={name}\n\
         ETCD_DATA_DIR=/var/lib/etcd/{site}\n\
         ETCD_LISTEN_PEER_URLS={s}://{ip}:{ETCD_PEER_PORT}\n\
         ETCD_LISTEN_CLIENT_URLS={s}://{ip}:{ETCD_CLIENT_PORT},{s}://127.0.0.1:{ETCD_CLIENT_PORT}\n\
         ETCD_INITIAL_ADVERTISE_PEER_URLS={s}://{ip}:{ETCD_PEER_PORT}\n\
         ETCD_ADVERTISE_CLIENT_URLS={s}://{ip}:{ETCD_CLIENT_PORT}\n\
         ETCD_INITIAL_CLUSTER={initial}\n\
         ETCD_INITIAL_CLUSTER_TOKEN=herd-{site}\n\
         ETCD_INITIAL_CLUSTER_STATE=new\n",
        site = inv.site.name,
        name = machine.name(),
        initial = initial.join(","),
    );
    if tls {
        let dir = crate::node::TLS_DIR;
        for side in ["", "PEER_"] {
            text.push_str(&format!(
                "ETCD_{side}CLIENT_CERT_AUTH=true\n\
                 ETCD_{side}TRUSTED_CA_FILE={dir}/etcd-ca.crt\n\
                 ETCD_{side}CERT_FILE={dir}/member.crt\n\
                 ETCD_{side}KEY_FILE={dir}/member.key\n"
            ));
        }
        // Peers only with a member's certificate, not any of the CA's (herd_pki::PEER_NAME).
        text.push_str(&format!("ETCD_PEER_CERT_ALLOWED_HOSTNAME={}\n", herd_pki::PEER_NAME));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Inventory {
        let spec = herd_inventory::FleetSpec { machines: 10, racks: 5, masters: 3 };
        herd_inventory::parse("gen.toml", &herd_inventory::generate(spec).unwrap()).unwrap()
    }

    fn file_text(config: &ign::Config, path: &str) -> String {
        let files = config.storage.as_ref().unwrap().files.as_ref().unwrap();
        let f = files.iter().find(|f| f.path == path).unwrap_or_else(|| panic!("no {path}"));
        decode(f.contents.as_ref().unwrap().source.as_ref().unwrap())
    }

    /// The bond node-init is to build in the initramfs, from the config's bond.json.
    fn early(config: &ign::Config) -> Option<EarlyBond> {
        let c: BondConfig = serde_json::from_str(&file_text(config, BOND_CONFIG_PATH)).unwrap();
        assert_eq!(c.version, 1);
        c.bond
    }

    fn decode(url: &str) -> String {
        percent_decode(url.strip_prefix("data:,").unwrap()).unwrap()
    }

    #[test]
    fn data_urls_round_trip() {
        let text = "a b\n%100 [x]=y;\"q\"\tç";
        assert_eq!(decode(&data_url(text)), text);
    }

    #[test]
    fn master_gets_etcd_member_settings_with_every_member() {
        let inv = fleet();
        let master = inv.etcd_members().next().unwrap();
        let config = render(&inv, master).unwrap();
        let etcd = file_text(&config, "/etc/default/etcd");
        assert!(etcd.contains("ETCD_NAME=r01-m01\n"), "{etcd}");
        assert!(
            etcd.contains(
                "ETCD_INITIAL_CLUSTER=r01-m01=http://10.20.1.11:2380,r02-m01=http://10.20.2.11:2380,r03-m01=http://10.20.3.11:2380"
            ),
            "{etcd}"
        );
        let units = config.systemd.as_ref().unwrap().units.as_ref().unwrap();
        assert!(units.iter().any(|u| u.name == "etcd.service" && u.enabled == Some(true)));
    }

    #[test]
    fn worker_is_an_etcd_client_with_the_members_as_endpoints() {
        let inv = fleet();
        let worker = inv.machine("r01-m02").unwrap();
        let config = render(&inv, worker).unwrap();
        let node: NodeConfig = serde_json::from_str(&file_text(&config, NODE_CONFIG_PATH)).unwrap();
        assert!(!node.etcd_member);
        assert_eq!(node.etcd_endpoints.len(), 3);
        assert_eq!(node.labels["herd.io/rack"], "r01");
        let files = config.storage.as_ref().unwrap().files.as_ref().unwrap();
        assert!(files.iter().all(|f| f.path != "/etc/default/etcd"));
    }

    #[test]
    fn with_etcd_tls_every_url_is_https_and_members_require_certificates_on_both_sides() {
        let inv = fleet();
        let tls = RenderOptions { etcd_tls: true };
        let master = render_with(&inv, inv.etcd_members().next().unwrap(), tls).unwrap();
        let etcd = file_text(&master, "/etc/default/etcd");
        assert!(!etcd.contains("http://"), "{etcd}");
        assert!(etcd.contains("ETCD_LISTEN_CLIENT_URLS=https://10.20.1.11:2379,https://127.0.0.1:2379\n"), "{etcd}");
        assert!(etcd.contains("ETCD_INITIAL_CLUSTER=r01-m01=https://10.20.1.11:2380,"), "{etcd}");
        for line in [
            "ETCD_CLIENT_CERT_AUTH=true",
            "ETCD_PEER_CLIENT_CERT_AUTH=true",
            "ETCD_TRUSTED_CA_FILE=/var/lib/herd/tls/etcd-ca.crt",
            "ETCD_PEER_TRUSTED_CA_FILE=/var/lib/herd/tls/etcd-ca.crt",
            "ETCD_KEY_FILE=/var/lib/herd/tls/member.key",
            "ETCD_PEER_CERT_FILE=/var/lib/herd/tls/member.crt",
            "ETCD_PEER_CERT_ALLOWED_HOSTNAME=etcd-peer.herd.internal",
        ] {
            assert!(etcd.lines().any(|l| l == line), "{line} missing from {etcd}");
        }
        let worker = render_with(&inv, inv.machine("r01-m02").unwrap(), tls).unwrap();
        let node: NodeConfig = serde_json::from_str(&file_text(&worker, NODE_CONFIG_PATH)).unwrap();
        assert!(node.etcd_tls());
        assert!(node.etcd_endpoints.iter().all(|e| e.starts_with("https://")), "{:?}", node.etcd_endpoints);
        // Without a site PKI nothing changes.
        let plain = render(&inv, inv.machine("r01-m02").unwrap()).unwrap();
        let node: NodeConfig = serde_json::from_str(&file_text(&plain, NODE_CONFIG_PATH)).unwrap();
        assert!(!node.etcd_tls());
    }

    #[test]
    fn lacp_bond_members_and_address() {
        let inv = fleet();
        let m = inv.machine("r01-m02").unwrap();
        let config = render(&inv, m).unwrap();
        let netdev = file_text(&config, "/etc/systemd/network/10-bond0.netdev");
        assert!(netdev.contains("Mode=802.3ad\nMIIMonitorSec=100ms\nLACPTransmitRate=fast"), "{netdev}");
        assert!(netdev.contains("MTUBytes=9000"));
        let bond = file_text(&config, "/etc/systemd/network/30-bond0.network");
        assert!(bond.contains("Address=10.20.1.12/16\nGateway=10.20.0.1\n"), "{bond}");
        for mac in m.macs() {
            let member = file_text(
                &config,
                &format!("/etc/systemd/network/20-bond0-{}.network", mac.to_string().replace(':', "")),
            );
            assert!(member.contains(&format!("PermanentMACAddress={mac}")) && member.contains("Bond=bond0"));
        }
        assert_eq!(file_text(&config, "/etc/modprobe.d/herd-bonding.conf"), "options bonding max_bonds=0\n");
        // The bond node-init builds in the initramfs is the one of the networkd files, and networkd keeps it.
        assert!(bond.contains("[Network]\nKeepConfiguration=static\n"), "{bond}");
        let early = early(&config).expect("a static bond is built early");
        assert_eq!(early.name, "bond0");
        assert_eq!(early.mode, BondMode::Lacp);
        assert_eq!(early.mac, m.boot_mac().unwrap().to_string());
        assert_eq!(early.members, m.macs().map(|m| m.to_string()).collect::<Vec<_>>());
        assert_eq!(early.primary, None);
        assert_eq!(
            (early.mtu, early.address.as_str(), early.gateway.as_deref()),
            (Some(9000), "10.20.1.12/16", Some("10.20.0.1"))
        );
        for s in BondMode::Lacp.settings() {
            assert!(netdev.contains(&format!("{}={}\n", s.networkd.0, s.networkd.1)), "{netdev}");
        }
    }

    #[test]
    fn active_backup_makes_the_boot_nic_primary() {
        let inv = fleet();
        // Rack r05 uses active-backup in generated fleets.
        let m = inv.machines.iter().find(|m| m.rack.get_ref().as_str() == "r05").unwrap();
        let config = render(&inv, m).unwrap();
        let netdev = file_text(&config, "/etc/systemd/network/10-bond0.netdev");
        assert!(netdev.contains("Mode=active-backup"), "{netdev}");
        let boot = m.boot_mac().unwrap();
        let primary =
            file_text(&config, &format!("/etc/systemd/network/20-bond0-{}.network", boot.to_string().replace(':', "")));
        assert!(primary.contains("PrimarySlave=true"));
        assert_eq!(early(&config).unwrap().primary, Some(boot.to_string()));
    }

    #[test]
    fn external_interface_takes_the_default_route() {
        let inv = fleet();
        let master = inv.etcd_members().next().unwrap();
        let config = render(&inv, master).unwrap();
        let ext = file_text(&config, "/etc/systemd/network/40-external.network");
        assert!(ext.contains("Address=198.51.100.11/24\nGateway=198.51.100.1\n"), "{ext}");
        let bond = file_text(&config, "/etc/systemd/network/30-bond0.network");
        assert!(!bond.contains("Gateway="), "one default route only: {bond}");
        assert_eq!(early(&config).unwrap().gateway, None, "the early bond has no default route either");
    }

    #[test]
    fn unknown_machine_and_missing_members_are_clear_errors() {
        let inv = fleet();
        assert!(render_machine(&inv, "nope").unwrap_err().to_string().contains("herdctl inventory show"));
        let mut no_masters = inv.clone();
        for role in no_masters.roles.values_mut() {
            role.etcd = EtcdRole::Client;
        }
        let err = render(&no_masters, &no_masters.machines[0]).unwrap_err();
        assert!(matches!(err, RenderError::NoEtcdMembers), "{err}");
    }

    #[test]
    fn dhcp_addressing_asks_dhcp_on_the_bond_with_the_boot_mac() {
        let text = herd_inventory::generate(herd_inventory::FleetSpec { machines: 10, racks: 5, masters: 3 })
            .unwrap()
            .replace("mtu = 9000\n", "mtu = 9000\naddressing = \"dhcp\"\n");
        let inv = herd_inventory::parse("gen.toml", &text).unwrap();
        let worker = inv.machine("r01-m02").unwrap();
        let config = render(&inv, worker).unwrap();
        let bond = file_text(&config, "/etc/systemd/network/30-bond0.network");
        assert!(bond.contains("DHCP=ipv4\n") && !bond.contains("Address="), "{bond}");
        assert!(!bond.contains("KeepConfiguration="), "{bond}");
        assert_eq!(early(&config), None, "a DHCP bond is networkd's alone");
        let netdev = file_text(&config, "/etc/systemd/network/10-bond0.netdev");
        assert!(netdev.contains(&format!("MACAddress={}\n", worker.boot_mac().unwrap())), "{netdev}");
        let master = render(&inv, inv.etcd_members().next().unwrap()).unwrap();
        let bond = file_text(&master, "/etc/systemd/network/30-bond0.network");
        assert!(bond.contains("[DHCPv4]\nUseRoutes=no"), "the external interface keeps the default route: {bond}");
    }

    #[test]
    fn a_machine_file_replaces_the_role_file_at_the_same_path() {
        let text = herd_inventory::generate(herd_inventory::FleetSpec { machines: 10, racks: 5, masters: 3 })
            .unwrap()
            .replace(
                "description = \"runs units\"\n",
                "description = \"runs units\"\nfiles = [{ path = \"/etc/motd\", contents = \"role\\n\" }]\n",
            )
            .replace(
                "name = \"r01-m02\"\n",
                "name = \"r01-m02\"\nfiles = [{ path = \"/etc/motd\", contents = \"mine\\n\", mode = \"0600\" }]\n",
            );
        let inv = herd_inventory::parse("gen.toml", &text).unwrap_or_else(|d| panic!("{d}"));
        let config = render(&inv, inv.machine("r01-m02").unwrap()).unwrap();
        assert_eq!(file_text(&config, "/etc/motd"), "mine\n");
        let files = config.storage.as_ref().unwrap().files.as_ref().unwrap();
        let motd: Vec<_> = files.iter().filter(|f| f.path == "/etc/motd").collect();
        assert_eq!(motd.len(), 1);
        assert_eq!(motd[0].mode, Some(0o600));
        let other = render(&inv, inv.machine("r02-m02").unwrap()).unwrap();
        assert_eq!(file_text(&other, "/etc/motd"), "role\n");
    }
}
