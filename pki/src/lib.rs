//! The site PKI (docs/security.md): two certificate authorities, so that one leak does not open everything —
//! **etcd** (its members' peer and server certificates, and every etcd client: machines, the engine, operators)
//! and **api** (herd's own APIs: the provisioner's operator API, agents, FleetLock clients) — and the
//! certificates issued from them.
//!
//! A site directory holds each CA's certificate and key (`etcd-ca.crt`, `etcd-ca.key`, `api-ca.crt`,
//! `api-ca.key`; keys are refused if anyone but the owner may read them) and a copy of every certificate issued
//! (`issued/AUTHORITY/SERIAL.crt`, never a key), which is what `herdctl pki status` lists. A certificate is issued
//! either for a key made here (an operator's credential) or for a certificate request (a machine's: its key
//! never leaves it); either way the subject, the names and the validity come from [`Subject`], never from the
//! request, which only lends its public key.
//!
//! Who a certificate names is in its subject: the common name is `KIND:NAME` (`machine:r01-m02`,
//! `operator:alice`, `member:m1`), so no inventory name can pass for another kind (a machine named `root` is
//! `machine:root`, not etcd's root user), and the organization carries the role (`herd:admin`, `herd:operator`,
//! `herd:read-only`, `herd:machine`, `herd:member`), as Talos does.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber,
};
use sha2::{Digest, Sha256};
use time::{Duration, OffsetDateTime};

mod files;
mod rotate;

pub use files::{FileError, check_private, write_private, write_public};
pub use rotate::{Rotation, split_pems, verify_any};

/// How far back a certificate's validity starts, for clocks that run a little behind the issuer's.
pub const BACKDATE: Duration = Duration::minutes(5);

/// How long a site CA is valid.
pub const CA_VALIDITY: Duration = Duration::days(3650);

/// A leaf whose remaining validity is under this share of its whole validity is due for renewal.
pub const RENEW_AT: f64 = 1.0 / 3.0;

/// The DNS name every etcd member's certificate carries and no other certificate may: members let in a peer
/// connection only from a certificate that names it (etcd's `--peer-cert-allowed-hostname`), so a machine's or an
/// operator's certificate of the same CA cannot speak raft or read the member list on a peer port. A tag, never
/// resolved (`.internal` is reserved for private use).
pub const PEER_NAME: &str = "etcd-peer.herd.internal";

/// One of the site's two certificate authorities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Authority {
    /// etcd's members and clients.
    Etcd,
    /// herd's own APIs.
    Api,
}

impl Authority {
    /// Both, in the order they are listed.
    pub const ALL: [Authority; 2] = [Authority::Etcd, Authority::Api];

    /// `etcd` or `api`.
    pub fn as_str(self) -> &'static str {
        match self {
            Authority::Etcd => "etcd",
            Authority::Api => "api",
        }
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operator's certificate lets its holder do (etcd roles and API checks follow it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything, including etcd's users and roles and cluster membership.
    Admin,
    /// Submits, starts and stops units, cordons and drains machines, reprovisions.
    Operator,
    /// Reads.
    ReadOnly,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::ReadOnly];

    /// `admin`, `operator` or `read-only`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::ReadOnly => "read-only",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?}: use admin, operator or read-only"))
    }
}

/// Who a certificate is for, parsed from (or written into) its subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Holder {
    /// A machine of the inventory (`machine:NAME`, `herd:machine`).
    Machine(String),
    /// A person or a tool (`operator:NAME`, `herd:ROLE`).
    Operator(String, Role),
    /// An etcd member (`member:NAME`, `herd:member`): its peer and server certificate.
    Member(String),
    /// A server of herd's APIs (`server:NAME`, `herd:server`), e.g. the provisioner.
    Server(String),
}

impl Holder {
    /// The common name: `KIND:NAME`.
    pub fn common_name(&self) -> String {
        match self {
            Holder::Machine(n) => format!("machine:{n}"),
            Holder::Operator(n, _) => format!("operator:{n}"),
            Holder::Member(n) => format!("member:{n}"),
            Holder::Server(n) => format!("server:{n}"),
        }
    }

