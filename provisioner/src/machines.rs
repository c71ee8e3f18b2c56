//! Machine state and boot timelines, owned by one task.
//!
//! ```text
//!   unknown ──DHCP seen──► discovered ──install script served──► provisioning ──phone-home "installed"──► installed
//!                                                                   │ (diskless: "healthy")                  │
//!                                                                   └──────────────► running ◄──"healthy"───┘
//!   reprovision (any state) ──► provisioning: the next boot installs again
//! ```
//!
//! The state decides what a machine's iPXE script does: provisioning machines install, installed and running
//! machines boot their installed slot (no install loops). Every step a machine takes (DHCP, TFTP, script, kernel,
//! initramfs, config, phone-homes) is appended to its timeline. State, the current per-boot token and the timeline
//! are persisted in the store; a batch of events costs one commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use std::net::Ipv4Addr;

use herd_images::slot::SlotReport;
use herd_inventory::{Inventory, Mac};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::dhcp::leases::LeaseView;
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// Most timeline entries kept per machine (oldest dropped first).
pub const TIMELINE_LIMIT: usize = 256;

pub use herd_api::{MachineState, TimelineEntry, describe_slots};

/// Why the machines task could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachinesError {
    /// The name is not a machine of the inventory.
    #[error("no machine named {0:?} in the inventory")]
    Unknown(String),
    /// The task is gone (the daemon is shutting down).
    #[error("the machines task stopped")]
    Stopped,
    /// The change could not be made durable; it is not acknowledged.
    #[error("the machine state could not be written to the store: {0}")]
    NotDurable(String),
    /// A join credential was refused (`reason`: `none`, `spent`, `expired`, `wrong`), an approval found no
    /// join awaiting with those keys (`not-awaiting`), or a renewal presented certificates the machine no longer
    /// holds (`superseded`).
    #[error("join credential refused: {0}")]
    JoinRefused(&'static str),
    /// A signed report's sequence is not above the last accepted one's (carried here).
    #[error("a report with a sequence above {0} is expected")]
    Stale(u64),
}

/// How long a join credential is valid after the config carrying it was served.
pub const JOIN_VALIDITY_MS: u64 = 10 * 60 * 1000;

/// What [`Machines::spend_join`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinSpend {
    /// The credential is spent: issue the certificates.
    Spent,
    /// The keys await an admin's approval; the credential is kept.
    Awaiting,
}

const AWAITING: &str = "awaiting";

/// A machine's one-time join credential, as kept: its hash, never the credential.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinTicket {
    /// SHA-256 of the credential, hex.
    pub hash: String,
    /// Valid until (ms since the epoch).
    pub expires_ms: u64,
    /// Spent (a certificate was issued for it).
    pub spent: bool,
}

/// The certificates a machine holds now (issued at its last join or renewal), by fingerprint: only these may be
/// renewed, so a certificate a rejoin replaced (its keys perhaps lost with a disk) ends with its validity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldCerts {
    /// The machine's etcd client certificate.
    pub machine: String,
    /// An etcd member's peer and server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
}

/// What moves a machine from one state to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Its DHCP traffic was seen.
    Seen,
    /// An install script was served (or, diskless, the OS in RAM).
    Install,
    /// node-init said `installed`.
    Installed,
    /// node-init said `healthy`.
    Healthy,
    /// An operator asked for a reinstall.
    Reprovision,
}

/// The state `transition` leads to from `from`, or None when it does not apply there (a machine with a disk is
/// never `running` without having been `installed`; a stray phone-home changes nothing). The event that carried it
/// is recorded either way.
pub fn next_state(from: MachineState, transition: Transition, has_disk: bool) -> Option<MachineState> {
    use MachineState as S;
    match (transition, from) {
        (Transition::Seen, S::Unknown) => Some(S::Discovered),
        (Transition::Seen, _) => None,
        (Transition::Install, S::Installed | S::Running) if has_disk => None,
        (Transition::Install, _) | (Transition::Reprovision, _) => Some(S::Provisioning),
        (Transition::Installed, S::Provisioning) if has_disk => Some(S::Installed),
        (Transition::Installed, _) => None,
        (Transition::Healthy, S::Installed | S::Running) if has_disk => Some(S::Running),
        (Transition::Healthy, S::Provisioning | S::Running) if !has_disk => Some(S::Running),
        (Transition::Healthy, _) => None,
    }
}

