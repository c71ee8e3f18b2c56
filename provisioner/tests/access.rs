//! The provisioner's etcd access keeper (`herd_provisioner::access`) against a real 3-member etcd with mutual TLS:
//! it turns least privilege on with a credential of its own, changes nothing when applied again, and two appliers
//! at once (the provisioner and an admin's `herdctl access apply`) do not fail each other.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use herd_cluster::store::{Store, TlsFiles};
use herd_lab::local::LocalEtcd;
use herd_pki::{Authority, Holder, Site, Subject};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provisioner_turns_least_privilege_on_with_a_credential_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let pki = dir.path().join("pki");
    let site = Site::init(&pki, "lab", now).unwrap();
    let etcd = LocalEtcd::start_secure(&dir.path().join("etcd"), 3, &site).unwrap();
    etcd.ready(Duration::from_secs(60)).await.unwrap();
    let inv_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/qemu-3.toml");
    let inv = herd_inventory::load(&inv_path).unwrap();
    let state = dir.path().join("state");

    // A machine the inventory does not list holds a certificate of the site's CA: with authentication still off
    // (a fresh etcd) it reads; once the provisioner applied the policy it gets nothing.
    let stranger = dir.path().join("stranger");
    let subject = Subject::new(Holder::Machine("node9".into()), time::Duration::hours(1));
    herd_pki::write_credential(&site, &subject, &stranger, now).unwrap();
    let file = |f: &str| Some(stranger.join(f).display().to_string());
    let tls = TlsFiles { ca: file("etcd-ca.crt"), cert: file("etcd.crt"), key: file("etcd.key") };
    let store = Store::connect(&etcd.endpoints(), &tls, Duration::from_secs(2)).await.unwrap();
    let store = store.with_retry_for(Duration::ZERO);
    assert!(store.get("/herd/v1/probe").await.is_ok(), "a fresh etcd has authentication off");

    let applied = herd_provisioner::access::apply_once(&inv, &pki, &state, &etcd.endpoints()).await.unwrap();
    for user in ["machine:node1", "machine:node3", "operator:provisioner"] {
        assert!(applied.users.contains(&user.to_owned()), "no user {user}: {applied:?}");
    }
    assert!(store.get("/herd/v1/probe").await.is_err(), "authentication is not on");
    // Its own credential: an admin's, from the site's etcd CA, its key the owner's alone.
    let mode = std::fs::metadata(state.join("etcd.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let cert = std::fs::read_to_string(state.join("etcd.crt")).unwrap();
    let info = site.verify(Authority::Etcd, &cert, now).unwrap();
    assert_eq!(info.holder, Some(Holder::Operator("provisioner".into(), herd_pki::Role::Admin)));

    // Again: nothing changes, and the same credential serves.
    let again = herd_provisioner::access::apply_once(&inv, &pki, &state, &etcd.endpoints()).await.unwrap();
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(std::fs::read_to_string(state.join("etcd.crt")).unwrap(), cert, "issued again while still valid");

    // Two appliers at once, on a policy that grew (a new operator): both succeed, and she is a user after.
    let rita = Subject::new(Holder::Operator("rita".into(), herd_pki::Role::ReadOnly), time::Duration::days(1));
    herd_pki::write_credential(&site, &rita, &dir.path().join("rita"), now).unwrap();
    let endpoints = etcd.endpoints();
    let (a, b) = tokio::join!(
        herd_provisioner::access::apply_once(&inv, &pki, &state, &endpoints),
        herd_provisioner::access::apply_once(&inv, &pki, &state, &endpoints),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.users.contains(&"operator:rita".to_owned()) || b.users.contains(&"operator:rita".to_owned()));
    drop(etcd);
}
