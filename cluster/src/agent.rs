//! The agent: runs on every machine (inside node-init), registers the machine under its lease, watches only its
//! own schedule prefix, drives an [`Executor`] to match it, and reports unit states.
//!
//! Failure semantics fleet lacked:
//! - An etcd hiccup changes nothing locally: units keep running while the agent reconnects; after reconnecting it
//!   re-reads its schedule and converges.
//! - Fencing: the agent knows when its lease could expire on the server (the send time of the last acknowledged
//!   keep-alive plus the TTL). Three quarters of the way there it stops its `AtMostOnce=true` units, so they are
//!   down before the server expires the lease, and the engine moves them only a grace period after that. When a
//!   renewal gets through again they start again (if still scheduled here).
//! - The fence is open for one lease at a time (`Fence`), and only once the schedule has been read under that
//!   lease; every target a worker holds carries the lease it was read under. An at-most-once unit starts only from a
//!   target read under the lease the fence is open for, checked right before the start (after a slow load too): an
//!   agent whose lease lapsed starts nothing from what it knew before (issue #28). Stopping stays immediate.
//! - State reports are written under the lease they were made under while it lives; once the agent has dropped a
//!   lease they are not retried with it: the agent reports every state again under its next lease.
//! - Every unit has its own worker task, so a slow image pull never delays keep-alives or other units.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{Compare, CompareOp, EventType, TxnOp, WatchStream};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::exec::Executor;
use crate::record::{self, ActiveState, Desired, MachineRecord, PrewarmRecord, ScheduleEntry, StateRecord};
use crate::schema::{self, Key, MachineKey};
use crate::store::{KeepAlive, Store, StoreError};
use crate::unit::{Unit, UnitName};

/// How long state reports gather before they are written.
const FLUSH_DELAY: Duration = Duration::from_millis(50);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The registration (id, labels, capacity, instance token).
    pub machine: MachineRecord,
    /// Lease TTL.
    pub ttl: Duration,
    /// How often workers poll the executor for units that stopped on their own.
    pub status_interval: Duration,
}

/// Something the agent did, for tests and timelines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Registered under a new lease.
    Registered {
        /// The lease.
        lease: i64,
    },
    /// Pulled an image before registering (cluster-wide pre-warm list).
    Prewarmed {
        /// The image.
        image: String,
        /// Whether the pull worked.
        ok: bool,
    },
    /// An executor action on a unit finished.
    Action {
        /// The unit.
        unit: UnitName,
        /// `load`, `start`, `stop` or `unload`.
        action: &'static str,
        /// When it finished.
        at: SystemTime,
        /// Whether it worked.
        ok: bool,
    },
    /// Read its whole schedule under `lease` (after registering, or after its watch broke): every unit there has
    /// been handed to its worker, and every unit no longer there is being removed.
    Synced {
        /// The lease.
        lease: i64,
    },
    /// The lease could lapse: at-most-once units are being stopped.
    Fenced {
        /// When.
        at: SystemTime,
    },
    /// A renewal got through again.
    Unfenced,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Another live machine holds this id.
    #[error(
        "machine id {id} is already registered by another machine ({hostname}); machine ids must be unique \
         (a cloned image keeps its id: give each machine its own)"
    )]
    DuplicateMachineId {
        /// The id.
        id: String,
        /// The other machine's host name.
        hostname: String,
    },
    /// The machine id cannot be used in keys.
    #[error("machine id {0:?} is not valid: use 1-64 of a-z 0-9 - _ .")]
    BadMachineId(String),
}

/// What a unit's worker should converge to.
#[derive(Debug, Clone)]
struct Target {
    unit: Arc<Unit>,
    desired: Desired,
    epoch: u64,
    /// The lease under which this schedule entry was read (from the full read after registering, or that
    /// registration's watch): an at-most-once unit starts only while the fence is open for this very lease.
    session: i64,
}

/// The lease whose registration is alive and whose schedule has been read under it: at-most-once units read
/// under it may run. None: fenced (no lease we trust, its deadline passed, or its schedule not read yet).
type Fence = Option<i64>;

/// Whether `unit` may run under `fence` with a target read under `session`.
fn may_run(unit: &Unit, session: i64, fence: Fence) -> bool {
    !unit.placement.at_most_once || fence == Some(session)
}

/// A state change to write (None: the unit is gone from this machine).
#[derive(Debug)]
struct Report {
    unit: UnitName,
    state: Option<StateRecord>,
}

