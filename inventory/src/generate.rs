//! Fleet generators: realistic inventories of any size for tests, benchmarks and examples.
//!
//! A generated fleet has racks of servers with bonded NIC pairs (802.3ad, or active-backup in every fifth rack, as
//! on switches without MLAG), an internal /16 with one /24-sized block per rack, BMC addresses, a dynamic pool,
//! masters spread over distinct racks with an external interface, and a few hardware labels. The output is TOML
//! text, so it exercises the same parser the admin's file does.

use std::fmt::Write as _;

use crate::model::FORMAT_VERSION;
use crate::validate::ETCD_MEMBER_COUNTS;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetSpec {
    /// Number of machines.
    pub machines: usize,
    /// Number of racks (machines are spread evenly).
    pub racks: usize,
    /// Number of masters (etcd members), on distinct racks where possible.
    pub masters: usize,
}

impl FleetSpec {
    /// A spec with a rack per 40 machines and 3 masters (1 for a single machine).
    pub fn new(machines: usize) -> Self {
        FleetSpec { machines, racks: machines.div_ceil(MACHINES_PER_RACK_DEFAULT).max(1), masters: 3.min(machines) }
    }
}

/// Why a spec cannot be generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenError {
    /// A limit of the address plan.
    #[error("{0}")]
    Limit(String),
}

const MACHINES_PER_RACK_DEFAULT: usize = 40;
/// Rack r's machines get 10.20.r.11 onwards; .250-.255 of the /16 is the dynamic pool.
const MAX_RACKS: usize = 249;
const MAX_PER_RACK: usize = 240;
const ROWS_OF: usize = 10;
const HARDWARE: [&str; 3] = ["r650", "r750", "r7525"];
/// A well-formed example key (its private half was discarded).
pub const EXAMPLE_SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIqncyYlckdA3ecqvtUFm49sdNEmVTYODA6I8GSIoPRO admin@dc1";

/// Generates the inventory described by `spec` as TOML text.
pub fn generate(spec: FleetSpec) -> Result<String, GenError> {
    let FleetSpec { machines, racks, masters } = spec;
    if machines == 0 {
        return Err(GenError::Limit("--machines must be at least 1".into()));
    }
    if racks == 0 || racks > MAX_RACKS {
        return Err(GenError::Limit(format!("--racks must be between 1 and {MAX_RACKS}")));
    }
    if racks > machines {
        return Err(GenError::Limit(format!("{racks} racks for {machines} machines leaves racks empty")));
    }
    let per_rack = machines.div_ceil(racks);
    if per_rack > MAX_PER_RACK {
        return Err(GenError::Limit(format!(
            "{per_rack} machines per rack exceeds the address plan's {MAX_PER_RACK}; pass --racks {} or more",
            machines.div_ceil(MAX_PER_RACK)
        )));
    }
    if !ETCD_MEMBER_COUNTS.contains(&masters) || masters > machines {
        return Err(GenError::Limit(format!(
            "--masters must be 1, 3 or 5 (an etcd quorum) and at most --machines, not {masters}"
        )));
    }

    let mut out = String::with_capacity(machines * 420 + 2048);
    header(&mut out, spec);
    for rack in 1..=racks {
        let zone = (b'a' + ((rack - 1) / ROWS_OF % 26) as u8) as char;
        let _ = writeln!(out, "[racks.r{rack:02}]");
        let _ = writeln!(
            out,
            "location = \"hall 1, row {}, position {}\"",
            zone.to_ascii_uppercase(),
            (rack - 1) % ROWS_OF + 1
        );
        let _ = writeln!(out, "labels = {{ \"topology.herd.io/zone\" = \"{zone}\" }}\n");
    }

    // Machine k of rack r (both from 1). Racks are filled evenly: the first `machines % racks` racks get one more.
    let base = machines / racks;
    let extra = machines % racks;
    let mut index = 0usize;
    for rack in 1..=racks {
        let in_rack = base + usize::from(rack <= extra);
        for slot in 1..=in_rack {
            // Master k sits in rack (k mod racks)+1 at slot (k / racks)+1: distinct racks first.
            let master_number = (slot - 1) * racks + (rack - 1);
            let master = master_number < masters;
            machine(&mut out, index, rack, slot, master.then_some(master_number));
            index += 1;
        }
    }
    Ok(out)
}

