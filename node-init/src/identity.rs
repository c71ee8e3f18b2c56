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
    if answer.etcd_ca != etcd_ca {
        return Err(bad("the join answer's etcd CA is not the one the config pinned".into()));
    }
    let now = time::OffsetDateTime::now_utc();
    let check = |pem: &str, holder: &Holder| -> Result<String, ProvisionError> {
        let info = herd_pki::verify(&etcd_ca, Authority::Etcd, pem, now).map_err(|e| bad(format!("{holder}: {e}")))?;
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
    let write =
        |file: &str, pem: &str| herd_pki::write_public(&dir.join(file), pem.as_bytes()).map_err(|e| bad(e.to_string()));
    write("etcd-ca.crt", &answer.etcd_ca)?;
    write("api-ca.crt", &answer.api_ca)?;
    write("machine.crt", &answer.machine_cert)?;
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
    Ok(Joined { machine: machine_fp, member: member_fp })
}

#[cfg(test)]
mod tests {
    use super::*;

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