    /// The organization: `herd:ROLE` or `herd:KIND`.
    pub fn organization(&self) -> String {
        match self {
            Holder::Machine(_) => "herd:machine".to_owned(),
            Holder::Operator(_, role) => format!("herd:{role}"),
            Holder::Member(_) => "herd:member".to_owned(),
            Holder::Server(_) => "herd:server".to_owned(),
        }
    }

    /// The name without its kind.
    pub fn name(&self) -> &str {
        match self {
            Holder::Machine(n) | Holder::Operator(n, _) | Holder::Member(n) | Holder::Server(n) => n,
        }
    }

    /// Reads a subject back; None for a certificate herd did not issue (or one that mixes kinds and roles).
    pub fn from_subject(common_name: &str, organization: &str) -> Option<Holder> {
        let (kind, name) = common_name.split_once(':')?;
        if !is_name(name) {
            return None;
        }
        let holder = match kind {
            "machine" => Holder::Machine(name.to_owned()),
            "member" => Holder::Member(name.to_owned()),
            "server" => Holder::Server(name.to_owned()),
            "operator" => Holder::Operator(name.to_owned(), organization.strip_prefix("herd:")?.parse().ok()?),
            _ => return None,
        };
        (holder.organization() == organization).then_some(holder)
    }

    /// Whether the certificate authenticates a client, a server, or (an etcd member: peers are both) both.
    fn usages(&self) -> &'static [ExtendedKeyUsagePurpose] {
        match self {
            Holder::Machine(_) | Holder::Operator(..) => &[ExtendedKeyUsagePurpose::ClientAuth],
            Holder::Member(_) => &[ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Holder::Server(_) => &[ExtendedKeyUsagePurpose::ServerAuth],
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.common_name())
    }
}

/// Whether `s` may name a holder: 1-63 of `a-z 0-9 -`, starting and ending with a letter or digit (a DNS label,
/// as inventory host names are), so it goes into a common name and a DNS name unchanged.
pub fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a DNS name a certificate may carry: dot-separated labels, at most 253 characters.
pub fn is_dns_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_name)
}

/// What a certificate says and how long it lasts.
#[derive(Debug, Clone)]
pub struct Subject {
    /// Who it is for.
    pub holder: Holder,
    /// DNS names (servers and members: what clients dial; machines: the host name).
    pub dns: Vec<String>,
    /// IP addresses.
    pub ips: Vec<IpAddr>,
    /// How long it is valid from now.
    pub validity: Duration,
}

impl Subject {
    /// A subject with no alternative names.
    pub fn new(holder: Holder, validity: Duration) -> Subject {
        Subject { holder, dns: Vec::new(), ips: Vec::new(), validity }
    }

    /// Checks every value before anything is signed.
    fn check(&self) -> Result<(), PkiError> {
        let bad = |why: String| Err(PkiError::Subject { holder: self.holder.common_name(), why });
        if !is_name(self.holder.name()) {
            return bad(format!(
                "{:?} cannot go into a certificate: use 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
                self.holder.name()
            ));
        }
        if let Some(d) = self.dns.iter().find(|d| !is_dns_name(d)) {
            return bad(format!("{d:?} is not a DNS name (dot-separated labels of a-z, 0-9 and '-')"));
        }
        if !matches!(self.holder, Holder::Member(_)) && self.dns.iter().any(|d| d == PEER_NAME) {
            return bad(format!("{PEER_NAME} is for etcd members' certificates alone: rename the host"));
        }
        if self.validity <= Duration::ZERO || self.validity > CA_VALIDITY {
            return bad(format!(
                "a validity of {} days is out of range (1 day to 10 years)",
                self.validity.whole_days()
            ));
        }
        Ok(())
    }
}

/// Where the key of a new certificate comes from.
#[derive(Debug, Clone, Copy)]
pub enum KeySource<'a> {
    /// Make a new key here (returned with the certificate).
    Generate,
    /// A PEM certificate request: its signature is checked and only its public key is used.
    Request(&'a str),
}

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The new key, PEM (only for [`KeySource::Generate`]; write it with [`write_private`]).
    pub key_pem: Option<String>,
    /// What it says.
    pub info: CertInfo,
}

