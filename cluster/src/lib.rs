//! The herd cluster: fleet-style units (systemd units with `[X-Fleet]`, plus `[Container]` units), the etcd schema,
//! the engine that places units, the agent that runs them, and the rolling-upgrade orchestrator.
//!
//! Not implemented yet (issue #6); `herdctl` (in `cluster/herdctl`) is the admin CLI over this crate.
