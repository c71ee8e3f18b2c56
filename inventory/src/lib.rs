//! The herd inventory: the one file in which a datacenter admin describes every server.
//!
//! The inventory is versioned TOML (`version = 1`): `[site]` defaults, `[network.internal]` (the boot network,
//! with DHCP pools) and an optional `[network.external]`, `[roles.NAME]` profiles (etcd member or client, labels,
//! kernel arguments), `[racks.NAME]`, and `[[machines]]` (name, MACs with the boot NIC first, bond, internal and
//! external addresses, role, rack, install disk, BMC, labels). Every other herd program reads it through this
//! crate; nobody re-parses it.
//!
//! [`parse`] reports **every** problem at once as `FILE:LINE:COL: rule: message` ([`Diagnostic`]): syntax,
//! unknown keys and malformed values per entry (one bad machine does not hide the next), then the cross-field rules
//! of [`validate`]. [`diff`] compares two inventories as the plan an admin reviews; [`generate`] makes realistic
//! fleets for tests and benchmarks.
//!
//! Limits: IPv4 only; two networks (internal, external); a machine has one bond.

mod diag;
pub mod diff;
pub mod generate;
mod model;
mod parse;
mod types;
pub mod validate;

pub use diag::{Diagnostic, Diagnostics, Rule};
pub use diff::{InventoryDiff, diff};
pub use generate::{FleetSpec, GenError, generate};
pub use model::{
    Addressing, Bond, BondMode, BondSetting, EtcdRole, External, FORMAT_VERSION, Inventory, Labels, Machine, Network,
    Networks, Pool, Rack, Role, RoleFile, Site, Spanned,
};
pub use parse::{LoadError, load, parse, parse_in};
pub use types::{Address, Cidr, DevicePath, DomainName, Hostname, KernelArg, LabelKey, Mac, Name, ValueError};