/// What herd reads from a certificate.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CertInfo {
    /// The subject's common name.
    pub common_name: String,
    /// The subject's organization (empty if none).
    pub organization: String,
    /// Who it names, if herd issued it.
    #[serde(skip)]
    pub holder: Option<Holder>,
    /// The serial number, hex.
    pub serial: String,
    /// SHA-256 of the DER certificate, colon-separated hex (what an admin compares).
    pub fingerprint: String,
    /// Valid from, Unix seconds.
    pub not_before: i64,
    /// Valid until, Unix seconds.
    pub not_after: i64,
    /// Whether it is a CA.
    pub is_ca: bool,
}

impl CertInfo {
    /// Where it stands at `now`.
    pub fn standing(&self, now: OffsetDateTime) -> Standing {
        let t = now.unix_timestamp();
        if t < self.not_before {
            Standing::NotYetValid
        } else if t >= self.not_after {
            Standing::Expired
        } else if ((self.not_after - t) as f64) < (self.not_after - self.not_before) as f64 * RENEW_AT {
            Standing::RenewSoon
        } else {
            Standing::Valid
        }
    }
}

/// A certificate's validity at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    /// Valid, with most of its life ahead.
    Valid,
    /// Valid, but in the last third of its life: renew it.
    RenewSoon,
    /// Past its end.
    Expired,
    /// Not valid yet (a clock behind the issuer's, or a certificate from the future).
    NotYetValid,
}

impl Standing {
    /// `valid`, `renew-soon`, `expired`, `not-yet-valid`.
    pub fn as_str(self) -> &'static str {
        match self {
            Standing::Valid => "valid",
            Standing::RenewSoon => "renew-soon",
            Standing::Expired => "expired",
            Standing::NotYetValid => "not-yet-valid",
        }
    }
}

/// What went wrong with the site PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written, or is open to others.
    #[error(transparent)]
    File(#[from] FileError),
    /// `init` found a PKI already there.
    #[error(
        "{} already holds a site PKI: nothing was changed (use `herdctl pki status`; a new site needs a new --dir)",
        dir.display()
    )]
    Exists {
        /// The site directory.
        dir: PathBuf,
    },
    /// The directory has no PKI.
    #[error("{} holds no site PKI ({} is missing): run `herdctl pki init` first", dir.display(), missing)]
    Missing {
        /// The site directory.
        dir: PathBuf,
        /// The first file not found.
        missing: String,
    },
    /// A PEM file does not hold what it should.
    #[error("{}: {why}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A CA's key does not belong to its certificate.
    #[error("{} does not belong to {}: the site PKI was tampered with or mixed up", key.display(), cert.display())]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// The CA cannot issue now.
    #[error("the {authority} CA is {}: nothing can be issued from it (make a new site PKI with `herdctl pki init --dir NEW` and issue again)", standing.as_str())]
    CaUnusable {
        /// Which CA.
        authority: Authority,
        /// Why.
        standing: Standing,
    },
    /// A subject cannot go into a certificate.
    #[error("{holder}: {why}")]
    Subject {
        /// The holder as asked.
        holder: String,
        /// What is wrong, and what to use instead.
        why: String,
    },
    /// A certificate request was refused.
    #[error("the certificate request for {holder} is refused: {why}")]
    Request {
        /// The holder it was to be issued to.
        holder: String,
        /// Why.
        why: String,
    },
    /// A rotation step that does not follow from where the rotation stands.
    #[error("rotating the {authority} CA: {why}")]
    Rotation {
        /// Which CA.
        authority: Authority,
        /// Why, and what to do.
        why: String,
    },
    /// The OS gave no randomness.
    #[error("no randomness from the OS: {0}")]
    Random(String),
    /// rcgen failed.
    #[error("cannot make the certificate")]
    Rcgen(#[from] rcgen::Error),
}

/// Why a certificate does not verify against a CA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Not a certificate.
    #[error("not a PEM certificate: {0}")]
    Malformed(String),
    /// Signed by someone else.
    #[error("not issued by this site's {0} CA")]
    Foreign(Authority),
    /// Outside its validity.
    #[error("{}", .0.as_str())]
    Standing(Standing),
}

