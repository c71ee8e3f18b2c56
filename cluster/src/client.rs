//! What herdctl does to the cluster: submit and target units, read units and machines, cordon and drain, the
//! pre-warm list, and waiting (bounded) for units to reach their target.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use serde::Serialize;

use crate::record::{
    self, ActiveState, CordonRecord, Desired, MachineRecord, PrewarmRecord, ScheduleEntry, StateRecord, UnitRecord,
};
use crate::schema::{self, Key, MachineKey};
use crate::store::{Store, StoreError};
use crate::unit::{Unit, UnitError, UnitName};

/// A refused or failed request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The unit is invalid.
    #[error(transparent)]
    Unit(#[from] UnitError),
    /// Submitting a different file under an existing name.
    #[error("{0} already exists with a different unit file; pass --replace to replace it")]
    Exists(UnitName),
    /// No such unit (and no template to instantiate it from).
    #[error("unit {0} not found; submit it first (herdctl submit FILE)")]
    NoUnit(String),
    /// No such machine.
    #[error("machine {0} is not registered; see herdctl list-machines")]
    NoMachine(String),
    /// Templates are not run themselves.
    #[error("{0} is a template; start an instance of it, e.g. {1}")]
    Template(UnitName, String),
    /// A unit being launched failed on a machine.
    #[error("{unit} failed on {machine}: {detail}; see herdctl status {unit}")]
    Failed {
        /// The unit.
        unit: String,
        /// Where.
        machine: String,
        /// What its agent reported.
        detail: String,
    },
    /// Waiting ran out of time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// How long we waited.
        after: Duration,
        /// What was not reached.
        what: String,
    },
}

/// A unit with where it is scheduled and what its agents report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UnitStatus {
    /// The name.
    pub name: String,
    /// The target state.
    pub desired: Desired,
    /// The unit file.
    #[serde(skip)]
    pub text: String,
    /// Machines it is scheduled on, with the state reported there (None: nothing reported yet).
    pub machines: Vec<Placed>,
    /// Why the engine could not place it (none when placed or not asked to run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unplaced: Option<record::UnplacedRecord>,
}

/// A unit on one machine.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Placed {
    /// Machine id.
    pub machine: String,
    /// Reported state.
    pub state: Option<ActiveState>,
    /// Why, for failures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Since (ms since the Unix epoch).
    pub since_ms: Option<u64>,
}

/// A machine with its cordon and how many units it runs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MachineStatus {
    /// The registration.
    #[serde(flatten)]
    pub record: MachineRecord,
    /// Cordoned or draining.
    pub cordon: Option<CordonRecord>,
    /// Units scheduled there.
    pub units: usize,
    /// Whether the engine instance leading the cluster runs on this machine (its id is the leader key's value).
    pub engine_leader: bool,
}

/// herdctl's handle on the cluster.
#[derive(Debug, Clone)]
pub struct ClusterClient {
    store: Store,
}

impl ClusterClient {
    /// A client over `store`.
    pub fn new(store: Store) -> ClusterClient {
        ClusterClient { store }
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Submits a unit file (desired state inactive, or left as it was). The same file again is a no-op; a different
    /// file needs `replace` (its desired state is kept, so a running unit is restarted with the new file).
    pub async fn submit(&self, name: &str, text: &str, replace: bool) -> Result<(), ClientError> {
        let unit = Unit::parse(name, text)?;
        let key = Key::Unit(unit.name.clone()).path();
        let existing = self.store.get(&key).await?;
        let desired = match existing.as_ref().and_then(|kv| record::decode::<UnitRecord>(kv.value())) {
            Some(old) if old.text == text => return Ok(()),
            Some(_) if !replace => return Err(ClientError::Exists(unit.name)),
            Some(old) => old.desired,
            None => Desired::Inactive,
        };
        let guard = match &existing {
            Some(kv) => Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
            None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
        };
        let value = record::encode(&UnitRecord { text: text.to_owned(), desired });
        let txn = Txn::new().when([guard]).and_then([TxnOp::put(key, value, None)]);
        if !self.store.txn(txn).await?.succeeded() {
            // Changed under us, or an earlier attempt of this very write landed before its answer was lost: look
            // again (our own text is a success, another one a conflict or a replace).
            return Box::pin(self.submit(name, text, replace)).await;
        }
        Ok(())
    }

    /// Sets a unit's target state. An instance not submitted yet is created from its template (`web@3.service`
    /// from `web@.service`), as fleet does.
    pub async fn set_desired(&self, name: &str, desired: Desired) -> Result<(), ClientError> {
        let unit: UnitName = name.parse()?;
        if unit.is_template() {
            return Err(ClientError::Template(unit.clone(), format!("{}@1.{}", unit.prefix(), unit.unit_type())));
        }
        let key = Key::Unit(unit.clone()).path();
        let (text, guard) = match self.store.get(&key).await? {
            Some(kv) => {
                let rec = record::decode::<UnitRecord>(kv.value()).ok_or_else(|| ClientError::NoUnit(name.into()))?;
                if rec.desired == desired {
                    return Ok(());
                }
                (rec.text, Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()))
            }
            None => {
                let template = unit.template().ok_or_else(|| ClientError::NoUnit(name.into()))?;
                let kv = self
                    .store
                    .get(&Key::Unit(template).path())
                    .await?
                    .ok_or_else(|| ClientError::NoUnit(name.into()))?;
                let rec = record::decode::<UnitRecord>(kv.value()).ok_or_else(|| ClientError::NoUnit(name.into()))?;
                Unit::parse(name, &rec.text)?;
                (rec.text, Compare::create_revision(key.as_str(), CompareOp::Equal, 0))
            }
        };
        let value = record::encode(&UnitRecord { text, desired });
        let txn = Txn::new().when([guard]).and_then([TxnOp::put(key, value, None)]);
        if !self.store.txn(txn).await?.succeeded() {
            // Changed under us: try again on the new version.
            return Box::pin(self.set_desired(name, desired)).await;
        }
        Ok(())
    }

