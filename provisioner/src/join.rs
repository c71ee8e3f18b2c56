//! Machine identity (docs/security.md): a machine trades the one-time join credential of its config for
//! certificates of its own key, kubeadm's TLS bootstrap.
//!
//! With `--site-pki DIR` the provisioner holds the site PKI. Every config it serves carries the site's CA
//! certificates (which the machine pins) and a fresh join credential: 256 random bits, bound to that machine
//! (and so to its MAC), replacing the one of any earlier boot, valid for [`crate::machines::JOIN_VALIDITY_MS`],
//! kept only as a hash. The machine makes its keys, and `POST /join/MAC` with the credential and its certificate
//! requests, from its own address: the credential is spent (durably) and the provisioner answers with a
//! `machine:NAME` etcd client certificate (SANs: its host name, FQDN and internal address) and, for an etcd
//! member, a `member:NAME` peer and server certificate (SANs: those and the loopback, where its own machine reaches
//! it). Only the requests' public keys are used. A credential used twice, late, wrong, or from another address is
//! refused and the machine's timeline says so.
//! `join = "approve"` issues only for keys an admin approved (the fingerprint the machine shows on its console,
//! compared before `herdctl machine approve`): a host that took a machine's address and MAC, and with them its
//! config, gets nothing. `join = "closed"` issues nothing: registration is closed.

use std::net::IpAddr;
use std::path::Path;

use herd_api::JoinAnswer;
use herd_inventory::{Inventory, Machine};
use herd_pki::{Authority, Holder, KeySource, PkiError, Site, Subject};

/// Whether machines may join.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum JoinPolicy {
    /// Every machine of the inventory that presents its credential gets its certificates.
    #[default]
    Open,
    /// As `open`, and an admin approves each machine's keys first (`herdctl machine approve NAME FINGERPRINT`,
    /// comparing the fingerprint the machine prints on its console); approved keys join again without asking.
    Approve,
    /// Nothing is issued: registration is closed.
    Closed,
}

/// How long a certificate issued at a join or a renewal is valid by default (`--cert-validity-secs`; the node
/// renews it once two thirds of it have passed, see docs/security.md).
pub const MACHINE_VALIDITY: time::Duration = time::Duration::days(30);

/// The shortest and the longest validity `--cert-validity-secs` accepts.
pub const VALIDITY_RANGE: std::ops::RangeInclusive<u64> = 60..=365 * 86_400;

