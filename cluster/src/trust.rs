//! What the site trusts, in etcd (docs/security.md, "Rotating the etcd CA").
//!
//! The provisioner (an admin) publishes at `pki/trust` every etcd CA the site trusts and the one that issues
//! ([`TrustRecord`]). Each machine makes its trusted-CA file say the same (an etcd member then restarts its etcd,
//! one member at a time: [`take_restart_turn`]), renews its certificates once they are not from the CA that issues,
//! and says where it stands at `pki/acks/MACHINE` ([`TrustAck`]). A machine may read the record and write only its
//! own acknowledgement (`crate::access::machine_role`); only admins publish.

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::schema::{self, Key, MachineKey};
use crate::store::{Store, StoreError};

/// The most CAs a record may list (one that issues, and a rotation's next or previous one).
pub const MAX_TRUSTED: usize = 3;

/// What the site trusts, as the provisioner publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustRecord {
    /// Every etcd CA the site trusts, PEM certificates one after the other.
    pub trusted: String,
    /// The SHA-256 fingerprint of the one that issues.
    pub issuing: String,
    /// Where the site's rotation stands (`steady`, `accepting`, `switched`).
    pub rotation: String,
}

impl TrustRecord {
    /// The fingerprints of the CAs it lists, sorted (what [`TrustAck::trusted`] is compared with).
    pub fn fingerprints(&self) -> Vec<String> {
        fingerprints(&self.trusted)
    }

    /// Checks what a machine is about to trust: one to [`MAX_TRUSTED`] CA certificates, the one that issues among
    /// them, and at least one that `current` (what the machine trusts now) lists, so no record, however written,
    /// moves a machine to CAs it has no path from.
    pub fn check(&self, current: &str) -> Result<(), String> {
        let pems = herd_pki::split_pems(&self.trusted);
        if pems.is_empty() || pems.len() > MAX_TRUSTED {
            return Err(format!("{} CA certificates (1 to {MAX_TRUSTED} expected)", pems.len()));
        }
        for pem in &pems {
            let info = herd_pki::parse(pem).map_err(|e| e.to_string())?;
            if !info.is_ca {
                return Err(format!("{} is not a CA certificate", info.common_name));
            }
        }
        let listed = self.fingerprints();
        if !listed.contains(&self.issuing) {
            return Err("the CA that issues is not among those trusted".to_owned());
        }
        if !fingerprints(current).iter().any(|f| listed.contains(f)) {
            return Err("none of the CAs this machine trusts now is among them".to_owned());
        }
        Ok(())
    }
}

/// The fingerprints of the certificates in a PEM bundle, sorted.
pub fn fingerprints(bundle: &str) -> Vec<String> {
    let mut out: Vec<String> = herd_pki::split_pems(bundle)
        .iter()
        .filter_map(|pem| herd_pki::parse(pem).ok())
        .map(|c| c.fingerprint)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Where one machine stands, as it says itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrustAck {
    /// The fingerprints of the CAs its trusted-CA file lists, sorted (its etcd restarted with them, for a member).
    pub trusted: Vec<String>,
    /// The fingerprints of the CAs that issued each certificate it holds (its machine one, and its member one).
    pub issued_by: Vec<String>,
}

/// Reading or writing what the site trusts failed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// etcd failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The record does not parse.
    #[error("{key} does not hold a trust record: {why}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        why: String,
    },
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, TrustError> {
    serde_json::from_slice(value).map_err(|e| TrustError::Corrupt { key: key.to_owned(), why: e.to_string() })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// The record, if one was published.
pub async fn read(store: &Store) -> Result<Option<TrustRecord>, TrustError> {
    let key = Key::Trust.path();
    store.get(&key).await?.map(|kv| decode(&key, kv.value())).transpose()
}

/// Publishes `record` unless it is there already; says whether it wrote.
pub async fn publish(store: &Store, record: &TrustRecord) -> Result<bool, StoreError> {
    // A record that does not parse is written over.
    if read(store).await.ok().flatten().as_ref() == Some(record) {
        return Ok(false);
    }
    store.put(&Key::Trust.path(), encode(record), None).await?;
    Ok(true)
}

/// Writes `machine`'s acknowledgement.
pub async fn acknowledge(store: &Store, machine: &MachineKey, ack: &TrustAck) -> Result<(), StoreError> {
    store.put(&Key::TrustAck(machine.clone()).path(), encode(ack), None).await
}

/// Every machine's acknowledgement, by machine; one that does not parse is left out.
pub async fn acks(store: &Store) -> Result<BTreeMap<String, TrustAck>, StoreError> {
    let (kvs, _) = store.get_prefix(&schema::prefix("pki/acks")).await?;
    Ok(kvs
        .iter()
        .filter_map(|kv| match Key::parse(kv.key_str().ok()?)? {
            Key::TrustAck(m) => Some((m.as_str().to_owned(), serde_json::from_slice(kv.value()).ok()?)),
            _ => None,
        })
        .collect())
}

/// Takes the turn to restart an etcd member for `machine`, attached to `lease` (so a member that dies mid-turn
/// gives it up when its lease ends): false if another member holds it.
pub async fn take_restart_turn(store: &Store, machine: &MachineKey, lease: i64) -> Result<bool, StoreError> {
    let key = Key::RestartTurn.path();
    let txn = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
        key.as_str(),
        machine.as_str(),
        Some(PutOptions::new().with_lease(lease)),
    )]);
    Ok(store.txn(txn).await?.succeeded())
}

/// Gives the turn back, if `machine` holds it.
pub async fn end_restart_turn(store: &Store, machine: &MachineKey) -> Result<(), StoreError> {
    let key = Key::RestartTurn.path();
    let txn = Txn::new()
        .when([Compare::value(key.as_str(), CompareOp::Equal, machine.as_str())])
        .and_then([TxnOp::delete(key.as_str(), None)]);
    store.txn(txn).await?;
    Ok(())
}
