//! The herd provisioner: one daemon that answers DHCP (full and proxyDHCP, port 4011), TFTP and HTTP for every
//! machine of the inventory, renders each machine's Ignition config, and records its boot timeline.
//!
//! Not implemented yet (issue #8); the crate exists so the workspace has its final shape. The `provisioner`
//! binary refuses to run rather than pretend to serve.
