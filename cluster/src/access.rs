//! Least privilege inside etcd: who may read and write which keys of the schema, as etcd users and roles.
//!
//! etcd (with `--client-cert-auth` and auth enabled) takes a client certificate's common name as its user name,
//! so every holder of a site certificate (`herd_pki::Holder`) is a user here, and what it may do is the role
//! granted to it:
//!
//! | user | role | may |
//! |---|---|---|
//! | `machine:NAME` | `herd-machine:NAME` | write its registration `machines/NAME` and its states `state/NAME/`; read its schedule `schedule/NAME/` and `prewarm/` |
//! | `machine:NAME` of an etcd member | also `herd-engine` | read everything herd keeps; write `schedule/`, `unplaced/`, `engine/`, `events/` |
//! | `operator:NAME`, role operator | `herd-operator` | read everything herd keeps; write `units/`, `cordon/`, `prewarm/` |
//! | `operator:NAME`, role read-only | `herd-read-only` | read everything herd keeps |
//! | `operator:NAME`, role admin | etcd's `root` | everything, including users, roles and membership |
//!
//! A machine can therefore neither write another machine's schedule, states or registration nor the engine's
//! keys, and reads no other machine's schedule. [`apply`] makes etcd's users and roles what a [`Policy`] says —
//! adding what is missing, taking back what is no longer granted, removing herd users no longer in it — and
//! turns authentication on; run again, it changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Permission, PermissionType};
use herd_pki::{Holder, Role};

use crate::schema::{self, MachineKey};
use crate::store::{Store, StoreError};

/// The engine's role.
pub const ENGINE: &str = "herd-engine";
/// An operator's role.
pub const OPERATOR: &str = "herd-operator";
/// A read-only operator's role.
pub const READ_ONLY: &str = "herd-read-only";
/// etcd's own all-powerful role (admins get it).
pub const ROOT: &str = "root";

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// Range, watch, and compare in transactions.
    Read,
    /// Put and delete.
    Write,
    /// Both.
    ReadWrite,
}

/// One permission of a role: an access on a key, or on every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Grant {
    /// What it allows.
    pub access: Access,
    /// The key, or the prefix.
    pub key: String,
    /// Whether `key` is a prefix.
    pub prefix: bool,
}

impl Grant {
    fn on_prefix(access: Access, prefix: String) -> Grant {
        Grant { access, key: prefix, prefix: true }
    }

    fn on_key(access: Access, key: String) -> Grant {
        Grant { access, key, prefix: false }
    }

    /// The range etcd stores for it: `(key, range_end)`, an empty end for a single key.
    fn range(&self) -> (Vec<u8>, Vec<u8>) {
        let end = if self.prefix { crate::store::prefix_end(self.key.as_bytes()) } else { Vec::new() };
        (self.key.clone().into_bytes(), end)
    }
}

/// The role of one machine.
pub fn machine_role(machine: &MachineKey) -> (String, Vec<Grant>) {
    let grants = vec![
        Grant::on_key(Access::ReadWrite, schema::Key::Machine(machine.clone()).path()),
        Grant::on_prefix(Access::ReadWrite, schema::machine_states_prefix(machine)),
        Grant::on_prefix(Access::Read, schema::schedule_prefix(machine)),
        Grant::on_prefix(Access::Read, schema::prefix("prewarm")),
        Grant::on_key(Access::Read, schema::Key::Trust.path()),
        Grant::on_key(Access::ReadWrite, schema::Key::TrustAck(machine.clone()).path()),
    ];
    (format!("herd-machine:{machine}"), grants)
}

/// The shared roles: the engine's, the operator's and the read-only operator's.
pub fn shared_roles() -> Vec<(String, Vec<Grant>)> {
    let read_all = || Grant::on_prefix(Access::Read, schema::ROOT.to_owned());
    let write =
        |kinds: &[&str]| kinds.iter().map(|k| Grant::on_prefix(Access::Write, schema::prefix(k))).collect::<Vec<_>>();
    let with_reads = |mut w: Vec<Grant>| {
        w.insert(0, read_all());
        w
    };
    vec![
        (ENGINE.to_owned(), {
            // The etcd members' machines run the engine, and take turns restarting their etcd.
            let mut grants = with_reads(write(&["schedule", "unplaced", "engine", "events"]));
            grants.push(Grant::on_key(Access::Write, schema::Key::RestartTurn.path()));
            grants
        }),
        (OPERATOR.to_owned(), with_reads(write(&["units", "cordon", "prewarm"]))),
        (READ_ONLY.to_owned(), vec![read_all()]),
    ]
}