/// The agent of one machine.
pub struct Agent<E> {
    store: Store,
    cfg: AgentConfig,
    key: MachineKey,
    exec: Arc<E>,
    events: broadcast::Sender<AgentEvent>,
}

impl<E> std::fmt::Debug for Agent<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("machine", &self.cfg.machine.id).finish_non_exhaustive()
    }
}

/// One registration: a lease kept alive by its own task.
struct Session {
    lease: i64,
    lapsed: mpsc::Receiver<()>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

impl<E: Executor> Agent<E> {
    /// An agent for `cfg.machine`, running units through `exec`.
    pub fn new(store: Store, cfg: AgentConfig, exec: Arc<E>) -> Result<Agent<E>, AgentError> {
        let key = MachineKey::new(&cfg.machine.id).ok_or_else(|| AgentError::BadMachineId(cfg.machine.id.clone()))?;
        let (events, _) = broadcast::channel(1024);
        Ok(Agent { store, cfg, key, exec, events })
    }

    /// Subscribes to what the agent does.
    pub fn events(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    fn emit(&self, event: AgentEvent) {
        let _ = self.events.send(event);
    }

    /// Runs until `shutdown` (units keep running: a restarted agent picks them up) or a fatal error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let warm = self.prewarm(&shutdown).await;
        // Images added to the list later arrive on the schedule's watch stream and are pulled in the background,
        // without holding anything up.
        let (prewarm_tx, prewarm_rx) = mpsc::unbounded_channel::<String>();
        let puller =
            tokio::spawn(pull_added(self.exec.clone(), self.key.clone(), self.events.clone(), warm, prewarm_rx));
        let _puller = AbortOnDrop(puller);
        let (report_tx, mut report_rx) = mpsc::unbounded_channel::<Report>();
        // None: no lease we trust; Some((lease, t)): at-most-once units may run under `lease` until t.
        let (valid_tx, valid_rx) = watch::channel::<Option<(i64, Instant)>>(None);
        // The lease under which the whole schedule was last read (0: none): a unit fenced while cut off must not
        // start again before the agent knows, under its new lease, whether it is still scheduled here.
        let (synced_tx, synced_rx) = watch::channel(0i64);
        let (fence_tx, fence_rx) = watch::channel::<Fence>(None);
        let fencer = tokio::spawn(fence_task(valid_rx.clone(), synced_rx, fence_tx, self.events.clone()));
        let _fencer = AbortOnDrop(fencer);

        let mut workers: HashMap<UnitName, watch::Sender<Option<Target>>> = HashMap::new();
        let mut epochs: HashMap<UnitName, u64> = HashMap::new();
        let mut reported: HashMap<UnitName, StateRecord> = HashMap::new();
        let mut pending: HashMap<UnitName, Option<StateRecord>> = HashMap::new();
        let mut session: Option<Session> = None;
        let mut stream: Option<WatchStream> = None;
        let mut retry_at = Instant::now();
        // State reports are written together: a burst of unit changes costs one transaction, not one per change.
        let backoff = (self.cfg.ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(2));
        let mut flush_at = Instant::now();
        let (flush_tx, flush_rx) = mpsc::unbounded_channel();
        let (gone_tx, mut gone_rx) = mpsc::channel(4);
        let _writer = AbortOnDrop(tokio::spawn(writer(
            self.store.clone(),
            self.key.clone(),
            flush_rx,
            valid_rx,
            gone_tx,
            backoff,
        )));

        loop {
            let now = Instant::now();
            if session.is_none() && now >= retry_at {
                match self.register(&valid_tx).await {
                    Ok(s) => {
                        self.emit(AgentEvent::Registered { lease: s.lease });
                        session = Some(s);
                        stream = None;
                        // States were attached to the old lease: write them all again.
                        pending.extend(reported.iter().map(|(u, s)| (u.clone(), Some(s.clone()))));
                    }
                    Err(RegisterError::Fatal(e)) => return Err(e),
                    Err(RegisterError::Store(e)) => {
                        tracing::warn!(machine = %self.key, "registering: {e}");
                        retry_at = now + backoff;
                    }
                }
            }
            if let Some(lease) = session.as_ref().map(|s| s.lease)
                && stream.is_none()
                && Instant::now() >= retry_at
            {
                match self.sync(lease, &mut workers, &mut epochs, &report_tx, &fence_rx, &prewarm_tx).await {
                    Ok(s) => {
                        stream = Some(s);
                        synced_tx.send_replace(lease);
                        self.emit(AgentEvent::Synced { lease });
                    }
                    Err(e) => {
                        tracing::warn!(machine = %self.key, "reading the schedule: {e}");
                        retry_at = Instant::now() + backoff;
                    }
                }
            }
            if let Some(s) = &session
                && !pending.is_empty()
                && Instant::now() >= flush_at
            {
                // The writer task does the etcd write, so this loop keeps reading the watch meanwhile.
                let _ = flush_tx.send((s.lease, std::mem::take(&mut pending)));
            }

            let waiting = session.is_none() || stream.is_none();
            let wake = if pending.is_empty() || session.is_none() { retry_at } else { flush_at.min(retry_at) };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                Some(()) = lapsed(&mut session) => {
                    tracing::warn!(machine = %self.key, "lease expired; registering again");
                    valid_tx.send_replace(None);
                    session = None;
                    stream = None;
                }
                Some(lease) = gone_rx.recv() => {
                    if session.as_ref().is_some_and(|s| s.lease == lease) {
                        tracing::warn!(machine = %self.key, "lease expired; registering again");
                        valid_tx.send_replace(None);
                        session = None;
                        stream = None;
                    }
                }
                msg = next_watch(&mut stream) => match msg {
                    Ok(Some(resp)) => {
                        self.store.stats().watched(resp.events().len() as u64);
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            match kv.key_str().ok().and_then(Key::parse) {
                                Some(Key::Schedule(_, unit)) => {
                                    let entry = match ev.event_type() {
                                        EventType::Put => record::decode::<ScheduleEntry>(kv.value()),
                                        EventType::Delete => None,
                                    };
                                    // The stream is this session's: it is dropped with the session.
                                    let lease = session.as_ref().map_or(0, |s| s.lease);
                                    self.assign(lease, unit, entry, &mut workers, &mut epochs, &report_tx, &fence_rx);
                                }
                                Some(Key::Prewarm(_)) if ev.event_type() == EventType::Put => {
                                    if let Some(p) = record::decode::<PrewarmRecord>(kv.value()) {
                                        let _ = prewarm_tx.send(p.image);
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    Ok(None) | Err(_) => {
                        stream = None;
                        retry_at = Instant::now() + backoff;
                    }
                },
                Some(r) = report_rx.recv() => {
                    if pending.is_empty() {
                        flush_at = Instant::now() + FLUSH_DELAY;
                    }
                    let mut batch = vec![r];
                    while let Ok(more) = report_rx.try_recv() {
                        batch.push(more);
                    }
                    for r in batch {
                        match &r.state {
                            Some(s) => { reported.insert(r.unit.clone(), s.clone()); }
                            None => {
                                reported.remove(&r.unit);
                                if workers.get(&r.unit).is_some_and(|w| w.borrow().is_none()) {
                                    workers.remove(&r.unit);
                                    epochs.remove(&r.unit);
                                }
                            }
                        }
                        pending.insert(r.unit, r.state);
                    }
                }
                () = tokio::time::sleep_until(wake.max(Instant::now() + Duration::from_millis(5))), if waiting || !pending.is_empty() => {}
            }
        }
    }

    /// Pulls every image of the pre-warm list before the machine registers (so it is schedulable only once warm);
    /// returns the images seen.
    async fn prewarm(&self, shutdown: &CancellationToken) -> BTreeSet<String> {
        let images = loop {
            match self.store.get_prefix(&schema::prefix("prewarm")).await {
                Ok((kvs, _)) => break prewarm_images(&kvs).collect::<BTreeSet<_>>(),
                Err(e) => {
                    tracing::warn!(machine = %self.key, "reading the pre-warm list: {e}");
                    tokio::select! {
                        () = shutdown.cancelled() => return BTreeSet::new(),
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        };
        for image in &images {
            pull_prewarm(&*self.exec, &self.key, image, &self.events).await;
        }
        images
    }

    async fn register(&self, valid: &watch::Sender<Option<(i64, Instant)>>) -> Result<Session, RegisterError> {
        let key = Key::Machine(self.key.clone()).path();
        let sent = Instant::now();
        let (lease, ttl) = self.store.grant(self.cfg.ttl).await?;
        let mut machine = self.cfg.machine.clone();
        machine.since_ms = record::now_ms();
        let value = record::encode(&machine);
        let put = |v: Vec<u8>| TxnOp::put(key.as_str(), v, Some(etcd_client::PutOptions::new().with_lease(lease)));
        let txn = etcd_client::Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([put(value.clone())])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.store.txn(txn).await?;
        if !resp.succeeded() {
            let existing = resp.op_responses().into_iter().find_map(|r| match r {
                etcd_client::TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            let Some(kv) = existing else {
                return Err(RegisterError::Store(StoreError::Fenced("registration raced".into())));
            };
            let other = record::decode::<MachineRecord>(kv.value()).unwrap_or_default();
            if other.instance != machine.instance {
                let _ = self.store.revoke(lease).await;
                return Err(RegisterError::Fatal(AgentError::DuplicateMachineId {
                    id: machine.id.clone(),
                    hostname: other.hostname,
                }));
            }
            // Our own registration from before a restart: take it over under the new lease.
            let txn = etcd_client::Txn::new()
                .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())])
                .and_then([put(value)]);
            if !self.store.txn(txn).await?.succeeded() {
                return Err(RegisterError::Store(StoreError::Fenced("registration raced".into())));
            }
        }
        // The fence stays closed for this lease until its schedule has been read (the fence task checks both).
        valid.send_replace(Some((lease, sent + ttl * 3 / 4)));
        let (lapsed_tx, lapsed) = mpsc::channel(1);
        let renewer =
            tokio::spawn(renew_task(KeepAlive::new(&self.store, lease), lease, ttl, sent, valid.clone(), lapsed_tx));
        Ok(Session { lease, lapsed, renewer })
    }

    /// Reads the whole schedule and converges to it, and the pre-warm list at the same revision (images it has not
    /// pulled go to `prewarm`); returns one watch stream on both from just after that read (one stream per machine
    /// for etcd to keep, not two).
    async fn sync(
        &self,
        lease: i64,
        workers: &mut HashMap<UnitName, watch::Sender<Option<Target>>>,
        epochs: &mut HashMap<UnitName, u64>,
        reports: &mpsc::UnboundedSender<Report>,
        fence: &watch::Receiver<Fence>,
        prewarm: &mpsc::UnboundedSender<String>,
    ) -> Result<WatchStream, StoreError> {
        let prefix = schema::schedule_prefix(&self.key);
        let (kvs, revision) = self.store.get_prefix(&prefix).await?;
        let warm_prefix = schema::prefix("prewarm");
        let (warm, _) = self.store.get_prefix_at(&warm_prefix, revision).await?;
        for image in prewarm_images(&warm) {
            let _ = prewarm.send(image);
        }
        let mut seen = std::collections::HashSet::new();
        for kv in &kvs {
            let Some(Key::Schedule(_, unit)) = kv.key_str().ok().and_then(Key::parse) else { continue };
            seen.insert(unit.clone());
            // A full read is authoritative: forget epochs so a new leader's lower-numbered writes are not refused.
            epochs.remove(&unit);
            self.assign(lease, unit, record::decode(kv.value()), workers, epochs, reports, fence);
        }
        let gone: Vec<UnitName> = workers.keys().filter(|u| !seen.contains(*u)).cloned().collect();
        for unit in gone {
            self.assign(lease, unit, None, workers, epochs, reports, fence);
        }
        self.store.watch_prefixes(&[(prefix, revision + 1), (warm_prefix, revision + 1)]).await
    }

    /// Points a unit's worker at a schedule entry read under `lease` (None: remove the unit).
    #[allow(clippy::too_many_arguments)]
    fn assign(
        &self,
        lease: i64,
        name: UnitName,
        entry: Option<ScheduleEntry>,
        workers: &mut HashMap<UnitName, watch::Sender<Option<Target>>>,
        epochs: &mut HashMap<UnitName, u64>,
        reports: &mpsc::UnboundedSender<Report>,
        fence: &watch::Receiver<Fence>,
    ) {
        let target = match entry {
            Some(e) => {
                if epochs.get(&name).is_some_and(|seen| e.epoch < *seen) {
                    tracing::warn!(unit = %name, epoch = e.epoch, "schedule from an older engine epoch ignored");
                    return;
                }
                epochs.insert(name.clone(), e.epoch);
                match Unit::parse(name.as_str(), &e.text) {
                    Ok(unit) => {
                        Some(Target { unit: Arc::new(unit), desired: e.desired, epoch: e.epoch, session: lease })
                    }
                    Err(err) => {
                        let _ = reports.send(Report {
                            unit: name,
                            state: Some(StateRecord {
                                state: ActiveState::Failed,
                                epoch: e.epoch,
                                since_ms: record::now_ms(),
                                detail: Some(err.to_string()),
                            }),
                        });
                        return;
                    }
                }
            }
            None => None,
        };
        if let Some(tx) = workers.get(&name)
            && tx.send(target.clone()).is_ok()
        {
            return;
        }
        if target.is_none() {
            workers.remove(&name);
            return;
        }
        let (tx, rx) = watch::channel(target);
        workers.insert(name, tx);
        tokio::spawn(worker(
            rx,
            fence.clone(),
            self.exec.clone(),
            reports.clone(),
            self.events.clone(),
            self.cfg.status_interval,
        ));
    }
}

/// Writes state reports attached to the lease they came with, latest per unit wins; retries until they land or
/// the agent drops that lease (`live`: the agent's live lease). Says which lease is gone when etcd no longer knows
/// it. Reports of a dropped lease are discarded, not retried with it: the agent sends every state it holds again
/// under its next lease.
async fn writer(
    store: Store,
    machine: MachineKey,
    mut batches: mpsc::UnboundedReceiver<(i64, HashMap<UnitName, Option<StateRecord>>)>,
    live: watch::Receiver<Option<(i64, Instant)>>,
    gone: mpsc::Sender<i64>,
    backoff: Duration,
) {
    let mut lease = 0;
    let mut pending: HashMap<UnitName, Option<StateRecord>> = HashMap::new();
    loop {
        if pending.is_empty() {
            let Some((l, batch)) = batches.recv().await else { return };
            lease = l;
            pending = batch;
        }
        while let Ok((l, batch)) = batches.try_recv() {
            lease = l;
            pending.extend(batch);
        }
        if live.borrow().is_none_or(|(l, _)| l != lease) {
            tracing::debug!(machine = %machine, lease, dropped = pending.len(), "reports of a dropped lease discarded");
            pending.clear();
            continue;
        }
        let written = match pending.len() {
            // One change (the usual case: units land one by one) is a plain put or delete, not a transaction: etcd
            // 3.4 opens a read view for every transaction's comparisons that copies its whole pending write
            // buffer, so thousands of one-op transactions a second cost it more CPU than the writes themselves.
            1 => {
                let (unit, state) = pending.iter().next().expect("one");
                let key = Key::UnitState(unit.clone(), machine.clone()).path();
                match state {
                    Some(s) => store.put(&key, record::encode(s), Some(lease)).await,
                    None => store.delete(&key).await.map(|_| ()),
                }
            }
            _ => store.apply(state_ops(&machine, lease, &pending), &[]).await,
        };
        match written {
            Ok(()) => pending.clear(),
            Err(e) if e.lease_gone() => {
                // The agent registers again and sends every state anew under the new lease.
                pending.clear();
                let _ = gone.send(lease).await;
            }
            Err(e) => {
                tracing::warn!(machine = %machine, "reporting states: {e}");
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// The writes for a batch of state changes (a put under `lease` or a delete per unit).
fn state_ops(machine: &MachineKey, lease: i64, changes: &HashMap<UnitName, Option<StateRecord>>) -> Vec<TxnOp> {
    changes
        .iter()
        .map(|(unit, state)| {
            let key = Key::UnitState(unit.clone(), machine.clone()).path();
            match state {
                Some(s) => TxnOp::put(key, record::encode(s), Some(etcd_client::PutOptions::new().with_lease(lease))),
                None => TxnOp::delete(key, None),
            }
        })
        .collect()
}

enum RegisterError {
    Fatal(AgentError),
    Store(StoreError),
}

impl From<StoreError> for RegisterError {
    fn from(e: StoreError) -> Self {
        RegisterError::Store(e)
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn lapsed(session: &mut Option<Session>) -> Option<()> {
    match session {
        Some(s) => s.lapsed.recv().await,
        None => std::future::pending().await,
    }
}

/// Pulls a pre-warm image (three tries) and says how it went.
async fn pull_prewarm<E: Executor>(exec: &E, key: &MachineKey, image: &str, events: &broadcast::Sender<AgentEvent>) {
    let mut ok = false;
    for _ in 0..3 {
        match exec.pull(image).await {
            Ok(()) => {
                ok = true;
                break;
            }
            Err(e) => tracing::warn!(machine = %key, image = %image, "pre-warm pull: {e}"),
        }
    }
    let _ = events.send(AgentEvent::Prewarmed { image: image.to_owned(), ok });
}

/// The images of pre-warm list entries.
fn prewarm_images(kvs: &[etcd_client::KeyValue]) -> impl Iterator<Item = String> + '_ {
    kvs.iter().filter_map(|kv| record::decode::<PrewarmRecord>(kv.value())).map(|p| p.image)
}

/// Pulls each image added to the pre-warm list (sent by the agent's loop, from its watch or a full read) that is not
/// in `warm` yet, one at a time.
async fn pull_added<E: Executor>(
    exec: Arc<E>,
    key: MachineKey,
    events: broadcast::Sender<AgentEvent>,
    mut warm: BTreeSet<String>,
    mut added: mpsc::UnboundedReceiver<String>,
) {
    while let Some(image) = added.recv().await {
        if warm.insert(image.clone()) {
            pull_prewarm(&*exec, &key, &image, &events).await;
        }
    }
}

async fn next_watch(stream: &mut Option<WatchStream>) -> Result<Option<etcd_client::WatchResponse>, StoreError> {
    match stream {
        Some(s) => Ok(s.message().await?),
        None => std::future::pending().await,
    }
}

/// Renews the lease every third of its TTL; moves the fencing deadline forward on every acknowledged renewal.
/// Declares the lease lapsed when etcd says it is gone, or when no renewal was acknowledged for a whole TTL after
/// the last acknowledgement (the server cannot have kept it; registering again takes the old registration over).
async fn renew_task(
    mut ka: KeepAlive,
    lease: i64,
    ttl: Duration,
    mut last_sent: Instant,
    valid: watch::Sender<Option<(i64, Instant)>>,
    lapsed: mpsc::Sender<()>,
) {
    let every = (ttl / 3).max(Duration::from_millis(200));
    let mut last_ack = Instant::now();
    loop {
        tokio::time::sleep_until(last_sent + every).await;
        let sent = Instant::now();
        let gone = match ka.renew().await {
            Ok(left) if !left.is_zero() => {
                last_sent = sent;
                last_ack = Instant::now();
                valid.send_replace(Some((lease, sent + ttl * 3 / 4)));
                false
            }
            Ok(_) => true,
            Err(e) if e.lease_gone() => true,
            // Not acknowledged: keep the old deadline and try again soon.
            Err(_) => {
                last_sent = sent.min(last_sent + every / 2);
                Instant::now() > last_ack + ttl + every
            }
        };
        if gone {
            valid.send_replace(None);
            let _ = lapsed.send(()).await;
            return;
        }
    }
}

/// Raises the fence when the lease's deadline passes or the lease is dropped; opens it for a lease only while that
/// lease's deadline is ahead and the schedule has been read under that same lease (`synced`). Keyed by lease, so a
/// registration publishing its deadline before its schedule is read cannot open the fence on the old read.
async fn fence_task(
    mut valid: watch::Receiver<Option<(i64, Instant)>>,
    mut synced: watch::Receiver<i64>,
    fence: watch::Sender<Fence>,
    events: broadcast::Sender<AgentEvent>,
) {
    loop {
        let until = *valid.borrow_and_update();
        let open = fence_for(until, *synced.borrow_and_update(), Instant::now());
        if fence.send_if_modified(|f| std::mem::replace(f, open) != open) {
            let _ = events.send(match open {
                None => AgentEvent::Fenced { at: SystemTime::now() },
                Some(_) => AgentEvent::Unfenced,
            });
        }
        let deadline = until.filter(|_| open.is_some()).map(|(_, t)| t);
        tokio::select! {
            r = valid.changed() => if r.is_err() { return },
            r = synced.changed() => if r.is_err() { return },
            () = async { match deadline { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {}
        }
    }
}

/// The fence at `now`: open for the live lease (`until`: the lease and its deadline) only if its deadline is ahead
/// and the schedule was read under that same lease (`read`).
fn fence_for(until: Option<(i64, Instant)>, read: i64, now: Instant) -> Fence {
    until.filter(|&(lease, t)| lease == read && now < t).map(|(lease, _)| lease)
}

/// Converges one unit to its target, then keeps watching its state until the unit is removed.
async fn worker<E: Executor>(
    mut target: watch::Receiver<Option<Target>>,
    mut fence: watch::Receiver<Fence>,
    exec: Arc<E>,
    reports: mpsc::UnboundedSender<Report>,
    events: broadcast::Sender<AgentEvent>,
    status_interval: Duration,
) {
    let mut installed: Option<(Arc<Unit>, ActiveState)> = None;
    let mut name: Option<UnitName> = None;
    loop {
        let t = target.borrow_and_update().clone();
        fence.borrow_and_update();
        if let Some(t) = &t {
            name = Some(t.unit.name.clone());
        }
        let report = |state: ActiveState, epoch: u64, detail: Option<String>| {
            if let Some(unit) = &name {
                let record = StateRecord { state, epoch, since_ms: record::now_ms(), detail };
                let _ = reports.send(Report { unit: unit.clone(), state: Some(record) });
            }
        };
        let act = |unit: &UnitName, action: &'static str, ok: bool, since: Instant| {
            let took_ms = since.elapsed().as_millis() as u64;
            tracing::info!(unit = %unit, action, ok, took_ms, "unit {action} {}", if ok { "done" } else { "failed" });
            let _ = events.send(AgentEvent::Action { unit: unit.clone(), action, at: SystemTime::now(), ok });
        };
        // A different unit file (or removal): take the old one down first.
        if let Some((old, _)) = &installed
            && t.as_ref().is_none_or(|t| t.unit.file != old.file)
        {
            let old = old.clone();
            let since = Instant::now();
            let stopped = exec.stop(&old).await;
            act(&old.name, "stop", stopped.is_ok(), since);
            let since = Instant::now();
            let unloaded = exec.unload(&old).await;
            act(&old.name, "unload", unloaded.is_ok(), since);
            installed = None;
        }
        let Some(t) = t else {
            if let Some(unit) = name.take() {
                let _ = reports.send(Report { unit, state: None });
            }
            return;
        };
        if installed.is_none() {
            // Loading a container pulls its image, which can take a while: say so. A service loads at once.
            if t.unit.container.is_some() {
                report(ActiveState::Preparing, t.epoch, None);
            }
            let since = Instant::now();
            match exec.load(&t.unit).await {
                Ok(()) => {
                    act(&t.unit.name, "load", true, since);
                    installed = Some((t.unit.clone(), ActiveState::Loaded));
                }
                Err(e) => {
                    act(&t.unit.name, "load", false, since);
                    report(ActiveState::Failed, t.epoch, Some(e.to_string()));
                }
            }
        }
        if installed.is_some() && target.has_changed().unwrap_or(false) {
            // A newer target arrived while loading (an image pull can take long): act on that one.
            continue;
        }
        if let Some((unit, state)) = installed.as_mut() {
            // The fence as it is now, right before acting, not as it was before a slow load (marked seen: a change
            // made during the load is acted on here, not once more after).
            let run = t.desired == Desired::Launched && may_run(unit, t.session, *fence.borrow_and_update());
            let mut detail = None;
            let since = Instant::now();
            if run && *state != ActiveState::Active {
                match exec.start(unit).await {
                    Ok(()) => *state = ActiveState::Active,
                    Err(e) => {
                        *state = ActiveState::Failed;
                        detail = Some(e.to_string());
                    }
                }
                act(&unit.name, "start", detail.is_none(), since);
            } else if !run && *state == ActiveState::Active {
                let r = exec.stop(unit).await;
                act(&unit.name, "stop", r.is_ok(), since);
                *state = ActiveState::Loaded;
            }
            report(*state, t.epoch, detail);
        }
        // Wait for a new target, a fence change, or the next state poll.
        loop {
            tokio::select! {
                r = target.changed() => {
                    if r.is_err() {
                        // The agent is gone: leave the unit as it is (a restarted agent picks it up).
                        return;
                    }
                    break;
                }
                r = fence.changed() => {
                    if r.is_err() { return; }
                    break;
                }
                () = tokio::time::sleep(status_interval) => {
                    if let Some((unit, state)) = installed.as_mut() {
                        let now = exec.state(unit).await;
                        if now != *state && *state == ActiveState::Active {
                            *state = now;
                            let epoch = target.borrow().as_ref().map_or(0, |t| t.epoch);
                            report(now, epoch, Some("exited".into()));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::exec::{ExecError, RecordingExecutor};

    fn unit(at_most_once: bool) -> Arc<Unit> {
        let text = format!("[Service]\nExecStart=/bin/sleep 60\n[X-Fleet]\nAtMostOnce={at_most_once}\n");
        Arc::new(Unit::parse("amo.service", &text).unwrap())
    }

    fn target(unit: &Arc<Unit>, session: i64) -> Option<Target> {
        Some(Target { unit: unit.clone(), desired: Desired::Launched, epoch: 1, session })
    }

    /// A worker for an at-most-once unit whose target was read under `session`, the fence open for `fence`.
    struct Worker {
        target: watch::Sender<Option<Target>>,
        fence: watch::Sender<Fence>,
        reports: mpsc::UnboundedReceiver<Report>,
        unit: Arc<Unit>,
        _task: AbortOnDrop,
    }

    fn spawn_worker<E: Executor>(exec: &Arc<E>, session: i64, fence: Fence) -> Worker {
        let unit = unit(true);
        let (target_tx, target_rx) = watch::channel(target(&unit, session));
        let (fence_tx, fence_rx) = watch::channel(fence);
        let (reports, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(16);
        let task = tokio::spawn(worker(target_rx, fence_rx, exec.clone(), reports, events, Duration::from_secs(60)));
        Worker { target: target_tx, fence: fence_tx, reports: rx, unit, _task: AbortOnDrop(task) }
    }

    /// The next state the worker reports (bounded wait).
    async fn next_report(rx: &mut mpsc::UnboundedReceiver<Report>) -> ActiveState {
        let r = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
        r.state.unwrap().state
    }

    #[test]
    fn the_fence_opens_only_for_the_live_lease_whose_schedule_was_read() {
        let now = Instant::now();
        let later = now + Duration::from_secs(5);
        assert_eq!(fence_for(Some((1, later)), 1, now), Some(1));
        // Registered again under lease 2: its deadline is published before its schedule is read. The read made
        // under lease 1 must not open the fence (issue #28: it did, and the old schedule started a unit).
        assert_eq!(fence_for(Some((2, later)), 1, now), None);
        assert_eq!(fence_for(Some((2, later)), 2, now), Some(2));
        // The deadline passed, or no lease at all.
        assert_eq!(fence_for(Some((2, now)), 2, now), None);
        assert_eq!(fence_for(None, 2, now), None);
        // Only at-most-once units care, and only for the lease their target was read under.
        assert!(may_run(&unit(true), 2, Some(2)));
        assert!(!may_run(&unit(true), 1, Some(2)));
        assert!(!may_run(&unit(true), 2, None));
        assert!(may_run(&unit(false), 1, None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_target_read_under_an_old_lease_starts_no_at_most_once_unit() {
        let exec = Arc::new(RecordingExecutor::default());
        // The worker still holds what it read under lease 1; the fence is open for lease 2.
        let mut w = spawn_worker(&exec, 1, Some(2));
        assert_eq!(next_report(&mut w.reports).await, ActiveState::Loaded);
        assert_eq!(exec.active(), 0, "not started from the old lease's schedule");
        // The schedule read under lease 2 still has it here: now it starts.
        w.target.send_replace(target(&w.unit, 2));
        assert_eq!(next_report(&mut w.reports).await, ActiveState::Active);
        assert_eq!(exec.active(), 1);
    }

    /// Loads block until released, so a test can change the fence while a load (an image pull) is under way.
    #[derive(Debug, Default)]
    struct Gate {
        entered: tokio::sync::Notify,
        release: tokio::sync::Notify,
        starts: std::sync::atomic::AtomicU32,
    }

    impl Executor for Gate {
        async fn pull(&self, _image: &str) -> Result<(), ExecError> {
            Ok(())
        }
        async fn load(&self, _unit: &Unit) -> Result<(), ExecError> {
            self.entered.notify_one();
            self.release.notified().await;
            Ok(())
        }
        async fn start(&self, _unit: &Unit) -> Result<(), ExecError> {
            self.starts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        async fn stop(&self, _unit: &Unit) -> Result<(), ExecError> {
            Ok(())
        }
        async fn unload(&self, _unit: &Unit) -> Result<(), ExecError> {
            Ok(())
        }
        async fn state(&self, _unit: &Unit) -> ActiveState {
            ActiveState::Loaded
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_load_that_ends_after_the_fence_closed_starts_nothing() {
        let exec = Arc::new(Gate::default());
        let mut w = spawn_worker(&exec, 1, Some(1));
        exec.entered.notified().await;
        // The lease lapses while the load is under way.
        w.fence.send_replace(None);
        exec.release.notify_one();
        assert_eq!(next_report(&mut w.reports).await, ActiveState::Loaded);
        assert_eq!(exec.starts.load(std::sync::atomic::Ordering::SeqCst), 0, "no start after the fence closed");
        // The fence opens again for the same lease (a renewal got through): it starts.
        w.fence.send_replace(Some(1));
        assert_eq!(next_report(&mut w.reports).await, ActiveState::Active);
    }
}
