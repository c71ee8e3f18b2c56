//! Scale and failover benchmarks with hollow machines (kubemark-style): the real agent code with a
//! [`RecordingExecutor`], against a real etcd (a local 3-member cluster unless endpoints are given). Driven by
//! `herdctl bench scheduler|failover`, which prints the figures next to the anchors'.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::TxnOp;
use tokio_util::sync::CancellationToken;

use crate::local::LocalEtcd;
use herd_cluster::agent::{Agent, AgentConfig};
use herd_cluster::engine::{Engine, EngineConfig};
use herd_cluster::exec::RecordingExecutor;
use herd_cluster::record::{self, Desired, MachineRecord, UnitRecord};
use herd_cluster::schema::{self, Key};
use herd_cluster::store::{Stats, Store, TlsFiles};
use herd_cluster::unit::UnitName;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Hollow machines.
    pub machines: usize,
    /// Units to place (scheduler) or to spread before killing a machine (failover).
    pub units: usize,
    /// Racks the machines are spread over.
    pub racks: usize,
    /// etcd connections the hollow machines share.
    pub connections: usize,
    /// Lease TTL of the agents.
    pub ttl: Duration,
    /// etcd to use; None starts a local cluster of `etcd_members` under `dir`.
    pub endpoints: Option<Vec<String>>,
    /// Members of the local etcd cluster.
    pub etcd_members: usize,
    /// Scratch directory.
    pub dir: PathBuf,
    /// Mutual TLS and etcd's users and roles (the local etcd only): every connection with its own certificate,
    /// each hollow machine's permissions those of a machine (the machines sharing a connection share a role
    /// holding all of theirs), the engine's and the submitter's their roles'.
    pub secure: bool,
}

/// One placement phase of the scheduler bench.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Units added in the phase.
    pub units: usize,
    /// Units in the cluster after it.
    pub total: usize,
    /// Writing the units (the submit).
    pub submit: Duration,
    /// From the start of the submit until the engine had scheduled every unit.
    pub placed: Duration,
    /// From the start of the submit until every unit ran on its machine.
    pub running: Duration,
    /// etcd requests (engine, agents, submitter) per unit during the phase.
    pub requests_per_unit: f64,
    /// etcd requests per second of the idle cluster after the phase.
    pub idle_requests_per_sec: f64,
}

/// The scheduler bench's figures.
#[derive(Debug, Clone, Default)]
pub struct SchedulerReport {
    /// Hollow machines.
    pub machines: usize,
    /// Time until every machine had registered.
    pub registered: Duration,
    /// Resident memory added per hollow machine (the whole process's growth divided by the machines).
    pub rss_per_machine_kib: f64,
    /// The phases: a tenth of the units, then the rest.
    pub phases: Vec<Phase>,
}

/// The failover bench's figures.
#[derive(Debug, Clone, Default)]
pub struct FailoverReport {
    /// Lease TTL used.
    pub ttl: Duration,
    /// Grace period used.
    pub grace: Duration,
    /// Per trial: units the killed machine ran, and the time from its death until all of them ran elsewhere.
    pub trials: Vec<(usize, Duration)>,
}

/// Progress callback: (what, done, of).
pub type Progress<'a> = &'a (dyn Fn(&str, u64, u64) + Sync);

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Hollow {
    exec: Arc<RecordingExecutor>,
    task: tokio::task::JoinHandle<()>,
}

/// The TLS files each part of a bench cluster connects with (none without TLS).
#[derive(Debug, Default)]
struct Credentials {
    admin: TlsFiles,
    submit: TlsFiles,
    engine: TlsFiles,
    groups: Vec<TlsFiles>,
}

/// The id of hollow machine `i`.
fn hollow_id(i: usize) -> String {
    format!("hollow-{i:05}")
}