/// Who may use etcd.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Every machine, and whether it runs the engine (the etcd members do).
    pub machines: Vec<(MachineKey, bool)>,
    /// Every operator and their role.
    pub operators: Vec<(String, Role)>,
}

impl Policy {
    /// The policy of `machines` (and whether each runs the engine) and of every operator `site` issued an etcd
    /// certificate to that is still valid at `now` (the latest one's role, if a name was issued twice).
    pub fn of_site(
        machines: Vec<(MachineKey, bool)>,
        site: &herd_pki::Site,
        now: time::OffsetDateTime,
    ) -> Result<Policy, herd_pki::PkiError> {
        let lines = site.status(now)?;
        let operators = herd_pki::newest_per_holder(&lines)
            .into_iter()
            .filter(|l| l.authority == herd_pki::Authority::Etcd)
            .filter(|l| matches!(l.standing, herd_pki::Standing::Valid | herd_pki::Standing::RenewSoon))
            .filter_map(|l| match &l.cert.holder {
                Some(Holder::Operator(name, role)) => Some((name.clone(), *role)),
                _ => None,
            })
            .collect();
        Ok(Policy { machines, operators })
    }

    /// [`Policy::of_site`] for the machines named `(name, whether it is an etcd member)`, as an inventory lists
    /// them; a name that cannot be an etcd user is refused with it.
    pub fn of_machines<'a>(
        machines: impl IntoIterator<Item = (&'a str, bool)>,
        site: &herd_pki::Site,
        now: time::OffsetDateTime,
    ) -> Result<Policy, PolicyError> {
        let machines = machines
            .into_iter()
            .map(|(name, member)| {
                Ok((MachineKey::new(name).ok_or_else(|| PolicyError::Name(name.to_owned()))?, member))
            })
            .collect::<Result<Vec<_>, PolicyError>>()?;
        Ok(Policy::of_site(machines, site, now)?)
    }

    /// Every user with its roles, and every role with its grants.
    fn wanted(&self) -> (BTreeMap<String, BTreeSet<String>>, BTreeMap<String, BTreeSet<Grant>>) {
        let mut users = BTreeMap::new();
        let mut roles: BTreeMap<String, BTreeSet<Grant>> =
            shared_roles().into_iter().map(|(n, g)| (n, g.into_iter().collect())).collect();
        // etcd needs a root user holding the root role before it turns authentication on; nobody can act as it
        // without a certificate naming it, and the site CA issues none.
        users.insert(ROOT.to_owned(), BTreeSet::from([ROOT.to_owned()]));
        for (machine, engine) in &self.machines {
            let (role, grants) = machine_role(machine);
            let mut granted = BTreeSet::from([role.clone()]);
            if *engine {
                granted.insert(ENGINE.to_owned());
            }
            users.insert(Holder::Machine(machine.to_string()).common_name(), granted);
            roles.insert(role, grants.into_iter().collect());
        }
        for (name, role) in &self.operators {
            let etcd_role = match role {
                Role::Admin => ROOT,
                Role::Operator => OPERATOR,
                Role::ReadOnly => READ_ONLY,
            };
            users
                .entry(Holder::Operator(name.clone(), *role).common_name())
                .or_insert_with(BTreeSet::new)
                .insert(etcd_role.to_owned());
        }
        (users, roles)
    }
}

/// Why a policy cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A machine name that cannot be an etcd user name.
    #[error("machine {0:?} cannot be an etcd user name (a-z, 0-9, '-', '_', '.'; at most 64)")]
    Name(String),
    /// The site PKI could not be read.
    #[error(transparent)]
    Pki(#[from] herd_pki::PkiError),
}

/// What [`apply`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Roles created or whose grants changed.
    pub roles: Vec<String>,
    /// Users created or whose roles changed.
    pub users: Vec<String>,
    /// herd users and roles removed (no longer in the policy).
    pub removed: Vec<String>,
}

impl Applied {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.roles.is_empty() && self.users.is_empty() && self.removed.is_empty()
    }
}

/// Whether a user or role name is one herd manages (and may remove).
fn herds(name: &str) -> bool {
    ["machine:", "operator:", "herd-machine:"].iter().any(|p| name.starts_with(p))
        || [ENGINE, OPERATOR, READ_ONLY].contains(&name)
}

/// Makes etcd's users and roles what `policy` says and turns authentication on. New grants are added before old
/// ones are taken back, so a holder never loses access it keeps.
///
/// Another applier (the provisioner keeps the policy applied; an admin runs `herdctl access apply`; `herdctl demo`)
/// may run at the same moment, in the same order: each add, delete and revoke that finds the other one did it first
/// counts as done.
pub async fn apply(store: &Store, policy: &Policy) -> Result<Applied, StoreError> {
    apply_listed(store, policy).await
}

