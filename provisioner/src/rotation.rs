//! Rotating the site's etcd CA on a running cluster (docs/security.md, "Rotating the etcd CA"), without losing
//! the quorum: accept the new CA, switch to it, drop the old one.
//!
//! An admin begins it (`herdctl pki rotate`: `POST /api/v1/pki/rotate`, `herd_pki::Site::begin_rotation`). From
//! then on this keeper, every [`EVERY`], publishes what the site trusts at etcd's `pki/trust`
//! (`herd_cluster::trust`; node-init follows it: its trusted-CA file, its etcd member restarted in its turn, its
//! certificates renewed) and reads every registered machine's acknowledgement. Once every registered machine trusts
//! the next CA too (every etcd member restarted with it), the new CA issues (*switched*); once every one holds only
//! certificates of the new CA (and so does the provisioner's own credential), the old CA is dropped (*steady*), and
//! the machines follow again. A machine that is down all along is not waited for: at its next boot its config pins
//! the CAs the site trusts then, and it joins again. A machine that is up but does not follow holds the rotation
//! where it is, and the status says which.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use herd_api::{MachineTrust, RotationStatus};
use herd_cluster::schema::{self, Key};
use herd_cluster::store::Store;
use herd_cluster::trust;
use herd_inventory::Inventory;
use herd_pki::{Authority, Rotation, Site};
use tokio_util::sync::CancellationToken;

use crate::join::Joining;
use crate::metrics::Metrics;

/// How often the record is published and the machines' acknowledgements are read.
pub const EVERY: Duration = Duration::from_secs(5);

/// How long one round may take before it is given up (and tried again at the next).
const ATTEMPT: Duration = Duration::from_secs(30);

/// The status of `site` with `machines` as they stand, waiting for `waiting`.
pub fn status(site: &Site, machines: Vec<MachineTrust>, waiting: Option<String>) -> RotationStatus {
    let trusted = herd_pki::split_pems(&site.trust_pem(Authority::Etcd))
        .iter()
        .filter_map(|pem| herd_pki::parse(pem).ok())
        .map(|c| c.common_name)
        .collect();
    RotationStatus {
        rotation: site.rotation(Authority::Etcd).as_str().to_owned(),
        issuing: site.ca_info(Authority::Etcd).common_name.clone(),
        trusted,
        machines,
        waiting,
    }
}

/// The machines `waiting` names: those of `machines` for which `pending` holds, as a short list.
fn names(machines: &[MachineTrust], pending: impl Fn(&MachineTrust) -> bool) -> Option<String> {
    let behind: Vec<&str> = machines.iter().filter(|m| pending(m)).map(|m| m.name.as_str()).collect();
    match behind.len() {
        0 => None,
        n if n <= 5 => Some(behind.join(", ")),
        n => Some(format!("{} and {} more", behind[..5].join(", "), n - 5)),
    }
}

/// A connection to etcd, and the credential files it was made with.
#[derive(Debug)]
pub struct Connected {
    store: Store,
    files: String,
}

/// The credential files' contents (a connection made with others is made again).
fn contents(tls: &herd_cluster::store::TlsFiles) -> String {
    [&tls.ca, &tls.cert].iter().filter_map(|p| p.as_ref()).filter_map(|p| std::fs::read_to_string(p).ok()).collect()
}

