//! Trust inside etcd (docs/security.md): a real 3-member etcd with mutual TLS on every client and peer URL and
//! herd's users and roles applied (`access::apply`). Who gets in, and what each holder may touch.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{machine_record, poll, scratch, sleeper};
use herd_cluster::access::{self, Policy};
use herd_cluster::agent::{Agent, AgentConfig};
use herd_cluster::client::{ClientError, ClusterClient};
use herd_cluster::engine::{Engine, EngineConfig};
use herd_cluster::exec::ProcessExecutor;
use herd_cluster::record::{ActiveState, Desired};
use herd_cluster::schema::{Key, MachineKey};
use herd_cluster::store::{Store, StoreError, TlsFiles};
use herd_lab::local::{LAB_ADMIN, LocalEtcd};
use herd_pki::{Authority, Holder, KeySource, Role, Site, Subject};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

struct Secure {
    dir: std::path::PathBuf,
    site: Site,
    etcd: LocalEtcd,
}

impl Secure {
    async fn start(name: &str) -> Secure {
        let dir = scratch(name);
        let now = time::OffsetDateTime::now_utc();
        let site = Site::init(&dir.join("pki"), "lab", now).unwrap();
        let etcd = LocalEtcd::start_secure(&dir.join("etcd"), 3, &site).unwrap();
        etcd.ready(Duration::from_secs(60)).await.unwrap();
        Secure { dir, site, etcd }
    }

    /// Writes a credential for `holder` from `site` (a machine's from a request: its key is made "on the machine").
    fn credential(&self, site: &Site, holder: Holder) -> TlsFiles {
        let now = time::OffsetDateTime::now_utc();
        // Its address, as a real holder's names its own (etcd also checks a peer's address against them).
        let mut subject = Subject::new(holder.clone(), time::Duration::hours(1));
        subject.ips = vec![std::net::Ipv4Addr::LOCALHOST.into()];
        let (key, cert) = match holder {
            Holder::Machine(_) => {
                let (key, csr) = herd_pki::request("anything").unwrap();
                let issued = site.issue(Authority::Etcd, &subject, KeySource::Request(&csr), now).unwrap();
                (key, issued.cert_pem)
            }
            _ => {
                let issued = site.issue(Authority::Etcd, &subject, KeySource::Generate, now).unwrap();
                (issued.key_pem.unwrap(), issued.cert_pem)
            }
        };
        let stem = self.dir.join(holder.common_name().replace(':', "-"));
        let (cert_path, key_path) = (stem.with_extension("crt"), stem.with_extension("key"));
        herd_pki::write_public(&cert_path, cert.as_bytes()).unwrap();
        herd_pki::write_private(&key_path, key.as_bytes()).unwrap();
        TlsFiles {
            ca: self.etcd.tls().ca,
            cert: Some(cert_path.display().to_string()),
            key: Some(key_path.display().to_string()),
        }
    }

    async fn store(&self, tls: &TlsFiles) -> Store {
        Store::connect(&self.etcd.endpoints(), tls, Duration::from_secs(2))
            .await
            .unwrap()
            .with_retry_for(Duration::ZERO)
    }

    fn policy() -> Policy {
        Policy {
            machines: vec![(MachineKey::new("m1").unwrap(), true), (MachineKey::new("m2").unwrap(), false)],
            operators: vec![
                (LAB_ADMIN.to_owned(), Role::Admin),
                ("olga".to_owned(), Role::Operator),
                ("rita".to_owned(), Role::ReadOnly),
            ],
        }
    }
}