/// What the provisioner knows about one machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// Current state.
    pub state: MachineState,
    /// The token of the last iPXE script served (the config fetch must present it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Boot timeline, oldest first.
    #[serde(default)]
    pub timeline: Vec<TimelineEntry>,
    /// The machine's A/B slots as node-init last reported them (installed machines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<SlotReport>,
    /// The join credential of the config served last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join: Option<JoinTicket>,
    /// With `--join approve`: the fingerprint (`herd_pki::requests_fingerprint`) of the keys an admin approved.
    /// It stays: the machine keeps its keys on STATE, so its next boots join without asking again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved: Option<String>,
    /// With `--join approve`: the fingerprint of the keys of the last join waiting for an admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub awaiting: Option<String>,
    /// The certificates issued last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certs: Option<HeldCerts>,
    /// The sequence of the last signed report accepted (`herd_api::Report::seq`): a later one must be above it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub report_seq: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A machine in a listing: its state and its last event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Brief {
    /// Current state.
    pub state: MachineState,
    /// The newest timeline entry.
    pub last: Option<TimelineEntry>,
}

/// How a machine's next boot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMode {
    /// Install (or run diskless from RAM).
    Install,
    /// Boot the installed slot.
    Local,
}

/// Commands to the machines task.
#[derive(Debug)]
pub enum Command {
    /// Record a timeline event (fire and forget).
    Event { machine: String, event: String, detail: String },
    /// An iPXE script is about to be served: issue a fresh token, move to provisioning if not installed, and say
    /// how to boot.
    Script { machine: String, reply: oneshot::Sender<Result<(String, BootMode), MachinesError>> },
    /// Is this the current token of this machine?
    CheckToken { machine: String, token: String, reply: oneshot::Sender<bool> },
    /// A phone-home from node-init; `signed` when it came signed by the machine's key.
    PhoneHome {
        machine: String,
        stage: String,
        detail: String,
        slots: Option<SlotReport>,
        signed: Option<Signed>,
        reply: oneshot::Sender<Result<MachineState, MachinesError>>,
    },
    /// A config is about to be served: make a new one-time join credential (replacing any earlier one).
    IssueJoin { machine: String, reply: oneshot::Sender<Result<String, MachinesError>> },
    /// Spend a join credential: valid, unspent and not expired, it is marked spent (durably) before the reply.
    /// Spend a join credential; with `approval` (the request's key fingerprint, when the site requires approval)
    /// only if an admin approved those keys, else keep it and record the fingerprint as awaiting (`pending`).
    SpendJoin {
        machine: String,
        credential: String,
        approval: Option<String>,
        reply: oneshot::Sender<Result<String, MachinesError>>,
    },
    /// Certificates were issued (`event`: `join` or `renewed`); with `replacing`, only if the machine still holds
    /// those (a renewal), else refused as `superseded`.
    Issued {
        machine: String,
        event: &'static str,
        certs: HeldCerts,
        replacing: Option<HeldCerts>,
        reply: oneshot::Sender<Result<String, MachinesError>>,
    },
    /// An admin (`by`) approves the awaiting join whose keys have `fingerprint`.
    Approve { machine: String, fingerprint: String, by: String, reply: oneshot::Sender<Result<String, MachinesError>> },
    /// Force the next boot to install.
    Reprovision { machine: String, by: String, reply: oneshot::Sender<Result<MachineState, MachinesError>> },
    /// Read one machine.
    Get { machine: String, reply: oneshot::Sender<Option<MachineRecord>> },
    /// Read all machines.
    List { reply: oneshot::Sender<BTreeMap<String, Brief>> },
}

/// Who signed a report: the fingerprint of the certificate it came with, and its sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The certificate's fingerprint: it must be the machine certificate issued last.
    pub fingerprint: String,
    /// `herd_api::Report::seq`.
    pub seq: u64,
}

