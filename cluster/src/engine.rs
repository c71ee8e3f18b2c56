//! The engine: one leader at a time (an etcd lease on `engine/leader`), reconciling what should run (units,
//! machines, cordons) with where it runs (the per-machine schedule keys), through the pure
//! [`planner`](crate::plan).
//!
//! - Leadership: the leader key is created under the candidate's lease, only if absent; followers watch it and
//!   campaign when it goes (at the latest one TTL after the leader dies). Every write the leader makes is guarded
//!   by the leader key's creation revision, so a deposed leader cannot write. A new leader bumps
//!   `engine/epoch`; schedule entries carry it.
//! - Taking over changes nothing that runs: the new leader reads the schedule as it is and plans from it.
//! - A machine whose registration disappears is *suspect* for a grace period (its units stay put, nothing new lands
//!   there), then *dead* (its units move). A registration that comes back within the grace moves nothing.
//! - An at-most-once unit moves off a dead machine only if that machine is still unregistered at the write: the
//!   move (delete there, put elsewhere) is one transaction guarded by the machine key's absence, so a machine that
//!   registers again just as this engine declares it dead (its view a moment behind) keeps the unit and never sees
//!   it run elsewhere meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, TxnOp, WatchOptions};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::plan::{self, MachineView, Snapshot};
use crate::record::{
    self, ActiveState, CordonRecord, Desired, MachineRecord, ScheduleEntry, UnitRecord, UnplacedRecord,
};
use crate::schema::{self, Key};
use crate::store::{KeepAlive, Store, StoreError};
use crate::unit::{Unit, UnitName};

/// How an engine instance runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This instance's id (the leader key's value).
    pub id: String,
    /// Leader lease TTL.
    pub ttl: Duration,
    /// How long a machine is suspect before its units move.
    pub grace: Duration,
    /// How long to gather changes before planning (bulk submits plan once, not per unit).
    pub settle: Duration,
}

impl EngineConfig {
    /// Defaults for `id`: 10 s lease, the [`default_grace`] of agents with the same TTL, 20 ms settle.
    pub fn new(id: &str) -> EngineConfig {
        let ttl = Duration::from_secs(10);
        EngineConfig { id: id.to_owned(), ttl, grace: default_grace(ttl), settle: Duration::from_millis(20) }
    }
}

/// The grace period for machines whose agents hold leases of `agent_ttl`: a quarter of it. A registration goes
/// only when its lease expires, a whole TTL after the last renewal etcd acknowledged (three renewals missed): the
/// lease is already the failure detector's patience. The grace covers an agent that lost its lease to a passing
/// fault and registers again as soon as it reaches etcd, so its units do not move for nothing.
pub fn default_grace(agent_ttl: Duration) -> Duration {
    agent_ttl / 4
}

/// What an engine instance is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineStatus {
    /// Waiting for leadership.
    Follower,
    /// Leading with this fencing epoch.
    Leader {
        /// The epoch.
        epoch: u64,
    },
}

/// Figures of the last reconcile, for benchmarks and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Schedule entries the leader holds.
    pub scheduled: usize,
    /// Units that fit nowhere.
    pub unplaced: usize,
    /// Reconcile rounds so far.
    pub rounds: u64,
    /// The etcd revision of the newest change to units, machines or cordons the round planned from: a change
    /// written at revision R has been acted on once a round reports R or later (what tests wait on, instead of a
    /// fixed sleep, before they check that nothing moved).
    pub revision: i64,
}

/// An engine instance.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    cfg: EngineConfig,
    status: watch::Sender<EngineStatus>,
    reconciled: watch::Sender<Reconciled>,
}

/// A unit warming on its next machine before it leaves a draining one.
struct Warming {
    from: String,
    to: String,
    since: Instant,
}

/// How long a drained unit waits for its next machine to load it before it moves anyway (it then starts there
/// once its image is pulled).
const WARM_LIMIT: Duration = Duration::from_secs(120);

