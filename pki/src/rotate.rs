//! Rotating a CA on a running site (docs/security.md, "Rotating the etcd CA"): a new CA is first trusted beside
//! the one that issues (*accepting*), then issues while the old one is still trusted (*switched*), then the old
//! one is dropped (*steady* again).
//!
//! The files of authority `A` in the site directory:
//! - `A-ca.crt`, `A-ca.key`: the CA that issues, always;
//! - `A-ca.next.crt`, `A-ca.next.key`: while accepting, the CA that will issue;
//! - `A-ca.previous.crt`: once switched, the CA that issued before (its certificate only);
//! - `retired/A-ca-SERIAL.crt`: a previous CA once its rotation ended (its key is gone with the switch).
//!
//! Each step writes or renames files in an order a power cut leaves harmless: [`Site::open`] finishes a switch cut
//! between its renames, and ignores a next key written without its certificate (the rotation begins again).

use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use time::OffsetDateTime;

use crate::{
    Authority, Ca, CertInfo, PkiError, Site, StatusLine, VerifyError, cert_file, files, key_file, make_ca, parse,
    public_key, verify, write_private, write_public,
};

/// Where a CA's rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rotation {
    /// One CA: it issues, and it alone is trusted.
    Steady,
    /// A next CA is trusted beside the one that issues; holders are to learn it (and etcd members reload).
    Accepting,
    /// The new CA issues; the previous one is still trusted until every holder has a certificate of the new one.
    Switched,
}

impl Rotation {
    /// `steady`, `accepting` or `switched`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rotation::Steady => "steady",
            Rotation::Accepting => "accepting",
            Rotation::Switched => "switched",
        }
    }
}

fn next_cert(dir: &Path, a: Authority) -> PathBuf {
    dir.join(format!("{a}-ca.next.crt"))
}

fn next_key(dir: &Path, a: Authority) -> PathBuf {
    dir.join(format!("{a}-ca.next.key"))
}

fn previous_cert(dir: &Path, a: Authority) -> PathBuf {
    dir.join(format!("{a}-ca.previous.crt"))
}

fn refused(authority: Authority, why: impl Into<String>) -> PkiError {
    PkiError::Rotation { authority, why: why.into() }
}

/// Finishes a switch a power cut interrupted between moving the next key into place and moving its certificate.
pub(crate) fn recover(dir: &Path, a: Authority) -> Result<(), PkiError> {
    let (cert, key, next) = (dir.join(cert_file(a)), dir.join(key_file(a)), next_cert(dir, a));
    if !next.exists() || next_key(dir, a).exists() || !key.exists() {
        return Ok(());
    }
    let key_pem = files::read_string(&key)?;
    let Ok(pair) = KeyPair::from_pem(&key_pem) else { return Ok(()) };
    if public_key(&files::read_string(&next)?).as_deref() == Some(pair.public_key_raw()) {
        files::rename(dir, &next, &cert)?;
    }
    Ok(())
}

/// A rotation's next CAs and previous CAs, read beside the current ones (`cas`).
#[allow(clippy::type_complexity)] // Two lists, read once by `Site::open`.
pub(crate) fn load(dir: &Path, cas: &[Ca]) -> Result<(Vec<Ca>, Vec<(Authority, String, CertInfo)>), PkiError> {
    let (mut next, mut previous) = (Vec::new(), Vec::new());
    for ca in cas {
        let a = ca.authority;
        let (cert, key) = (next_cert(dir, a), next_key(dir, a));
        if cert.exists() && key.exists() {
            next.push(Ca::load(a, &cert, &key)?);
        } else if cert.exists() {
            return Err(PkiError::Malformed {
                path: cert,
                why: format!("a next CA without its key: move it away and begin the {a} rotation again"),
            });
        }
        // A next key alone is a rotation's beginning cut short: ignored, and written again by the next beginning.
        let prev = previous_cert(dir, a);
        if prev.exists() {
            let pem = files::read_string(&prev)?;
            let info = parse(&pem).map_err(|e| PkiError::Malformed { path: prev.clone(), why: e.to_string() })?;
            // The same as the current one: a switch cut before its renames (the next CA is still there).
            if info.fingerprint != ca.info.fingerprint {
                previous.push((a, pem, info));
            }
        }
    }
    if let Some((a, ..)) = previous.iter().find(|(a, ..)| next.iter().any(|n| n.authority == *a)) {
        return Err(refused(*a, "both a next and a previous CA: the site directory was changed by hand"));
    }
    Ok((next, previous))
}

/// The generation in a CA's common name (`herd lab etcd CA 3`: 3; the first one has none: 1).
fn generation(common_name: &str) -> u32 {
    common_name.rsplit_once(' ').and_then(|(head, n)| head.ends_with(" CA").then(|| n.parse().ok())?).unwrap_or(1)
}

impl Site {
    /// Where `authority`'s rotation stands.
    pub fn rotation(&self, authority: Authority) -> Rotation {
        if self.next.iter().any(|c| c.authority == authority) {
            Rotation::Accepting
        } else if self.previous.iter().any(|(a, ..)| *a == authority) {
            Rotation::Switched
        } else {
            Rotation::Steady
        }
    }

