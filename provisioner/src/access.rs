//! Least privilege from the start (docs/security.md): a provisioner with the site PKI turns etcd's users and roles
//! on as soon as the inventory's etcd members answer, and keeps them what the inventory and the site's operators
//! say (`herd_cluster::access`, what `herdctl access apply` does by hand).
//!
//! A fresh etcd has authentication off: until it is turned on, any certificate of the site's etcd CA may do
//! anything there. The machines' first boot is when that matters, and the provisioner is the one part of the site
//! that is up then, holds the PKI and knows the inventory: it connects as `operator:provisioner` (an admin
//! credential it issues itself, kept 0600 in its state directory and issued again before it ends), asks every
//! [`RETRY`] until the members answer, then applies the policy again every [`EVERY`] (new operators, a machine
//! taken out of the inventory).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use herd_cluster::access::{self, Policy};
use herd_cluster::store::{Store, TlsFiles};
use herd_inventory::Inventory;
use herd_pki::{Authority, Holder, Role, Site, Subject};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The operator name the provisioner's own etcd credential carries.
pub const OPERATOR: &str = "provisioner";

/// How often the policy is asked for again until the members first answer.
pub const RETRY: Duration = Duration::from_secs(5);

/// How often the policy is applied again once it was.
pub const EVERY: Duration = Duration::from_secs(300);

/// How long one application may take before it is given up (and tried again at the next round).
const ATTEMPT: Duration = Duration::from_secs(60);

/// How long the provisioner's own credential is valid (issued again once a third of it is left).
const CREDENTIAL_VALIDITY: time::Duration = time::Duration::days(7);

/// The etcd client URLs of the inventory's members.
pub(crate) fn endpoints(inv: &Inventory) -> Vec<String> {
    inv.etcd_members().map(|m| format!("https://{}:2379", m.internal.get_ref().0)).collect()
}

/// The provisioner's admin credential in `dir`: issued from `site` when missing, due for renewal or (a rotation
/// switched) from a CA that no longer issues; its CA file follows every CA the site trusts.
/// Both keepers that use it (access, rotation) take it in turns: two issuing at once could leave one's key beside
/// the other's certificate.
pub(crate) fn credential(site: &Site, dir: &Path) -> anyhow::Result<TlsFiles> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = time::OffsetDateTime::now_utc();
    let (cert, ca) = (dir.join("etcd.crt"), dir.join("etcd-ca.crt"));
    let issuing = site.ca_pem(Authority::Etcd);
    let current =
        std::fs::read_to_string(&cert).ok().and_then(|pem| herd_pki::verify(issuing, Authority::Etcd, &pem, now).ok());
    if current.is_none_or(|c| c.standing(now) != herd_pki::Standing::Valid) {
        let subject = Subject::new(Holder::Operator(OPERATOR.to_owned(), Role::Admin), CREDENTIAL_VALIDITY);
        herd_pki::write_credential(site, &subject, dir, now)?;
    } else if std::fs::read_to_string(&ca).ok().as_deref() != Some(site.trust_pem(Authority::Etcd).as_str()) {
        herd_pki::write_public(&ca, site.trust_pem(Authority::Etcd).as_bytes())?;
    }
    let file = |f: &str| Some(dir.join(f).display().to_string());
    Ok(TlsFiles { ca: file("etcd-ca.crt"), cert: file("etcd.crt"), key: file("etcd.key") })
}

/// Applies the policy once to the etcd at `endpoints`, as the holder of the credential in `state` (issued there
/// from the site PKI in `pki` if missing or due): Ok(what changed).
pub async fn apply_once(
    inv: &Inventory,
    pki: &Path,
    state: &Path,
    endpoints: &[String],
) -> anyhow::Result<access::Applied> {
    let site = Site::open(pki)?;
    let tls = credential(&site, state)?;
    let members: Vec<&str> = inv.etcd_members().map(|m| m.name.get_ref().as_str()).collect();
    let machines = inv.machines.iter().map(|m| m.name.get_ref().as_str()).map(|n| (n, members.contains(&n)));
    let policy = Policy::of_machines(machines, &site, time::OffsetDateTime::now_utc())?;
    let store = Store::connect(endpoints, &tls, Duration::from_secs(3)).await?;
    Ok(access::apply(&store, &policy).await?)
}

/// Keeps etcd's users and roles applied until `stop`; `state` is where its credential lives.
pub async fn keep_applied(
    inv: Arc<Inventory>,
    pki: PathBuf,
    state: PathBuf,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    metrics.describe("herd_etcd_access_applied_total", "Times etcd's users and roles were applied (changed or not).");
    metrics.describe("herd_etcd_access_failed_total", "Times applying etcd's users and roles failed.");
    if let Err(e) = std::fs::create_dir_all(&state) {
        tracing::error!(dir = %state.display(), error = %e, "cannot keep the etcd access credential: not applying");
        return;
    }
    let mut applied_once = false;
    let members = endpoints(&inv);
    loop {
        // A member that vanished mid-request must hold neither the next try nor the daemon's shutdown.
        let once = tokio::time::timeout(ATTEMPT, apply_once(&inv, &pki, &state, &members));
        let result = tokio::select! {
            r = once => r.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {} s", ATTEMPT.as_secs()))),
            () = stop.cancelled() => return,
        };
        match result {
            Ok(applied) => {
                metrics.inc("herd_etcd_access_applied_total", "");
                if !applied_once || !applied.is_empty() {
                    tracing::info!(
                        roles = applied.roles.len(),
                        users = applied.users.len(),
                        removed = applied.removed.len(),
                        "etcd's users and roles applied; authentication on"
                    );
                }
                applied_once = true;
            }
            Err(e) => {
                metrics.inc("herd_etcd_access_failed_total", "");
                // Expected until the members have formed a cluster: only said once it had worked before.
                if applied_once {
                    tracing::warn!(error = format!("{e:#}"), "cannot apply etcd's users and roles");
                } else {
                    tracing::debug!(error = format!("{e:#}"), "etcd not applied yet");
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(if applied_once { EVERY } else { RETRY }) => {}
            () = stop.cancelled() => return,
        }
    }
}