/// The leader's view of the cluster.
#[derive(Default)]
struct View {
    units: BTreeMap<UnitName, (UnitRecord, Option<Unit>)>,
    machines: BTreeMap<String, MachineRecord>,
    suspects: BTreeMap<String, (MachineRecord, Instant)>,
    cordons: BTreeMap<String, CordonRecord>,
    /// (machine, unit) → entry, as written.
    schedule: BTreeMap<(String, UnitName), ScheduleEntry>,
    /// At-most-once units taken off a live machine, by the machine they are leaving: they are placed again only
    /// once that machine's agent has stopped them (its state key is gone).
    leaving: BTreeMap<UnitName, String>,
    /// Unit → why it is not placed, as written to `unplaced/`.
    unplaced: BTreeMap<UnitName, UnplacedRecord>,
    /// Container units moving off a draining machine, warming on their new one first: they keep running where
    /// they are while the new machine loads them (pulls the image, creates the container), then move.
    warming: BTreeMap<UnitName, Warming>,
    /// Machine events seen but not yet written to `events/`: (machine, event, detail).
    events: Vec<(String, &'static str, String)>,
    /// The revision it was loaded at, or of the newest watch event applied since.
    revision: i64,
}

impl Engine {
    /// An engine instance.
    pub fn new(store: Store, cfg: EngineConfig) -> Engine {
        Engine {
            store,
            cfg,
            status: watch::channel(EngineStatus::Follower).0,
            reconciled: watch::channel(Reconciled::default()).0,
        }
    }

    /// Follows the instance's role.
    pub fn status(&self) -> watch::Receiver<EngineStatus> {
        self.status.subscribe()
    }

    /// Follows the reconcile figures.
    pub fn reconciled(&self) -> watch::Receiver<Reconciled> {
        self.reconciled.subscribe()
    }

    /// Campaigns and leads until `shutdown`; on shutdown a leader resigns (its lease is revoked, so a follower
    /// takes over at once).
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            let term = tokio::select! {
                () = shutdown.cancelled() => return,
                t = self.campaign() => t,
            };
            let term = match term {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(engine = %self.cfg.id, "campaign: {e}");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            tracing::info!(engine = %self.cfg.id, epoch = term.epoch, "leading");
            self.status.send_replace(EngineStatus::Leader { epoch: term.epoch });
            let result = self.lead(&term, &shutdown).await;
            self.status.send_replace(EngineStatus::Follower);
            if shutdown.is_cancelled() {
                let _ = self.store.revoke(term.lease).await;
                return;
            }
            if let Err(e) = result {
                tracing::warn!(engine = %self.cfg.id, "lost leadership: {e}");
                // Give the lease back (best effort) so that the next leader, maybe this engine, need not wait out
                // its TTL.
                let _ = self.store.revoke(term.lease).await;
            }
        }
    }

