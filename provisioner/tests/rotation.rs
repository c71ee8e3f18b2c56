//! The provisioner's etcd CA rotation keeper (`herd_provisioner::rotation`) against a real 3-member etcd with mutual
//! TLS and least privilege: it publishes what the site trusts, waits for every registered machine's
//! acknowledgement before each step (one that lags holds it there, and is named), switches, drops the old CA, and
//! re-issues its own credential from the new one. The machines here answer as node-init does (reading the record
//! with their own certificates, acknowledging for themselves); node-init's side runs on the QEMU cluster.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::time::Duration;

use herd_cluster::schema::{Key, MachineKey};
use herd_cluster::store::{Store, TlsFiles};
use herd_cluster::trust::{self, TrustAck};
use herd_lab::local::LocalEtcd;
use herd_pki::{Authority, Holder, Site, Subject};
use herd_provisioner::join::{JoinPolicy, Joining};
use herd_provisioner::rotation;

/// A machine of the inventory, connected with a certificate of its own from the CA that issues now (its credential
/// written under `dir`).
async fn machine(name: &str, site: &Site, dir: &std::path::Path, endpoints: &[String]) -> (Store, TlsFiles) {
    let out = dir.join(name);
    let subject = Subject::new(Holder::Machine(name.to_owned()), time::Duration::hours(1));
    herd_pki::write_credential(site, &subject, &out, time::OffsetDateTime::now_utc()).unwrap();
    let file = |f: &str| Some(out.join(f).display().to_string());
    let tls = TlsFiles { ca: file("etcd-ca.crt"), cert: file("etcd.crt"), key: file("etcd.key") };
    let store = Store::connect(endpoints, &tls, Duration::from_secs(3)).await.unwrap();
    (store, tls)
}

