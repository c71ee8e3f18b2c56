//! The herd provisioner: one daemon that answers DHCP (full and proxyDHCP, port 4011), TFTP and HTTP for every
//! machine of the inventory, renders each machine's Ignition config, and records its boot timeline.
//!
//! Done so far: [`ignition`] renders every machine's Ignition 3.3.0 config from the inventory and its role, and
//! [`lint`] checks configs for the foot-guns `ignition-validate` misses. The network services are not implemented
//! yet (issue #8); the `provisioner` binary refuses to run rather than pretend to serve.

pub mod boot;
pub mod cloud_config;
pub mod dhcp;
pub mod ignition;
pub mod lint;