    /// Removes a unit (it stops and is unloaded wherever it runs). Ok(false) if there was none.
    pub async fn destroy(&self, name: &str) -> Result<bool, ClientError> {
        let unit: UnitName = name.parse()?;
        Ok(self.store.delete(&Key::Unit(unit).path()).await?)
    }

    /// A unit's file.
    pub async fn cat(&self, name: &str) -> Result<String, ClientError> {
        let unit: UnitName = name.parse()?;
        let kv = self.store.get(&Key::Unit(unit).path()).await?.ok_or_else(|| ClientError::NoUnit(name.into()))?;
        Ok(record::decode::<UnitRecord>(kv.value()).ok_or_else(|| ClientError::NoUnit(name.into()))?.text)
    }

    /// Every unit, with its placements and reported states, by name.
    pub async fn units(&self) -> Result<Vec<UnitStatus>, ClientError> {
        let (units, _) = self.store.get_prefix(&schema::prefix("units")).await?;
        let (schedule, _) = self.store.get_prefix(&schema::prefix("schedule")).await?;
        let (states, _) = self.store.get_prefix(&schema::prefix("state")).await?;
        let (unplaced, _) = self.store.get_prefix(&schema::prefix("unplaced")).await?;
        let mut by_unit: BTreeMap<UnitName, UnitStatus> = BTreeMap::new();
        for kv in &units {
            if let (Some(Key::Unit(name)), Some(rec)) =
                (kv.key_str().ok().and_then(Key::parse), record::decode::<UnitRecord>(kv.value()))
            {
                by_unit.insert(
                    name.clone(),
                    UnitStatus {
                        name: name.to_string(),
                        desired: rec.desired,
                        text: rec.text,
                        machines: Vec::new(),
                        unplaced: None,
                    },
                );
            }
        }
        for kv in &unplaced {
            if let Some(Key::Unplaced(name)) = kv.key_str().ok().and_then(Key::parse)
                && let Some(status) = by_unit.get_mut(&name)
                && status.desired != Desired::Inactive
            {
                status.unplaced = Some(record::decode(kv.value()).unwrap_or_else(|| record::UnplacedRecord {
                    // A reason written by an older engine: plain text.
                    summary: String::from_utf8_lossy(kv.value()).into_owned(),
                    ..record::UnplacedRecord::default()
                }));
            }
        }
        let mut reported: BTreeMap<(UnitName, String), StateRecord> = BTreeMap::new();
        for kv in &states {
            if let (Some(Key::UnitState(u, m)), Some(s)) =
                (kv.key_str().ok().and_then(Key::parse), record::decode::<StateRecord>(kv.value()))
            {
                reported.insert((u, m.to_string()), s);
            }
        }
        for kv in &schedule {
            if let (Some(Key::Schedule(m, u)), Some(_)) =
                (kv.key_str().ok().and_then(Key::parse), record::decode::<ScheduleEntry>(kv.value()))
                && let Some(status) = by_unit.get_mut(&u)
            {
                let s = reported.get(&(u.clone(), m.to_string()));
                status.machines.push(Placed {
                    machine: m.to_string(),
                    state: s.map(|s| s.state),
                    detail: s.and_then(|s| s.detail.clone()),
                    since_ms: s.map(|s| s.since_ms),
                });
            }
        }
        Ok(by_unit.into_values().collect())
    }