/// A CA loaded from the site directory.
struct Ca {
    authority: Authority,
    cert_pem: String,
    key: KeyPair,
    info: CertInfo,
}

impl Ca {
    /// Reads a CA: its key readable by its owner only and matching its certificate, which must be a CA's.
    fn load(authority: Authority, cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        check_private(key_path)?;
        let cert_pem = files::read_string(cert_path)?;
        let info =
            parse(&cert_pem).map_err(|why| PkiError::Malformed { path: cert_path.to_owned(), why: why.to_string() })?;
        let key = KeyPair::from_pem(&files::read_string(key_path)?)
            .map_err(|e| PkiError::Malformed { path: key_path.to_owned(), why: format!("not a private key: {e}") })?;
        if public_key(&cert_pem).as_deref() != Some(key.public_key_raw()) {
            return Err(PkiError::KeyMismatch { key: key_path.to_owned(), cert: cert_path.to_owned() });
        }
        if !info.is_ca {
            return Err(PkiError::Malformed { path: cert_path.to_owned(), why: "not a CA certificate".to_owned() });
        }
        Ok(Ca { authority, cert_pem, key, info })
    }
}

/// A new CA for site `name`: its key and its self-signed certificate (PEM). The first of an authority is
/// `herd NAME AUTHORITY CA`; a rotation's next ones carry their generation (`... CA 2`).
fn make_ca(
    name: &str,
    authority: Authority,
    generation: u32,
    now: OffsetDateTime,
) -> Result<(KeyPair, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let suffix = if generation > 1 { format!(" {generation}") } else { String::new() };
    dn.push(DnType::CommonName, format!("herd {name} {authority} CA{suffix}"));
    dn.push(DnType::OrganizationName, format!("herd:{name}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = now - BACKDATE;
    params.not_after = now + CA_VALIDITY;
    params.serial_number = Some(serial()?);
    let cert = params.self_signed(&key)?;
    Ok((key, cert.pem()))
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca").field("authority", &self.authority).field("info", &self.info).finish_non_exhaustive()
    }
}

/// A site PKI on disk.
#[derive(Debug)]
pub struct Site {
    dir: PathBuf,
    /// The CA each authority issues from, in `Authority::ALL` order.
    cas: Vec<Ca>,
    /// A rotation's next CA, trusted beside the current one until it takes over (see `rotate`).
    next: Vec<Ca>,
    /// A rotation's previous CA (certificate only), trusted beside the current one until the rotation ends.
    previous: Vec<(Authority, String, CertInfo)>,
}

fn cert_file(a: Authority) -> String {
    format!("{a}-ca.crt")
}

fn key_file(a: Authority) -> String {
    format!("{a}-ca.key")
}

impl Site {
    /// Makes both CAs for site `name` in `dir` (created if missing). Refuses a directory that already holds
    /// either, so nothing issued is ever lost to a second `init`.
    pub fn init(dir: &Path, name: &str, now: OffsetDateTime) -> Result<Site, PkiError> {
        if Authority::ALL.iter().any(|a| dir.join(cert_file(*a)).exists() || dir.join(key_file(*a)).exists()) {
            return Err(PkiError::Exists { dir: dir.to_owned() });
        }
        if !is_name(name) {
            return Err(PkiError::Subject {
                holder: name.to_owned(),
                why: "a site name is 1-63 of a-z, 0-9 and '-' (it names the CAs)".to_owned(),
            });
        }
        files::make_dir(dir)?;
        for authority in Authority::ALL {
            let (key, cert_pem) = make_ca(name, authority, 1, now)?;
            // The key first: a certificate without its key would make the next init refuse and leave no CA.
            write_private(&dir.join(key_file(authority)), key.serialize_pem().as_bytes())?;
            write_public(&dir.join(cert_file(authority)), cert_pem.as_bytes())?;
        }
        Site::open(dir)
    }

    /// Opens the site PKI in `dir`: both CAs must be there, each key readable by its owner only and matching its
    /// certificate.
    pub fn open(dir: &Path) -> Result<Site, PkiError> {
        let mut cas = Vec::new();
        for authority in Authority::ALL {
            let (cert_path, key_path) = (dir.join(cert_file(authority)), dir.join(key_file(authority)));
            for p in [&cert_path, &key_path] {
                if !p.exists() {
                    let missing = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
                    return Err(PkiError::Missing { dir: dir.to_owned(), missing });
                }
            }
            rotate::recover(dir, authority)?;
            cas.push(Ca::load(authority, &cert_path, &key_path)?);
        }
        let (next, previous) = rotate::load(dir, &cas)?;
        Ok(Site { dir: dir.to_owned(), cas, next, previous })
    }

    fn ca(&self, authority: Authority) -> &Ca {
        // Both are loaded by `open`, in `Authority::ALL` order.
        &self.cas[Authority::ALL.iter().position(|a| *a == authority).unwrap_or(0)]
    }

    /// The site directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A CA's certificate, PEM (what clients and servers pin).
    pub fn ca_pem(&self, authority: Authority) -> &str {
        &self.ca(authority).cert_pem
    }

    /// A CA's certificate, read.
    pub fn ca_info(&self, authority: Authority) -> &CertInfo {
        &self.ca(authority).info
    }

    /// Issues a certificate from `authority` for `subject`, and keeps a copy in `issued/`.
    pub fn issue(
        &self,
        authority: Authority,
        subject: &Subject,
        key: KeySource<'_>,
        now: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        subject.check()?;
        let ca = self.ca(authority);
        match ca.info.standing(now) {
            Standing::Valid | Standing::RenewSoon => {}
            standing => return Err(PkiError::CaUnusable { authority, standing }),
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject.holder.common_name());
        dn.push(DnType::OrganizationName, subject.holder.organization());
        params.distinguished_name = dn;
        // A member's certificate also names the peer tag (see PEER_NAME).
        let peer = matches!(subject.holder, Holder::Member(_)).then(|| PEER_NAME.to_owned());
        params.subject_alt_names = subject
            .dns
            .iter()
            .filter(|d| d.as_str() != PEER_NAME)
            .cloned()
            .chain(peer)
            .map(|d| d.try_into().map(SanType::DnsName))
            .chain(subject.ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = subject.holder.usages().to_vec();
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - BACKDATE;
        // Never past the CA: a leaf outliving its issuer would fail verification anyway.
        let ca_end = OffsetDateTime::from_unix_timestamp(ca.info.not_after).unwrap_or(now);
        params.not_after = (now + subject.validity).min(ca_end);
        params.serial_number = Some(serial()?);
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, &ca.key)?;
        let (cert, key_pem) = match key {
            KeySource::Generate => {
                let key = KeyPair::generate()?;
                (params.signed_by(&key, &issuer)?, Some(key.serialize_pem()))
            }
            KeySource::Request(pem) => {
                let request = CertificateSigningRequestParams::from_pem(pem).map_err(|e| PkiError::Request {
                    holder: subject.holder.common_name(),
                    why: format!("not a valid signed request ({e})"),
                })?;
                (params.signed_by(&request.public_key, &issuer)?, None)
            }
        };
        let cert_pem = cert.pem();
        let info = parse(&cert_pem).map_err(|e| PkiError::Malformed { path: self.dir.clone(), why: e.to_string() })?;
        let issued_dir = self.dir.join("issued").join(authority.as_str());
        files::make_dir(&issued_dir)?;
        write_public(&issued_dir.join(format!("{}.crt", info.serial)), cert_pem.as_bytes())?;
        Ok(Issued { cert_pem, key_pem, info })
    }

    /// Checks that `cert_pem` was issued by a CA of `authority` the site trusts (see [`Site::trust_pem`]) and is valid
    /// at `now`.
    pub fn verify(&self, authority: Authority, cert_pem: &str, now: OffsetDateTime) -> Result<CertInfo, VerifyError> {
        verify_any(&self.trust_pem(authority), authority, cert_pem, now)
    }

    /// Removes from `issued/` the copies of certificates that ended at least `ended_for` before `now` and that a
    /// newer certificate of the same holder replaced; each holder's newest stays, ended or not (it is what
    /// `status` shows of it). An ended certificate authenticates nothing, and `status` (with the expiry gauges it
    /// feeds) reads every copy: a machine renewing every 20 days leaves 18 a year. With `dry_run` nothing is
    /// removed. Returns what was (or would be) removed, oldest first.
    pub fn prune(&self, now: OffsetDateTime, ended_for: Duration, dry_run: bool) -> Result<Vec<StatusLine>, PkiError> {
        let lines = self.status(now)?;
        let newest: std::collections::HashSet<(Authority, &str)> =
            newest_per_holder(&lines).into_iter().map(|l| (l.authority, l.cert.serial.as_str())).collect();
        let cutoff = (now - ended_for).unix_timestamp();
        let gone: Vec<StatusLine> = lines
            .iter()
            .filter(|l| !l.cert.is_ca && l.cert.not_after <= cutoff)
            .filter(|l| !newest.contains(&(l.authority, l.cert.serial.as_str())))
            .cloned()
            .collect();
        if !dry_run {
            for authority in Authority::ALL {
                let dir = self.dir.join("issued").join(authority.as_str());
                let paths: Vec<PathBuf> = gone
                    .iter()
                    .filter(|l| l.authority == authority)
                    .map(|l| dir.join(format!("{}.crt", l.cert.serial)))
                    .collect();
                if !paths.is_empty() {
                    files::remove_all(&dir, &paths)?;
                }
            }
        }
        Ok(gone)
    }

    /// Both CAs (and a rotation's next or previous ones) and every certificate issued, with where each stands at
    /// `now`, CAs first, then by expiry.
    pub fn status(&self, now: OffsetDateTime) -> Result<Vec<StatusLine>, PkiError> {
        let mut lines: Vec<StatusLine> = self
            .cas
            .iter()
            .map(|ca| StatusLine {
                authority: ca.authority,
                standing: ca.info.standing(now),
                cert: ca.info.clone(),
                rotation: None,
            })
            .collect();
        lines.extend(self.rotating_cas(now));
        let mut leaves = Vec::new();
        for authority in Authority::ALL {
            let dir = self.dir.join("issued").join(authority.as_str());
            for path in files::list(&dir)? {
                let pem = files::read_string(&path)?;
                let cert = parse(&pem).map_err(|e| PkiError::Malformed { path: path.clone(), why: e.to_string() })?;
                leaves.push(StatusLine { authority, standing: cert.standing(now), cert, rotation: None });
            }
        }
        leaves.sort_by(|a, b| (a.cert.not_after, &a.cert.common_name).cmp(&(b.cert.not_after, &b.cert.common_name)));
        lines.extend(leaves);
        Ok(lines)
    }
}

/// The CAs a holder's credential needs: an operator both (etcd and herd's APIs), a machine or an etcd member
/// etcd's, a server herd's APIs'.
pub fn authorities_of(holder: &Holder) -> &'static [Authority] {
    match holder {
        Holder::Operator(..) => &Authority::ALL,
        Holder::Machine(_) | Holder::Member(_) => &[Authority::Etcd],
        Holder::Server(_) => &[Authority::Api],
    }
}