    async fn campaign(&self) -> Result<Term, StoreError> {
        let leader = Key::EngineLeader.path();
        loop {
            let (lease, ttl) = self.store.grant(self.cfg.ttl).await?;
            let txn = etcd_client::Txn::new()
                .when([Compare::create_revision(leader.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    leader.as_str(),
                    self.cfg.id.as_bytes(),
                    Some(etcd_client::PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(leader.as_str(), None)]);
            let resp = self.store.txn(txn).await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            if resp.succeeded() {
                let epoch = self.bump_epoch().await?;
                let (lost_tx, lost) = watch::channel(false);
                let renewer = tokio::spawn(keep_leading(KeepAlive::new(&self.store, lease), ttl, lost_tx));
                return Ok(Term { lease, leader_rev: revision, epoch, lost, renewer });
            }
            let _ = self.store.revoke(lease).await;
            if let Some(term) = self.reclaim(&resp).await? {
                return Ok(term);
            }
            // Wait until the leader key goes (its holder resigned or its lease expired).
            self.store.stats().request(1);
            let options = WatchOptions::new().with_start_revision(revision + 1);
            let mut stream = self.store.client().watch(leader.as_str(), Some(options)).await?;
            loop {
                match stream.message().await? {
                    Some(resp) if resp.events().iter().any(|e| e.event_type() == EventType::Delete) => break,
                    Some(_) => {}
                    None => break,
                }
            }
        }
    }

    /// Takes the lead back when the leader key is still this engine's under a lease that is still alive: it
    /// stepped down because it could not renew for most of a TTL (an etcd leader election, its member dying), but
    /// etcd kept the lease (a new etcd leader extends every lease), so no other engine can have led meanwhile.
    /// Waiting out the TTL instead would leave the cluster without an engine for as long.
    async fn reclaim(&self, resp: &etcd_client::TxnResponse) -> Result<Option<Term>, StoreError> {
        let held = resp.op_responses().into_iter().find_map(|op| match op {
            etcd_client::TxnOpResponse::Get(mut g) => g.take_kvs().into_iter().next(),
            _ => None,
        });
        let Some(kv) = held.filter(|kv| kv.value() == self.cfg.id.as_bytes() && kv.lease() != 0) else {
            return Ok(None);
        };
        let mut ka = KeepAlive::new(&self.store, kv.lease());
        let ttl = match ka.renew().await {
            Ok(left) if !left.is_zero() => left,
            _ => return Ok(None),
        };
        let epoch = self.bump_epoch().await?;
        tracing::info!(engine = %self.cfg.id, "leader lease {:x} still alive: leading again", kv.lease());
        let (lost_tx, lost) = watch::channel(false);
        let renewer = tokio::spawn(keep_leading(ka, ttl, lost_tx));
        Ok(Some(Term { lease: kv.lease(), leader_rev: kv.create_revision(), epoch, lost, renewer }))
    }

    async fn bump_epoch(&self) -> Result<u64, StoreError> {
        let key = Key::EngineEpoch.path();
        loop {
            let current = self.store.get(&key).await?;
            let (value, guard) = match &current {
                Some(kv) => (
                    kv.value_str().ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
                ),
                None => (0, Compare::create_revision(key.as_str(), CompareOp::Equal, 0)),
            };
            let next = value + 1;
            let txn =
                etcd_client::Txn::new().when([guard]).and_then([TxnOp::put(key.as_str(), next.to_string(), None)]);
            if self.store.txn(txn).await?.succeeded() {
                return Ok(next);
            }
        }
    }

    async fn load(&self) -> Result<(View, i64), StoreError> {
        let mut view = View::default();
        let (kvs, revision) = self.store.get_prefix(&schema::prefix("units")).await?;
        for kv in kvs {
            if let Some(Key::Unit(name)) = kv.key_str().ok().and_then(Key::parse) {
                view.set_unit(name, record::decode(kv.value()));
            }
        }
        for (kind, at) in [("machines", revision), ("cordon", revision), ("schedule", revision), ("unplaced", revision)]
        {
            let (kvs, _) = self.store.get_prefix_at(&schema::prefix(kind), at).await?;
            for kv in kvs {
                match kv.key_str().ok().and_then(Key::parse) {
                    Some(Key::Machine(m)) => {
                        if let Some(r) = record::decode::<MachineRecord>(kv.value()) {
                            view.machines.insert(m.to_string(), r);
                        }
                    }
                    Some(Key::Cordon(m)) => {
                        if let Some(r) = record::decode(kv.value()) {
                            view.cordons.insert(m.to_string(), r);
                        }
                    }
                    Some(Key::Schedule(m, u)) => {
                        if let Some(e) = record::decode(kv.value()) {
                            view.schedule.insert((m.to_string(), u), e);
                        }
                    }
                    Some(Key::Unplaced(u)) => {
                        // An older engine's plain-text reason decodes to nothing and is rewritten.
                        view.unplaced.insert(u, record::decode(kv.value()).unwrap_or_default());
                    }
                    _ => {}
                }
            }
        }
        view.revision = revision;
        Ok((view, revision))
    }

    async fn lead(&self, term: &Term, shutdown: &CancellationToken) -> Result<(), StoreError> {
        let (mut view, revision) = self.load().await?;
        // Machines whose registration went while no engine led (the old leader died with them, or during the
        // hand-over): their units move now; their timelines say so.
        let gone: std::collections::BTreeSet<String> =
            view.schedule.keys().map(|(m, _)| m.clone()).filter(|m| !view.machines.contains_key(m)).collect();
        for m in gone {
            let detail = "not registered when this engine took the lead: its units move".to_owned();
            view.events.push((m, "dead", detail));
        }
        let mut stream = ViewWatch::open(&self.store, revision).await?;
        let (recorder, events) = mpsc::unbounded_channel();
        // Ends once the term's queue is written (the sender goes with this function).
        tokio::spawn(Self::record_events(self.store.clone(), events));
        let guard = [Compare::create_revision(Key::EngineLeader.path(), CompareOp::Equal, term.leader_rev)];
        let mut lost = term.lost.clone();
        let mut rounds = 0u64;
        let mut dirty = true;
        loop {
            if !view.events.is_empty() {
                let at = record::now_ms();
                for (i, (machine, event, detail)) in std::mem::take(&mut view.events).into_iter().enumerate() {
                    // Two events of one round keep their order.
                    let _ = recorder.send((
                        machine,
                        record::MachineEvent { at_ms: at + i as u64, event: event.to_owned(), detail },
                    ));
                }
            }
            if dirty {
                rounds += 1;
                self.reconcile(&mut view, term.epoch, &guard, rounds).await?;
                dirty = false;
            }
            let next_suspect = view.suspects.values().map(|(_, t)| *t).min();
            // While at-most-once units wait for their old machine to stop them, look again shortly.
            let next_suspect = if view.leaving.is_empty() && view.warming.is_empty() {
                next_suspect
            } else {
                let soon = Instant::now() + Duration::from_millis(200);
                Some(next_suspect.map_or(soon, |t| t.min(soon)))
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                r = lost.changed() => {
                    if r.is_err() || *lost.borrow() {
                        return Err(StoreError::Fenced("leader lease lost".into()));
                    }
                }
                msg = stream.next() => {
                    self.apply(&mut view, &msg?);
                    // Gather whatever else arrives while changes keep coming (bounded), then plan once.
                    let until = Instant::now() + self.cfg.settle * 10;
                    while Instant::now() < until {
                        match tokio::time::timeout(self.cfg.settle, stream.next()).await {
                            Ok(more) => self.apply(&mut view, &more?),
                            Err(_) => break,
                        }
                    }
                    dirty = true;
                }
                () = async { match next_suspect { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    let now = Instant::now();
                    let dead: Vec<String> = view.suspects.iter().filter(|(_, (_, t))| *t <= now).map(|(m, _)| m.clone()).collect();
                    for m in dead {
                        tracing::info!(machine = %m, "machine dead: moving its units");
                        view.suspects.remove(&m);
                        let detail = format!("suspect for {:?}: its units move", self.cfg.grace);
                        view.events.push((m, "dead", detail));
                    }
                    dirty = true;
                }
            }
        }
    }

    fn apply(&self, view: &mut View, resp: &etcd_client::WatchResponse) {
        self.store.stats().watched(resp.events().len() as u64);
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            view.revision = view.revision.max(kv.mod_revision());
            let put = ev.event_type() == EventType::Put;
            match kv.key_str().ok().and_then(Key::parse) {
                Some(Key::Unit(name)) => view.set_unit(name, if put { record::decode(kv.value()) } else { None }),
                Some(Key::Machine(m)) => {
                    let id = m.to_string();
                    if put {
                        if let Some(r) = record::decode::<MachineRecord>(kv.value()) {
                            let detail = [r.address.as_deref(), r.version.as_deref()]
                                .into_iter()
                                .flatten()
                                .collect::<Vec<_>>()
                                .join(", ");
                            if view.suspects.remove(&id).is_some() {
                                view.events.push((id.clone(), "back", detail));
                            } else if !view.machines.contains_key(&id) {
                                view.events.push((id.clone(), "registered", detail));
                            }
                            view.machines.insert(id, r);
                        }
                    } else if let Some(r) = view.machines.remove(&id) {
                        tracing::info!(machine = %id, "registration gone: suspect for {:?}", self.cfg.grace);
                        let detail = format!("registration gone; its units move after {:?}", self.cfg.grace);
                        view.events.push((id.clone(), "suspect", detail));
                        view.suspects.insert(id, (r, Instant::now() + self.cfg.grace));
                    }
                }
                Some(Key::Cordon(m)) => {
                    match if put { record::decode::<CordonRecord>(kv.value()) } else { None } {
                        Some(c) => view.cordons.insert(m.to_string(), c),
                        None => view.cordons.remove(m.as_str()),
                    };
                }
                _ => {}
            }
        }
    }

    /// Writes machine events in order, keeping the last [`schema::EVENTS_KEPT`] per machine, until the sender goes.
    /// Best effort: the events are for people reading a machine's timeline, nothing depends on them, and the
    /// engine's loop never waits for them (a write stuck on a dead etcd member must not delay a machine's death).
    async fn record_events(store: Store, mut events: mpsc::UnboundedReceiver<(String, record::MachineEvent)>) {
        while let Some((machine, e)) = events.recv().await {
            let Some(key) = schema::MachineKey::new(&machine) else { continue };
            let event = e.event.clone();
            if let Err(err) = store.put(&Key::Event(key.clone(), e.at_ms).path(), record::encode(&e), None).await {
                tracing::warn!(machine = %machine, "cannot record machine event {event}: {err}");
                continue;
            }
            let Ok((kvs, _)) = store.get_prefix(&schema::events_prefix(&key)).await else { continue };
            for kv in kvs.iter().take(kvs.len().saturating_sub(schema::EVENTS_KEPT)) {
                if let Ok(k) = kv.key_str() {
                    let _ = store.delete(k).await;
                }
            }
        }
    }

    async fn reconcile(&self, view: &mut View, epoch: u64, guard: &[Compare], rounds: u64) -> Result<(), StoreError> {
        let machine_view = |r: &MachineRecord, suspect: bool| {
            let cordon = view.cordons.get(&r.id);
            let mut labels = r.labels.clone();
            labels.entry("hostname".into()).or_insert_with(|| r.hostname.clone());
            MachineView {
                id: r.id.clone(),
                labels,
                cpu_millis: r.cpu_millis,
                memory: r.memory,
                rack: r.rack.clone(),
                schedulable: !suspect && cordon.is_none(),
                draining: cordon.is_some_and(|c| c.drain),
                reserved: r.reserved.iter().map(|(role, q)| (role.clone(), (q.cpu_millis, q.memory))).collect(),
            }
        };
        let machines: Vec<MachineView> = view
            .machines
            .values()
            .map(|r| machine_view(r, false))
            .chain(view.suspects.values().map(|(r, _)| machine_view(r, true)))
            .collect();
        let units: Vec<Unit> = view
            .units
            .iter()
            .filter(|(name, (r, _))| r.desired != Desired::Inactive && !name.is_template())
            .map(|(_, v)| v)
            .filter_map(|(_, u)| u.clone())
            .collect();
        let mut current = BTreeMap::new();
        for (m, u) in view.schedule.keys() {
            current.insert(u.clone(), m.clone());
        }
        // A warming unit is where it is going: the planner keeps it there.
        for (u, w) in &view.warming {
            current.insert(u.clone(), w.to.clone());
        }
        let started = Instant::now();
        let snapshot = Snapshot { machines, units, current };
        // Planning 50,000 units takes a few hundred ms of CPU: keep it off the async workers when there are others.
        let plan = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(|| plan::plan(&snapshot)),
            _ => plan::plan(&snapshot),
        };
        let planned = started.elapsed();

        let mut wanted: HashMap<(String, UnitName), ScheduleEntry> = HashMap::new();
        for (unit, on) in &plan.placements {
            let Some((rec, _)) = view.units.get(unit) else { continue };
            for m in on {
                let key = (m.clone(), unit.clone());
                let entry = match view.schedule.get(&key) {
                    Some(e) if e.desired == rec.desired && e.text == rec.text => e.clone(),
                    _ => ScheduleEntry { epoch, desired: rec.desired, text: rec.text.clone() },
                };
                wanted.insert(key, entry);
            }
        }
        // At-most-once units that left a live machine: still running there until its agent removes their state.
        let mut still_leaving = BTreeMap::new();
        for (unit, from) in std::mem::take(&mut view.leaving) {
            let registered = view.machines.contains_key(&from) || view.suspects.contains_key(&from);
            if registered
                && self.store.get(&Key::UnitState(unit.clone(), self.machine_key(&from)?).path()).await?.is_some()
            {
                still_leaving.insert(unit, from);
            }
        }
        view.leaving = still_leaving;
        // Warming units: done once their next machine loaded them (or failed, or took too long), or when the plan
        // or the machines changed under them.
        let mut still_warming = BTreeMap::new();
        for (unit, w) in std::mem::take(&mut view.warming) {
            if !wanted.contains_key(&(w.to.clone(), unit.clone())) || !view.machines.contains_key(&w.from) {
                continue;
            }
            let state = self.store.get(&Key::UnitState(unit.clone(), self.machine_key(&w.to)?).path()).await?;
            let state = state.and_then(|kv| record::decode::<record::StateRecord>(kv.value())).map(|r| r.state);
            let done = matches!(state, Some(ActiveState::Loaded | ActiveState::Active | ActiveState::Failed));
            if !done && w.since.elapsed() < WARM_LIMIT {
                still_warming.insert(unit, w);
            } else {
                tracing::info!(unit = %unit, from = %w.from, to = %w.to, "warm after {:?}: moving", w.since.elapsed());
            }
        }
        view.warming = still_warming;
        // Container units starting to move off a draining machine that is alive warm up first.
        for (from, unit) in view.schedule.keys() {
            if wanted.contains_key(&(from.clone(), unit.clone())) || view.warming.contains_key(unit) {
                continue;
            }
            let draining = view.machines.contains_key(from) && view.cordons.get(from).is_some_and(|c| c.drain);
            let container = view.units.get(unit).is_some_and(|(r, u)| {
                r.desired == Desired::Launched && u.as_ref().is_some_and(|u| u.container.is_some())
            });
            let to = wanted.keys().find(|(m, u)| u == unit && m != from).map(|(m, _)| m.clone());
            if let (true, true, Some(to)) = (draining, container, to)
                && !view.schedule.contains_key(&(to.clone(), unit.clone()))
            {
                tracing::info!(unit = %unit, from = %from, to = %to, "warming on the next machine before moving");
                view.warming.insert(unit.clone(), Warming { from: from.clone(), to, since: Instant::now() });
            }
        }
        let mut ops = Vec::new();
        let mut removed = Vec::new();
        // At-most-once units leaving dead machines: unit -> (the machines, the move's writes), one guarded txn each.
        let mut fenced_moves: BTreeMap<UnitName, (Vec<String>, Vec<TxnOp>)> = BTreeMap::new();
        for key in view.schedule.keys() {
            if view.warming.get(&key.1).is_some_and(|w| w.from == key.0) {
                // Keeps running here until its next machine has loaded it.
                continue;
            }
            if !wanted.contains_key(key) {
                let (from, unit) = key;
                let at_most_once =
                    view.units.get(unit).is_some_and(|(_, u)| u.as_ref().is_some_and(|u| u.placement.at_most_once));
                let dead = !view.machines.contains_key(from) && !view.suspects.contains_key(from);
                if at_most_once && dead {
                    let (machines, writes) = fenced_moves.entry(unit.clone()).or_default();
                    machines.push(from.clone());
                    writes.push(TxnOp::delete(self.schedule_key(key), None));
                } else {
                    ops.push(TxnOp::delete(self.schedule_key(key), None));
                }
                removed.push(key.clone());
                let moving_off_a_live_machine = view.machines.contains_key(from)
                    && view.units.get(unit).is_some_and(|(_, u)| u.as_ref().is_some_and(|u| u.placement.at_most_once))
                    && wanted.keys().any(|(m, u)| u == unit && m != from);
                if moving_off_a_live_machine {
                    view.leaving.insert(unit.clone(), from.clone());
                }
            }
        }
        let mut added = Vec::new();
        for (key, entry) in &wanted {
            if view.leaving.contains_key(&key.1) {
                // Break before make: it starts on its new machine only after the old one stopped it.
                continue;
            }
            let entry = if view.warming.get(&key.1).is_some_and(|w| w.to == key.0) {
                // Loaded, not started: the image is pulled and the container created while the old one runs.
                ScheduleEntry { desired: Desired::Loaded, ..entry.clone() }
            } else {
                entry.clone()
            };
            if view.schedule.get(key) != Some(&entry) {
                let put = TxnOp::put(self.schedule_key(key), record::encode(&entry), None);
                match fenced_moves.get_mut(&key.1) {
                    Some((_, writes)) => writes.push(put),
                    None => ops.push(put),
                }
                added.push((key.clone(), entry));
            }
        }
        let mut writes = ops.len();
        if !ops.is_empty() {
            self.store.apply(ops, guard).await?;
        }
        for (unit, (from, moves)) in fenced_moves {
            writes += moves.len();
            let mut when = guard.to_vec();
            for m in &from {
                when.push(Compare::version(Key::Machine(self.machine_key(m)?).path(), CompareOp::Equal, 0));
            }
            let moved = self.store.txn(etcd_client::Txn::new().when(when).and_then(moves)).await?.succeeded();
            if !moved {
                // A machine registered again (or this engine was deposed): nothing moved. The registration reaches
                // the view through the watch and the next round plans from it.
                tracing::info!(unit = %unit, from = ?from, "not moved: its machine registered again");
                removed.retain(|(_, u)| *u != unit);
                added.retain(|((_, u), _)| *u != unit);
                view.leaving.remove(&unit);
            }
        }
        tracing::debug!(round = rounds, ?planned, total = ?started.elapsed(), writes, "reconciled");
        for key in removed {
            view.schedule.remove(&key);
        }
        view.schedule.extend(added);
        // Why units are not placed, for list-units: written when the reason changes, removed once placed.
        let mut notes = Vec::new();
        for (unit, why) in &plan.unplaced {
            if view.unplaced.get(unit) != Some(why) {
                notes.push(TxnOp::put(Key::Unplaced(unit.clone()).path(), record::encode(why), None));
            }
        }
        for unit in view.unplaced.keys() {
            if !plan.unplaced.contains_key(unit) {
                notes.push(TxnOp::delete(Key::Unplaced(unit.clone()).path(), None));
            }
        }
        if !notes.is_empty() {
            self.store.apply(notes, guard).await?;
        }
        view.unplaced = plan.unplaced.clone();
        self.reconciled.send_replace(Reconciled {
            scheduled: view.schedule.len(),
            unplaced: plan.unplaced.len(),
            rounds,
            revision: view.revision,
        });
        Ok(())
    }

    fn machine_key(&self, id: &str) -> Result<crate::schema::MachineKey, StoreError> {
        crate::schema::MachineKey::new(id).ok_or_else(|| StoreError::Fenced(format!("bad machine id {id:?}")))
    }

    fn schedule_key(&self, (machine, unit): &(String, UnitName)) -> String {
        format!("{}{}", schema::prefix("schedule"), format_args!("{machine}/{unit}"))
    }
}

impl View {
    fn set_unit(&mut self, name: UnitName, record: Option<UnitRecord>) {
        match record {
            Some(r) => {
                let parsed = match Unit::parse(name.as_str(), &r.text) {
                    Ok(u) => Some(u),
                    Err(e) => {
                        tracing::warn!(unit = %name, "stored unit does not parse: {e}");
                        None
                    }
                };
                self.units.insert(name, (r, parsed));
            }
            None => {
                self.units.remove(&name);
            }
        }
    }
}

/// One term of leadership.
/// The engine's watch on what its view is made of (units, machines, cordons). A stream that breaks (the etcd
/// member behind it died) is opened again from the revision after the last event applied for each prefix, so the
/// view misses nothing and the engine keeps its term; a watch etcd cancels (history compacted) ends the term.
struct ViewWatch {
    store: Store,
    /// Each prefix and the revision of the last event applied under it.
    last: Vec<(String, i64)>,
    stream: Option<etcd_client::WatchStream>,
}

impl ViewWatch {
    /// Watches from the revision after `revision` (the one the view was loaded at).
    async fn open(store: &Store, revision: i64) -> Result<ViewWatch, StoreError> {
        let last = ["units", "machines", "cordon"].iter().map(|k| (schema::prefix(k), revision)).collect();
        let mut w = ViewWatch { store: store.clone(), last, stream: None };
        w.connect().await?;
        Ok(w)
    }

