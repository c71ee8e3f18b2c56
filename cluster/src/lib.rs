//! The herd cluster: fleet-style units (systemd units with `[X-Fleet]`, plus `[Container]` units), the etcd schema,
//! the engine that places units, the agent that runs them, and the rolling-upgrade orchestrator.
//!
//! Done so far: [`unit`](mod@unit), the unit format (names, parsing, placement options, container sections, template
//! specifiers, metadata and conflict semantics), [`plan`], the engine's pure planner (snapshot in, placements
//! out), and [`schema`], the etcd key layout. The executor, the agent and herdctl's unit commands are issue #6's
//! remaining work.

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