/// etcd's answer to a change another applier made first: a user or role that exists already, or that is gone
/// already, or a permission or role not (or no longer) granted.
fn done_already(e: &StoreError) -> bool {
    const DONE: [&str; 3] = ["already exists", "not found", "not granted"];
    matches!(e, StoreError::Etcd(etcd_client::Error::GRpcStatus(s))
        if s.code() == tonic::Code::FailedPrecondition && DONE.iter().any(|d| s.message().contains(d)))
}

/// `r`, with a change another applier made first counted as done.
fn tolerant<T>(r: Result<T, etcd_client::Error>) -> Result<(), StoreError> {
    match r.map_err(StoreError::from) {
        Err(e) if done_already(&e) => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Ok(()),
    }
}

async fn apply_listed(store: &Store, policy: &Policy) -> Result<Applied, StoreError> {
    let mut auth = store.client().auth_client();
    let (users, roles) = policy.wanted();
    let mut applied = Applied::default();
    let existing_roles: BTreeSet<String> = auth.role_list().await?.roles().iter().cloned().collect();
    for (name, grants) in &roles {
        if set_role(&mut auth, name, grants, existing_roles.contains(name)).await? {
            applied.roles.push(name.clone());
        }
    }
    if !existing_roles.contains(ROOT) {
        tolerant(auth.role_add(ROOT).await)?;
    }
    let existing_users: BTreeSet<String> = auth.user_list().await?.users().iter().cloned().collect();
    for (name, granted) in &users {
        if set_user(&mut auth, name, granted, existing_users.contains(name)).await? {
            applied.users.push(name.clone());
        }
    }
    for name in existing_users.iter().filter(|u| herds(u) && !users.contains_key(*u)) {
        tolerant(auth.user_delete(name.as_str()).await)?;
        applied.removed.push(name.clone());
    }
    for name in existing_roles.iter().filter(|r| herds(r) && !roles.contains_key(*r)) {
        tolerant(auth.role_delete(name.as_str()).await)?;
        applied.removed.push(name.clone());
    }
    // etcd answers an enable of an enabled cluster with success.
    auth.auth_enable().await?;
    Ok(applied)
}

/// Gives user `user` one role of its own, `role`, with `grants` (for holders that stand for several machines,
/// as the hollow machines of `herdctl bench` sharing a connection do); needs an admin's store.
pub async fn set_user_with_grants(
    store: &Store,
    user: &str,
    role: &str,
    grants: &BTreeSet<Grant>,
) -> Result<(), StoreError> {
    let mut auth = store.client().auth_client();
    let roles: BTreeSet<String> = auth.role_list().await?.roles().iter().cloned().collect();
    set_role(&mut auth, role, grants, roles.contains(role)).await?;
    let users: BTreeSet<String> = auth.user_list().await?.users().iter().cloned().collect();
    set_user(&mut auth, user, &BTreeSet::from([role.to_owned()]), users.contains(user)).await?;
    Ok(())
}

/// Makes role `name` hold exactly `grants`; says whether anything changed.
async fn set_role(
    auth: &mut etcd_client::AuthClient,
    name: &str,
    grants: &BTreeSet<Grant>,
    exists: bool,
) -> Result<bool, StoreError> {
    let have: BTreeSet<Grant> = if exists {
        auth.role_get(name).await?.permissions().iter().filter_map(grant_of).collect()
    } else {
        tolerant(auth.role_add(name).await)?;
        // Another applier may have added it first, and granted some of it.
        auth.role_get(name).await?.permissions().iter().filter_map(grant_of).collect()
    };
    if &have == grants {
        return Ok(!exists);
    }
    for g in grants.difference(&have) {
        let (key, end) = g.range();
        let kind = match g.access {
            Access::Read => PermissionType::Read,
            Access::Write => PermissionType::Write,
            Access::ReadWrite => PermissionType::Readwrite,
        };
        let mut perm = Permission::new(kind, key);
        if !end.is_empty() {
            perm = perm.with_range_end(end);
        }
        auth.role_grant_permission(name, perm).await?;
    }
    for g in have.difference(grants) {
        let (key, end) = g.range();
        let options = (!end.is_empty()).then(|| etcd_client::RoleRevokePermissionOptions::new().with_range_end(end));
        tolerant(auth.role_revoke_permission(name, key, options).await)?;
    }
    Ok(true)
}