/// Issues `subject`'s certificates (from [`authorities_of`] its holder) with new keys and writes them, with their
/// CAs, into the credential directory `out`: `AUTHORITY-ca.crt` (every CA of it the site trusts, see
/// [`Site::trust_pem`]), `AUTHORITY.crt`, `AUTHORITY.key` (0600).
/// Everything is issued before anything is written, so a refusal leaves `out` as it was.
pub fn write_credential(site: &Site, subject: &Subject, out: &Path, now: OffsetDateTime) -> Result<(), PkiError> {
    let issued = authorities_of(&subject.holder)
        .iter()
        .map(|a| Ok((*a, site.issue(*a, subject, KeySource::Generate, now)?)))
        .collect::<Result<Vec<_>, PkiError>>()?;
    files::make_dir(out)?;
    for (a, cert) in issued {
        write_public(&out.join(format!("{a}-ca.crt")), site.trust_pem(a).as_bytes())?;
        write_private(&out.join(format!("{a}.key")), cert.key_pem.unwrap_or_default().as_bytes())?;
        write_public(&out.join(format!("{a}.crt")), cert.cert_pem.as_bytes())?;
    }
    Ok(())
}

/// One line of `herdctl pki status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatusLine {
    /// Which CA it belongs to (or is).
    pub authority: Authority,
    /// Where it stands.
    pub standing: Standing,
    /// The certificate.
    #[serde(flatten)]
    pub cert: CertInfo,
    /// For a CA a rotation trusts beside the one that issues: `next` (it will issue) or `previous` (it issued).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation: Option<&'static str>,
}

