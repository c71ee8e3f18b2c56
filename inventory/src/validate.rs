//! Cross-field rules: what a typed parse cannot see, and what bites in production (duplicate MACs and addresses,
//! addresses outside their subnet or inside a DHCP pool, bonds over NICs the machine does not have, references to
//! roles and racks that do not exist, an etcd membership that cannot form a quorum).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::ops::Range;
use std::path::Path;

use crate::diag::{Diagnostic, Rule, SourceMap};
use crate::model::{EtcdRole, Machine, Network, Networks, RoleFile, Spanned};
use crate::parse::Parts;
use crate::types::{Address, Mac};

/// Etcd member counts that form a useful quorum: 1 (lab), 3 or 5. Even counts add a member without adding fault
/// tolerance; more than 5 slows every write.
pub const ETCD_MEMBER_COUNTS: [usize; 3] = [1, 3, 5];

/// File name suffixes of the systemd units a role may install.
pub const UNIT_SUFFIXES: [&str; 7] = [".service", ".socket", ".timer", ".path", ".mount", ".target", ".slice"];

pub(crate) fn check(parts: &Parts, map: &SourceMap<'_>, diags: &mut Vec<Diagnostic>) {
    let mut checker = Checker { map, diags, addresses: HashMap::new(), macs: HashMap::new() };
    if let Some(networks) = &parts.network {
        checker.networks(networks);
    }
    if let Some(site) = &parts.site {
        // A small site's provisioner is often the boot network's router too: the same host, not a duplicate.
        let routes = parts.network.as_ref().and_then(|n| n.internal.gateway.as_ref()).map(|g| g.get_ref().0);
        if routes != Some(site.provisioner.get_ref().0) {
            checker.claim_address(&site.provisioner, "the provisioner's address".to_owned());
        }
        if let Some(networks) = &parts.network {
            checker.host_address(&site.provisioner, &networks.internal, "internal", "the provisioner");
        }
    }
    checker.roles(parts);
    checker.machines(parts);
    if parts.complete {
        checker.etcd_quorum(parts);
    }
}

struct Checker<'a, 'm> {
    map: &'a SourceMap<'m>,
    diags: &'a mut Vec<Diagnostic>,
    /// Every address claimed so far: who holds it and where.
    addresses: HashMap<Ipv4Addr, (String, Range<usize>)>,
    /// Every MAC claimed so far: which machine and where.
    macs: HashMap<Mac, (String, Range<usize>)>,
}

impl Checker<'_, '_> {
    fn report(&mut self, span: Range<usize>, rule: Rule, message: String) {
        self.diags.push(self.map.diagnostic(span, rule, message));
    }

    fn networks(&mut self, networks: &Networks) {
        let mut pools = Vec::new();
        for (name, net) in networks.iter() {
            let cidr = net.cidr.get_ref();
            if let Some(gateway) = &net.gateway {
                self.claim_address(gateway, format!("the {name} network's gateway"));
                self.host_address(gateway, net, name, "the gateway");
            }
            for pool in &net.pools {
                let p = pool.get_ref();
                if p.start.0 > p.end.0 {
                    self.report(
                        pool.span(),
                        Rule::PoolInverted,
                        format!("pool {p} starts after it ends; swap start and end"),
                    );
                    continue;
                }
                if !cidr.contains(p.start.0) || !cidr.contains(p.end.0) {
                    self.report(
                        pool.span(),
                        Rule::PoolOutsideSubnet,
                        format!("pool {p} is not inside the {name} network {cidr}"),
                    );
                } else if p.contains(cidr.network()) || p.contains(cidr.broadcast()) {
                    self.report(
                        pool.span(),
                        Rule::PoolOutsideSubnet,
                        format!("pool {p} includes the network or broadcast address of {cidr}"),
                    );
                }
                for (other_net, other) in &pools {
                    let o: &Spanned<crate::model::Pool> = other;
                    if p.overlaps(o.get_ref()) {
                        let at = self.map.locate(&o.span());
                        self.report(
                            pool.span(),
                            Rule::PoolOverlap,
                            format!("pool {p} overlaps pool {} of the {other_net} network ({at})", o.get_ref()),
                        );
                    }
                }
                pools.push((name, pool.clone()));
            }
        }
        if let Some(external) = &networks.external
            && external.cidr.get_ref().overlaps(networks.internal.cidr.get_ref())
        {
            self.report(
                external.cidr.span(),
                Rule::NetworkOverlap,
                format!(
                    "the external network {} overlaps the internal network {}",
                    external.cidr.get_ref(),
                    networks.internal.cidr.get_ref()
                ),
            );
        }
    }