/// Makes user `name` (no password: it authenticates by certificate) hold exactly `roles`; says whether anything
/// changed.
async fn set_user(
    auth: &mut etcd_client::AuthClient,
    name: &str,
    roles: &BTreeSet<String>,
    exists: bool,
) -> Result<bool, StoreError> {
    let have: BTreeSet<String> = if exists {
        auth.user_get(name).await?.roles().iter().cloned().collect()
    } else {
        let no_password = etcd_client::UserAddOptions::new().with_no_pwd();
        tolerant(auth.user_add(name, "", Some(no_password)).await)?;
        auth.user_get(name).await?.roles().iter().cloned().collect()
    };
    if &have == roles {
        return Ok(!exists);
    }
    for r in roles.difference(&have) {
        auth.user_grant_role(name, r.as_str()).await?;
    }
    for r in have.difference(roles) {
        tolerant(auth.user_revoke_role(name, r.as_str()).await)?;
    }
    Ok(true)
}

/// A permission etcd reports, as a grant (None for one herd never makes: a range that is not a prefix).
fn grant_of(p: &Permission) -> Option<Grant> {
    let key = String::from_utf8(p.key().to_vec()).ok()?;
    let access = match PermissionType::try_from(p.get_type()).ok()? {
        PermissionType::Read => Access::Read,
        PermissionType::Write => Access::Write,
        PermissionType::Readwrite => Access::ReadWrite,
    };
    let end = p.range_end();
    if end.is_empty() {
        Some(Grant::on_key(access, key))
    } else if end == crate::store::prefix_end(key.as_bytes()).as_slice() {
        Some(Grant::on_prefix(access, key))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str) -> MachineKey {
        MachineKey::new(id).unwrap()
    }

    fn covers(grants: &[Grant], access: Access, key: &str) -> bool {
        grants.iter().any(|g| {
            let kind_ok = g.access == access || g.access == Access::ReadWrite;
            kind_ok && if g.prefix { key.starts_with(&g.key) } else { key == g.key }
        })
    }

    #[test]
    fn a_machine_writes_only_its_own_keys() {
        let (_, grants) = machine_role(&m("m1"));
        use schema::Key;
        let unit: crate::unit::UnitName = "web.service".parse().unwrap();
        assert!(covers(&grants, Access::Write, &Key::Machine(m("m1")).path()));
        assert!(covers(&grants, Access::Write, &Key::UnitState(unit.clone(), m("m1")).path()));
        assert!(covers(&grants, Access::Read, &Key::Schedule(m("m1"), unit.clone()).path()));
        for key in [
            Key::Machine(m("m10")).path(),
            Key::UnitState(unit.clone(), m("m10")).path(),
            Key::Schedule(m("m1"), unit.clone()).path(),
            Key::Schedule(m("m2"), unit.clone()).path(),
            Key::EngineLeader.path(),
            Key::Unit(unit.clone()).path(),
        ] {
            assert!(!covers(&grants, Access::Write, &key), "{key}");
        }
        assert!(!covers(&grants, Access::Read, &Key::Schedule(m("m10"), unit).path()));
    }

    #[test]
    fn roles_follow_the_policy_and_root_always_exists() {
        let policy = Policy {
            machines: vec![(m("m1"), true), (m("m2"), false)],
            operators: vec![("alice".into(), Role::Admin), ("bob".into(), Role::ReadOnly)],
        };
        let (users, roles) = policy.wanted();
        assert_eq!(users["machine:m1"], BTreeSet::from(["herd-machine:m1".to_owned(), ENGINE.to_owned()]));
        assert_eq!(users["machine:m2"], BTreeSet::from(["herd-machine:m2".to_owned()]));
        assert_eq!(users["operator:alice"], BTreeSet::from([ROOT.to_owned()]));
        assert_eq!(users["operator:bob"], BTreeSet::from([READ_ONLY.to_owned()]));
        assert_eq!(users[ROOT], BTreeSet::from([ROOT.to_owned()]));
        assert!(roles.contains_key("herd-machine:m2") && roles.contains_key(ENGINE));
        assert!(!herds(ROOT) && herds("machine:m9") && herds("herd-machine:m9"));
    }

    #[test]
    fn a_prefix_grant_reads_back_as_itself() {
        for g in machine_role(&m("m1")).1 {
            let (key, end) = g.range();
            let mut p = Permission::new(PermissionType::Read, key);
            if !end.is_empty() {
                p = p.with_range_end(end);
            }
            let back = grant_of(&p).unwrap();
            assert_eq!((back.key, back.prefix), (g.key, g.prefix));
        }
    }
}