/// Every holder's newest certificate (the one that ends last) per CA, CAs left out: a certificate a renewal or a
/// rejoin replaced does not count. In the order of `(authority, common name)`.
pub fn newest_per_holder(lines: &[StatusLine]) -> Vec<&StatusLine> {
    let mut newest: std::collections::BTreeMap<(Authority, &str), &StatusLine> = std::collections::BTreeMap::new();
    for line in lines.iter().filter(|l| !l.cert.is_ca) {
        let slot = newest.entry((line.authority, line.cert.common_name.as_str())).or_insert(line);
        if line.cert.not_after > slot.cert.not_after {
            *slot = line;
        }
    }
    newest.into_values().collect()
}

/// Makes a key and a certificate request for it (what a machine sends; the subject in it is ignored by the
/// issuer, which names the machine from the inventory). Returns (key PEM, request PEM).
pub fn request(common_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?.serialize_pem();
    let csr = request_for(&key, common_name)?;
    Ok((key, csr))
}

/// A new key (PEM), for [`request_for`].
pub fn new_key() -> Result<String, PkiError> {
    Ok(KeyPair::generate()?.serialize_pem())
}

/// A certificate request (PEM) for the key in `key_pem` (a machine keeps its key across boots and asks again).
pub fn request_for(key_pem: &str, common_name: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| PkiError::Request { holder: common_name.to_owned(), why: format!("not a private key: {e}") })?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    Ok(params.serialize_request(&key)?.pem()?)
}