    /// Every CA of `authority` the site trusts, PEM, one after the other: the one that issues, then a rotation's
    /// next or previous one. What holders are to trust (etcd's trusted-CA file holds all of them) and what a
    /// certificate of the site verifies against.
    pub fn trust_pem(&self, authority: Authority) -> String {
        let mut out = self.ca_pem(authority).to_owned();
        let next = self.next.iter().filter(|c| c.authority == authority).map(|c| c.cert_pem.as_str());
        let previous = self.previous.iter().filter(|(a, ..)| *a == authority).map(|(_, pem, _)| pem.as_str());
        for pem in next.chain(previous) {
            if !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(pem);
        }
        out
    }

    /// Begins rotating `authority`'s CA: makes the next CA (a new key, valid for [`crate::CA_VALIDITY`]), trusted
    /// from now on beside the current one, which still issues. Refused while a rotation is under way.
    pub fn begin_rotation(&mut self, authority: Authority, now: OffsetDateTime) -> Result<CertInfo, PkiError> {
        match self.rotation(authority) {
            Rotation::Steady => {}
            r => return Err(refused(authority, format!("a rotation is under way ({}): finish it first", r.as_str()))),
        }
        let current = &self.ca(authority).info;
        let site = current.organization.strip_prefix("herd:").unwrap_or(&current.organization).to_owned();
        let (key, cert_pem) = make_ca(&site, authority, generation(&current.common_name) + 1, now)?;
        // The key first: a certificate without its key is refused by `open`; a key alone is ignored.
        write_private(&next_key(&self.dir, authority), key.serialize_pem().as_bytes())?;
        write_public(&next_cert(&self.dir, authority), cert_pem.as_bytes())?;
        *self = Site::open(&self.dir)?;
        let next = self.next.iter().find(|c| c.authority == authority).map(|c| c.info.clone());
        next.ok_or_else(|| refused(authority, "the next CA was written but does not read back"))
    }

    /// Switches `authority` to the next CA: it issues from now on, and the one that issued stays trusted (as the
    /// previous CA) until [`Site::end_rotation`]. Its key is gone with the switch. Returns the CA that issues now.
    pub fn switch_rotation(&mut self, authority: Authority) -> Result<CertInfo, PkiError> {
        if self.rotation(authority) != Rotation::Accepting {
            return Err(refused(authority, "no next CA to switch to: begin a rotation first"));
        }
        let dir = self.dir.clone();
        write_public(&previous_cert(&dir, authority), self.ca_pem(authority).as_bytes())?;
        // A cut between these two renames is finished by `open` (see `recover`).
        files::rename(&dir, &next_key(&dir, authority), &dir.join(key_file(authority)))?;
        files::rename(&dir, &next_cert(&dir, authority), &dir.join(cert_file(authority)))?;
        *self = Site::open(&dir)?;
        Ok(self.ca_info(authority).clone())
    }

    /// Ends `authority`'s rotation: the previous CA is trusted no more (its certificate is kept in `retired/`).
    /// Returns it.
    pub fn end_rotation(&mut self, authority: Authority) -> Result<CertInfo, PkiError> {
        let Some((_, pem, info)) = self.previous.iter().find(|(a, ..)| *a == authority).cloned() else {
            return Err(refused(authority, "not switched: there is no previous CA to drop"));
        };
        let retired = self.dir.join("retired");
        files::make_dir(&retired)?;
        write_public(&retired.join(format!("{authority}-ca-{}.crt", info.serial)), pem.as_bytes())?;
        files::remove_all(&self.dir, &[previous_cert(&self.dir, authority)])?;
        *self = Site::open(&self.dir)?;
        Ok(info)
    }

    /// The status lines of a rotation's next and previous CAs.
    pub(crate) fn rotating_cas(&self, now: OffsetDateTime) -> Vec<StatusLine> {
        let next = self.next.iter().map(|c| (c.authority, &c.info, "next"));
        let previous = self.previous.iter().map(|(a, _, info)| (*a, info, "previous"));
        next.chain(previous)
            .map(|(authority, info, role)| StatusLine {
                authority,
                standing: info.standing(now),
                cert: info.clone(),
                rotation: Some(role),
            })
            .collect()
    }
}

/// The PEM certificates in `bundle`, each with its armor and a final newline.
pub fn split_pems(bundle: &str) -> Vec<String> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = bundle;
    while let Some(start) = rest.find(BEGIN) {
        let Some(len) = rest[start..].find(END) else { break };
        let end = start + len + END.len();
        out.push(format!("{}\n", &rest[start..end]));
        rest = &rest[end..];
    }
    out
}

/// Checks that `cert_pem` was signed by one of the CAs in `bundle` (PEM certificates one after the other, as
/// [`Site::trust_pem`] gives them) and is valid at `now`.
pub fn verify_any(
    bundle: &str,
    authority: Authority,
    cert_pem: &str,
    now: OffsetDateTime,
) -> Result<CertInfo, VerifyError> {
    for ca in split_pems(bundle) {
        match verify(&ca, authority, cert_pem, now) {
            Err(VerifyError::Foreign(_)) => {}
            other => return other,
        }
    }
    Err(VerifyError::Foreign(authority))
}