/// A handle to the machines task.
#[derive(Debug, Clone)]
pub struct Machines {
    tx: mpsc::Sender<Command>,
    metrics: Arc<Metrics>,
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn new_token() -> String {
    let mut bytes = [0u8; 16];
    // The OS random source does not fail on Linux after boot; a zero token would still be refused by the
    // config check, because it is also tied to the MAC and the leased address.
    let _ = getrandom::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Machines {
    /// Starts the machines task over the inventory's machines and their persisted records.
    pub fn start(inv: &Inventory, store: Arc<Store>, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let mut records = store.machines()?;
        for m in &inv.machines {
            records.entry(m.name().to_string()).or_default();
        }
        records.retain(|name, _| inv.machine(name).is_some());
        let disk: HashMap<String, bool> =
            inv.machines.iter().map(|m| (m.name().to_string(), m.disk.is_some())).collect();
        let (tx, rx) = mpsc::channel(4096);
        metrics.describe(
            "herd_machine_events_dropped_total",
            "Timeline events dropped because the machines task was busy.",
        );
        metrics.describe("herd_machine_commits_total", "Durable commits of machine state and timelines.");
        let task = Task { records, disk, store, metrics: Arc::clone(&metrics) };
        tokio::spawn(task.run(rx));
        Ok(Machines { tx, metrics })
    }

    /// Records an event without waiting; dropped (and counted) if the task is saturated.
    pub fn event(&self, machine: &str, event: &str, detail: impl Into<String>) {
        let cmd = Command::Event { machine: machine.to_owned(), event: event.to_owned(), detail: detail.into() };
        if self.tx.try_send(cmd).is_err() {
            self.metrics.inc("herd_machine_events_dropped_total", "");
        }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.ok()?;
        rx.await.ok()
    }

    /// Issues a token for a script and says how the machine boots.
    pub async fn script(&self, machine: &str) -> Result<(String, BootMode), MachinesError> {
        self.ask(|reply| Command::Script { machine: machine.to_owned(), reply })
            .await
            .unwrap_or(Err(MachinesError::Stopped))
    }

    /// Whether `token` is the machine's current token.
    pub async fn check_token(&self, machine: &str, token: &str) -> bool {
        self.ask(|reply| Command::CheckToken { machine: machine.to_owned(), token: token.to_owned(), reply })
            .await
            .unwrap_or(false)
    }

    /// A new join credential for the config about to be served to `machine`.
    pub async fn issue_join(&self, machine: &str) -> Result<String, MachinesError> {
        self.ask(|reply| Command::IssueJoin { machine: machine.to_owned(), reply })
            .await
            .unwrap_or(Err(MachinesError::Stopped))
    }

    /// Spends `credential`: Ok(Spent) once it is durably marked spent; refused if unknown, spent, expired or
    /// wrong. With `approval` (the fingerprint of the request's keys: the site requires approval), spent only if an
    /// admin approved those keys; otherwise Ok(Awaiting), the credential kept and the fingerprint recorded.
    pub async fn spend_join(
        &self,
        machine: &str,
        credential: &str,
        approval: Option<&str>,
    ) -> Result<JoinSpend, MachinesError> {
        let cmd = |reply| Command::SpendJoin {
            machine: machine.to_owned(),
            credential: credential.to_owned(),
            approval: approval.map(str::to_owned),
            reply,
        };
        let said = self.ask(cmd).await.unwrap_or(Err(MachinesError::Stopped))?;
        Ok(if said == AWAITING { JoinSpend::Awaiting } else { JoinSpend::Spent })
    }

    /// Records, durably, that `machine` now holds `certs` (a timeline `event` names them). A renewal passes the
    /// certificates it renews as `replacing`: refused (`superseded`) unless they are still the machine's.
    pub async fn issued(
        &self,
        machine: &str,
        event: &'static str,
        certs: HeldCerts,
        replacing: Option<HeldCerts>,
    ) -> Result<(), MachinesError> {
        let cmd = |reply| Command::Issued { machine: machine.to_owned(), event, certs, replacing, reply };
        self.ask(cmd).await.unwrap_or(Err(MachinesError::Stopped)).map(drop)
    }

    /// Approves `machine`'s awaiting join whose keys have `fingerprint` (`by`: the admin, for the timeline).
    pub async fn approve(&self, machine: &str, fingerprint: &str, by: &str) -> Result<(), MachinesError> {
        let cmd = |reply| Command::Approve {
            machine: machine.to_owned(),
            fingerprint: fingerprint.to_owned(),
            by: by.to_owned(),
            reply,
        };
        self.ask(cmd).await.unwrap_or(Err(MachinesError::Stopped)).map(drop)
    }

    /// Records a phone-home and applies its state transition. A `signed` one is refused unless its certificate is
    /// the machine's (`superseded`) and its sequence above the last one's ([`MachinesError::Stale`]); accepted, it
    /// also spends this boot's token.
    pub async fn phone_home(
        &self,
        machine: &str,
        stage: &str,
        detail: &str,
        slots: Option<SlotReport>,
        signed: Option<Signed>,
    ) -> Result<MachineState, MachinesError> {
        self.ask(|reply| Command::PhoneHome {
            machine: machine.to_owned(),
            stage: stage.to_owned(),
            detail: detail.to_owned(),
            slots,
            signed,
            reply,
        })
        .await
        .unwrap_or(Err(MachinesError::Stopped))
    }

    /// Makes the machine install again on its next boot.
    pub async fn reprovision(&self, machine: &str, by: &str) -> Result<MachineState, MachinesError> {
        self.ask(|reply| Command::Reprovision { machine: machine.to_owned(), by: by.to_owned(), reply })
            .await
            .unwrap_or(Err(MachinesError::Stopped))
    }

    /// One machine's record.
    pub async fn get(&self, machine: &str) -> Option<MachineRecord> {
        self.ask(|reply| Command::Get { machine: machine.to_owned(), reply }).await.flatten()
    }

    /// Every machine's state and last event (not its whole record: the task answers this for a listing of 450
    /// machines without copying 450 timelines while boots wait on it).
    pub async fn list(&self) -> BTreeMap<String, Brief> {
        self.ask(|reply| Command::List { reply }).await.unwrap_or_default()
    }
}

struct Task {
    records: BTreeMap<String, MachineRecord>,
    disk: HashMap<String, bool>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

/// Replies held until the batch they belong to is durable.
enum Pending {
    Script(oneshot::Sender<Result<(String, BootMode), MachinesError>>, Result<(String, BootMode), MachinesError>),
    State(oneshot::Sender<Result<MachineState, MachinesError>>, Result<MachineState, MachinesError>),
    Text(oneshot::Sender<Result<String, MachinesError>>, Result<String, MachinesError>),
}

/// A reply as it goes out: a success only if its batch was written.
fn settle<T>(v: Result<T, MachinesError>, failed: &Option<MachinesError>) -> Result<T, MachinesError> {
    match failed {
        Some(e) if v.is_ok() => Err(e.clone()),
        _ => v,
    }
}

impl Task {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::new();
        while rx.recv_many(&mut batch, 512).await > 0 {
            let mut dirty: Vec<String> = Vec::new();
            let mut pending = Vec::new();
            for cmd in batch.drain(..) {
                self.apply(cmd, &mut dirty, &mut pending);
            }
            dirty.sort();
            dirty.dedup();
            let mut failed = None;
            if !dirty.is_empty() {
                let rows: Vec<(String, MachineRecord)> =
                    dirty.iter().filter_map(|n| self.records.get(n).map(|r| (n.clone(), r.clone()))).collect();
                let store = Arc::clone(&self.store);
                match tokio::task::spawn_blocking(move || store.write_machines(&rows)).await {
                    Ok(Ok(())) => self.metrics.inc("herd_machine_commits_total", ""),
                    Ok(Err(e)) => {
                        let e = crate::report(&e);
                        tracing::error!(error = %e, "cannot persist machine state");
                        failed = Some(MachinesError::NotDurable(e));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "machine persistence task failed");
                        failed = Some(MachinesError::NotDurable(e.to_string()));
                    }
                }
            }
            // A reply says the change is durable: a batch that could not be written is answered with the failure
            // (a token handed out but not stored would be refused after a restart).
            for p in pending {
                match p {
                    Pending::Script(tx, v) => {
                        let _ = tx.send(settle(v, &failed));
                    }
                    Pending::State(tx, v) => {
                        let _ = tx.send(settle(v, &failed));
                    }
                    Pending::Text(tx, v) => {
                        let _ = tx.send(settle(v, &failed));
                    }
                }
            }
        }
    }

    fn push(record: &mut MachineRecord, event: &str, detail: String) {
        record.timeline.push(TimelineEntry { at_ms: now_ms(), event: event.to_owned(), detail });
        if record.timeline.len() > TIMELINE_LIMIT {
            let excess = record.timeline.len() - TIMELINE_LIMIT;
            record.timeline.drain(..excess);
        }
    }

    fn set_state(record: &mut MachineRecord, to: MachineState) {
        if record.state != to {
            let from = record.state;
            record.state = to;
            Self::push(record, "state", format!("{from} -> {to}"));
        }
    }

    /// Applies `t` if it applies from the record's state ([`next_state`]); says so in the timeline when a
    /// phone-home would have moved it and may not.
    fn transition(record: &mut MachineRecord, t: Transition, has_disk: bool) {
        match next_state(record.state, t, has_disk) {
            Some(to) => Self::set_state(record, to),
            None if matches!(t, Transition::Installed | Transition::Healthy) => {
                let detail = format!("{t:?} does not apply to a machine that is {}", record.state).to_lowercase();
                Self::push(record, "state-unchanged", detail);
            }
            None => {}
        }
    }

    fn apply(&mut self, cmd: Command, dirty: &mut Vec<String>, pending: &mut Vec<Pending>) {
        let unknown = |name: &str| MachinesError::Unknown(name.to_owned());
        match cmd {
            Command::Event { machine, event, detail } => {
                if let Some(r) = self.records.get_mut(&machine) {
                    Self::push(r, &event, detail);
                    if event.starts_with("dhcp") {
                        let has_disk = self.disk.get(&machine).copied().unwrap_or(false);
                        Self::transition(r, Transition::Seen, has_disk);
                    }
                    dirty.push(machine);
                }
            }
            Command::Script { machine, reply } => {
                let has_disk = self.disk.get(&machine).copied().unwrap_or(false);
                let result = match self.records.get_mut(&machine) {
                    Some(r) => {
                        let mode = match r.state {
                            MachineState::Installed | MachineState::Running if has_disk => BootMode::Local,
                            _ => BootMode::Install,
                        };
                        if mode == BootMode::Install {
                            Self::transition(r, Transition::Install, has_disk);
                        }
                        let token = new_token();
                        r.token = Some(token.clone());
                        let label = match mode {
                            BootMode::Install => "install",
                            BootMode::Local => "local boot",
                        };
                        Self::push(r, "script", label.to_owned());
                        dirty.push(machine);
                        Ok((token, mode))
                    }
                    None => Err(unknown(&machine)),
                };
                pending.push(Pending::Script(reply, result));
            }
            Command::CheckToken { machine, token, reply } => {
                let ok = self.records.get(&machine).and_then(|r| r.token.as_deref()) == Some(token.as_str());
                let _ = reply.send(ok);
            }
            Command::PhoneHome { machine, stage, detail, slots, signed, reply } => {
                let has_disk = self.disk.get(&machine).copied().unwrap_or(false);
                let held = |r: &MachineRecord, s: &Signed| r.certs.as_ref().is_some_and(|c| c.machine == s.fingerprint);
                let result = match self.records.get_mut(&machine) {
                    Some(r) if signed.as_ref().is_some_and(|s| !held(r, s)) => {
                        Err(MachinesError::JoinRefused("superseded"))
                    }
                    Some(r) if signed.as_ref().is_some_and(|s| s.seq <= r.report_seq) => {
                        Err(MachinesError::Stale(r.report_seq))
                    }
                    Some(r) => {
                        if let Some(s) = signed {
                            r.report_seq = s.seq;
                            r.token = None;
                        }
                        Self::push(r, &format!("phone-home:{stage}"), detail);
                        if let Some(report) = slots {
                            Self::push(r, "slots", describe_slots(&report));
                            r.slots = Some(report);
                        }
                        match stage.as_str() {
                            "installed" => Self::transition(r, Transition::Installed, has_disk),
                            "healthy" => Self::transition(r, Transition::Healthy, has_disk),
                            _ => {}
                        }
                        dirty.push(machine);
                        Ok(r.state)
                    }
                    None => Err(unknown(&machine)),
                };
                pending.push(Pending::State(reply, result));
            }
            Command::IssueJoin { machine, reply } => {
                let result = match self.records.get_mut(&machine) {
                    Some(r) => {
                        let credential = new_token() + &new_token();
                        let hash = herd_api::token_hash(&credential);
                        r.join = Some(JoinTicket { hash, expires_ms: now_ms() + JOIN_VALIDITY_MS, spent: false });
                        dirty.push(machine);
                        Ok(credential)
                    }
                    None => Err(unknown(&machine)),
                };
                pending.push(Pending::Text(reply, result));
            }
            Command::SpendJoin { machine, credential, approval, reply } => {
                let result = match self.records.get_mut(&machine) {
                    Some(r) => match r.join.as_mut() {
                        None => Err(MachinesError::JoinRefused("none")),
                        Some(t) if t.hash != herd_api::token_hash(&credential) => {
                            Err(MachinesError::JoinRefused("wrong"))
                        }
                        Some(t) if t.spent => Err(MachinesError::JoinRefused("spent")),
                        Some(t) if now_ms() >= t.expires_ms => Err(MachinesError::JoinRefused("expired")),
                        Some(_) if approval.is_some() && approval != r.approved => {
                            if r.awaiting != approval {
                                let fp = approval.clone().unwrap_or_default();
                                Self::push(
                                    r,
                                    "join-awaiting",
                                    format!("keys {fp}: herdctl machine approve {machine} FINGERPRINT"),
                                );
                                r.awaiting = approval;
                                dirty.push(machine);
                            }
                            Ok(AWAITING.to_owned())
                        }
                        Some(t) => {
                            t.spent = true;
                            dirty.push(machine);
                            Ok(String::new())
                        }
                    },
                    None => Err(unknown(&machine)),
                };
                pending.push(Pending::Text(reply, result));
            }
            Command::Issued { machine, event, certs, replacing, reply } => {
                let result = match self.records.get_mut(&machine) {
                    Some(r) if replacing.is_some() && r.certs != replacing => {
                        Err(MachinesError::JoinRefused("superseded"))
                    }
                    Some(r) => {
                        let mut detail = format!("machine:{machine} {}", certs.machine);
                        if let Some(m) = &certs.member {
                            detail.push_str(&format!(", member:{machine} {m}"));
                        }
                        Self::push(r, event, detail);
                        r.certs = Some(certs);
                        if replacing.is_none() {
                            // Joined: this boot's token is spent; the boot reports signed from now on.
                            r.token = None;
                        }
                        dirty.push(machine);
                        Ok(String::new())
                    }
                    None => Err(unknown(&machine)),
                };
                pending.push(Pending::Text(reply, result));
            }
            Command::Approve { machine, fingerprint, by, reply } => {
                let result = match self.records.get_mut(&machine) {
                    Some(r) if r.awaiting.as_deref() == Some(fingerprint.as_str()) => {
                        Self::push(r, "join-approved", format!("keys {fingerprint}, by {by}"));
                        r.approved = r.awaiting.take();
                        dirty.push(machine);
                        Ok(String::new())
                    }
                    Some(_) => Err(MachinesError::JoinRefused("not-awaiting")),
                    None => Err(unknown(&machine)),
                };
                pending.push(Pending::Text(reply, result));
            }
            Command::Reprovision { machine, by, reply } => {
                let result = match self.records.get_mut(&machine) {
                    Some(r) => {
                        Self::push(r, "reprovision", format!("requested by {by}"));
                        let has_disk = self.disk.get(&machine).copied().unwrap_or(false);
                        Self::transition(r, Transition::Reprovision, has_disk);
                        dirty.push(machine);
                        Ok(r.state)
                    }
                    None => Err(unknown(&machine)),
                };
                pending.push(Pending::State(reply, result));
            }
            Command::Get { machine, reply } => {
                let _ = reply.send(self.records.get(&machine).cloned());
            }
            Command::List { reply } => {
                let brief = self
                    .records
                    .iter()
                    .map(|(name, r)| (name.clone(), Brief { state: r.state, last: r.timeline.last().cloned() }))
                    .collect();
                let _ = reply.send(brief);
            }
        }
    }
}

/// The timeline event for fetching a boot asset (`vmlinuz` → `kernel`, `initramfs`), if it is one (also from an
/// image kept by root hash, `images/HASH/vmlinuz`).
pub fn asset_event(path: &str) -> Option<&'static str> {
    match path.rsplit('/').next().unwrap_or(path) {
        "vmlinuz" => Some("kernel"),
        "initramfs" => Some("initramfs"),
        _ => None,
    }
}

