//! The cluster test lab: a real 3-member etcd, engine instances, and agents running real processes, each agent
//! reaching etcd through its own cuttable TCP proxy (to partition one machine).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herd_cluster::agent::{Agent, AgentConfig, AgentEvent};
use herd_cluster::client::ClusterClient;
use herd_cluster::engine::{Engine, EngineConfig, EngineStatus};
use herd_cluster::exec::{Executor, ProcessExecutor};
use herd_cluster::record::MachineRecord;
use herd_cluster::store::{Store, TlsFiles};
use herd_lab::local::LocalEtcd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;

/// Lease TTL of agents and engines in the lab.
pub const TTL: Duration = Duration::from_secs(2);
/// Grace before a suspect machine is dead.
pub const GRACE: Duration = Duration::from_secs(1);

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herd-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TCP proxy that can be cut (existing connections closed, new ones refused) and restored.
pub struct Proxy {
    pub addr: String,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<CancellationToken>>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(CancellationToken::new()));
        let (c, k) = (cut.clone(), conns.clone());
        let target = upstream.trim_start_matches("http://").to_owned();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = k.lock().await.clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        Proxy { addr, cut, conns }
    }

    pub async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let mut k = self.conns.lock().await;
        k.cancel();
        *k = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A machine of the lab: its agent task, its executor, its proxies to etcd.
pub struct Machine {
    pub id: String,
    pub proxies: Vec<Proxy>,
    pub events: broadcast::Receiver<AgentEvent>,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), herd_cluster::agent::AgentError>>,
}

impl Machine {
    pub async fn partition(&self) {
        for p in &self.proxies {
            p.cut().await;
        }
    }

    pub fn heal(&self) {
        for p in &self.proxies {
            p.restore();
        }
    }
}

/// An engine instance of the lab, reaching etcd through its own proxies.
pub struct EngineHandle {
    pub crashed: AtomicBool,
    pub engine: Arc<Engine>,
    pub proxies: Vec<Proxy>,
    pub task: tokio::task::JoinHandle<()>,
}

impl EngineHandle {
    /// Crashes the instance: its task dies and it stops talking to etcd at once (no resignation).
    pub async fn crash(&self) {
        self.crashed.store(true, Ordering::SeqCst);
        self.task.abort();
        for p in &self.proxies {
            p.cut().await;
        }
    }
}

