//! The machine's identity (docs/security.md): keys made here and kept on STATE, certificates for them from the
//! provisioner at a join.
//!
//! A config from a provisioner with a site PKI carries the site's CA certificates and a one-time join
//! credential. node-init takes the credential out of the config (it is never written anywhere), makes the
//! machine's etcd client key (and an etcd member's peer and server key) unless STATE already holds them, sends
//! their certificate requests with the credential (`POST /join/MAC`), checks what comes back against the CA the
//! config pinned and the machine's own name, and keeps keys, certificates and CAs in `/var/lib/herd/tls/`
//! (on STATE, keys 0600).

use std::path::Path;

use herd_api::{JoinAnswer, JoinRequest};
use herd_pki::{Authority, Holder};
use serde_json::Value;

use crate::provision::{JoinReply, ProvisionError, Provisioner};

/// The user etcd runs as (Debian's unit): it reads the member's key and certificate.
const ETCD_USER: &str = "etcd";

/// The contents of the file at `path` in `config` (a `data:` URL), if it is there.
fn config_file(config: &Value, path: &str) -> Option<String> {
    let files = config.pointer("/storage/files")?.as_array()?;
    let source = files.iter().find(|f| f["path"] == path)?["contents"]["source"].as_str()?;
    String::from_utf8(crate::ignition::data_url(source).ok()?).ok()
}

/// Takes the join credential out of `config` (None when the provisioner issued none).
pub fn take_credential(config: &mut Value) -> Option<String> {
    let credential = config_file(config, herd_api::JOIN_CREDENTIAL_PATH)?;
    if let Some(files) = config.pointer_mut("/storage/files").and_then(Value::as_array_mut) {
        files.retain(|f| f["path"] != herd_api::JOIN_CREDENTIAL_PATH);
    }
    Some(credential.trim().to_owned())
}

/// The CA certificate `config` pins for `authority`.
fn pinned(config: &Value, authority: Authority) -> Option<String> {
    config_file(config, &format!("{}/{authority}-ca.crt", herd_api::CA_DIR))
}

/// What a join gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The machine certificate's fingerprint.
    pub machine: String,
    /// The member certificate's, for an etcd member.
    pub member: Option<String>,
}

fn bad(why: String) -> ProvisionError {
    ProvisionError::Identity(why)
}

