//! The herd cluster: fleet-style units (systemd units with `[X-Fleet]`, plus `[Container]` units), the etcd schema,
//! the engine that places units and the agent that runs them.
//!
//! [`unit`](mod@unit) is the unit format; [`plan`] the engine's pure planner; [`schema`] and [`record`] the etcd
//! keys and values (docs/etcd-schema.md); [`store`] the etcd connection; [`engine`] and [`agent`] the two daemons'
//! logic; [`exec`], [`systemd`] and [`docker`] the executors; and [`client`] what herdctl does. What
//! runs a cluster on one machine for tests, benchmarks and the demo (a local etcd, dockerd and registry, hollow
//! machines) is `herd-lab`, which ships in herdctl, not on the nodes.

pub mod access;
pub mod agent;
pub mod client;
pub mod docker;
pub mod engine;
pub mod exec;
pub mod plan;
pub mod record;
pub mod schema;
pub mod store;
pub mod systemd;
pub mod trust;
pub mod unit;