    /// Records that `what` holds `addr`; reports a duplicate if someone already does.
    fn claim_address(&mut self, addr: &Spanned<Address>, what: String) {
        let ip = addr.get_ref().0;
        if let Some((holder, span)) = self.addresses.get(&ip) {
            let message = format!("{ip} is already {holder} ({})", self.map.locate(span));
            self.report(addr.span(), Rule::DuplicateAddress, message);
        } else {
            self.addresses.insert(ip, (what, addr.span()));
        }
    }

    /// A static host address must be inside its network, not its network/broadcast address, and outside its pools.
    fn host_address(&mut self, addr: &Spanned<Address>, net: &Network, net_name: &str, what: &str) {
        let ip = addr.get_ref().0;
        let cidr = net.cidr.get_ref();
        if !cidr.contains(ip) {
            self.report(
                addr.span(),
                Rule::AddressOutsideSubnet,
                format!("{what}'s address {ip} is outside the {net_name} network {cidr}"),
            );
        } else if cidr.is_reserved(ip) {
            self.report(
                addr.span(),
                Rule::AddressReserved,
                format!("{what}'s address {ip} is the network or broadcast address of {cidr}"),
            );
        } else if let Some(pool) = net.pool_containing(ip) {
            let message = format!(
                "{what}'s address {ip} is inside the dynamic pool {} ({}); static addresses must be outside pools",
                pool.get_ref(),
                self.map.locate(&pool.span())
            );
            self.report(addr.span(), Rule::AddressInPool, message);
        }
    }

    /// Role (and machine) units must be unit files that exist when the inventory was loaded from a file; their
    /// files need an absolute path and an octal mode.
    fn roles(&mut self, parts: &Parts) {
        for (name, role) in &parts.roles {
            self.units_and_files(parts, &format!("role {name}"), &role.units, &role.files);
        }
    }

    fn units_and_files(&mut self, parts: &Parts, owner: &str, units: &[Spanned<String>], files: &[RoleFile]) {
        for unit in units {
            let path = unit.get_ref();
            let file_name = Path::new(path).file_name().and_then(|f| f.to_str()).unwrap_or_default();
            if !UNIT_SUFFIXES.iter().any(|s| file_name.ends_with(s) && file_name.len() > s.len()) {
                self.report(
                    unit.span(),
                    Rule::MalformedPath,
                    format!(
                        "{owner} unit {path:?} is not a systemd unit file name (ends in one of {})",
                        UNIT_SUFFIXES.join(" ")
                    ),
                );
            } else if let Some(base) = &parts.base_dir
                && !base.join(path).is_file()
            {
                self.report(
                    unit.span(),
                    Rule::MissingFile,
                    format!(
                        "{owner} unit file {path:?} does not exist (looked for {}); unit paths are relative to the inventory file",
                        base.join(path).display()
                    ),
                );
            }
        }
        for file in files {
            if !file.path.get_ref().starts_with('/') {
                self.report(
                    file.path.span(),
                    Rule::MalformedPath,
                    format!("{owner} file path {:?} must be absolute", file.path.get_ref()),
                );
            }
            if file.mode_bits().is_none() {
                self.report(
                    file.mode.span(),
                    Rule::MalformedMode,
                    format!("mode {:?} is not an octal permission string like \"0644\"", file.mode.get_ref()),
                );
            }
        }
    }

    fn machines(&mut self, parts: &Parts) {
        let mut names: HashMap<&str, Range<usize>> = HashMap::new();
        for machine in &parts.machines {
            let name = machine.name.get_ref().as_str();
            if let Some(first) = names.get(name) {
                let message = format!("machine name {name} is already used ({})", self.map.locate(first));
                self.report(machine.name.span(), Rule::DuplicateName, message);
            } else {
                names.insert(name, machine.name.span());
            }
            self.machine(parts, machine);
        }
    }