/// The key at `path`, made (0600) if missing; one readable by others is refused.
fn key(path: &Path) -> Result<String, ProvisionError> {
    if path.exists() {
        herd_pki::check_private(path).map_err(|e| bad(e.to_string()))?;
        return std::fs::read_to_string(path).map_err(|e| bad(format!("{}: {e}", path.display())));
    }
    let pem = herd_pki::new_key().map_err(|e| bad(e.to_string()))?;
    herd_pki::write_private(path, pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    Ok(pem)
}

/// How long a machine waits for an admin to approve its keys (its join credential is valid that long).
const APPROVAL_LIMIT: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// Sends `body` until certificates come back: at once on an open site; on one that approves joins, once an admin
/// has approved the keys whose fingerprint this prints on the console (asked again every 5 s, for at most
/// [`APPROVAL_LIMIT`]).
fn awaiting_approval(prov: &Provisioner, body: &JoinRequest, machine: &str) -> Result<JoinAnswer, ProvisionError> {
    let started = std::time::Instant::now();
    let mut said: Option<std::time::Instant> = None;
    loop {
        let fingerprint = match prov.join(body)? {
            JoinReply::Issued(answer) => return Ok(answer),
            JoinReply::Awaiting(fingerprint) => fingerprint,
        };
        if started.elapsed() > APPROVAL_LIMIT {
            return Err(bad(format!(
                "not approved within {} minutes (keys {fingerprint}): approve it, then power-cycle it",
                APPROVAL_LIMIT.as_secs() / 60
            )));
        }
        if said.is_none_or(|t| t.elapsed() > std::time::Duration::from_secs(60)) {
            println!(
                "herd-initrd: waiting for an admin to approve this machine's keys: herdctl machine approve {machine} \
                 {fingerprint}"
            );
            said = Some(std::time::Instant::now());
        }
        std::thread::sleep(std::time::Duration::from_secs(5));
    }
}

/// Joins: keys (kept or made) under `root`'s [`herd_config::node::TLS_DIR`], their requests with `credential`, the
/// answer checked against what `config` pinned and written beside the keys (a member's key and certificate owned by
/// etcd's user).
pub fn join(
    prov: &Provisioner,
    root: &Path,
    config: &Value,
    machine: &str,
    member: bool,
    credential: &str,
) -> Result<Joined, ProvisionError> {
    let dir = root.join(herd_config::node::TLS_DIR.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
    let request = |file: &str, holder: &Holder| -> Result<String, ProvisionError> {
        let key = key(&dir.join(file))?;
        herd_pki::request_for(&key, &holder.common_name()).map_err(|e| bad(e.to_string()))
    };
    let (me, member_holder) = (Holder::Machine(machine.to_owned()), Holder::Member(machine.to_owned()));
    let body = JoinRequest {
        credential: credential.to_owned(),
        machine_csr: request("machine.key", &me)?,
        member_csr: if member { Some(request("member.key", &member_holder)?) } else { None },
    };
    let answer = awaiting_approval(prov, &body, machine)?;
    let etcd_ca = pinned(config, Authority::Etcd).ok_or_else(|| bad("the config pins no etcd CA".into()))?;
    let joined = check_answer(&answer, &etcd_ca, machine, member)?;
    let write =
        |file: &str, pem: &str| herd_pki::write_public(&dir.join(file), pem.as_bytes()).map_err(|e| bad(e.to_string()));
    // What this machine trusts is what its config pinned (every CA the site trusts, two during a rotation).
    write("etcd-ca.crt", &etcd_ca)?;
    write("api-ca.crt", &answer.api_ca)?;
    write("machine.crt", &answer.machine_cert)?;
    // Joined: the provisioner spent this boot's token; what this boot reports from now on is signed.
    prov.sign_reports_with(dir.clone());
    if let Some(pem) = &answer.member_cert {
        write("member.crt", pem)?;
        // etcd reads its key as its own user; the key stays 0600, readable by etcd alone.
        let (uid, gid) = crate::ignition::user_ids(root, ETCD_USER)
            .ok_or_else(|| bad(format!("the image has no {ETCD_USER} user to run the etcd member")))?;
        for file in ["member.key", "member.crt"] {
            let path = dir.join(file);
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|e| bad(format!("chown {}: {e}", path.display())))?;
        }
    }
    Ok(joined)
}

/// The fingerprints of the CA certificates in `bundle`.
fn fingerprints(bundle: &str) -> std::collections::BTreeSet<String> {
    herd_pki::split_pems(bundle).iter().filter_map(|pem| herd_pki::parse(pem).ok()).map(|c| c.fingerprint).collect()
}

/// Checks what the provisioner answered: its etcd CAs include one of `trust` (the CAs this machine pinned or was
/// told since), and each certificate is valid, from one of `trust` and names this machine (a member's, for an etcd
/// member).
fn check_answer(answer: &JoinAnswer, trust: &str, machine: &str, member: bool) -> Result<Joined, ProvisionError> {
    if fingerprints(&answer.etcd_ca).is_disjoint(&fingerprints(trust)) {
        return Err(bad("the provisioner's etcd CA is not one this machine trusts (pinned)".into()));
    }
    let (me, member_holder) = (Holder::Machine(machine.to_owned()), Holder::Member(machine.to_owned()));
    let now = time::OffsetDateTime::now_utc();
    let check = |pem: &str, holder: &Holder| -> Result<String, ProvisionError> {
        let info = herd_pki::verify_any(trust, Authority::Etcd, pem, now).map_err(|e| bad(format!("{holder}: {e}")))?;
        if info.holder.as_ref() != Some(holder) {
            return Err(bad(format!("a certificate for {}, not {holder}", info.common_name)));
        }
        Ok(info.fingerprint)
    };
    let machine_fp = check(&answer.machine_cert, &me)?;
    let member_fp = match (&answer.member_cert, member) {
        (Some(pem), true) => Some(check(pem, &member_holder)?),
        (None, true) => return Err(bad("an etcd member got no member certificate".into())),
        _ => None,
    };
    Ok(Joined { machine: machine_fp, member: member_fp })
}

/// The certificates a running machine holds: `(file stem, holder)` in [`herd_config::node::TLS_DIR`].
pub(crate) fn held(machine: &str, member: bool) -> Vec<(&'static str, Holder)> {
    let mut out = vec![("machine", Holder::Machine(machine.to_owned()))];
    if member {
        out.push(("member", Holder::Member(machine.to_owned())));
    }
    out
}

/// When (Unix seconds) the first of the certificates in `dir` is due for renewal: once less than
/// [`herd_pki::RENEW_AT`] of its validity is left. An unreadable certificate is due now.
pub fn renewal_due(dir: &Path, machine: &str, member: bool) -> i64 {
    held(machine, member)
        .iter()
        .map(|(stem, _)| {
            let pem = std::fs::read_to_string(dir.join(format!("{stem}.crt"))).unwrap_or_default();
            match herd_pki::parse(&pem) {
                Ok(c) => c.not_after - ((c.not_after - c.not_before) as f64 * herd_pki::RENEW_AT) as i64,
                Err(_) => 0,
            }
        })
        .min()
        .unwrap_or(0)
}

/// Renews the certificates in `dir` (`POST /renew/MAC`): requests signed by the keys kept there, with the
/// certificates they renew; the answer checked against the etcd CA this machine pinned at its join and against
/// its own keys, then each certificate swapped in atomically (etcd reads its certificate per connection).
pub fn renew(prov: &Provisioner, dir: &Path, machine: &str, member: bool) -> Result<Joined, ProvisionError> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|e| bad(format!("{}: {e}", path.display())))
    };
    let mut pairs = Vec::new();
    for (stem, holder) in held(machine, member) {
        let key_path = dir.join(format!("{stem}.key"));
        herd_pki::check_private(&key_path).map_err(|e| bad(e.to_string()))?;
        let csr = herd_pki::request_for(&read(&format!("{stem}.key"))?, &holder.common_name())
            .map_err(|e| bad(e.to_string()))?;
        pairs.push((read(&format!("{stem}.crt"))?, csr));
    }
    let mut pairs = pairs.into_iter();
    let (machine_cert, machine_csr) = pairs.next().ok_or_else(|| bad("no machine certificate".into()))?;
    let (member_cert, member_csr) = pairs.next().unzip();
    let body = herd_api::RenewRequest { machine_cert, machine_csr, member_cert, member_csr };
    let answer = prov.renew(&body)?;
    let joined = check_answer(&answer, &read("etcd-ca.crt")?, machine, member)?;
    // For the keys kept here: a certificate of another key would lock this machine out at its next connection.
    let member_pair = body.member_csr.as_ref().zip(answer.member_cert.as_ref());
    for (csr, cert) in std::iter::once((&body.machine_csr, &answer.machine_cert)).chain(member_pair) {
        herd_pki::request_proves(csr, cert).map_err(|e| bad(format!("the renewed certificate: {e}")))?;
    }
    let write =
        |file: &str, pem: &str| herd_pki::write_public(&dir.join(file), pem.as_bytes()).map_err(|e| bad(e.to_string()));
    write("machine.crt", &answer.machine_cert)?;
    if let Some(pem) = &answer.member_cert {
        write("member.crt", pem)?;
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site, and a certificate for `holder` of a new key valid `secs` from now, as `(site dir, site, key, cert)`.
    fn issued(holder: Holder, secs: i64) -> (tempfile::TempDir, herd_pki::Site, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let now = time::OffsetDateTime::now_utc();
        let site = herd_pki::Site::init(&dir.path().join("pki"), "lab", now).unwrap();
        let key = herd_pki::new_key().unwrap();
        let csr = herd_pki::request_for(&key, &holder.common_name()).unwrap();
        let subject = herd_pki::Subject::new(holder, time::Duration::seconds(secs));
        let cert = site.issue(Authority::Etcd, &subject, herd_pki::KeySource::Request(&csr), now).unwrap().cert_pem;
        (dir, site, key, cert)
    }

    #[test]
    fn renewal_is_due_once_a_third_of_the_first_certificates_validity_is_left() {
        let (dir, site, _, machine) = issued(Holder::Machine("m1".into()), 3_000);
        std::fs::write(dir.path().join("machine.crt"), &machine).unwrap();
        let info = herd_pki::parse(&machine).unwrap();
        let third = (info.not_after - info.not_before) / 3;
        assert!((renewal_due(dir.path(), "m1", false) - (info.not_after - third)).abs() <= 1);
        // A member's certificate that ends sooner sets the time; a missing one makes it due now.
        assert_eq!(renewal_due(dir.path(), "m1", true), 0, "no member.crt yet");
        let (_, key) = herd_pki::request("member:m1").unwrap();
        let subject = herd_pki::Subject::new(Holder::Member("m1".into()), time::Duration::seconds(600));
        let now = time::OffsetDateTime::now_utc();
        let member = site.issue(Authority::Etcd, &subject, herd_pki::KeySource::Request(&key), now).unwrap();
        std::fs::write(dir.path().join("member.crt"), &member.cert_pem).unwrap();
        let soon = herd_pki::parse(&member.cert_pem).unwrap();
        let due = renewal_due(dir.path(), "m1", true);
        assert!((due - (soon.not_after - (soon.not_after - soon.not_before) / 3)).abs() <= 1, "{due}");
    }

    #[test]
    fn an_answer_is_taken_only_from_the_pinned_ca_and_for_this_machine() {
        let (dir, site, _, cert) = issued(Holder::Machine("m1".into()), 3_000);
        let answer = JoinAnswer {
            etcd_ca: site.ca_pem(Authority::Etcd).to_owned(),
            api_ca: site.ca_pem(Authority::Api).to_owned(),
            machine_cert: cert,
            member_cert: None,
        };
        let pinned = site.ca_pem(Authority::Etcd);
        assert!(check_answer(&answer, pinned, "m1", false).is_ok());
        let err = |r: Result<Joined, ProvisionError>| r.unwrap_err().to_string();
        assert!(
            err(check_answer(&answer, pinned, "m2", false)).contains("a certificate for machine:m1, not machine:m2")
        );
        assert!(err(check_answer(&answer, pinned, "m1", true)).contains("no member certificate"));
        let (_other_dir, other, _, _) = issued(Holder::Machine("m1".into()), 3_000);
        let foreign = other.ca_pem(Authority::Etcd);
        assert!(err(check_answer(&answer, foreign, "m1", false)).contains("not one this machine trusts"));
        let forged = JoinAnswer { etcd_ca: foreign.to_owned(), ..answer.clone() };
        assert!(err(check_answer(&forged, foreign, "m1", false)).contains("machine:m1"), "signed by another CA");
        // During a rotation the machine trusts two CAs: an answer naming either, with certificates of either, is
        // taken; a certificate from outside them is not.
        let mut rotating = herd_pki::Site::open(&dir.path().join("pki")).unwrap();
        rotating.begin_rotation(Authority::Etcd, time::OffsetDateTime::now_utc()).unwrap();
        rotating.switch_rotation(Authority::Etcd).unwrap();
        let both = rotating.trust_pem(Authority::Etcd);
        let (_, csr) = herd_pki::request("machine:m1").unwrap();
        let subject = herd_pki::Subject::new(Holder::Machine("m1".into()), time::Duration::hours(1));
        let now = time::OffsetDateTime::now_utc();
        let renewed = rotating.issue(Authority::Etcd, &subject, herd_pki::KeySource::Request(&csr), now).unwrap();
        let from_new = JoinAnswer { etcd_ca: both.clone(), machine_cert: renewed.cert_pem.clone(), ..answer.clone() };
        assert!(check_answer(&from_new, &both, "m1", false).is_ok());
        assert!(check_answer(&answer, &both, "m1", false).is_ok(), "the first CA's certificate");
        assert!(
            err(check_answer(&from_new, pinned, "m1", false)).contains("machine:m1"),
            "trusted before the rotation"
        );
    }

    #[test]
    fn the_credential_leaves_the_config_and_nothing_else_does() {
        let mut config = serde_json::json!({"storage": {"files": [
            {"path": "/etc/hostname", "contents": {"source": "data:,node1%0A"}},
            {"path": herd_api::JOIN_CREDENTIAL_PATH, "contents": {"source": "data:,abc123"}},
        ]}});
        assert_eq!(take_credential(&mut config).as_deref(), Some("abc123"));
        assert_eq!(config["storage"]["files"].as_array().map(Vec::len), Some(1));
        assert!(!config.to_string().contains("abc123"));
        assert_eq!(take_credential(&mut config), None, "taken once");
    }
}