impl Drop for Secure {
    fn drop(&mut self) {
        self.etcd.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn denied(r: Result<impl std::fmt::Debug, StoreError>) -> bool {
    match r {
        Err(StoreError::Etcd(etcd_client::Error::GRpcStatus(s))) => s.code() == tonic::Code::PermissionDenied,
        _ => false,
    }
}

fn machine(name: &str) -> Holder {
    Holder::Machine(name.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_lets_in_only_site_certificates_and_each_holder_only_its_keys() {
    let lab = Secure::start("trust-access").await;
    let admin = lab.store(&lab.etcd.tls()).await;
    let applied = access::apply(&admin, &Secure::policy()).await.unwrap();
    assert!(applied.users.contains(&"machine:m1".to_owned()) && applied.roles.contains(&"herd-machine:m2".to_owned()));
    assert!(access::apply(&admin, &Secure::policy()).await.unwrap().is_empty(), "a second apply changed something");
    let probe = "/herd/v1/units/probe.service";

    // No certificate, or one from another site's CA: the TLS handshake refuses the connection.
    let no_cert = TlsFiles { ca: lab.etcd.tls().ca, cert: None, key: None };
    let other = Site::init(&lab.dir.join("other-pki"), "other", time::OffsetDateTime::now_utc()).unwrap();
    let foreign = lab.credential(&other, Holder::Operator(LAB_ADMIN.to_owned(), Role::Admin));
    for (who, tls) in [("no certificate", &no_cert), ("another CA's certificate", &foreign)] {
        let refused = match Store::connect(&lab.etcd.endpoints(), tls, Duration::from_secs(2)).await {
            Err(_) => true,
            Ok(s) => s.with_retry_for(Duration::ZERO).get(probe).await.is_err(),
        };
        assert!(refused, "etcd answered a client with {who}");
    }
    // A certificate from the site CA for a machine the policy does not know gets nothing either.
    let stranger = lab.store(&lab.credential(&lab.site, machine("m9"))).await;
    assert!(stranger.get(probe).await.is_err(), "a machine outside the inventory read a key");

    // A machine: its own registration and states, its own schedule (read), nothing else.
    let m1 = lab.store(&lab.credential(&lab.site, machine("m1"))).await;
    let unit: herd_cluster::unit::UnitName = "web.service".parse().unwrap();
    let (k1, k2) = (MachineKey::new("m1").unwrap(), MachineKey::new("m2").unwrap());
    m1.put(&Key::Machine(k1.clone()).path(), b"{}".to_vec(), None).await.unwrap();
    m1.put(&Key::UnitState(unit.clone(), k1.clone()).path(), b"{}".to_vec(), None).await.unwrap();
    m1.get_prefix(&herd_cluster::schema::schedule_prefix(&k1)).await.unwrap();
    let m2 = lab.store(&lab.credential(&lab.site, machine("m2"))).await;
    for (what, key) in [
        ("another machine's schedule", Key::Schedule(k1.clone(), unit.clone()).path()),
        ("another machine's registration", Key::Machine(k1.clone()).path()),
        ("another machine's state", Key::UnitState(unit.clone(), k1.clone()).path()),
        ("its own schedule", Key::Schedule(k2.clone(), unit.clone()).path()),
        ("the engine's leader key", Key::EngineLeader.path()),
        ("the engine's epoch", Key::EngineEpoch.path()),
        ("a unit", Key::Unit(unit.clone()).path()),
    ] {
        assert!(denied(m2.put(&key, b"{}".to_vec(), None).await), "machine m2 wrote {what} ({key})");
    }
    assert!(denied(m2.get_prefix(&herd_cluster::schema::schedule_prefix(&k1)).await), "m2 read m1's schedule");
    assert!(denied(m2.delete(&Key::Machine(k1.clone()).path()).await), "m2 deleted m1's registration");

    // Operators: read-only reads and cannot submit; an operator submits but cannot write a schedule.
    let rita = ClusterClient::new(
        lab.store(&lab.credential(&lab.site, Holder::Operator("rita".into(), Role::ReadOnly))).await,
    );
    rita.units().await.unwrap();
    match rita.submit("web.service", &sleeper(""), false).await {
        Err(ClientError::Store(e)) => assert!(denied(Err::<(), _>(e)), "refused, but not for want of permission"),
        other => panic!("a read-only operator submitted a unit: {other:?}"),
    }
    let olga = lab.store(&lab.credential(&lab.site, Holder::Operator("olga".into(), Role::Operator))).await;
    ClusterClient::new(olga.clone()).submit("web.service", &sleeper(""), false).await.unwrap();
    assert!(denied(olga.put(&Key::Schedule(k2.clone(), unit.clone()).path(), b"{}".to_vec(), None).await));

    // Taking a machine out of the policy takes its access away.
    let mut fewer = Secure::policy();
    fewer.machines.retain(|(m, _)| m.as_str() != "m2");
    let applied = access::apply(&admin, &fewer).await.unwrap();
    assert!(applied.removed.contains(&"machine:m2".to_owned()), "{applied:?}");
    assert!(m2.put(&Key::Machine(k2).path(), b"{}".to_vec(), None).await.is_err(), "a removed machine still writes");
}

/// The record of what the site trusts: only an admin publishes it, every machine reads it and acknowledges for
/// itself alone, and only the etcd members' machines take turns restarting their etcd, one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_publish_what_the_site_trusts_and_each_machine_answers_for_itself() {
    use herd_cluster::trust::{self, TrustAck, TrustRecord};
    let lab = Secure::start("trust-record").await;
    let admin = lab.store(&lab.etcd.tls()).await;
    access::apply(&admin, &Secure::policy()).await.unwrap();
    let trusted = lab.site.trust_pem(Authority::Etcd);
    let record = TrustRecord {
        trusted: trusted.clone(),
        issuing: lab.site.ca_info(Authority::Etcd).fingerprint.clone(),
        rotation: "steady".to_owned(),
    };
    assert!(trust::publish(&admin, &record).await.unwrap());
    assert!(!trust::publish(&admin, &record).await.unwrap(), "published again unchanged");

    // m2 (no etcd member) reads it and acknowledges for itself; nothing more.
    let (k1, k2) = (MachineKey::new("m1").unwrap(), MachineKey::new("m2").unwrap());
    let m2 = lab.store(&lab.credential(&lab.site, machine("m2"))).await;
    let read = trust::read(&m2).await.unwrap().unwrap();
    assert_eq!(read, record);
    read.check(&trusted).unwrap();
    let ack = TrustAck { trusted: record.fingerprints(), issued_by: vec![record.issuing.clone()] };
    trust::acknowledge(&m2, &k2, &ack).await.unwrap();
    assert!(denied(trust::acknowledge(&m2, &k1, &ack).await), "m2 acknowledged for m1");
    assert!(denied(trust::publish(&m2, &TrustRecord { rotation: "x".into(), ..record.clone() }).await));
    let (lease, _) = m2.grant(Duration::from_secs(30)).await.unwrap();
    assert!(denied(trust::take_restart_turn(&m2, &k2, lease).await), "a machine that is no member took a turn");
    assert_eq!(trust::acks(&admin).await.unwrap().get("m2"), Some(&ack));

    // m1 (an etcd member's machine) takes the turn; nobody else gets it until m1 gives it back.
    let m1 = lab.store(&lab.credential(&lab.site, machine("m1"))).await;
    let (l1, _) = m1.grant(Duration::from_secs(30)).await.unwrap();
    assert!(trust::take_restart_turn(&m1, &k1, l1).await.unwrap());
    let (la, _) = admin.grant(Duration::from_secs(30)).await.unwrap();
    let other = MachineKey::new("m3").unwrap();
    assert!(!trust::take_restart_turn(&admin, &other, la).await.unwrap(), "two turns at once");
    trust::end_restart_turn(&admin, &other).await.unwrap();
    assert!(!trust::take_restart_turn(&admin, &other, la).await.unwrap(), "ended by one that did not hold it");
    trust::end_restart_turn(&m1, &k1).await.unwrap();
    assert!(trust::take_restart_turn(&admin, &other, la).await.unwrap());

    // What a machine is about to trust must keep one CA it trusts now, list the one that issues, and hold CAs.
    let other_site = Site::init(&lab.dir.join("other-site"), "other", time::OffsetDateTime::now_utc()).unwrap();
    let foreign = other_site.trust_pem(Authority::Etcd);
    let foreign_record = TrustRecord {
        trusted: foreign.clone(),
        issuing: other_site.ca_info(Authority::Etcd).fingerprint.clone(),
        ..record.clone()
    };
    assert!(foreign_record.check(&trusted).unwrap_err().contains("none of the CAs"));
    let leaf = lab.credential(&lab.site, machine("m2")).cert.unwrap();
    let not_ca = TrustRecord { trusted: std::fs::read_to_string(leaf).unwrap(), ..record.clone() };
    assert!(not_ca.check(&trusted).unwrap_err().contains("not a CA"));
    let wrong_issuer = TrustRecord { issuing: foreign_record.issuing.clone(), ..record.clone() };
    assert!(wrong_issuer.check(&trusted).unwrap_err().contains("issues"));
    let empty = TrustRecord { trusted: String::new(), ..record.clone() };
    assert!(empty.check(&trusted).is_err());
}

/// What `curl` (a real TLS client) gets from member 0's peer URL (`/members`, which every member serves its peers)
/// with `tls`: the body, or None if the handshake or the request failed.
fn peer_members(lab: &Secure, tls: &TlsFiles) -> Option<String> {
    let file = |f: &Option<String>| f.clone().unwrap();
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http1.1", "--max-time", "10", "--cacert", &file(&tls.ca), "--cert", &file(&tls.cert), "--key"])
        .arg(file(&tls.key))
        .arg(format!("{}/members", lab.etcd.peer_url(0)))
        .output()
        .expect("curl runs");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A member's peer port speaks raft and lists the members: only another member's certificate gets in, not a
/// machine's or an operator's from the same CA (etcd checks the peer tag every member certificate names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_port_lets_in_members_and_no_other_certificate_of_the_ca() {
    let lab = Secure::start("trust-peers").await;
    let member = lab.credential(&lab.site, Holder::Member("etcd9".to_owned()));
    let body = peer_members(&lab, &member).expect("a member's certificate is refused by its peers");
    assert!(body.contains("etcd0") && body.contains("etcd2"), "not the member list: {body}");
    for holder in [machine("m1"), Holder::Operator(LAB_ADMIN.to_owned(), Role::Admin)] {
        let tls = lab.credential(&lab.site, holder.clone());
        assert_eq!(peer_members(&lab, &tls), None, "{holder} reached a peer port");
    }
    // The cluster itself (its members are peers through the same check) still answers.
    let admin = lab.store(&lab.etcd.tls()).await;
    admin.put("/herd/v1/probe", b"1".to_vec(), None).await.unwrap();
}

/// The provisioner's access keeper, an admin's `herdctl access apply` and `herdctl demo` may apply the policy at
/// the same moment on a fresh etcd, walking the same users and roles in the same order (seen: a demo refused with
/// "role name already exists"). Each must succeed, and together they leave exactly the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appliers_racing_on_a_fresh_etcd_all_succeed_and_leave_exactly_the_policy() {
    let lab = Secure::start("trust-race").await;
    let mut policy = Secure::policy();
    policy.machines = (1..=24).map(|i| (MachineKey::new(&format!("m{i}")).unwrap(), i <= 3)).collect();
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(lab.store(&lab.etcd.tls()).await);
    }
    let runs = stores.iter().map(|s| access::apply(s, &policy));
    for (i, applied) in futures::future::join_all(runs).await.into_iter().enumerate() {
        applied.unwrap_or_else(|e| panic!("applier {i} failed: {e}"));
    }
    let admin = &stores[0];
    assert!(access::apply(admin, &policy).await.unwrap().is_empty(), "the racing appliers left something to do");
    let m24 = lab.store(&lab.credential(&lab.site, machine("m24"))).await;
    let own = Key::Machine(MachineKey::new("m24").unwrap()).path();
    m24.put(&own, b"{}".to_vec(), None).await.unwrap();
    assert!(denied(m24.put(&Key::Machine(MachineKey::new("m1").unwrap()).path(), b"{}".to_vec(), None).await));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_runs_end_to_end_on_mutual_tls_with_least_privilege() {
    let lab = Secure::start("trust-run").await;
    access::apply(&lab.store(&lab.etcd.tls()).await, &Secure::policy()).await.unwrap();
    let shutdown = CancellationToken::new();
    // m1 runs the engine and an agent, m2 an agent, each with its own machine certificate only.
    let m1 = lab.store(&lab.credential(&lab.site, machine("m1"))).await.with_retry_for(herd_cluster::store::RETRY_FOR);
    let engine = Arc::new(Engine::new(
        m1.clone(),
        EngineConfig { ttl: common::TTL, grace: common::GRACE, ..EngineConfig::new("m1") },
    ));
    let (e, stop) = (engine.clone(), shutdown.clone());
    tokio::spawn(async move { e.run(stop).await });
    for (id, store) in [("m1", m1.clone()), ("m2", lab.store(&lab.credential(&lab.site, machine("m2"))).await)] {
        let store = store.with_retry_for(herd_cluster::store::RETRY_FOR);
        let cfg = AgentConfig {
            machine: machine_record(id, "r1", &[]),
            ttl: common::TTL,
            status_interval: Duration::from_millis(300),
        };
        let agent = Agent::new(store, cfg, Arc::new(ProcessExecutor::default())).unwrap();
        let stop = shutdown.clone();
        tokio::spawn(async move { agent.run(stop).await });
    }
    let olga = ClusterClient::new(
        lab.store(&lab.credential(&lab.site, Holder::Operator("olga".into(), Role::Operator))).await,
    );
    poll(WAIT, "both machines registered", || async { (olga.machines().await.ok()?.len() == 2).then_some(()) }).await;
    for (name, on) in [("a.service", "m1"), ("b.service", "m2")] {
        olga.submit(name, &sleeper(&format!("MachineID={on}\n")), false).await.unwrap();
        olga.set_desired(name, Desired::Launched).await.unwrap();
    }
    let names = ["a.service".to_owned(), "b.service".to_owned()];
    olga.wait(&names, Some(Desired::Launched), WAIT).await.unwrap();
    for (name, on) in [("a.service", "m1"), ("b.service", "m2")] {
        let u = olga.units().await.unwrap().into_iter().find(|u| u.name == name).unwrap();
        let active: Vec<&str> =
            u.machines.iter().filter(|p| p.state == Some(ActiveState::Active)).map(|p| p.machine.as_str()).collect();
        assert_eq!(active, [on], "{name}");
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnection_with_a_new_certificate_serves_every_clone_of_the_store() {
    let lab = Secure::start("trust-reconnect").await;
    access::apply(&lab.store(&lab.etcd.tls()).await, &Secure::policy()).await.unwrap();
    let rita = lab.credential(&lab.site, Holder::Operator("rita".into(), Role::ReadOnly));
    let store = lab.store(&rita).await;
    // A clone made before, as the agent and the engine hold theirs.
    let clone = ClusterClient::new(store.clone());
    match clone.submit("web.service", &sleeper(""), false).await {
        Err(ClientError::Store(e)) => assert!(denied(Err::<(), _>(e)), "refused, but not for want of permission"),
        other => panic!("a read-only operator submitted a unit: {other:?}"),
    }
    // A reconnection that cannot read its files changes nothing.
    let missing = TlsFiles { cert: Some(lab.dir.join("no-such.crt").display().to_string()), ..rita.clone() };
    assert!(matches!(store.reconnect(&missing).await, Err(StoreError::Tls { .. })));
    clone.units().await.unwrap();
    // The new identity (here another holder's, so that it shows) is what every clone presents from now on.
    let olga = lab.credential(&lab.site, Holder::Operator("olga".into(), Role::Operator));
    store.reconnect(&olga).await.unwrap();
    clone.submit("web.service", &sleeper(""), false).await.unwrap();
}
