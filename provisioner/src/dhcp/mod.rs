//! DHCPv4 for the boot network: full server (reservations from the inventory, dynamic pools) or proxyDHCP, plus
//! the PXE boot-server port 4011. [`server`] is the logic, [`wire`] the packet edge, [`leases`] the table.

pub mod leases;
pub mod server;
pub mod service;
pub mod wire;