/// How often [`keep_pruned`] prunes.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// At start and once a day, removes from the PKI's `issued/` the copies of certificates that ended `after` ago
/// and that a newer one of the same holder replaced (`herd_pki::Site::prune`): every renewal leaves one, and
/// `/metrics` reads them all. Counted in `herd_pki_pruned_total`; a failure is logged and tried again the next day.
pub async fn keep_pruned(
    dir: std::path::PathBuf,
    after: time::Duration,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    stop: tokio_util::sync::CancellationToken,
) {
    metrics.describe("herd_pki_pruned_total", "Copies of long-ended, replaced certificates removed from issued/.");
    loop {
        let at = dir.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            Site::open(&at).and_then(|site| site.prune(time::OffsetDateTime::now_utc(), after, false))
        })
        .await;
        match pruned {
            Ok(Ok(gone)) => {
                metrics.add("herd_pki_pruned_total", "", gone.len() as u64);
                if !gone.is_empty() {
                    tracing::info!(removed = gone.len(), days = after.whole_days(), "pruned replaced certificates");
                }
            }
            Ok(Err(e)) => tracing::warn!(dir = %dir.display(), error = %e, "cannot prune the site PKI's issued/"),
            Err(e) => tracing::warn!(error = %e, "the prune task failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(PRUNE_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// The site PKI as the provisioner uses it.
#[derive(Debug)]
pub struct Joining {
    /// Changed only by a rotation step (`herd_pki::Site::begin_rotation` and the next ones).
    site: std::sync::RwLock<Site>,
    /// Whether machines may join.
    pub policy: JoinPolicy,
    /// How long the certificates issued are valid.
    pub validity: time::Duration,
    /// The expiry gauges of `/metrics`, and when they were read from the PKI's `issued/` directory.
    expiries: std::sync::Mutex<Option<(std::time::Instant, String)>>,
    /// Where the etcd CA's rotation stands machine by machine, as the rotation keeper last saw it.
    rotation: std::sync::Mutex<Option<herd_api::RotationStatus>>,
    /// Whether a rotation keeper runs (`--etcd-access auto`): without one a rotation could begin but not go on.
    pub rotation_keeper: bool,
}

/// How long `/metrics` serves the expiry gauges it read before reading `issued/` again.
const EXPIRIES_FOR: std::time::Duration = std::time::Duration::from_secs(30);

impl Joining {
    /// Opens the site PKI in `dir` (its keys must be the owner's alone); certificates are issued for `validity`.
    pub fn open(dir: &Path, policy: JoinPolicy, validity: time::Duration) -> Result<Joining, PkiError> {
        let site = std::sync::RwLock::new(Site::open(dir)?);
        let (expiries, rotation) = (std::sync::Mutex::new(None), std::sync::Mutex::new(None));
        Ok(Joining { site, policy, validity, expiries, rotation, rotation_keeper: false })
    }

    /// The site PKI, to read.
    pub fn site(&self) -> std::sync::RwLockReadGuard<'_, Site> {
        self.site.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What the site trusts, as machines are to learn it from etcd (`herd_cluster::trust`).
    pub fn trust_record(&self) -> herd_cluster::trust::TrustRecord {
        let site = self.site();
        herd_cluster::trust::TrustRecord {
            trusted: site.trust_pem(Authority::Etcd),
            issuing: site.ca_info(Authority::Etcd).fingerprint.clone(),
            rotation: site.rotation(Authority::Etcd).as_str().to_owned(),
        }
    }

    /// Where the etcd CA's rotation stands: as the rotation keeper last saw it, or (before it has) the site alone.
    pub fn rotation_status(&self) -> herd_api::RotationStatus {
        let seen = self.rotation.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        seen.unwrap_or_else(|| crate::rotation::status(&self.site(), Vec::new(), None))
    }

    /// Keeps what the rotation keeper saw.
    pub fn set_rotation_status(&self, status: herd_api::RotationStatus) {
        *self.rotation.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(status);
    }

    /// The site PKI, to take a rotation step (`f`); the expiry gauges are read again after it.
    pub fn rotate<T>(&self, f: impl FnOnce(&mut Site) -> Result<T, PkiError>) -> Result<T, PkiError> {
        let mut site = self.site.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = f(&mut site);
        *self.expiries.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        out
    }

    /// The expiry gauges (Prometheus text) of the site PKI at `now`: when each CA ends, and per CA the soonest end
    /// among every holder's newest certificate (an older one a renewal replaced does not count), with how many
    /// holders stand `valid`, `renew-soon` or `expired`. Read again at most every [`EXPIRIES_FOR`].
    pub fn expiry_metrics(&self, now: time::OffsetDateTime) -> String {
        let mut cached = self.expiries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, text)) = cached.as_ref()
            && at.elapsed() < EXPIRIES_FOR
        {
            return text.clone();
        }
        let text = match self.site().status(now) {
            Ok(lines) => expiry_text(&lines),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the site PKI's issued certificates");
                return String::new();
            }
        };
        *cached = Some((std::time::Instant::now(), text.clone()));
        text
    }

    /// The CA certificates a config carries: `(file name, PEM)`, every CA the site trusts (during a rotation, two
    /// of one authority in its file).
    pub fn ca_files(&self) -> Vec<(String, String)> {
        let site = self.site();
        Authority::ALL.iter().map(|a| (format!("{a}-ca.crt"), site.trust_pem(*a))).collect()
    }

    /// Checks a certificate a machine presents to renew it: the site's etcd CA signed it, it has not ended, and it
    /// names `holder`. Returns what it says.
    pub fn current(&self, cert_pem: &str, holder: &Holder) -> Result<herd_pki::CertInfo, String> {
        let now = time::OffsetDateTime::now_utc();
        let info = self.site().verify(Authority::Etcd, cert_pem, now).map_err(|e| e.to_string())?;
        if info.holder.as_ref() != Some(holder) {
            return Err(format!("a certificate for {}, not {holder}", info.common_name));
        }
        Ok(info)
    }

    /// Issues `machine`'s certificates for its requests (already checked: a join's credential spent, a renewal's
    /// possession proven): the machine's, and an etcd member's if `member` and it asked.
    pub fn issue(
        &self,
        inv: &Inventory,
        machine: &Machine,
        member: bool,
        machine_csr: &str,
        member_csr: Option<&str>,
    ) -> Result<JoinAnswer, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        let name = machine.name().to_string();
        let address: IpAddr = IpAddr::V4(machine.internal.get_ref().0);
        let names = vec![name.clone(), inv.fqdn(machine)];
        let mut subject = Subject::new(Holder::Machine(name.clone()), self.validity);
        subject.dns = names.clone();
        subject.ips = vec![address];
        let site = self.site();
        let machine_cert = site.issue(Authority::Etcd, &subject, KeySource::Request(machine_csr), now)?;
        let member_cert = match (member_csr, member) {
            (Some(csr), true) => {
                // The member serves its own machine on the loopback too (node-init, the agent, the engine).
                let mut subject = Subject::new(Holder::Member(name), self.validity);
                subject.dns = names.into_iter().chain(["localhost".to_owned()]).collect();
                subject.ips = vec![address, IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)];
                Some(site.issue(Authority::Etcd, &subject, KeySource::Request(csr), now)?.cert_pem)
            }
            _ => None,
        };
        Ok(JoinAnswer {
            etcd_ca: site.trust_pem(Authority::Etcd),
            api_ca: site.trust_pem(Authority::Api),
            machine_cert: machine_cert.cert_pem,
            member_cert,
        })
    }
}

