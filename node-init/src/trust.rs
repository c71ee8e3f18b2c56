//! Following what the site trusts (docs/security.md, "Rotating the etcd CA"): every [`TRUST_EVERY`] the daemon reads
//! the provisioner's record at `pki/trust` (`herd_cluster::trust`). When it lists other CAs than this machine's
//! trusted-CA file, the file is rewritten (an etcd member then restarts its etcd, in its turn, and waits for it to
//! rejoin the quorum) and etcd is reconnected; when a certificate this machine holds is not from the CA that issues,
//! it is renewed at once. Then the machine says where it stands at `pki/acks/MACHINE`, which is what the provisioner
//! waits for before it takes the rotation's next step.

use std::path::Path;
use std::time::Duration;

use herd_cluster::schema::MachineKey;
use herd_cluster::store::{Store, TlsFiles};
use herd_cluster::trust::{self, TrustAck, TrustRecord};
use herd_config::node::NodeConfig;
use herd_pki::Authority;
use tokio_util::sync::CancellationToken;

/// How often the record is read.
pub const TRUST_EVERY: Duration = Duration::from_secs(5);

/// The line printed at each change this machine makes.
pub const PRINTED: &str = "herd-node-init: trust:";

/// How long an etcd member's turn to restart lasts at most (its lease: a member that never comes back frees it).
const TURN: Duration = Duration::from_secs(120);

/// What a record asks of this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Its trusted-CA file is to list the record's CAs.
    pub write_trust: bool,
    /// A certificate it holds is not from the CA that issues: renew.
    pub renew: bool,
}

/// What `record` asks of a machine that trusts `current` and holds certificates issued by `issued_by`
/// (fingerprints); Err if the record is not one to follow ([`TrustRecord::check`]).
pub fn plan(record: &TrustRecord, current: &str, issued_by: &[String]) -> Result<Plan, String> {
    record.check(current)?;
    Ok(Plan {
        write_trust: trust::fingerprints(current) != record.fingerprints(),
        renew: issued_by.iter().any(|f| *f != record.issuing),
    })
}

/// The fingerprint of the CA in `trust` that issued each certificate in `dir` this machine holds (`?` for one no CA
/// of `trust` issued, or that cannot be read).
pub fn issuers(dir: &Path, trust: &str, machine: &str, member: bool) -> Vec<String> {
    let now = time::OffsetDateTime::now_utc();
    let cas = herd_pki::split_pems(trust);
    crate::identity::held(machine, member)
        .iter()
        .map(|(stem, _)| {
            let pem = std::fs::read_to_string(dir.join(format!("{stem}.crt"))).unwrap_or_default();
            cas.iter()
                .find(|ca| herd_pki::verify(ca, Authority::Etcd, &pem, now).is_ok())
                .and_then(|ca| herd_pki::parse(ca).ok())
                .map_or_else(|| "?".to_owned(), |c| c.fingerprint)
        })
        .collect()
}

/// Follows the record until `stop` (see the module).
pub async fn keep_trusted(
    prov: crate::provision::Provisioner,
    node: NodeConfig,
    store: Store,
    stop: CancellationToken,
) {
    let Some(me) = MachineKey::new(&node.machine) else { return };
    let mut acked: Option<TrustAck> = None;
    loop {
        if let Err(e) = follow(&prov, &node, &store, &me, &mut acked, &stop).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot follow what the site trusts");
        }
        tokio::select! {
            () = tokio::time::sleep(TRUST_EVERY) => {}
            () = stop.cancelled() => return,
        }
    }
}

async fn follow(
    prov: &crate::provision::Provisioner,
    node: &NodeConfig,
    store: &Store,
    me: &MachineKey,
    acked: &mut Option<TrustAck>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let Some(record) = trust::read(store).await? else { return Ok(()) };
    let dir = std::path::PathBuf::from(herd_config::node::TLS_DIR);
    let (machine, member, tls) = (node.machine.clone(), node.etcd_member, crate::member::tls_files(node));
    let trust_file = dir.join("etcd-ca.crt");
    let current = std::fs::read_to_string(&trust_file)?;
    let todo = plan(&record, &current, &issuers(&dir, &current, &machine, member)).map_err(anyhow::Error::msg)?;
    if todo.write_trust {
        herd_pki::write_public(&trust_file, record.trusted.as_bytes())?;
        if member {
            restart_member(node, store, me, &tls, stop).await?;
        }
        store.reconnect(&tls).await?;
        let n = record.fingerprints().len();
        println!("{PRINTED} trusts {n} etcd CA(s) now (rotation {}); etcd reconnected", record.rotation);
    }
    if todo.renew {
        let (p, d, m) = (prov.clone(), dir.clone(), machine.clone());
        tokio::task::spawn_blocking(move || crate::identity::renew(&p, &d, &m, member)).await??;
        store.reconnect(&tls).await?;
        println!("{PRINTED} certificates renewed from the CA that issues now; etcd reconnected");
    }
    let trusted = std::fs::read_to_string(&trust_file)?;
    let ack = TrustAck { trusted: trust::fingerprints(&trusted), issued_by: issuers(&dir, &trusted, &machine, member) };
    if acked.as_ref() != Some(&ack) {
        trust::acknowledge(store, me, &ack).await?;
        *acked = Some(ack);
    }
    Ok(())
}