/// Checks a PEM certificate request: it parses and its signature matches its key (so a credential is not spent
/// on a request that cannot be signed).
pub fn check_request(pem: &str) -> Result<(), String> {
    CertificateSigningRequestParams::from_pem(pem).map(|_| ()).map_err(|e| format!("not a valid signed request ({e})"))
}

/// Whether the signed request `csr_pem` proves possession of the key of `cert_pem`: its signature checks out and
/// its public key is the certificate's (a renewal: only the holder of a certificate's key can sign such a request;
/// a copy of one seen on the wire only gets another certificate for a key the copier does not have).
pub fn request_proves(csr_pem: &str, cert_pem: &str) -> Result<(), String> {
    let csr =
        CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| format!("not a valid signed request ({e})"))?;
    match public_key(cert_pem) {
        Some(key) if key == csr.public_key.der_bytes() => Ok(()),
        Some(_) => Err("the request is not signed by the certificate's key".to_owned()),
        None => Err("not a PEM certificate".to_owned()),
    }
}

/// Signs `msg` with the key in `key_pem` (a machine signs its reports with its own key): an ECDSA signature, ASN.1
/// DER, as [`signed_by`] checks it.
pub fn sign(key_pem: &str, msg: &[u8]) -> Result<Vec<u8>, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Request {
        holder: "a signed message".to_owned(),
        why: format!("not a private key: {e}"),
    })?;
    if key.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(PkiError::Request {
            holder: "a signed message".to_owned(),
            why: "not an ECDSA P-256 key (the kind herd makes)".to_owned(),
        });
    }
    Ok(rcgen::SigningKey::sign(&key, msg)?)
}