/// Records timeline events for whichever machine holds an address: TFTP and HTTP see addresses, not MACs.
#[derive(Debug, Clone)]
pub struct ByAddress {
    /// The machines task.
    pub machines: Machines,
    /// Bound leases.
    pub leases: Arc<LeaseView>,
    /// Every MAC of the inventory → its machine.
    pub macs: Arc<HashMap<Mac, String>>,
}

impl ByAddress {
    /// A recorder over the inventory's MACs.
    pub fn new(inv: &Inventory, machines: Machines, leases: Arc<LeaseView>) -> Self {
        ByAddress { machines, leases, macs: Arc::new(mac_index(inv)) }
    }

    /// The machine holding `ip`.
    pub fn machine_at(&self, ip: Ipv4Addr) -> Option<&str> {
        self.leases.holder(ip).and_then(|mac| self.macs.get(&mac)).map(String::as_str)
    }

    /// Appends `event` to the timeline of the machine holding `ip`, if any.
    pub fn event(&self, ip: Ipv4Addr, event: &str, detail: impl Into<String>) {
        if let Some(name) = self.machine_at(ip) {
            self.machines.event(name, event, detail);
        }
    }
}

/// Maps every MAC of the inventory to its machine's name.
pub fn mac_index(inv: &Inventory) -> HashMap<Mac, String> {
    inv.machines.iter().flat_map(|m| m.macs().map(move |mac| (mac, m.name().to_string()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineState as S;

    #[test]
    fn each_transition_applies_only_from_its_states() {
        // A machine with a disk.
        assert_eq!(next_state(S::Unknown, Transition::Seen, true), Some(S::Discovered));
        assert_eq!(next_state(S::Running, Transition::Seen, true), None, "DHCP of a running machine moves nothing");
        assert_eq!(next_state(S::Discovered, Transition::Install, true), Some(S::Provisioning));
        assert_eq!(next_state(S::Installed, Transition::Install, true), None, "installed machines boot locally");
        assert_eq!(next_state(S::Provisioning, Transition::Installed, true), Some(S::Installed));
        assert_eq!(next_state(S::Discovered, Transition::Installed, true), None, "no install script was served");
        assert_eq!(next_state(S::Installed, Transition::Healthy, true), Some(S::Running));
        assert_eq!(next_state(S::Provisioning, Transition::Healthy, true), None, "healthy before installed");
        assert_eq!(next_state(S::Discovered, Transition::Healthy, true), None);
        // Diskless: the OS runs from RAM, there is no install.
        assert_eq!(next_state(S::Provisioning, Transition::Installed, false), None);
        assert_eq!(next_state(S::Provisioning, Transition::Healthy, false), Some(S::Running));
        assert_eq!(next_state(S::Running, Transition::Install, false), Some(S::Provisioning), "every boot loads it");
        assert_eq!(next_state(S::Unknown, Transition::Healthy, false), None);
        for from in [S::Unknown, S::Discovered, S::Provisioning, S::Installed, S::Running] {
            for disk in [true, false] {
                assert_eq!(next_state(from, Transition::Reprovision, disk), Some(S::Provisioning));
            }
        }
    }

    fn transition() -> impl proptest::strategy::Strategy<Value = Transition> {
        proptest::prop_oneof![
            proptest::strategy::Just(Transition::Seen),
            proptest::strategy::Just(Transition::Install),
            proptest::strategy::Just(Transition::Installed),
            proptest::strategy::Just(Transition::Healthy),
            proptest::strategy::Just(Transition::Reprovision),
        ]
    }

    proptest::proptest! {
        #[test]
        fn no_sequence_runs_a_disk_machine_that_was_not_installed(
            events in proptest::collection::vec(transition(), 0..64),
            has_disk in proptest::bool::ANY,
        ) {
            let mut state = S::Unknown;
            // Since the last time the machine was made to install: did it say `installed`?
            let mut installed = false;
            for t in events {
                let before = state;
                if let Some(to) = next_state(state, t, has_disk) {
                    state = to;
                }
                match t {
                    Transition::Reprovision => {
                        proptest::prop_assert_eq!(state, S::Provisioning);
                        installed = false;
                    }
                    Transition::Install if state == S::Provisioning => installed = false,
                    Transition::Installed if state == S::Installed => installed = true,
                    _ => {}
                }
                if has_disk && state == S::Running {
                    proptest::prop_assert!(installed, "running without installed (from {:?} by {:?})", before, t);
                }
                if !has_disk {
                    proptest::prop_assert_ne!(state, S::Installed, "a diskless machine has nothing installed");
                }
            }
        }
    }
}