/// Issues the bench's certificates from the site the secure `etcd` was started with and applies etcd's users and
/// roles: an operator submits, a machine runs the engine, and connection group `k` (the hollow machines `i` with
/// `i % groups == k`) is one user whose role holds every one of its machines' permissions.
async fn secure(
    cfg: &BenchConfig,
    etcd: &LocalEtcd,
    endpoints: &[String],
    groups: usize,
) -> anyhow::Result<Credentials> {
    use herd_cluster::access::{self, Policy};
    use herd_pki::{Holder, Role, Subject};
    let site = herd_pki::Site::open(&cfg.dir.join("pki"))?;
    let now = time::OffsetDateTime::now_utc();
    let issue = |holder: Holder| -> anyhow::Result<TlsFiles> {
        let out = cfg.dir.join("credentials").join(holder.common_name().replace(':', "-"));
        herd_pki::write_credential(&site, &Subject::new(holder, time::Duration::days(1)), &out, now)?;
        let file = |f: &str| Some(out.join(f).display().to_string());
        Ok(TlsFiles { ca: file("etcd-ca.crt"), cert: file("etcd.crt"), key: file("etcd.key") })
    };
    let admin = Store::connect(endpoints, &etcd.tls(), Duration::from_secs(10)).await?;
    let engine_key = schema::MachineKey::new("bench-engine").ok_or_else(|| anyhow::anyhow!("machine id"))?;
    let policy = Policy {
        machines: vec![(engine_key, true)],
        operators: vec![(crate::local::LAB_ADMIN.to_owned(), Role::Admin), ("bench".to_owned(), Role::Operator)],
    };
    access::apply(&admin, &policy).await?;
    let mut creds = Credentials {
        admin: etcd.tls(),
        submit: issue(Holder::Operator("bench".to_owned(), Role::Operator))?,
        engine: issue(Holder::Machine("bench-engine".to_owned()))?,
        groups: Vec::new(),
    };
    let mut set = tokio::task::JoinSet::new();
    for k in 0..groups {
        let name = format!("hollow-group-{k}");
        let mut grants = std::collections::BTreeSet::new();
        for i in (k..cfg.machines).step_by(groups) {
            let key = schema::MachineKey::new(&hollow_id(i)).ok_or_else(|| anyhow::anyhow!("machine id"))?;
            grants.extend(access::machine_role(&key).1);
        }
        creds.groups.push(issue(Holder::Machine(name.clone()))?);
        let admin = admin.clone();
        set.spawn(async move {
            access::set_user_with_grants(&admin, &format!("machine:{name}"), &format!("herd-machine:{name}"), &grants)
                .await
        });
        while set.len() >= 8 {
            if let Some(r) = set.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(creds)
}

/// A running bench cluster: etcd, one engine, hollow machines.
struct BenchCluster {
    _etcd: Option<LocalEtcd>,
    engine: Arc<Engine>,
    engine_stats: Arc<Stats>,
    agent_stats: Arc<Stats>,
    submit: Store,
    machines: Vec<Hollow>,
    stop: CancellationToken,
}

impl BenchCluster {
    async fn start(cfg: &BenchConfig, grace: Duration, progress: Progress<'_>) -> anyhow::Result<BenchCluster> {
        let (etcd, endpoints) = match &cfg.endpoints {
            Some(e) => (None, e.clone()),
            None => {
                let dir = cfg.dir.join("etcd");
                let etcd = if cfg.secure {
                    let now = time::OffsetDateTime::now_utc();
                    let site = herd_pki::Site::init(&cfg.dir.join("pki"), "bench", now)?;
                    LocalEtcd::start_secure(&dir, cfg.etcd_members.max(1), &site)?
                } else {
                    LocalEtcd::start(&dir, cfg.etcd_members.max(1))?
                };
                etcd.ready(Duration::from_secs(60)).await?;
                let e = etcd.endpoints();
                (Some(etcd), e)
            }
        };
        let timeout = Duration::from_secs(10);
        let groups = cfg.connections.max(1);
        let tls = match (&etcd, cfg.secure) {
            (Some(etcd), true) => secure(cfg, etcd, &endpoints, groups).await?,
            _ => Credentials::default(),
        };
        // A previous run's keys would skew every figure.
        Store::connect(&endpoints, &tls.admin, timeout).await?.delete_prefix(schema::ROOT).await?;
        let submit = Store::connect(&endpoints, &tls.submit, timeout).await?;
        let engine_store = Store::connect(&endpoints, &tls.engine, timeout).await?;
        let engine_stats = engine_store.stats().clone();
        let engine = Arc::new(Engine::new(
            engine_store,
            EngineConfig { ttl: Duration::from_secs(10), grace, ..EngineConfig::new("bench-engine") },
        ));
        let stop = CancellationToken::new();
        let (e, s) = (engine.clone(), stop.clone());
        tokio::spawn(async move { e.run(s).await });
        let mut conns = Vec::new();
        for k in 0..groups {
            let files = tls.groups.get(k).cloned().unwrap_or_default();
            conns.push(Store::connect(&endpoints, &files, timeout).await?);
        }
        let agent_stats = Arc::new(Stats::default());
        let mut machines = Vec::with_capacity(cfg.machines);
        for i in 0..cfg.machines {
            let rack = format!("r{:03}", i % cfg.racks.max(1));
            let id = hollow_id(i);
            let machine = MachineRecord {
                id: id.clone(),
                hostname: id.clone(),
                address: None,
                labels: [("rack".to_owned(), rack.clone())].into_iter().collect(),
                rack: Some(rack),
                cpu_millis: 64_000,
                memory: 256 << 30,
                instance: format!("bench-{i}"),
                version: None,
                since_ms: 0,
                reserved: Default::default(),
            };
            let store = conns[i % conns.len()].with_own_stats(agent_stats.clone());
            let exec = Arc::new(RecordingExecutor::default());
            let agent_cfg = AgentConfig { machine, ttl: cfg.ttl, status_interval: Duration::from_secs(3600) };
            let agent = Agent::new(store, agent_cfg, exec.clone())?;
            let s = stop.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = agent.run(s).await {
                    tracing::error!("hollow agent: {e}");
                }
            });
            machines.push(Hollow { exec, task });
        }
        let cluster =
            BenchCluster { _etcd: etcd, engine, engine_stats, agent_stats, submit, machines, stop: stop.clone() };
        let n = cfg.machines as i64;
        loop {
            let registered = cluster.submit.count(&schema::prefix("machines")).await?;
            progress("machines registered", registered as u64, n as u64);
            if registered >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(cluster)
    }

    fn requests(&self) -> u64 {
        self.engine_stats.requests() + self.agent_stats.requests() + self.submit.stats().requests()
    }

    fn active(&self) -> u64 {
        self.machines.iter().map(|m| m.exec.active()).sum()
    }

    /// Writes units `from..to` (launched) in transactions of 128, 8 at a time.
    async fn submit_units(&self, from: usize, to: usize) -> anyhow::Result<()> {
        let text = "[Unit]\nDescription=hollow job\n[Service]\nExecStart=/bin/true\n[X-Fleet]\nCPU=10m\n";
        let value = record::encode(&UnitRecord { text: text.to_owned(), desired: Desired::Launched });
        let mut batches = Vec::new();
        let mut ops = Vec::new();
        for i in from..to {
            let name: UnitName = format!("job@{i}.service").parse()?;
            ops.push(TxnOp::put(Key::Unit(name).path(), value.clone(), None));
            if ops.len() == herd_cluster::store::MAX_TXN_OPS {
                batches.push(std::mem::take(&mut ops));
            }
        }
        if !ops.is_empty() {
            batches.push(ops);
        }
        let mut set = tokio::task::JoinSet::new();
        let mut iter = batches.into_iter();
        loop {
            while set.len() < 8 {
                let Some(batch) = iter.next() else { break };
                let store = self.submit.clone();
                set.spawn(async move { store.apply(batch, &[]).await });
            }
            match set.join_next().await {
                Some(r) => r??,
                None => return Ok(()),
            }
        }
    }

    async fn shutdown(self) {
        self.stop.cancel();
        for m in &self.machines {
            m.task.abort();
        }
    }
}

/// Places `cfg.units` units on `cfg.machines` hollow machines in two phases (a tenth, then the rest) and
/// measures placement rate, etcd requests per unit, the idle cluster's etcd traffic after each phase, and memory
/// per hollow machine.
pub async fn scheduler(cfg: &BenchConfig, progress: Progress<'_>) -> anyhow::Result<SchedulerReport> {
    let rss0 = rss_kib();
    let started = Instant::now();
    let cluster = BenchCluster::start(cfg, Duration::from_secs(5), progress).await?;
    let mut report = SchedulerReport {
        machines: cfg.machines,
        registered: started.elapsed(),
        rss_per_machine_kib: rss_kib().saturating_sub(rss0) as f64 / cfg.machines.max(1) as f64,
        phases: Vec::new(),
    };
    // Every machine has renewed its lease once (opening its keep-alive stream) before anything is measured.
    tokio::time::sleep(cfg.ttl / 3 + Duration::from_secs(1)).await;
    let first = (cfg.units / 10).max(1).min(cfg.units);
    let mut reconciled = cluster.engine.reconciled();
    for (from, to) in [(0, first), (first, cfg.units)] {
        if to <= from {
            continue;
        }
        let requests0 = cluster.requests();
        let t0 = Instant::now();
        cluster.submit_units(from, to).await?;
        let submit = t0.elapsed();
        let mut placed = None;
        loop {
            let scheduled = reconciled.borrow_and_update().scheduled;
            if placed.is_none() && scheduled >= to {
                placed = Some(t0.elapsed());
            }
            let active = cluster.active();
            progress("units running", active, to as u64);
            if placed.is_some() && active >= to as u64 {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), reconciled.changed()).await;
        }
        let running = t0.elapsed();
        let requests = cluster.requests() - requests0;
        // Let the last state reports land, then count what an idle cluster asks of etcd.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle0 = cluster.requests();
        // One whole keep-alive period (a third of the TTL): every machine renews once in it.
        let idle_for = cfg.ttl / 3;
        tokio::time::sleep(idle_for).await;
        let idle = (cluster.requests() - idle0) as f64 / idle_for.as_secs_f64();
        report.phases.push(Phase {
            units: to - from,
            total: to,
            submit,
            placed: placed.unwrap_or(running),
            running,
            requests_per_unit: requests as f64 / (to - from) as f64,
            idle_requests_per_sec: idle,
        });
    }
    cluster.shutdown().await;
    Ok(report)
}

