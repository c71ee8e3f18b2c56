//! The etcd key layout: the one place keys are built and parsed (documented in `docs/etcd-schema.md`).
//!
//! Everything lives under `/herd/v1/`. Each agent watches only `schedule/MACHINE/` — its own prefix — so a change
//! to one machine's schedule wakes one agent, not the fleet (fleet's fatal flaw at a few hundred machines).

use std::fmt;

use crate::unit::UnitName;

/// The root of every key.
pub const ROOT: &str = "/herd/v1/";

/// A machine id as used in keys: 1-64 of `a-z 0-9 - _ .`, no `/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineKey(String);

impl MachineKey {
    /// Validates a machine id for use in keys.
    pub fn new(id: &str) -> Option<MachineKey> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        ok.then(|| MachineKey(id.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MachineKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key herd knows, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `units/UNIT`: the unit file and its desired state.
    Unit(UnitName),
    /// `state/MACHINE/UNIT`: the state an agent reports for a unit it runs (machine first, so one etcd permission
    /// covers a machine's states and nobody else's).
    UnitState(UnitName, MachineKey),
    /// `machines/MACHINE`: a registration, attached to the machine's lease.
    Machine(MachineKey),
    /// `schedule/MACHINE/UNIT`: the engine's assignment, with its fencing epoch.
    Schedule(MachineKey, UnitName),
    /// `engine/leader`: the elected engine, attached to its lease.
    EngineLeader,
    /// `engine/epoch`: the fencing epoch, bumped on every leader change.
    EngineEpoch,
    /// `prewarm/IMAGE-ID`: an image every machine pulls before it becomes schedulable.
    Prewarm(String),
    /// `cordon/MACHINE`: the operator took the machine out of scheduling (and maybe drains it).
    Cordon(MachineKey),
    /// `unplaced/UNIT`: why the engine could not place the unit (written by the leader, removed once placed).
    Unplaced(UnitName),
    /// `events/MACHINE/MS`: what the engine saw happen to a machine (registered, suspect, dead, back), at MS ms
    /// since the Unix epoch (zero-padded, so keys sort by time). The leader keeps the last [`EVENTS_KEPT`].
    Event(MachineKey, u64),
    /// `pki/trust`: the etcd CAs the site trusts and the one that issues (written by the provisioner, an admin;
    /// see [`crate::trust`]).
    Trust,
    /// `pki/acks/MACHINE`: what the machine trusts now and which CAs issued its certificates.
    TrustAck(MachineKey),
    /// `pki/restart`: the etcd member restarting its etcd now (one at a time, so the cluster keeps its quorum),
    /// attached to that member's lease.
    RestartTurn,
}

/// How many events the engine keeps per machine.
pub const EVENTS_KEPT: usize = 32;

impl Key {
    /// The full key.
    pub fn path(&self) -> String {
        match self {
            Key::Unit(u) => format!("{ROOT}units/{u}"),
            Key::UnitState(u, m) => format!("{ROOT}state/{m}/{u}"),
            Key::Machine(m) => format!("{ROOT}machines/{m}"),
            Key::Schedule(m, u) => format!("{ROOT}schedule/{m}/{u}"),
            Key::EngineLeader => format!("{ROOT}engine/leader"),
            Key::EngineEpoch => format!("{ROOT}engine/epoch"),
            Key::Prewarm(image) => format!("{ROOT}prewarm/{image}"),
            Key::Cordon(m) => format!("{ROOT}cordon/{m}"),
            Key::Unplaced(u) => format!("{ROOT}unplaced/{u}"),
            Key::Event(m, ms) => format!("{ROOT}events/{m}/{ms:020}"),
            Key::Trust => format!("{ROOT}pki/trust"),
            Key::TrustAck(m) => format!("{ROOT}pki/acks/{m}"),
            Key::RestartTurn => format!("{ROOT}pki/restart"),
        }
    }

    /// Parses a full key; None for anything that is not one of herd's.
    pub fn parse(path: &str) -> Option<Key> {
        let rest = path.strip_prefix(ROOT)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let unit = |s: &str| s.parse::<UnitName>().ok();
        Some(match parts.as_slice() {
            ["units", u] => Key::Unit(unit(u)?),
            ["state", m, u] => Key::UnitState(unit(u)?, MachineKey::new(m)?),
            ["machines", m] => Key::Machine(MachineKey::new(m)?),
            ["schedule", m, u] => Key::Schedule(MachineKey::new(m)?, unit(u)?),
            ["engine", "leader"] => Key::EngineLeader,
            ["engine", "epoch"] => Key::EngineEpoch,
            ["prewarm", image] if !image.is_empty() => Key::Prewarm((*image).to_owned()),
            ["cordon", m] => Key::Cordon(MachineKey::new(m)?),
            ["unplaced", u] => Key::Unplaced(unit(u)?),
            ["events", m, ms] if ms.len() == 20 => Key::Event(MachineKey::new(m)?, ms.parse().ok()?),
            ["pki", "trust"] => Key::Trust,
            ["pki", "acks", m] => Key::TrustAck(MachineKey::new(m)?),
            ["pki", "restart"] => Key::RestartTurn,
            _ => return None,
        })
    }
}

/// The prefix an agent watches: its own schedule (trailing `/`, so `m1` does not see `m10`).
pub fn schedule_prefix(machine: &MachineKey) -> String {
    format!("{ROOT}schedule/{machine}/")
}

/// The prefix of every unit.
pub fn units_prefix() -> String {
    format!("{ROOT}units/")
}

/// The key id of an image reference for `prewarm/` (`/` is escaped, so the id is one path segment).
pub fn image_id(image: &str) -> String {
    image.replace('%', "%25").replace('/', "%2F")
}

/// The prefix of everything under `kind/` (`units`, `state`, `machines`, `schedule`, `prewarm`, `cordon`).
pub fn prefix(kind: &str) -> String {
    format!("{ROOT}{kind}/")
}

/// The prefix of every state one machine reports.
pub fn machine_states_prefix(machine: &MachineKey) -> String {
    format!("{ROOT}state/{machine}/")
}

/// The prefix of one machine's events.
pub fn events_prefix(machine: &MachineKey) -> String {
    format!("{ROOT}events/{machine}/")
}

/// The prefix of every registration.
pub fn machines_prefix() -> String {
    format!("{ROOT}machines/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str) -> MachineKey {
        MachineKey::new(id).unwrap()
    }

    fn u(name: &str) -> UnitName {
        name.parse().unwrap()
    }

    #[test]
    fn every_key_round_trips() {
        for key in [
            Key::Unit(u("web@3.service")),
            Key::UnitState(u("web@3.service"), m("r01-m02")),
            Key::Machine(m("r01-m02")),
            Key::Schedule(m("r01-m02"), u("db.service")),
            Key::EngineLeader,
            Key::EngineEpoch,
            Key::Prewarm(image_id("127.0.0.1:5000/herd/busybox:1")),
            Key::Cordon(m("r01-m02")),
            Key::Unplaced(u("db@2.service")),
            Key::Event(m("r01-m02"), 1_795_000_000_123),
            Key::Trust,
            Key::TrustAck(m("r01-m02")),
            Key::RestartTurn,
        ] {
            assert_eq!(Key::parse(&key.path()), Some(key.clone()), "{}", key.path());
        }
    }

    #[test]
    fn foreign_and_malformed_keys_are_not_ours() {
        for path in [
            "/fleet/units/web.service",
            "/herd/v1/units/web",
            "/herd/v1/schedule/M1/web.service",
            "/herd/v1/schedule/m1/x/web.service",
            "/herd/v1/engine/other",
            "/herd/v1/prewarm/",
            "/herd/v1/events/m1/123",
        ] {
            assert_eq!(Key::parse(path), None, "{path}");
        }
        assert!(MachineKey::new("a/b").is_none());
        assert!(MachineKey::new(&"x".repeat(65)).is_none());
    }

    #[test]
    fn events_sort_by_time_as_keys() {
        let early = Key::Event(m("m1"), 999).path();
        let late = Key::Event(m("m1"), 1_000).path();
        assert!(early < late, "{early} {late}");
        assert!(late.starts_with(&events_prefix(&m("m1"))));
    }

    #[test]
    fn a_machines_schedule_prefix_does_not_cover_another_machine() {
        let p1 = schedule_prefix(&m("m1"));
        assert!(Key::Schedule(m("m1"), u("a.service")).path().starts_with(&p1));
        assert!(!Key::Schedule(m("m10"), u("a.service")).path().starts_with(&p1));
    }
}