pub struct Lab {
    pub dir: PathBuf,
    pub etcd: LocalEtcd,
    pub store: Store,
    pub client: ClusterClient,
    pub engines: Vec<EngineHandle>,
    pub machines: BTreeMap<String, Machine>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

pub fn machine_record(id: &str, rack: &str, labels: &[(&str, &str)]) -> MachineRecord {
    let mut l: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    l.insert("rack".into(), rack.into());
    MachineRecord {
        id: id.into(),
        hostname: id.into(),
        address: Some("127.0.0.1".into()),
        labels: l,
        rack: Some(rack.into()),
        cpu_millis: 4000,
        memory: 8 << 30,
        instance: format!("instance-{id}"),
        version: None,
        since_ms: 0,
        reserved: Default::default(),
    }
}

impl Lab {
    /// etcd, `engines` engine instances, no machines yet.
    pub async fn start(name: &str, engines: usize) -> Lab {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        // At most two labs (three etcd members each) at once per test binary: on two cores, more make etcd
        // elections thrash and measure the machine, not herd.
        static LABS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
        let permit =
            LABS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(2))).clone().acquire_owned().await.unwrap();
        let dir = scratch(name);
        let etcd = LocalEtcd::start(&dir.join("etcd"), 3).unwrap();
        let store = etcd.ready(Duration::from_secs(60)).await.unwrap();
        let client = ClusterClient::new(store.clone());
        let mut lab = Lab { dir, etcd, store, client, engines: Vec::new(), machines: BTreeMap::new(), _permit: permit };
        for i in 0..engines {
            lab.add_engine(&format!("engine{i}")).await;
        }
        lab
    }

    pub async fn add_engine(&mut self, id: &str) {
        let cfg = EngineConfig { ttl: TTL, grace: GRACE, ..EngineConfig::new(id) };
        let mut proxies = Vec::new();
        for e in self.etcd.endpoints() {
            proxies.push(Proxy::start(e).await);
        }
        let endpoints: Vec<String> = proxies.iter().map(|p| p.addr.clone()).collect();
        let store = Store::connect(&endpoints, &TlsFiles::default(), Duration::from_millis(700)).await.unwrap();
        let engine = Arc::new(Engine::new(store, cfg));
        let e = engine.clone();
        let task = tokio::spawn(async move { e.run(CancellationToken::new()).await });
        self.engines.push(EngineHandle { crashed: AtomicBool::new(false), engine, proxies, task });
    }

    /// Index of the engine currently leading (waits, bounded).
    pub async fn leader(&self, within: Duration) -> usize {
        poll(within, "an engine leader", || async {
            self.engines.iter().position(|h| {
                !h.crashed.load(Ordering::SeqCst) && matches!(*h.engine.status().borrow(), EngineStatus::Leader { .. })
            })
        })
        .await
    }

    /// Waits (bounded) until the leading engine has finished a reconcile round planned from a view that holds
    /// the latest change to `key` (a unit's or a machine's key, which the engine watches): what it does about the
    /// change is then written. Tests wait on this, not on a fixed time, before they check that nothing moved.
    pub async fn engine_round_after(&self, key: &str) {
        let revision = self.store.get(key).await.unwrap().map(|kv| kv.mod_revision()).expect("the key exists");
        poll(Duration::from_secs(30), &format!("an engine round after revision {revision} ({key})"), || async {
            self.engines
                .iter()
                .any(|h| !h.crashed.load(Ordering::SeqCst) && h.engine.reconciled().borrow().revision >= revision)
                .then_some(())
        })
        .await;
    }

    /// Starts an agent for `record` (through its own proxies) running real processes, and returns its id.
    pub async fn add_machine(&mut self, record: MachineRecord) -> String {
        let m = self.spawn_agent(record, Arc::new(ProcessExecutor::default())).await;
        let id = m.id.clone();
        self.machines.insert(id.clone(), m);
        id
    }

    pub async fn spawn_agent<E: Executor>(&self, record: MachineRecord, exec: Arc<E>) -> Machine {
        let mut proxies = Vec::new();
        for e in self.etcd.endpoints() {
            proxies.push(Proxy::start(e).await);
        }
        let endpoints: Vec<String> = proxies.iter().map(|p| p.addr.clone()).collect();
        let store = Store::connect(&endpoints, &TlsFiles::default(), Duration::from_millis(700)).await.unwrap();
        let cfg = AgentConfig { machine: record.clone(), ttl: TTL, status_interval: Duration::from_millis(300) };
        let agent = Agent::new(store, cfg, exec).unwrap();
        let events = agent.events();
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move { agent.run(s).await });
        Machine { id: record.id, proxies, events, stop, task }
    }

    /// Kills an agent (as a machine dying: it stops talking to etcd at once).
    pub async fn kill_machine(&mut self, id: &str) -> Machine {
        let m = self.machines.remove(id).unwrap();
        m.task.abort();
        m.partition().await;
        m
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Agents and engines first (their processes with them), then etcd, then the scratch data.
        for m in self.machines.values() {
            m.task.abort();
        }
        for e in &self.engines {
            e.task.abort();
        }
        self.etcd.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` every 50 ms until it yields Some, at most `within`; panics naming `what` otherwise.
pub async fn poll<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A unit that runs a long sleep.
pub fn sleeper(xfleet: &str) -> String {
    format!("[Unit]\nDescription=test\n[Service]\nExecStart=/bin/sleep 3600\n[X-Fleet]\n{xfleet}")
}
