//! The provisioner's crash-safe state, in one redb file under `--state-dir`: leases, and machine states with their
//! per-boot tokens and boot timelines.
//!
//! Every write is a transaction committed with immediate durability (fsync) before the caller answers the
//! client, so a `kill -9` loses no acknowledged lease. Callers batch: one commit covers every lease decided in one
//! pass over the socket queue (group commit), which is what keeps durable leases fast.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use herd_inventory::Mac;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::dhcp::leases::{Lease, LeaseState};
use crate::machines::MachineRecord;

const LEASES: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("leases");
const LEASE_RECORD: usize = 6 + 8 + 1;
const MACHINES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("machines");

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state directory could not be created.
    #[error("cannot create state directory {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened (another provisioner holds it, or it is damaged).
    #[error("cannot open state database {path} (is another provisioner using this --state-dir?)")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: redb::DatabaseError,
    },
    /// A read or write failed.
    #[error("state database {what} failed")]
    Io {
        /// Which operation.
        what: &'static str,
        /// Why.
        #[source]
        source: redb::Error,
    },
    /// A machine record that does not decode.
    #[error("machine record for {name} is damaged")]
    CorruptMachine {
        /// The machine.
        name: String,
    },
    /// A record that does not decode (a newer or damaged database).
    #[error("lease record for {ip} is damaged ({len} bytes)")]
    Corrupt {
        /// The address.
        ip: Ipv4Addr,
        /// Its length.
        len: usize,
    },
}

fn io<E: Into<redb::Error>>(what: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Io { what, source: e.into() }
}

/// The state database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens (or creates) `DIR/provisioner.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir { path: dir.to_owned(), source })?;
        let path = dir.join("provisioner.redb");
        let db = Database::create(&path).map_err(|source| StoreError::Open { path: path.clone(), source })?;
        let txn = db.begin_write().map_err(io("begin"))?;
        txn.open_table(LEASES).map_err(io("open leases"))?;
        txn.open_table(MACHINES).map_err(io("open machines"))?;
        txn.commit().map_err(io("commit"))?;
        Ok(Store { db })
    }

    /// Every recorded lease.
    pub fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let txn = self.db.begin_read().map_err(io("begin read"))?;
        let table = txn.open_table(LEASES).map_err(io("open leases"))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(io("scan leases"))? {
            let (k, v) = row.map_err(io("read lease"))?;
            out.push(decode(Ipv4Addr::from(k.value()), v.value())?);
        }
        Ok(out)
    }

    /// Writes leases in one durable transaction; returns once they are on disk.
    pub fn write_leases(&self, leases: &[Lease]) -> Result<(), StoreError> {
        if leases.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(io("begin"))?;
        {
            let mut table = txn.open_table(LEASES).map_err(io("open leases"))?;
            for lease in leases {
                table.insert(u32::from(lease.ip), encode(lease).as_slice()).map_err(io("write lease"))?;
            }
        }
        txn.commit().map_err(io("commit leases"))
    }
}

impl Store {
    /// Every persisted machine record (state, token, timeline), by machine name.
    pub fn machines(&self) -> Result<BTreeMap<String, MachineRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(io("begin read"))?;
        let table = txn.open_table(MACHINES).map_err(io("open machines"))?;
        let mut out = BTreeMap::new();
        for row in table.iter().map_err(io("scan machines"))? {
            let (k, v) = row.map_err(io("read machine"))?;
            let record = serde_json::from_slice(v.value())
                .map_err(|_| StoreError::CorruptMachine { name: k.value().to_owned() })?;
            out.insert(k.value().to_owned(), record);
        }
        Ok(out)
    }

    /// Writes machine records in one durable transaction.
    pub fn write_machines(&self, rows: &[(String, MachineRecord)]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(io("begin"))?;
        {
            let mut table = txn.open_table(MACHINES).map_err(io("open machines"))?;
            for (name, record) in rows {
                // A record is strings, numbers and enums: serializing it cannot fail.
                let bytes = serde_json::to_vec(record).unwrap_or_default();
                table.insert(name.as_str(), bytes.as_slice()).map_err(io("write machine"))?;
            }
        }
        txn.commit().map_err(io("commit machines"))
    }
}

fn encode(lease: &Lease) -> [u8; LEASE_RECORD] {
    let mut out = [0u8; LEASE_RECORD];
    out[..6].copy_from_slice(&lease.mac.octets());
    out[6..14].copy_from_slice(&lease.expires.to_be_bytes());
    out[14] = match lease.state {
        LeaseState::Bound => 0,
        LeaseState::Released => 1,
        LeaseState::Declined => 2,
    };
    out
}

fn decode(ip: Ipv4Addr, bytes: &[u8]) -> Result<Lease, StoreError> {
    let corrupt = || StoreError::Corrupt { ip, len: bytes.len() };
    if bytes.len() != LEASE_RECORD {
        return Err(corrupt());
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&bytes[..6]);
    let mut expires = [0u8; 8];
    expires.copy_from_slice(&bytes[6..14]);
    let state = match bytes[14] {
        0 => LeaseState::Bound,
        1 => LeaseState::Released,
        2 => LeaseState::Declined,
        _ => return Err(corrupt()),
    };
    Ok(Lease { ip, mac: Mac::from_octets(mac), expires: u64::from_be_bytes(expires), state })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_survive_reopening() {
        let dir = std::env::temp_dir().join(format!("herd-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lease = |n: u8, state| Lease {
            ip: Ipv4Addr::new(10, 0, 0, n),
            mac: Mac::from_octets([0x52, 0x54, 0, 0, 0, n]),
            expires: 1_000 + u64::from(n),
            state,
        };
        {
            let store = Store::open(&dir).unwrap();
            store.write_leases(&[lease(1, LeaseState::Bound), lease(2, LeaseState::Declined)]).unwrap();
            store.write_leases(&[lease(1, LeaseState::Released)]).unwrap();
        }
        let store = Store::open(&dir).unwrap();
        let mut leases = store.leases().unwrap();
        leases.sort_by_key(|l| l.ip);
        assert_eq!(leases, [lease(1, LeaseState::Released), lease(2, LeaseState::Declined)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_records_are_reported_not_trusted() {
        assert!(matches!(decode(Ipv4Addr::LOCALHOST, &[0; 3]), Err(StoreError::Corrupt { len: 3, .. })));
        let mut bad = [0u8; LEASE_RECORD];
        bad[14] = 9;
        assert!(decode(Ipv4Addr::LOCALHOST, &bad).is_err());
    }
}