/// Spreads `cfg.units` units over the hollow machines, then kills one machine at a time (its agent dies without a
/// word, as a machine losing power) and measures how long until every unit it ran runs elsewhere.
pub async fn failover(cfg: &BenchConfig, trials: usize, progress: Progress<'_>) -> anyhow::Result<FailoverReport> {
    let grace = herd_cluster::engine::default_grace(cfg.ttl);
    let mut cluster = BenchCluster::start(cfg, grace, progress).await?;
    cluster.submit_units(0, cfg.units).await?;
    while cluster.active() < cfg.units as u64 {
        progress("units running", cluster.active(), cfg.units as u64);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut report = FailoverReport { ttl: cfg.ttl, grace, trials: Vec::new() };
    for trial in 0..trials.min(cfg.machines.saturating_sub(1)) {
        let victim = cluster.machines.remove(trial % cluster.machines.len());
        let lost = victim.exec.active();
        let died = Instant::now();
        victim.task.abort();
        // The dead machine's hollow executor still counts its units; the live ones must reach the total again.
        loop {
            let live: u64 = cluster.machines.iter().map(|m| m.exec.active()).sum();
            progress("units running elsewhere", live, cfg.units as u64);
            if live >= cfg.units as u64 {
                break;
            }
            if died.elapsed() > cfg.ttl * 10 {
                anyhow::bail!("units of the killed machine did not come back within 10 x TTL");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report.trials.push((lost as usize, died.elapsed()));
    }
    cluster.shutdown().await;
    Ok(report)
}