/// Checks that `signature` ([`sign`]) is of `msg` by the key of the certificate in `cert_pem` (an ECDSA P-256 key,
/// the kind herd makes; any other is refused). It says nothing of the certificate itself: check that first.
pub fn signed_by(cert_pem: &str, msg: &[u8], signature: &[u8]) -> Result<(), String> {
    let pem =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))?.1;
    let cert = pem.parse_x509().map_err(|e| format!("not a certificate: {e}"))?;
    let spki = cert.public_key();
    let p256 = spki.algorithm.algorithm == x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        && spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok())
            == Some(x509_parser::oid_registry::OID_EC_P256);
    if !p256 {
        return Err("the certificate's key is not ECDSA P-256 (the kind herd makes)".to_owned());
    }
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, &spki.subject_public_key.data)
        .verify(msg, signature)
        .map_err(|_| "the signature is not of this message by the certificate's key".to_owned())
}

/// What an admin compares to approve a join (`herdctl machine approve`): SHA-256 of the public keys of `requests`
/// (their SubjectPublicKeyInfo DER, in order), colon-separated hex. The machine prints it on its console; the
/// provisioner's timeline shows the one it was sent. Requests that are not validly signed have none.
pub fn requests_fingerprint(requests: &[&str]) -> Result<String, String> {
    let mut keys = Vec::new();
    for pem in requests {
        let csr =
            CertificateSigningRequestParams::from_pem(pem).map_err(|e| format!("not a valid signed request ({e})"))?;
        keys.extend(csr.public_key.subject_public_key_info());
    }
    Ok(fingerprint(&keys))
}

/// Checks that `cert_pem` was signed by the CA in `ca_pem` and is valid at `now`.
pub fn verify(
    ca_pem: &str,
    authority: Authority,
    cert_pem: &str,
    now: OffsetDateTime,
) -> Result<CertInfo, VerifyError> {
    let info = parse(cert_pem)?;
    let ca = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).map_err(|e| VerifyError::Malformed(e.to_string()))?.1;
    let ca = ca.parse_x509().map_err(|e| VerifyError::Malformed(e.to_string()))?;
    let leaf =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| VerifyError::Malformed(e.to_string()))?.1;
    let leaf = leaf.parse_x509().map_err(|e| VerifyError::Malformed(e.to_string()))?;
    if leaf.issuer() != ca.subject() || leaf.verify_signature(Some(ca.public_key())).is_err() {
        return Err(VerifyError::Foreign(authority));
    }
    match info.standing(now) {
        Standing::Valid | Standing::RenewSoon => Ok(info),
        s => Err(VerifyError::Standing(s)),
    }
}

/// Reads a PEM certificate.
pub fn parse(cert_pem: &str) -> Result<CertInfo, VerifyError> {
    let pem =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| VerifyError::Malformed(e.to_string()))?.1;
    if pem.label != "CERTIFICATE" {
        return Err(VerifyError::Malformed(format!("a PEM {:?} block, not a CERTIFICATE", pem.label)));
    }
    parse_der(&pem.contents)
}

/// Reads a DER certificate (as a TLS peer presents it).
pub fn parse_der(der: &[u8]) -> Result<CertInfo, VerifyError> {
    use x509_parser::prelude::FromDer as _;
    let cert =
        x509_parser::certificate::X509Certificate::from_der(der).map_err(|e| VerifyError::Malformed(e.to_string()))?.1;
    let first = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue<'_>>| {
        it.next().and_then(|a| a.as_str().ok()).unwrap_or_default().to_owned()
    };
    let common_name = first(&mut cert.subject().iter_common_name());
    let organization = first(&mut cert.subject().iter_organization());
    let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca);
    Ok(CertInfo {
        holder: Holder::from_subject(&common_name, &organization),
        common_name,
        organization,
        serial: cert.raw_serial_as_string().replace(':', ""),
        fingerprint: fingerprint(der),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        is_ca,
    })
}

fn public_key(cert_pem: &str) -> Option<Vec<u8>> {
    let pem = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?.1;
    let cert = pem.parse_x509().ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// SHA-256 of DER bytes, as colon-separated upper-case hex (how `openssl x509 -fingerprint -sha256` prints it).
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// A random, positive 128-bit serial number.
fn serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| PkiError::Random(e.to_string()))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests;