    fn machine(&mut self, parts: &Parts, machine: &Machine) {
        let name = machine.name.get_ref().to_string();
        if machine.macs.get_ref().is_empty() {
            self.report(
                machine.macs.span(),
                Rule::MissingMac,
                format!("machine {name} has no MAC address; list its NICs, the boot NIC first"),
            );
        }
        for mac in machine.macs.get_ref() {
            if let Some((holder, span)) = self.macs.get(mac.get_ref()) {
                let message =
                    format!("{} is already a NIC of machine {holder} ({})", mac.get_ref(), self.map.locate(span));
                self.report(mac.span(), Rule::DuplicateMac, message);
            } else {
                self.macs.insert(*mac.get_ref(), (name.clone(), mac.span()));
            }
        }
        self.bond(machine, &name);
        self.units_and_files(parts, &format!("machine {name}"), &machine.units, &machine.files);
        self.claim_address(&machine.internal, format!("the internal address of machine {name}"));
        if let Some(networks) = &parts.network {
            self.host_address(&machine.internal, &networks.internal, "internal", &format!("machine {name}"));
        }
        if let Some(external) = &machine.external {
            self.external(parts.network.as_ref(), machine, external, &name);
        }
        if let Some(bmc) = &machine.bmc {
            self.claim_address(bmc, format!("the BMC address of machine {name}"));
        }
        let role = machine.role.get_ref();
        if !parts.roles.contains_key(role) && !parts.broken_roles.contains(role.as_str()) {
            let known = join(parts.roles.keys().map(|r| r.as_str()));
            self.report(
                machine.role.span(),
                Rule::UnknownRole,
                format!("machine {name} has role `{role}`, which is not defined; defined roles: {known}"),
            );
        }
        let rack = machine.rack.get_ref();
        if !parts.racks.contains_key(rack) && !parts.broken_racks.contains(rack.as_str()) {
            let known = join(parts.racks.keys().map(|r| r.as_str()));
            self.report(
                machine.rack.span(),
                Rule::UnknownRack,
                format!("machine {name} is in rack `{rack}`, which is not defined; defined racks: {known}"),
            );
        }
    }

    fn bond(&mut self, machine: &Machine, name: &str) {
        let Some(bond) = &machine.bond else { return };
        let members = bond.members.get_ref();
        let mut distinct: Vec<Mac> = Vec::new();
        for member in members {
            let mac = *member.get_ref();
            if distinct.contains(&mac) {
                self.report(member.span(), Rule::DuplicateMac, format!("{mac} is listed twice in the bond"));
                continue;
            }
            distinct.push(mac);
            if !machine.macs().any(|m| m == mac) {
                self.report(
                    member.span(),
                    Rule::BondMemberUnknown,
                    format!("bond member {mac} is not one of machine {name}'s MACs; add it to `macs` or fix the typo"),
                );
            }
        }
        if distinct.len() < 2 {
            self.report(
                bond.members.span(),
                Rule::BondTooSmall,
                format!(
                    "the bond of machine {name} has {} distinct member(s); a bond needs at least 2 (remove `bond` for a single NIC)",
                    distinct.len()
                ),
            );
        }
    }

    fn external(
        &mut self,
        networks: Option<&Networks>,
        machine: &Machine,
        external: &crate::model::External,
        name: &str,
    ) {
        let mac = *external.mac.get_ref();
        if !machine.macs().any(|m| m == mac) {
            self.report(
                external.mac.span(),
                Rule::ExternalInterface,
                format!("external interface {mac} is not one of machine {name}'s MACs"),
            );
        } else if machine.bond.as_ref().is_some_and(|b| b.members.get_ref().iter().any(|m| *m.get_ref() == mac)) {
            self.report(
                external.mac.span(),
                Rule::ExternalInterface,
                format!("external interface {mac} is also a member of the bond; use a NIC outside the bond"),
            );
        }
        self.claim_address(&external.address, format!("the external address of machine {name}"));
        match networks.map(|n| n.external.as_ref()) {
            Some(Some(net)) => self.host_address(&external.address, net, "external", &format!("machine {name}")),
            Some(None) => self.report(
                external.address.span(),
                Rule::MissingNetwork,
                format!("machine {name} has an external address but there is no [network.external]; define it"),
            ),
            // [network] itself failed to parse and was reported.
            None => {}
        }
    }

    fn etcd_quorum(&mut self, parts: &Parts) {
        let members: Vec<&Machine> = parts
            .machines
            .iter()
            .filter(|m| parts.roles.get(m.role.get_ref()).is_some_and(|r| r.etcd == EtcdRole::Member))
            .collect();
        let count = members.len();
        if ETCD_MEMBER_COUNTS.contains(&count) {
            return;
        }
        if count == 0 {
            self.report(
                0..0,
                Rule::EtcdQuorum,
                "no machine is an etcd member; give 1, 3 or 5 machines a role with etcd = \"member\"".to_owned(),
            );
            return;
        }
        // Point at the member that makes the count wrong: the one past 5, or the last one.
        let culprit = members.get(5).unwrap_or(&members[count - 1]);
        let names = join(members.iter().take(8).map(|m| m.name.get_ref().as_str()));
        let more = if count > 8 { ", ..." } else { "" };
        self.report(
            culprit.role.span(),
            Rule::EtcdQuorum,
            format!("{count} machines are etcd members ({names}{more}); etcd needs 1, 3 or 5 members"),
        );
    }
}

fn join<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let list: Vec<&str> = items.collect();
    if list.is_empty() { "(none)".to_owned() } else { list.join(", ") }
}
