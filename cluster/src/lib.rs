//! The herd cluster: fleet-style units (systemd units with `[X-Fleet]`, plus `[Container]` units), the etcd schema,
//! the engine that places units and the agent that runs them.
//!
//! [`unit`](mod@unit) is the unit format; [`plan`] the engine's pure planner; [`schema`] and [`record`] the etcd
//! keys and values (docs/etcd-schema.md); [`store`] the etcd connection; [`engine`] and [`agent`] the two daemons'
//! logic; [`exec`], [`systemd`] and [`docker`] the executors; [`client`] what herdctl does; [`local`] a real local
//! etcd for tests and benches; [`bench`](mod@bench) the hollow-machine benchmarks.

pub mod agent;
pub mod bench;
pub mod client;
pub mod docker;
pub mod engine;
pub mod exec;
pub mod local;
pub mod plan;
pub mod record;
pub mod schema;
pub mod store;
pub mod systemd;
pub mod unit;
