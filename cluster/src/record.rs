//! The values stored under the keys of [`schema`](crate::schema): JSON documents, one type per key kind.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What the operator wants of a unit (fleet's target states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Submitted: stored, placed nowhere.
    Inactive,
    /// Placed on a machine, its unit file installed, not running.
    Loaded,
    /// Placed and running.
    Launched,
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Desired::Inactive => "inactive",
            Desired::Loaded => "loaded",
            Desired::Launched => "launched",
        })
    }
}

/// `units/UNIT`: the unit file and its desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitRecord {
    /// The unit file as submitted.
    pub text: String,
    /// The target state.
    pub desired: Desired,
}

/// `machines/MACHINE`: a registration, attached to the machine's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MachineRecord {
    /// Machine id (the key).
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// The address herdctl reaches the machine at over SSH.
    #[serde(default)]
    pub address: Option<String>,
    /// Labels, for `MachineMetadata` (the inventory's labels plus `hostname`, `rack`, `role`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Rack, for spreading.
    #[serde(default)]
    pub rack: Option<String>,
    /// CPU capacity offered to units, millicores.
    pub cpu_millis: u64,
    /// Memory capacity offered to units, bytes.
    pub memory: u64,
    /// A random token of this registration's agent instance: a second agent claiming the same id with another
    /// token is refused (fleet let cloned images share machine ids).
    pub instance: String,
    /// Capacity reserved per role: only units with that `Role=` may use it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reserved: BTreeMap<String, Reservation>,
    /// OS version the machine runs.
    #[serde(default)]
    pub version: Option<String>,
    /// Registration time, ms since the Unix epoch.
    pub since_ms: u64,
}

/// Capacity set aside for one role on a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reservation {
    /// Millicores.
    #[serde(default)]
    pub cpu_millis: u64,
    /// Bytes.
    #[serde(default)]
    pub memory: u64,
}

/// `schedule/MACHINE/UNIT`: the engine's assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleEntry {
    /// Fencing epoch of the engine leader that wrote it.
    pub epoch: u64,
    /// Loaded or launched.
    pub desired: Desired,
    /// The unit file (so an agent needs nothing but its own prefix).
    pub text: String,
}

/// A unit's state on a machine, as its agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActiveState {
    /// Pulling the image or installing the unit.
    Preparing,
    /// Installed, not running.
    Loaded,
    /// Running.
    Active,
    /// Exited with an error or could not start.
    Failed,
    /// Stopped.
    Inactive,
}

impl fmt::Display for ActiveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActiveState::Preparing => "preparing",
            ActiveState::Loaded => "loaded",
            ActiveState::Active => "active",
            ActiveState::Failed => "failed",
            ActiveState::Inactive => "inactive",
        })
    }
}

/// `state/UNIT/MACHINE`: what the agent reports, attached to its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    /// The state.
    pub state: ActiveState,
    /// The epoch of the schedule entry acted on.
    pub epoch: u64,
    /// When the state was entered, ms since the Unix epoch.
    pub since_ms: u64,
    /// Why, for failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `cordon/MACHINE`: the operator took the machine out of scheduling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CordonRecord {
    /// Also move its units away (drain), not only stop placing new ones.
    pub drain: bool,
    /// Since, ms since the Unix epoch.
    pub since_ms: u64,
}

/// `events/MACHINE/MS`: something the engine saw happen to a machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineEvent {
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
    /// `registered`, `suspect` (its registration is gone), `dead` (the grace ran out: its units move), `back`
    /// (registered again while suspect).
    pub event: String,
    /// More about it.
    pub detail: String,
}

/// `prewarm/IMAGE`: an image every machine pulls before it becomes schedulable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrewarmRecord {
    /// The image reference.
    pub image: String,
}

/// `unplaced/UNIT`: why the engine placed a unit nowhere.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnplacedRecord {
    /// One line for tables: each kind of refusal with how many machines gave it (`not enough CPU on 3 of 3
    /// machines`).
    pub summary: String,
    /// Each machine's reason, for the first [`UnplacedRecord::MACHINES`] machines.
    pub machines: Vec<Refused>,
    /// How many more machines refused it (left out of `machines`).
    #[serde(default)]
    pub more: usize,
}

impl UnplacedRecord {
    /// How many machines' reasons the record keeps.
    pub const MACHINES: usize = 10;
}

/// One machine's reason for not taking a unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// The machine.
    pub machine: String,
    /// Why (`not enough CPU (open capacity; ...)`, `conflicts with db@1.service`).
    pub reason: String,
}

impl fmt::Display for UnplacedRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)?;
        for r in &self.machines {
            write!(f, "; {}: {}", r.machine, r.reason)?;
        }
        if self.more > 0 {
            write!(f, "; {} more", self.more)?;
        }
        Ok(())
    }
}

/// Now, in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Decodes a stored value; None for anything that is not valid JSON of `T` (logged by callers).
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

/// Encodes a value to store.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}