    /// Every registered machine, by id.
    pub async fn machines(&self) -> Result<Vec<MachineStatus>, ClientError> {
        let (machines, _) = self.store.get_prefix(&schema::prefix("machines")).await?;
        let (cordons, _) = self.store.get_prefix(&schema::prefix("cordon")).await?;
        let (schedule, _) = self.store.get_prefix(&schema::prefix("schedule")).await?;
        let leader = self.store.get(&Key::EngineLeader.path()).await?;
        let leader = leader.map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for kv in &schedule {
            if let Some(Key::Schedule(m, _)) = kv.key_str().ok().and_then(Key::parse) {
                *counts.entry(m.to_string()).or_default() += 1;
            }
        }
        let cordons: BTreeMap<String, CordonRecord> = cordons
            .iter()
            .filter_map(|kv| match kv.key_str().ok().and_then(Key::parse) {
                Some(Key::Cordon(m)) => Some((m.to_string(), record::decode(kv.value())?)),
                _ => None,
            })
            .collect();
        Ok(machines
            .iter()
            .filter_map(|kv| record::decode::<MachineRecord>(kv.value()))
            .map(|record| MachineStatus {
                cordon: cordons.get(&record.id).cloned(),
                units: counts.get(&record.id).copied().unwrap_or(0),
                engine_leader: leader.as_deref() == Some(record.id.as_str()),
                record,
            })
            .collect())
    }

    /// Cordons a machine (nothing new lands there); with `drain`, its units also move away.
    pub async fn cordon(&self, machine: &str, drain: bool) -> Result<(), ClientError> {
        let key = MachineKey::new(machine).ok_or_else(|| ClientError::NoMachine(machine.into()))?;
        if self.store.get(&Key::Machine(key.clone()).path()).await?.is_none() {
            return Err(ClientError::NoMachine(machine.into()));
        }
        let rec = CordonRecord { drain, since_ms: record::now_ms() };
        self.store.put(&Key::Cordon(key).path(), record::encode(&rec), None).await?;
        Ok(())
    }

    /// Makes a machine schedulable again.
    pub async fn uncordon(&self, machine: &str) -> Result<bool, ClientError> {
        let key = MachineKey::new(machine).ok_or_else(|| ClientError::NoMachine(machine.into()))?;
        Ok(self.store.delete(&Key::Cordon(key).path()).await?)
    }

    /// What the engine saw happen to a machine (registered, suspect, dead, back), oldest first.
    pub async fn machine_events(&self, machine: &str) -> Result<Vec<record::MachineEvent>, ClientError> {
        let key = MachineKey::new(machine).ok_or_else(|| ClientError::NoMachine(machine.into()))?;
        let (kvs, _) = self.store.get_prefix(&schema::events_prefix(&key)).await?;
        Ok(kvs.iter().filter_map(|kv| record::decode(kv.value())).collect())
    }

    /// Adds an image to the cluster-wide pre-warm list.
    pub async fn prewarm_add(&self, image: &str) -> Result<(), ClientError> {
        let key = Key::Prewarm(schema::image_id(image)).path();
        self.store.put(&key, record::encode(&PrewarmRecord { image: image.to_owned() }), None).await?;
        Ok(())
    }

    /// Removes an image from the pre-warm list.
    pub async fn prewarm_remove(&self, image: &str) -> Result<bool, ClientError> {
        Ok(self.store.delete(&Key::Prewarm(schema::image_id(image)).path()).await?)
    }

    /// The pre-warm list.
    pub async fn prewarm_list(&self) -> Result<Vec<String>, ClientError> {
        let (kvs, _) = self.store.get_prefix(&schema::prefix("prewarm")).await?;
        Ok(kvs.iter().filter_map(|kv| record::decode::<PrewarmRecord>(kv.value())).map(|p| p.image).collect())
    }

    /// Waits (polling, bounded by `within`) until every unit in `names` has reached `target`: launched = active
    /// wherever scheduled; loaded = loaded wherever scheduled; inactive = scheduled nowhere; and a destroyed unit
    /// (`None`) is gone with no state left.
    pub async fn wait(&self, names: &[String], target: Option<Desired>, within: Duration) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let units = self.units().await?;
            let pending: Vec<&String> = names
                .iter()
                .filter(|n| {
                    let u = units.iter().find(|u| &u.name == *n);
                    !reached(u, target)
                })
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            // Launching: a failure reported by an agent ends the wait (it would not go away by waiting).
            if target == Some(Desired::Launched) {
                let failed = units.iter().filter(|u| pending.contains(&&u.name)).find_map(|u| {
                    let p = u.machines.iter().find(|p| p.state == Some(ActiveState::Failed))?;
                    Some((u.name.clone(), p.machine.clone(), p.detail.clone().unwrap_or_default()))
                });
                if let Some((unit, machine, detail)) = failed {
                    return Err(ClientError::Failed { unit, machine, detail });
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let what = pending.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
                let to = target.map_or("destroyed".to_owned(), |t| t.to_string());
                return Err(ClientError::Timeout { after: within, what: format!("{what} to be {to}") });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether a unit has reached `target`.
pub fn reached(unit: Option<&UnitStatus>, target: Option<Desired>) -> bool {
    match (unit, target) {
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(u), Some(Desired::Inactive)) => u.machines.is_empty(),
        (Some(u), Some(Desired::Loaded)) => {
            !u.machines.is_empty() && u.machines.iter().all(|p| p.state == Some(ActiveState::Loaded))
        }
        (Some(u), Some(Desired::Launched)) => {
            !u.machines.is_empty() && u.machines.iter().all(|p| p.state == Some(ActiveState::Active))
        }
    }
}