fn header(out: &mut String, spec: FleetSpec) {
    let FleetSpec { machines, racks, masters } = spec;
    let _ = write!(
        out,
        r#"# A generated fleet: {machines} machines in {racks} racks, {masters} masters.
# Made by `herdctl inventory gen --machines {machines} --racks {racks} --masters {masters}`.
version = {FORMAT_VERSION}

[site]
name = "dc1"
domain = "dc1.herd.example"
provisioner = "10.20.0.2"
dns = ["10.20.0.3"]
ntp = ["10.20.0.4"]
ssh_authorized_keys = ["{EXAMPLE_SSH_KEY}"]

# The boot network: machines' bonds carry their internal address here.
[network.internal]
cidr = "10.20.0.0/16"
gateway = "10.20.0.1"
mtu = 9000
pools = [{{ start = "10.20.250.1", end = "10.20.255.254" }}]

# Traffic from outside reaches the masters on a separate NIC.
[network.external]
cidr = "198.51.100.0/24"
gateway = "198.51.100.1"

[roles.master]
description = "etcd member, cluster engine"
etcd = "member"
labels = {{ "herd.io/control-plane" = "true" }}

[roles.worker]
description = "runs units"
etcd = "client"

"#
    );
}

fn machine(out: &mut String, index: usize, rack: usize, slot: usize, master: Option<usize>) {
    // 0c:c4:7a is a server-board vendor OUI; four MACs per machine from a 22-bit machine index.
    let mac = |nic: usize| {
        let n = (index << 2) | nic;
        format!("0c:c4:7a:{:02x}:{:02x}:{:02x}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
    };
    let host = 10 + slot;
    let mode = if rack.is_multiple_of(5) { "active-backup" } else { "802.3ad" };
    let _ = writeln!(out, "[[machines]]");
    let _ = writeln!(out, "name = \"r{rack:02}-m{slot:02}\"");
    let _ = writeln!(out, "role = \"{}\"", if master.is_some() { "master" } else { "worker" });
    let _ = writeln!(out, "rack = \"r{rack:02}\"");
    if master.is_some() {
        let _ = writeln!(out, "macs = [\"{}\", \"{}\", \"{}\"]", mac(0), mac(1), mac(2));
    } else {
        let _ = writeln!(out, "macs = [\"{}\", \"{}\"]", mac(0), mac(1));
    }
    let _ = writeln!(out, "bond = {{ mode = \"{mode}\", members = [\"{}\", \"{}\"] }}", mac(0), mac(1));
    let _ = writeln!(out, "internal = \"10.20.{rack}.{host}\"");
    if let Some(k) = master {
        let _ = writeln!(out, "external = {{ mac = \"{}\", address = \"198.51.100.{}\" }}", mac(2), 11 + k);
    }
    let _ = writeln!(out, "disk = \"{}\"", if master.is_some() { "/dev/sda" } else { "/dev/nvme0n1" });
    let _ = writeln!(out, "bmc = \"10.21.{rack}.{host}\"");
    let hw = HARDWARE[index % HARDWARE.len()];
    if master.is_none() && index % 20 == 7 {
        let _ = writeln!(out, "labels = {{ hardware = \"{hw}\", gpu = \"a100\" }}");
    } else {
        let _ = writeln!(out, "labels = {{ hardware = \"{hw}\" }}");
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EtcdRole;

    #[test]
    fn generated_fleets_pass_check() {
        for spec in [
            FleetSpec { machines: 1, racks: 1, masters: 1 },
            FleetSpec { machines: 3, racks: 1, masters: 3 },
            FleetSpec { machines: 450, racks: 12, masters: 3 },
            FleetSpec { machines: 97, racks: 7, masters: 5 },
        ] {
            let text = generate(spec).unwrap();
            let inv = crate::parse("gen.toml", &text).unwrap_or_else(|d| panic!("{spec:?}:\n{d}"));
            assert_eq!(inv.machines.len(), spec.machines);
            assert_eq!(inv.racks.len(), spec.racks);
            let members: Vec<_> = inv.etcd_members().collect();
            assert_eq!(members.len(), spec.masters);
            assert!(inv.roles.values().any(|r| r.etcd == EtcdRole::Member));
        }
    }

    #[test]
    fn masters_land_on_distinct_racks() {
        let inv =
            crate::parse("gen.toml", &generate(FleetSpec { machines: 450, racks: 12, masters: 5 }).unwrap()).unwrap();
        let mut racks: Vec<_> = inv.etcd_members().map(|m| m.rack.get_ref().clone()).collect();
        racks.dedup();
        assert_eq!(racks.len(), 5);
    }

    #[test]
    fn impossible_specs_are_refused_with_the_way_out() {
        let err = generate(FleetSpec { machines: 5000, racks: 10, masters: 3 }).unwrap_err();
        assert!(err.to_string().contains("--racks 21"), "{err}");
        assert!(generate(FleetSpec { machines: 10, racks: 2, masters: 2 }).is_err());
        assert!(generate(FleetSpec { machines: 0, racks: 1, masters: 1 }).is_err());
        assert!(generate(FleetSpec { machines: 2, racks: 3, masters: 1 }).is_err());
    }
}
