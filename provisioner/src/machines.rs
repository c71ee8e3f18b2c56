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
use std::fmt;
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

/// Where a machine is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    /// In the inventory, never seen on the network.
    #[default]
    Unknown,
    /// Seen (DHCP), not yet booting herd.
    Discovered,
    /// Booting the installer (or, diskless, the OS in RAM).
    Provisioning,
    /// Installed to disk; boots its slot.
    Installed,
    /// Up and healthy.
    Running,
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MachineState::Unknown => "unknown",
            MachineState::Discovered => "discovered",
            MachineState::Provisioning => "provisioning",
            MachineState::Installed => "installed",
            MachineState::Running => "running",
        })
    }
}

/// One step in a machine's boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// What happened: `dhcp-offer`, `dhcp-ack`, `tftp`, `script`, `kernel`, `initramfs`, `config`,
    /// `phone-home:STAGE`, `state`, `config-refused`.
    pub event: String,
    /// Details (address, file, stage message, new state).
    pub detail: String,
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
    Script { machine: String, reply: oneshot::Sender<Result<(String, BootMode), String>> },
    /// Is this the current token of this machine?
    CheckToken { machine: String, token: String, reply: oneshot::Sender<bool> },
    /// A phone-home from node-init.
    PhoneHome {
        machine: String,
        stage: String,
        detail: String,
        slots: Option<SlotReport>,
        reply: oneshot::Sender<Result<MachineState, String>>,
    },
    /// Force the next boot to install.
    Reprovision { machine: String, reply: oneshot::Sender<Result<MachineState, String>> },
    /// Read one machine.
    Get { machine: String, reply: oneshot::Sender<Option<MachineRecord>> },
    /// Read all machines.
    List { reply: oneshot::Sender<BTreeMap<String, MachineRecord>> },
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
    pub async fn script(&self, machine: &str) -> Result<(String, BootMode), String> {
        self.ask(|reply| Command::Script { machine: machine.to_owned(), reply })
            .await
            .unwrap_or_else(|| Err("machines task stopped".into()))
    }

    /// Whether `token` is the machine's current token.
    pub async fn check_token(&self, machine: &str, token: &str) -> bool {
        self.ask(|reply| Command::CheckToken { machine: machine.to_owned(), token: token.to_owned(), reply })
            .await
            .unwrap_or(false)
    }

    /// Records a phone-home and applies its state transition.
    pub async fn phone_home(
        &self,
        machine: &str,
        stage: &str,
        detail: &str,
        slots: Option<SlotReport>,
    ) -> Result<MachineState, String> {
        self.ask(|reply| Command::PhoneHome {
            machine: machine.to_owned(),
            stage: stage.to_owned(),
            detail: detail.to_owned(),
            slots,
            reply,
        })
        .await
        .unwrap_or_else(|| Err("machines task stopped".into()))
    }

    /// Makes the machine install again on its next boot.
    pub async fn reprovision(&self, machine: &str) -> Result<MachineState, String> {
        self.ask(|reply| Command::Reprovision { machine: machine.to_owned(), reply })
            .await
            .unwrap_or_else(|| Err("machines task stopped".into()))
    }

    /// One machine's record.
    pub async fn get(&self, machine: &str) -> Option<MachineRecord> {
        self.ask(|reply| Command::Get { machine: machine.to_owned(), reply }).await.flatten()
    }

    /// Every machine's record.
    pub async fn list(&self) -> BTreeMap<String, MachineRecord> {
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
    Script(oneshot::Sender<Result<(String, BootMode), String>>, Result<(String, BootMode), String>),
    State(oneshot::Sender<Result<MachineState, String>>, Result<MachineState, String>),
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
            if !dirty.is_empty() {
                let rows: Vec<(String, MachineRecord)> =
                    dirty.iter().filter_map(|n| self.records.get(n).map(|r| (n.clone(), r.clone()))).collect();
                let store = Arc::clone(&self.store);
                match tokio::task::spawn_blocking(move || store.write_machines(&rows)).await {
                    Ok(Ok(())) => self.metrics.inc("herd_machine_commits_total", ""),
                    Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "cannot persist machine state"),
                    Err(e) => tracing::error!(error = %e, "machine persistence task failed"),
                }
            }
            for p in pending {
                match p {
                    Pending::Script(tx, v) => {
                        let _ = tx.send(v);
                    }
                    Pending::State(tx, v) => {
                        let _ = tx.send(v);
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

    fn apply(&mut self, cmd: Command, dirty: &mut Vec<String>, pending: &mut Vec<Pending>) {
        let unknown = |name: &str| format!("no machine named {name:?} in the inventory");
        match cmd {
            Command::Event { machine, event, detail } => {
                if let Some(r) = self.records.get_mut(&machine) {
                    Self::push(r, &event, detail);
                    if r.state == MachineState::Unknown && event.starts_with("dhcp") {
                        Self::set_state(r, MachineState::Discovered);
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
                            Self::set_state(r, MachineState::Provisioning);
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
            Command::PhoneHome { machine, stage, detail, slots, reply } => {
                let has_disk = self.disk.get(&machine).copied().unwrap_or(false);
                let result = match self.records.get_mut(&machine) {
                    Some(r) => {
                        Self::push(r, &format!("phone-home:{stage}"), detail);
                        if let Some(report) = slots {
                            Self::push(r, "slots", describe_slots(&report));
                            r.slots = Some(report);
                        }
                        match stage.as_str() {
                            "installed" if has_disk => Self::set_state(r, MachineState::Installed),
                            "healthy" => Self::set_state(r, MachineState::Running),
                            _ => {}
                        }
                        dirty.push(machine);
                        Ok(r.state)
                    }
                    None => Err(unknown(&machine)),
                };
                pending.push(Pending::State(reply, result));
            }
            Command::Reprovision { machine, reply } => {
                let result = match self.records.get_mut(&machine) {
                    Some(r) => {
                        Self::push(r, "reprovision", "requested".to_owned());
                        Self::set_state(r, MachineState::Provisioning);
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
                let _ = reply.send(self.records.clone());
            }
        }
    }
}

/// One line for a slot table: `booted a; a: herd-os 1 good; b: herd-os 2 tries 1`.
pub fn describe_slots(r: &SlotReport) -> String {
    let slots: Vec<String> = r
        .slots
        .iter()
        .map(|s| {
            let Some(h) = &s.header else { return format!("{}: empty", s.slot) };
            let what = format!("{} {}", h.name, h.release);
            let how = if s.flags.successful {
                "good".to_owned()
            } else if s.flags.priority == 0 {
                "bad".to_owned()
            } else {
                format!("tries {}", s.flags.tries)
            };
            format!("{}: {what} {how}", s.slot)
        })
        .collect();
    format!("booted {}; {}", r.booted, slots.join("; "))
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