/// One round against the etcd at `endpoints`, as the holder of the credential in `state` (connected once, and again
/// when the credential changes: `conn`): publish, read, and take the next step if every registered machine is
/// there.
pub async fn round(
    joining: &Joining,
    endpoints: &[String],
    state: &std::path::Path,
    conn: &mut Option<Connected>,
) -> anyhow::Result<RotationStatus> {
    let tls = crate::access::credential(&joining.site(), state)?;
    let files = contents(&tls);
    if conn.as_ref().is_none_or(|c| c.files != files) {
        let store = Store::connect(endpoints, &tls, Duration::from_secs(3)).await?;
        *conn = Some(Connected { store, files });
    }
    let store = conn.as_ref().map(|c| c.store.clone()).ok_or_else(|| anyhow::anyhow!("not connected"))?;
    let record = joining.trust_record();
    if trust::publish(&store, &record).await? {
        tracing::info!(rotation = %record.rotation, cas = record.fingerprints().len(), "published what the site trusts");
    }
    let acks = trust::acks(&store).await?;
    let (registrations, _) = store.get_prefix(&schema::prefix("machines")).await?;
    let fingerprints = record.fingerprints();
    let machines: Vec<MachineTrust> = registrations
        .iter()
        .filter_map(|kv| match Key::parse(kv.key_str().ok()?)? {
            Key::Machine(m) => Some(m.as_str().to_owned()),
            _ => None,
        })
        .map(|name| {
            let ack = acks.get(&name);
            MachineTrust {
                trusts: ack.is_some_and(|a| a.trusted == fingerprints),
                renewed: ack
                    .is_some_and(|a| !a.issued_by.is_empty() && a.issued_by.iter().all(|f| *f == record.issuing)),
                name,
            }
        })
        .collect();
    let untrusting = names(&machines, |m| !m.trusts);
    let unrenewed = names(&machines, |m| !m.renewed);
    let rotation = joining.site().rotation(Authority::Etcd);
    let waiting = match rotation {
        Rotation::Accepting => match untrusting {
            None => {
                let issuing = joining.rotate(|site| site.switch_rotation(Authority::Etcd))?;
                tracing::info!(ca = %issuing.common_name, "every machine trusts the next etcd CA: it issues now");
                Some("the machines to renew their certificates from the new CA".to_owned())
            }
            Some(behind) => Some(format!("{behind} to trust the next CA")),
        },
        Rotation::Switched => match (untrusting.or(unrenewed), own_is_current(joining, &tls)) {
            (None, true) => {
                let dropped = joining.rotate(|site| site.end_rotation(Authority::Etcd))?;
                tracing::info!(ca = %dropped.common_name, "every machine holds certificates of the new etcd CA: the old one is dropped");
                Some("the machines to drop the old CA".to_owned())
            }
            (None, false) => Some("the provisioner's own credential to be issued again".to_owned()),
            (Some(behind), _) => Some(format!("{behind} to renew their certificates from the new CA")),
        },
        Rotation::Steady => untrusting.map(|behind| format!("{behind} to trust the site's CA alone")),
    };
    if joining.site().rotation(Authority::Etcd) != rotation {
        // A step was taken: the machines learn it now, not a round later.
        trust::publish(&store, &joining.trust_record()).await?;
    }
    Ok(status(&joining.site(), machines, waiting))
}

/// Whether the provisioner's own etcd credential is from the CA that issues.
fn own_is_current(joining: &Joining, tls: &herd_cluster::store::TlsFiles) -> bool {
    let Some(pem) = tls.cert.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) else { return false };
    let site = joining.site();
    herd_pki::verify(site.ca_pem(Authority::Etcd), Authority::Etcd, &pem, time::OffsetDateTime::now_utc()).is_ok()
}

/// Runs [`round`] every [`EVERY`] until `stop`; `state` is where the provisioner's etcd credential lives.
pub async fn keep_rotating(
    joining: Arc<Joining>,
    inv: Arc<Inventory>,
    state: PathBuf,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    metrics.describe("herd_pki_rotation_rounds_failed_total", "Rotation keeper rounds that failed (etcd unreachable).");
    let mut failing = false;
    let endpoints = crate::access::endpoints(&inv);
    let mut conn = None;
    loop {
        let once = tokio::time::timeout(ATTEMPT, round(&joining, &endpoints, &state, &mut conn));
        let result = tokio::select! {
            r = once => r.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {} s", ATTEMPT.as_secs()))),
            () = stop.cancelled() => return,
        };
        match result {
            Ok(status) => {
                joining.set_rotation_status(status);
                failing = false;
            }
            Err(e) => {
                // Connect again at the next round: the members may have restarted with other CAs.
                conn = None;
                metrics.inc("herd_pki_rotation_rounds_failed_total", "");
                // Expected until the members have formed a cluster: said once per failing stretch.
                if !failing && joining.site().rotation(Authority::Etcd) != Rotation::Steady {
                    tracing::warn!(error = format!("{e:#}"), "the etcd CA rotation cannot go on");
                }
                failing = true;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}