/// What node-init acknowledges once it follows the record, its certificates issued by `issued_by`.
async fn follow(store: &Store, name: &str, issued_by: &str) {
    let record = trust::read(store).await.unwrap().unwrap();
    let ack = TrustAck { trusted: record.fingerprints(), issued_by: vec![issued_by.to_owned()] };
    trust::acknowledge(store, &MachineKey::new(name).unwrap(), &ack).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_etcd_ca_rotates_step_by_step_as_every_registered_machine_follows() {
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let pki = dir.path().join("pki");
    let site = Site::init(&pki, "lab", now).unwrap();
    let mut etcd = LocalEtcd::start_secure(&dir.path().join("etcd"), 3, &site).unwrap();
    etcd.ready(Duration::from_secs(60)).await.unwrap();
    let endpoints = etcd.endpoints();
    let inv_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/qemu-3.toml");
    let inv = herd_inventory::load(&inv_path).unwrap();
    let state = dir.path().join("state");
    herd_provisioner::access::apply_once(&inv, &pki, &state, &endpoints).await.unwrap();
    let mut joining = Joining::open(&pki, JoinPolicy::Open, time::Duration::days(1)).unwrap();
    joining.rotation_keeper = true;
    let first = site.ca_info(Authority::Etcd).fingerprint.clone();
    // One connection across rounds, as the keeper keeps it (made again when its credential changes).
    let mut conn = None;

    // Two registered machines; node3 is down (not registered): not waited for.
    let before = dir.path().join("before");
    let ((n1, _), (n2, n2_old_tls)) =
        (machine("node1", &site, &before, &endpoints).await, machine("node2", &site, &before, &endpoints).await);
    for (store, name) in [(&n1, "node1"), (&n2, "node2")] {
        store.put(&Key::Machine(MachineKey::new(name).unwrap()).path(), b"{}".to_vec(), None).await.unwrap();
    }
    let steady = rotation::round(&joining, &endpoints, &state, &mut conn).await.unwrap();
    assert_eq!(steady.rotation, "steady");
    assert_eq!(steady.trusted, ["herd lab etcd CA"]);
    for (store, name) in [(&n1, "node1"), (&n2, "node2")] {
        follow(store, name, &first).await;
    }
    let settled = rotation::round(&joining, &endpoints, &state, &mut conn).await.unwrap();
    assert_eq!(settled.waiting, None, "{settled:?}");
    assert!(settled.machines.iter().all(|m| m.trusts && m.renewed), "{settled:?}");

    // Accepting: node2 lags, so the rotation waits for it, by name.
    joining.rotate(|s| s.begin_rotation(Authority::Etcd, time::OffsetDateTime::now_utc())).unwrap();
    let accepting = rotation::round(&joining, &endpoints, &state, &mut conn).await.unwrap();
    assert_eq!(accepting.rotation, "accepting");
    assert_eq!(accepting.trusted, ["herd lab etcd CA", "herd lab etcd CA 2"]);
    // The members trust both CAs, as herd's members do once node-init restarted them in turn.
    etcd.follow_rotation(&Site::open(&pki).unwrap()).await.unwrap();
    follow(&n1, "node1", &first).await;
    let held = rotation::round(&joining, &endpoints, &state, &mut conn).await.unwrap();
    assert_eq!(held.rotation, "accepting", "switched before node2 trusted the next CA");
    assert_eq!(held.waiting.as_deref(), Some("node2 to trust the next CA"));
    follow(&n2, "node2", &first).await;

    // Switched: the new CA issues; the old one stays trusted until both renewed.
    let switched = rotation::round(&joining, &endpoints, &state, &mut conn).await.unwrap();
    assert_eq!(switched.rotation, "switched");
    assert_eq!(switched.issuing, "herd lab etcd CA 2");
    let new = joining.trust_record().issuing;
    assert_ne!(new, first);
    etcd.follow_rotation(&Site::open(&pki).unwrap()).await.unwrap();
    // The machines renew: certificates of the new CA (and every CA the site trusts in their CA file).
    let after = dir.path().join("after");
    let ((n1, _), (n2, _)) = (
        machine("node1", &Site::open(&pki).unwrap(), &after, &endpoints).await,
        machine("node2", &Site::open(&pki).unwrap(), &after, &endpoints).await,
    );
    follow(&n1, "node1", &new).await;
    let held = rotation::round(&joining, &endpoints, &state, &mut conn).await.unwrap();
    assert_eq!(held.rotation, "switched", "the old CA dropped before node2 renewed");
    assert_eq!(held.waiting.as_deref(), Some("node2 to renew their certificates from the new CA"));
    // The provisioner's own credential was issued again from the new CA as it went on.
    let own = std::fs::read_to_string(state.join("etcd.crt")).unwrap();
    assert!(herd_pki::verify(joining.site().ca_pem(Authority::Etcd), Authority::Etcd, &own, now).is_ok());
    follow(&n2, "node2", &new).await;

    // Steady again: the old CA is dropped, and the machines follow once more.
    let dropped = rotation::round(&joining, &endpoints, &state, &mut conn).await.unwrap();
    assert_eq!(dropped.rotation, "steady");
    assert_eq!(dropped.trusted, ["herd lab etcd CA 2"]);
    etcd.follow_rotation(&Site::open(&pki).unwrap()).await.unwrap();
    // With the old CA dropped, a certificate it issued gets nowhere.
    let stale = Store::connect(&endpoints, &n2_old_tls, Duration::from_secs(3)).await;
    assert!(stale.is_err() || stale.unwrap().with_retry_for(Duration::ZERO).get("/herd/v1/probe").await.is_err());
    assert_eq!(trust::read(&n1).await.unwrap().unwrap().fingerprints(), std::slice::from_ref(&new));
    for (store, name) in [(&n1, "node1"), (&n2, "node2")] {
        follow(store, name, &new).await;
    }
    let done = rotation::round(&joining, &endpoints, &state, &mut conn).await.unwrap();
    assert_eq!(done.waiting, None, "{done:?}");
    assert_eq!(joining.site().rotation(Authority::Etcd), herd_pki::Rotation::Steady);
    drop(etcd);
}