    async fn connect(&mut self) -> Result<&mut etcd_client::WatchStream, StoreError> {
        if self.stream.is_none() {
            let from: Vec<(String, i64)> = self.last.iter().map(|(p, r)| (p.clone(), r + 1)).collect();
            self.stream = Some(self.store.watch_prefixes(&from).await?);
        }
        self.stream.as_mut().ok_or_else(|| StoreError::Fenced("no watch".into()))
    }

    /// The next response with events. Cancel-safe.
    async fn next(&mut self) -> Result<etcd_client::WatchResponse, StoreError> {
        let mut failures = 0u64;
        loop {
            let msg = self.connect().await?.message().await;
            match msg {
                Ok(Some(resp)) if resp.canceled() => {
                    return Err(StoreError::Fenced(format!(
                        "etcd cancelled the engine's watch (compacted at revision {}): {}",
                        resp.compact_revision(),
                        resp.cancel_reason()
                    )));
                }
                Ok(Some(resp)) if resp.events().is_empty() => {}
                Ok(Some(resp)) => {
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        if let Some((_, last)) = self.last.iter_mut().find(|(p, _)| kv.key().starts_with(p.as_bytes()))
                        {
                            *last = (*last).max(kv.mod_revision());
                        }
                    }
                    return Ok(resp);
                }
                Ok(None) | Err(_) if failures < 5 => {
                    failures += 1;
                    tracing::debug!("engine watch broke ({msg:?}): watching again");
                    self.stream = None;
                    tokio::time::sleep(Duration::from_millis(100 * failures)).await;
                }
                Ok(None) => return Err(StoreError::Fenced("watch closed".into())),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

struct Term {
    lease: i64,
    leader_rev: i64,
    epoch: u64,
    lost: watch::Receiver<bool>,
    renewer: tokio::task::JoinHandle<()>,
}

impl Drop for Term {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Keeps the leader lease; signals when it cannot have been renewed within its TTL.
async fn keep_leading(mut ka: KeepAlive, ttl: Duration, lost: watch::Sender<bool>) {
    let every = (ttl / 3).max(Duration::from_millis(200));
    let mut last_ok = Instant::now();
    let mut wait = every;
    loop {
        tokio::time::sleep(wait).await;
        let sent = Instant::now();
        match tokio::time::timeout(every, ka.renew()).await {
            Ok(Ok(left)) if !left.is_zero() => {
                last_ok = sent;
                wait = every;
            }
            Ok(Ok(_)) => {
                lost.send_replace(true);
                return;
            }
            Ok(Err(_)) | Err(_) => {
                // The stream's member may have died: a new stream goes to another one; try again soon.
                wait = (every / 8).max(Duration::from_millis(100));
                // Step down before the lease can have expired on the server.
                if Instant::now() >= last_ok + ttl * 3 / 4 {
                    lost.send_replace(true);
                    return;
                }
            }
        }
    }
}
