//! The daemon stage's cluster part: on masters wait for the local etcd member to see a quorum, connect to etcd,
//! register this machine (id, address, labels, capacity, OS version and slot) under a lease through the unit agent,
//! run the agent (systemd for `[Service]` units, the Docker Engine — connected on first use — for `[Container]`
//! units), and on masters also run an engine instance (one of them leads).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herd_cluster::agent::{Agent, AgentConfig, AgentEvent};
use herd_cluster::docker::LazyDocker;
use herd_cluster::engine::{Engine, EngineConfig};
use herd_cluster::exec::Dispatch;
use herd_cluster::record::{MachineRecord, now_ms};
use herd_cluster::store::{Store, TlsFiles};
use herd_cluster::systemd::SystemdExecutor;
use herd_config::node::NodeConfig;
use tokio_util::sync::CancellationToken;

use crate::report::SystemReport;

/// How long a master waits for its etcd member to join a quorum.
const QUORUM_LIMIT: Duration = Duration::from_secs(600);
/// The agent's lease TTL (the engine's grace period is a quarter of it: `default_grace`).
const TTL: Duration = Duration::from_secs(10);
/// Where this node keeps its agent instance token (on STATE: it survives reboots, and a cloned disk is caught).
const INSTANCE: &str = "/var/lib/herd/instance";
/// The line printed once the machine is registered.
pub const REGISTERED: &str = "herd-node-init: registered";

/// Waits until the local etcd member knows a leader (so it is part of a quorum), asking it over `tls`. One
/// connection serves every question: a TLS handshake costs real CPU under emulation, and the member is busy
/// electing.
pub(crate) async fn wait_for_quorum(endpoint: &str, tls: &TlsFiles) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut said = Instant::now();
    let endpoints = [endpoint.to_owned()];
    let mut store: Option<Store> = None;
    loop {
        if store.is_none() {
            store = Store::connect(&endpoints, tls, Duration::from_secs(3)).await.ok();
        }
        let leader = match &store {
            Some(s) => s.client().status().await.map(|s| s.leader()).unwrap_or(0),
            None => 0,
        };
        if leader != 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > QUORUM_LIMIT {
            anyhow::bail!("the local etcd member has no quorum after {} s", QUORUM_LIMIT.as_secs());
        }
        if said.elapsed() > Duration::from_secs(10) {
            println!("herd-node-init: waiting for etcd to form a quorum ({} s)", started.elapsed().as_secs());
            said = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The local member's client URL.
pub(crate) fn local_member(node: &NodeConfig) -> String {
    format!("{}://127.0.0.1:2379", if node.etcd_tls() { "https" } else { "http" })
}

/// The machine's etcd client identity: with TLS, its certificate from the join and the pinned etcd CA.
pub(crate) fn tls_files(node: &NodeConfig) -> TlsFiles {
    if !node.etcd_tls() {
        return TlsFiles::default();
    }
    let file = |name: &str| Some(format!("{}/{name}", herd_config::node::TLS_DIR));
    TlsFiles { ca: file("etcd-ca.crt"), cert: file("machine.crt"), key: file("machine.key") }
}

/// Where this node reaches etcd. A master: only through its own member on the loopback, as Kubernetes' stacked
/// control planes do. It answers before networkd has given the bond the node's address (a one-member cluster needs
/// no network at all), and no request or watch of this machine ever waits on a peer that died without closing its
/// connections (a power cut): a stream on such a connection hangs until the HTTP/2 keep-alive gives up, ~9 s, and a
/// watch stuck there delayed a failover by that much. A master whose own member is down is not a working member of
/// the cluster; its lease lapses and its units move. Other nodes: through every member.
fn endpoints(node: &NodeConfig) -> Vec<String> {
    if node.etcd_member { vec![local_member(node)] } else { node.etcd_endpoints.clone() }
}

/// This node's instance token: read from [`INSTANCE`], or made and stored there.
fn instance_token() -> anyhow::Result<String> {
    use anyhow::Context as _;
    if let Ok(t) = std::fs::read_to_string(INSTANCE)
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_owned());
    }
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("reading /dev/urandom")?;
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    std::fs::create_dir_all("/var/lib/herd").context("mkdir /var/lib/herd")?;
    // Atomically: a crash leaves the old token or the new one, never half of one.
    let tmp = format!("{INSTANCE}.tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, token.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, INSTANCE)?;
        std::fs::File::open("/var/lib/herd")?.sync_all()
    };
    write().with_context(|| format!("writing {INSTANCE}"))?;
    Ok(token)
}

fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The registration of this machine.
pub fn machine_record(node: &NodeConfig, report: &SystemReport, instance: String) -> MachineRecord {
    let mut labels: BTreeMap<String, String> = node.labels.clone();
    labels.entry("rack".into()).or_insert_with(|| node.rack.clone());
    labels.entry("role".into()).or_insert_with(|| node.role.clone());
    let version = report.boot.as_ref().map(|b| {
        let slot = b.slot.map_or("ram".to_owned(), |s| format!("slot {s}"));
        format!("{} {} ({slot})", b.image, b.release)
    });
    MachineRecord {
        id: node.machine.clone(),
        hostname: node.machine.clone(),
        address: node.address.clone(),
        labels,
        rack: Some(node.rack.clone()),
        cpu_millis: std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000,
        memory: memory_bytes(),
        instance,
        reserved: BTreeMap::new(),
        version,
        since_ms: now_ms(),
    }
}

/// The line printed when the machine's certificates were renewed.
pub const RENEWED: &str = "herd-node-init: certificates renewed:";

/// How long a failed renewal (the provisioner unreachable, a reconnection refused) waits before it is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(30);

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Keeps the machine's certificates renewed for as long as it runs: at the renewal point of the first one due
/// ([`crate::identity::renewal_due`]), from the provisioner it booted from; then the store (the agent's and the
/// engine's) reconnects with the new certificate. A failure is tried again every [`RENEW_RETRY`]; `/metrics` on
/// the provisioner shows a machine whose renewals keep failing as `renew-soon`, then `expired`.
async fn keep_renewed(prov: crate::provision::Provisioner, node: NodeConfig, store: Store, stop: CancellationToken) {
    let dir = std::path::PathBuf::from(herd_config::node::TLS_DIR);
    let (machine, member, tls) = (node.machine.clone(), node.etcd_member, tls_files(&node));
    // What a renewal gave, until the store has reconnected with it.
    let mut renewed: Option<String> = None;
    loop {
        if renewed.is_none() {
            let due = crate::identity::renewal_due(&dir, &machine, member);
            let wait = Duration::from_secs((due - unix_now()).clamp(0, 3600) as u64);
            if !wait.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    () = stop.cancelled() => return,
                }
            }
            let (p, d, m) = (prov.clone(), dir.clone(), machine.clone());
            match tokio::task::spawn_blocking(move || crate::identity::renew(&p, &d, &m, member)).await {
                Ok(Ok(joined)) => {
                    let member = joined.member.map(|fp| format!(", member:{machine} {fp}")).unwrap_or_default();
                    renewed = Some(format!("machine:{machine} {}{member}", joined.machine));
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error::chain(&e), "cannot renew the machine's certificates")
                }
                Err(e) => tracing::warn!(error = %e, "the renewal stopped"),
            }
        }
        if let Some(what) = &renewed {
            match store.reconnect(&tls).await {
                Ok(()) => {
                    println!("{RENEWED} {what}; etcd reconnected with them");
                    renewed = None;
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "cannot reconnect to etcd with the renewed certificate"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RENEW_RETRY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Joins the cluster and runs until the agent stops; `registered` is called once the machine is registered. With
/// etcd over TLS, `prov` (the provisioner this machine booted from) renews its certificates.
pub fn run(
    node: &NodeConfig,
    report: &SystemReport,
    prov: Option<crate::provision::Provisioner>,
    registered: impl FnOnce(&str) + Send + 'static,
) -> anyhow::Result<()> {
    let instance = instance_token()?;
    let machine = machine_record(node, report, instance);
    let endpoints = endpoints(node);
    let tls = tls_files(node);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        if node.etcd_member {
            let took = wait_for_quorum(&endpoints[0], &tls).await?;
            println!("herd-node-init: etcd member healthy (quorum) after {:.1} s", took.as_secs_f64());
        }
        let store = loop {
            // Requests bounded by 2 s (etcd answers in milliseconds): one that went to a member that just died is
            // sent again to another soon, and the engine's view of the cluster does not lag by a long timeout.
            match Store::connect(&endpoints, &tls, Duration::from_secs(2)).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(?endpoints, error = %e, "cannot reach etcd; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                term.recv().await;
            }
            stop.cancel();
        });
        if let Some(prov) = prov.filter(|_| node.etcd_tls()) {
            tokio::spawn(crate::trust::keep_trusted(prov.clone(), node.clone(), store.clone(), shutdown.clone()));
            tokio::spawn(keep_renewed(prov, node.clone(), store.clone(), shutdown.clone()));
        }
        if node.etcd_member {
            let engine = Engine::new(store.clone(), EngineConfig::new(&node.machine));
            let token = shutdown.clone();
            tokio::spawn(async move { engine.run(token).await });
        }
        let cfg = AgentConfig { machine, ttl: TTL, status_interval: Duration::from_secs(2) };
        let exec = Arc::new(Dispatch { services: SystemdExecutor::default(), containers: LazyDocker::new(None) });
        let agent = Agent::new(store, cfg, exec)?;
        let mut events = agent.events();
        let id = node.machine.clone();
        tokio::spawn(async move {
            while let Ok(e) = events.recv().await {
                if let AgentEvent::Registered { lease } = e {
                    let detail = format!("{id} registered in etcd (lease {lease:x})");
                    println!("{REGISTERED}: {detail}, {} ms after the kernel", crate::initrd::uptime_ms());
                    registered(&detail);
                    return;
                }
            }
        });
        agent.run(shutdown).await.map_err(|e| {
            tracing::error!(error = %e, "the unit agent stopped");
            anyhow::Error::new(e)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(member: bool) -> NodeConfig {
        let text = format!(
            r#"{{"version": 1, "machine": "m1", "fqdn": "m1.example", "role": "r", "rack": "r1",
               "provisioner_url": "http://10.0.0.2", "etcd_member": {member}, "labels": {{}},
               "etcd_endpoints": ["http://10.0.0.11:2379", "http://10.0.0.12:2379", "http://10.0.0.13:2379"]}}"#
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn a_master_reaches_etcd_through_its_own_member_on_the_loopback() {
        assert_eq!(endpoints(&node(true)), ["http://127.0.0.1:2379"]);
        let worker = endpoints(&node(false));
        assert_eq!(worker, ["http://10.0.0.11:2379", "http://10.0.0.12:2379", "http://10.0.0.13:2379"]);
        assert_eq!(tls_files(&node(true)), TlsFiles::default());
    }

    #[test]
    fn with_tls_a_machine_connects_over_https_with_its_own_certificate() {
        let mut master = node(true);
        master.etcd_endpoints = master.etcd_endpoints.iter().map(|e| e.replace("http:", "https:")).collect();
        assert_eq!(endpoints(&master), ["https://127.0.0.1:2379"]);
        let tls = tls_files(&master);
        assert_eq!(tls.cert.as_deref(), Some("/var/lib/herd/tls/machine.crt"));
        assert_eq!(tls.key.as_deref(), Some("/var/lib/herd/tls/machine.key"));
        assert_eq!(tls.ca.as_deref(), Some("/var/lib/herd/tls/etcd-ca.crt"));
    }
}