/// [`Joining::expiry_metrics`] of `lines` (`Site::status`).
fn expiry_text(lines: &[herd_pki::StatusLine]) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let mut out = String::new();
    out.push_str(
        "# HELP herd_pki_ca_expiry_timestamp_seconds When the CA ends (Unix seconds): rotate it before.\n\
         # TYPE herd_pki_ca_expiry_timestamp_seconds gauge\n",
    );
    for line in lines.iter().filter(|l| l.cert.is_ca && l.rotation.is_none()) {
        let (authority, at) = (line.authority, line.cert.not_after);
        let _ = writeln!(out, "herd_pki_ca_expiry_timestamp_seconds{{authority=\"{authority}\"}} {at}");
    }
    let newest = herd_pki::newest_per_holder(lines);
    out.push_str(
        "# HELP herd_pki_soonest_expiry_timestamp_seconds The soonest end among every holder's newest certificate \
         (Unix seconds).\n# TYPE herd_pki_soonest_expiry_timestamp_seconds gauge\n",
    );
    for authority in Authority::ALL {
        let soonest = newest.iter().filter(|l| l.authority == authority).map(|l| l.cert.not_after).min();
        if let Some(at) = soonest {
            let _ = writeln!(out, "herd_pki_soonest_expiry_timestamp_seconds{{authority=\"{authority}\"}} {at}");
        }
    }
    out.push_str(
        "# HELP herd_pki_holders Holders by where their newest certificate stands.\n# TYPE herd_pki_holders gauge\n",
    );
    let mut counts: BTreeMap<(Authority, &str), u64> = BTreeMap::new();
    for line in &newest {
        *counts.entry((line.authority, line.standing.as_str())).or_default() += 1;
    }
    for ((authority, standing), n) in counts {
        let _ = writeln!(out, "herd_pki_holders{{authority=\"{authority}\",standing=\"{standing}\"}} {n}");
    }
    out
}