/// Restarts this machine's etcd member so it reads its trusted-CA file again (etcd reads it once, at start), in its
/// turn: one member at a time, the next only once this one is back in the quorum.
async fn restart_member(
    node: &NodeConfig,
    store: &Store,
    me: &MachineKey,
    tls: &TlsFiles,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let (lease, _) = store.grant(TURN).await?;
    while !trust::take_restart_turn(store, me, lease).await? {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
            () = stop.cancelled() => anyhow::bail!("stopped while waiting for a turn to restart etcd"),
        }
    }
    let started = std::time::Instant::now();
    let status = tokio::process::Command::new("systemctl").args(["restart", "etcd"]).status().await?;
    anyhow::ensure!(status.success(), "systemctl restart etcd: {status}");
    let took = crate::member::wait_for_quorum(&crate::member::local_member(node), tls).await?;
    println!(
        "{PRINTED} etcd member restarted with the new trusted CAs, back in the quorum after {:.1} s",
        started.elapsed().max(took).as_secs_f64()
    );
    trust::end_restart_turn(store, me).await?;
    store.revoke(lease).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> (tempfile::TempDir, herd_pki::Site) {
        let dir = tempfile::tempdir().unwrap();
        let site = herd_pki::Site::init(&dir.path().join("pki"), "lab", time::OffsetDateTime::now_utc()).unwrap();
        (dir, site)
    }

    fn record(site: &herd_pki::Site) -> TrustRecord {
        TrustRecord {
            trusted: site.trust_pem(Authority::Etcd),
            issuing: site.ca_info(Authority::Etcd).fingerprint.clone(),
            rotation: site.rotation(Authority::Etcd).as_str().to_owned(),
        }
    }

    /// Writes a machine certificate issued now by `site` into `dir`.
    fn hold(site: &herd_pki::Site, dir: &Path) {
        let subject = herd_pki::Subject::new(herd_pki::Holder::Machine("m1".into()), time::Duration::hours(1));
        let now = time::OffsetDateTime::now_utc();
        let cert = site.issue(Authority::Etcd, &subject, herd_pki::KeySource::Generate, now).unwrap().cert_pem;
        std::fs::write(dir.join("machine.crt"), cert).unwrap();
    }

    #[test]
    fn a_machine_trusts_the_next_ca_then_renews_from_it_then_drops_the_old_one() {
        let (dir, mut site) = site();
        hold(&site, dir.path());
        let first = site.trust_pem(Authority::Etcd);
        let by = |trust: &str| issuers(dir.path(), trust, "m1", false);
        let first_fp = site.ca_info(Authority::Etcd).fingerprint.clone();
        assert_eq!(by(&first), [first_fp]);
        let nothing = Plan { write_trust: false, renew: false };
        assert_eq!(plan(&record(&site), &first, &by(&first)), Ok(nothing));

        // Accepting: trust both, nothing to renew.
        site.begin_rotation(Authority::Etcd, time::OffsetDateTime::now_utc()).unwrap();
        let accepting = record(&site);
        assert_eq!(plan(&accepting, &first, &by(&first)), Ok(Plan { write_trust: true, renew: false }));
        let both = accepting.trusted.clone();
        // Switched: the same CAs (in another order: nothing to write), and the certificate is renewed.
        site.switch_rotation(Authority::Etcd).unwrap();
        let switched = record(&site);
        assert_eq!(plan(&switched, &both, &by(&both)), Ok(Plan { write_trust: false, renew: true }));
        hold(&site, dir.path());
        assert_eq!(by(&both), std::slice::from_ref(&switched.issuing));
        assert_eq!(plan(&switched, &both, &by(&both)), Ok(nothing));
        // Steady: the previous CA goes from the file.
        site.end_rotation(Authority::Etcd).unwrap();
        let steady = record(&site);
        assert_eq!(plan(&steady, &both, &by(&both)), Ok(Plan { write_trust: true, renew: false }));
        // A machine that slept through it all trusts none of those CAs: it follows nothing (it joins again at its
        // next boot, from a config that pins the site's CAs).
        assert!(plan(&steady, &first, &by(&first)).unwrap_err().contains("none of the CAs"));
        assert_eq!(by(&first), ["?"], "the new certificate is not from the first CA");
    }
}
