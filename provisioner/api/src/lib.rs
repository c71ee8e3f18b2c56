//! The provisioner's HTTP interface (docs/provisioner-api.md) as types: every request and response body, the
//! paths, and a small [`Client`] for the operator API. The provisioner serves these types, node-init sends
//! [`PhoneHome`], herdctl reads the rest; nobody builds or walks this JSON by hand.

use std::fmt;

use herd_images::slot::SlotReport;
use serde::{Deserialize, Serialize};

/// Where a machine is in its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    /// In the inventory, never seen on the network.
    #[default]
    Unknown,
    /// Seen (DHCP), not yet booting herd.
    Discovered,
    /// Booting the installer (or, diskless, the OS in RAM).
    Provisioning,
    /// Installed to disk; boots its slot.
    Installed,
    /// Up and healthy.
    Running,
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MachineState::Unknown => "unknown",
            MachineState::Discovered => "discovered",
            MachineState::Provisioning => "provisioning",
            MachineState::Installed => "installed",
            MachineState::Running => "running",
        })
    }
}

/// One step in a machine's boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Unix time in milliseconds.
    pub at_ms: u64,
    /// What happened: `dhcp-offer`, `dhcp-ack`, `tftp`, `script`, `kernel`, `initramfs`, `config`,
    /// `phone-home:STAGE`, `state`, `config-refused`.
    pub event: String,
    /// Details (address, file, stage message, new state).
    pub detail: String,
}

/// `GET /api/v1/machines`: one machine of the list, in inventory order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSummary {
    /// Name.
    pub name: String,
    /// State.
    pub state: MachineState,
    /// Role.
    pub role: String,
    /// Rack.
    pub rack: String,
    /// Boot MAC.
    pub boot_mac: String,
    /// Internal address.
    pub address: String,
    /// The latest timeline entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<TimelineEntry>,
}

/// `GET /api/v1/machines/NAME`: one machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDetail {
    /// Name.
    pub name: String,
    /// State.
    pub state: MachineState,
    /// Fully qualified name.
    pub fqdn: String,
    /// Role.
    pub role: String,
    /// Rack.
    pub rack: String,
    /// Every NIC, boot NIC first.
    pub macs: Vec<String>,
    /// Internal address.
    pub address: String,
    /// The address leased to one of its NICs, if any.
    pub leased: Option<String>,
    /// How many timeline entries the provisioner keeps for it.
    pub timeline_entries: usize,
    /// Its A/B slots as node-init last reported them (installed machines).
    pub slots: Option<SlotReport>,
}

/// The answer of a request that changes a machine's state (reprovision, phone-home).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// The machine.
    pub machine: String,
    /// Its state now.
    pub state: MachineState,
}

/// Where a config carries the machine's one-time join credential (node-init reads it from the config and never
/// writes it anywhere).
pub const JOIN_CREDENTIAL_PATH: &str = "/run/herd/join-credential";

/// Where a config puts the site's CA certificates (what the machine pins).
pub const CA_DIR: &str = "/etc/herd/pki";

/// The longest certificate request (PEM) a join may carry.
pub const CSR_MAX: usize = 8 << 10;

/// `POST /join/MAC`: a machine's certificate requests, with its one-time join credential.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The join credential from this boot's config.
    pub credential: String,
    /// A PEM certificate request for the machine's etcd client key (`machine:NAME`).
    pub machine_csr: String,
    /// An etcd member's request for its peer and server key (`member:NAME`), members only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_csr: Option<String>,
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinRequest").field("member_csr", &self.member_csr.is_some()).finish_non_exhaustive()
    }
}

impl JoinRequest {
    /// Checks the shape of every field before anything is looked up or signed.
    pub fn check(&self) -> Result<(), herd_images::slot::ReportError> {
        let bad = |at: &str, why: &'static str| Err(herd_images::slot::ReportError { at: at.to_owned(), why });
        if self.credential.len() != 64 || !self.credential.bytes().all(|b| b.is_ascii_hexdigit()) {
            return bad("credential", "64 hex digits");
        }
        for (at, csr) in [("machine_csr", Some(&self.machine_csr)), ("member_csr", self.member_csr.as_ref())] {
            if let Some(csr) = csr
                && (csr.len() > CSR_MAX || !csr.trim_start().starts_with("-----BEGIN CERTIFICATE REQUEST-----"))
            {
                return bad(at, "a PEM certificate request of at most 8 KiB");
            }
        }
        Ok(())
    }
}

/// The longest certificate (PEM) a renewal may present.
pub const CERT_MAX: usize = 8 << 10;

/// `POST /renew/MAC`: a machine renews its certificates before they end, proving it holds their keys (no
/// credential: each request must be signed by the key of the certificate it renews). The answer is a
/// [`JoinAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The machine's current etcd client certificate (PEM).
    pub machine_cert: String,
    /// A certificate request signed by that certificate's key.
    pub machine_csr: String,
    /// An etcd member's current peer and server certificate, members only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_cert: Option<String>,
    /// A request signed by the member certificate's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_csr: Option<String>,
}

impl RenewRequest {
    /// Checks the shape of every field before anything is looked up or signed.
    pub fn check(&self) -> Result<(), herd_images::slot::ReportError> {
        let bad = |at: &str, why: &'static str| Err(herd_images::slot::ReportError { at: at.to_owned(), why });
        let pem = |text: &str, max: usize, label: &str| {
            text.len() <= max && text.trim_start().starts_with(&format!("-----BEGIN {label}-----"))
        };
        if self.member_cert.is_some() != self.member_csr.is_some() {
            return bad("member_csr", "a member certificate and its request come together");
        }
        for (at, cert) in [("machine_cert", Some(&self.machine_cert)), ("member_cert", self.member_cert.as_ref())] {
            if cert.is_some_and(|c| !pem(c, CERT_MAX, "CERTIFICATE")) {
                return bad(at, "a PEM certificate of at most 8 KiB");
            }
        }
        for (at, csr) in [("machine_csr", Some(&self.machine_csr)), ("member_csr", self.member_csr.as_ref())] {
            if csr.is_some_and(|c| !pem(c, CSR_MAX, "CERTIFICATE REQUEST")) {
                return bad(at, "a PEM certificate request of at most 8 KiB");
            }
        }
        Ok(())
    }
}

/// The answer to a join: the machine's certificates and the site's CAs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAnswer {
    /// The etcd CA (PEM).
    pub etcd_ca: String,
    /// The api CA (PEM).
    pub api_ca: String,
    /// The machine's etcd client certificate (PEM).
    pub machine_cert: String,
    /// The member's peer and server certificate (PEM), members only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_cert: Option<String>,
}

/// `202 Accepted` to `POST /join/MAC` on a site that approves joins (`--join approve`): the keys of the request
/// await an admin's approval (`herdctl machine approve NAME FINGERPRINT`); the credential is kept, ask again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinAwaiting {
    /// `herd_pki::requests_fingerprint` of the request's keys: what the machine shows on its console.
    pub fingerprint: String,
}

/// `POST /api/v1/machines/NAME/approve`: an admin approves the keys of NAME's awaiting join.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The fingerprint the machine shows (and its timeline's `join-awaiting` event).
    pub fingerprint: String,
}

/// `GET /api/v1/pki/rotation` (and the answer to `POST /api/v1/pki/rotate`): where the rotation of the site's etcd
/// CA stands, machine by machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationStatus {
    /// `steady`, `accepting` or `switched` (`herd_pki::Rotation`).
    pub rotation: String,
    /// The CA that issues (its common name).
    pub issuing: String,
    /// Every CA the site trusts (common names).
    pub trusted: Vec<String>,
    /// Every machine registered in etcd, and where it stands.
    pub machines: Vec<MachineTrust>,
    /// What the rotation waits for now, in words (none once every machine is where the site is).
    pub waiting: Option<String>,
}

/// One machine in a [`RotationStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineTrust {
    /// The machine.
    pub name: String,
    /// Its trusted-CA file lists exactly the CAs the site trusts (an etcd member's etcd restarted with them).
    pub trusts: bool,
    /// Every certificate it holds is from the CA that issues.
    pub renewed: bool,
}

/// `POST /phone-home/MAC?token=T`: what node-init reports at each stage of a boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneHome {
    /// The stage (`initramfs`, `installing`, `installed`, `configured`, `healthy`, `failed`, ...): 1-32 of
    /// `[a-z0-9-]`.
    pub stage: String,
    /// What happened (at most [`PhoneHome::DETAIL_CHARS`] characters are kept, control characters as spaces).
    #[serde(default)]
    pub detail: String,
    /// The disk's slot table (node-init sends it with `configured` and `healthy`).
    #[serde(default)]
    pub slots: Option<SlotReport>,
}

impl PhoneHome {
    /// The longest detail kept.
    pub const DETAIL_CHARS: usize = 512;

    /// Checks a report that crossed the network before anything of it is stored: the stage's form and the slot
    /// table's ([`SlotReport::check`]). Returns the detail as it is kept.
    pub fn check(&self) -> Result<String, herd_images::slot::ReportError> {
        let stage_ok = (1..=32).contains(&self.stage.len())
            && self.stage.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !stage_ok {
            return Err(herd_images::slot::ReportError { at: "stage".into(), why: "1-32 characters of a-z 0-9 -" });
        }
        if let Some(slots) = &self.slots {
            slots.check().map_err(|e| herd_images::slot::ReportError { at: format!("slots.{}", e.at), why: e.why })?;
        }
        Ok(self.detail.chars().take(Self::DETAIL_CHARS).map(|c| if c.is_control() { ' ' } else { c }).collect())
    }
}

/// `POST /report/MAC`: a [`PhoneHome`] signed by the machine's key. Once a boot has joined, its token is spent (it
/// sits in `/proc/cmdline`, where any process of the node, containers included, reads it): every later report of
/// that boot, the running system's too, is signed instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReport {
    /// The machine's current etcd client certificate (PEM): the one it was issued last.
    pub machine_cert: String,
    /// A [`Report`] as the JSON text that was signed.
    pub report: String,
    /// The signature of [`REPORT_CONTEXT`] followed by `report`, by the certificate's key: hex of an ECDSA P-256
    /// SHA-256 signature, ASN.1 DER (`herd_pki::sign`).
    pub signature: String,
}

/// What a [`SignedReport`]'s signature covers before the report's text, so no other signed message of the machine
/// passes for a report.
pub const REPORT_CONTEXT: &[u8] = b"herd-report/1\n";

/// The longest [`SignedReport::report`] accepted (a phone-home with a two-slot table is under 2 KiB).
pub const REPORT_MAX: usize = 16 << 10;

impl SignedReport {
    /// Checks the shape of every field before anything is verified; returns the signature's bytes.
    pub fn check(&self) -> Result<Vec<u8>, herd_images::slot::ReportError> {
        let bad = |at: &str, why: &'static str| Err(herd_images::slot::ReportError { at: at.to_owned(), why });
        if self.machine_cert.len() > CERT_MAX
            || !self.machine_cert.trim_start().starts_with("-----BEGIN CERTIFICATE-----")
        {
            return bad("machine_cert", "a PEM certificate of at most 8 KiB");
        }
        if self.report.len() > REPORT_MAX {
            return bad("report", "at most 16 KiB");
        }
        let hex = self.signature.as_bytes();
        if hex.is_empty() || hex.len() > 256 || !hex.len().is_multiple_of(2) || !hex.iter().all(u8::is_ascii_hexdigit) {
            return bad("signature", "an even number (at most 256) of hex digits");
        }
        let digit = |b: u8| (b as char).to_digit(16).unwrap_or(0) as u8;
        Ok(hex.chunks(2).map(|p| digit(p[0]) << 4 | digit(p[1])).collect())
    }

    /// The bytes the signature covers.
    pub fn signed_bytes(report: &str) -> Vec<u8> {
        [REPORT_CONTEXT, report.as_bytes()].concat()
    }
}

/// What a [`SignedReport`] carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The MAC the report is for (the path's: a report signed for one MAC does not pass for another).
    pub mac: String,
    /// Greater than the sequence of every report of this machine accepted before (node-init uses Unix time in
    /// milliseconds): a report is accepted once. A report refused as stale is answered with [`StaleReport`].
    pub seq: u64,
    /// The phone-home itself.
    pub phone: PhoneHome,
}

/// The answer (409) to a [`SignedReport`] whose sequence is not above the last accepted one's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleReport {
    /// The sequence of the last report accepted: send again above it.
    pub last: u64,
}

/// The paths of the interface.
pub mod paths {
    /// The operator API's machine list.
    pub const MACHINES: &str = "/api/v1/machines";

    /// The most machines one page of [`MACHINES`] holds (`?limit=` asks for fewer, `?after=NAME` for the next).
    pub const PAGE: usize = 500;

    /// One machine.
    pub fn machine(name: &str) -> String {
        format!("{MACHINES}/{name}")
    }

    /// One machine's timeline.
    pub fn timeline(name: &str) -> String {
        format!("{MACHINES}/{name}/timeline")
    }

    /// Makes a machine install on its next boot (POST).
    pub fn reprovision(name: &str) -> String {
        format!("{MACHINES}/{name}/reprovision")
    }

    /// Begins rotating the site's etcd CA (POST, admins only).
    pub const PKI_ROTATE: &str = "/api/v1/pki/rotate";

    /// Where the rotation of the site's etcd CA stands (GET a [`super::RotationStatus`]).
    pub const PKI_ROTATION: &str = "/api/v1/pki/rotation";

    /// Approves a machine's awaiting join (POST a [`super::Approval`]).
    pub fn approve(name: &str) -> String {
        format!("{MACHINES}/{name}/approve")
    }

    /// Where node-init fetches its config.
    pub fn config(mac: &str, token: &str) -> String {
        format!("/config/{mac}?token={token}")
    }

    /// Where node-init trades its join credential for certificates (POST a [`super::JoinRequest`]).
    pub fn join(mac: &str) -> String {
        format!("/join/{mac}")
    }

    /// Where node-init renews the machine's certificates (POST a [`super::RenewRequest`]).
    pub fn renew(mac: &str) -> String {
        format!("/renew/{mac}")
    }

    /// Where node-init reports its stages once this boot has joined (POST a [`super::SignedReport`]).
    pub fn report(mac: &str) -> String {
        format!("/report/{mac}")
    }

    /// Where node-init reports its stages before this boot joins (POST a [`super::PhoneHome`]).
    pub fn phone_home(mac: &str, token: &str) -> String {
        format!("/phone-home/{mac}?token={token}")
    }
}

/// One line for a slot table: `booted a; a: herd-os 1 good; b: herd-os 2 tries 1`.
pub fn describe_slots(r: &SlotReport) -> String {
    let slots: Vec<String> = r
        .slots
        .iter()
        .map(|s| {
            let Some(h) = &s.header else { return format!("{}: empty", s.slot) };
            let what = format!("{} {}", h.name, h.release);
            let how = if s.flags.successful {
                "good".to_owned()
            } else if s.flags.priority == 0 {
                "bad".to_owned()
            } else {
                format!("tries {}", s.flags.tries)
            };
            format!("{}: {what} {how}", s.slot)
        })
        .collect();
    format!("booted {}; {}", r.booted, slots.join("; "))
}

/// Why a request to the provisioner failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No answer (connection refused, timeout, DNS).
    #[error("cannot reach the provisioner at {url}")]
    Unreachable {
        /// The request's URL.
        url: String,
        /// Why.
        #[source]
        source: Box<ureq::Error>,
    },
    /// An answer other than success.
    #[error("the provisioner answered {url} with HTTP {status}: {message}")]
    Status {
        /// The request's URL.
        url: String,
        /// The status code.
        status: u16,
        /// The body's first line.
        message: String,
    },
    /// A body that is not what the interface says.
    #[error("unexpected answer from {url}")]
    Decode {
        /// The request's URL.
        url: String,
        /// Why.
        #[source]
        source: Box<ureq::Error>,
    },
}

impl ApiError {
    /// Whether the provisioner said there is no such machine.
    pub fn not_found(&self) -> bool {
        matches!(self, ApiError::Status { status: 404, .. })
    }
}

/// The SHA-256 of a bearer token, as hex: what a tokens file holds (never the token).
pub fn token_hash(token: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// How a client proves who it is to the operator API (docs/security.md).
#[derive(Clone, Default)]
pub struct Credentials {
    /// The site's api CA (PEM): the provisioner's certificate must come from it.
    pub ca_pem: Vec<u8>,
    /// A client certificate and its key (PEM), from the same CA.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// A bearer token, for automation.
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity.is_some())
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish_non_exhaustive()
    }
}

/// Credentials that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("unusable operator credentials: {0}")]
pub struct CredentialsError(String);

/// A client of one provisioner's operator API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

impl Client {
    /// A client of the provisioner at `base` (`http://10.0.0.2`), each request bounded by `timeout`.
    pub fn new(base: &str, timeout: std::time::Duration) -> Client {
        let agent = ureq::Agent::config_builder().timeout_global(Some(timeout)).http_status_as_error(false).build();
        Client { base: base.trim_end_matches('/').to_owned(), agent: agent.into(), token: None }
    }

    /// A client of the operator API at `base` (`https://10.0.0.2:8443`) that checks the provisioner against the
    /// site's api CA and presents `credentials`.
    pub fn with_credentials(
        base: &str,
        timeout: std::time::Duration,
        credentials: &Credentials,
    ) -> Result<Client, CredentialsError> {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};
        let bad = |what: &str, e: ureq::Error| CredentialsError(format!("{what}: {e}"));
        let ca = Certificate::from_pem(&credentials.ca_pem).map_err(|e| bad("the api CA certificate", e))?;
        let mut tls = TlsConfig::builder().root_certs(RootCerts::new_with_certs(&[ca]));
        if let Some((cert, key)) = &credentials.identity {
            let cert = Certificate::from_pem(cert).map_err(|e| bad("the client certificate", e))?;
            let key = PrivateKey::from_pem(key).map_err(|e| bad("the client key", e))?;
            tls = tls.client_cert(Some(ClientCert::new_with_certs(&[cert], key)));
        }
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .tls_config(tls.build())
            .build();
        Ok(Client {
            base: base.trim_end_matches('/').to_owned(),
            agent: agent.into(),
            token: credentials.token.clone(),
        })
    }

    fn authorized<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => request.header("authorization", format!("Bearer {t}")),
            None => request,
        }
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn answer<T: serde::de::DeserializeOwned>(
        url: String,
        sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, ApiError> {
        let mut resp = sent.map_err(|e| ApiError::Unreachable { url: url.clone(), source: Box::new(e) })?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            let message = body.lines().next().unwrap_or_default().chars().take(200).collect();
            return Err(ApiError::Status { url, status, message });
        }
        resp.body_mut().read_json().map_err(|e| ApiError::Decode { url, source: Box::new(e) })
    }

    fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.base);
        Self::answer(url.clone(), self.authorized(self.agent.get(&url)).call())
    }

    /// Every machine of the inventory, with its state and latest event.
    pub fn machines(&self) -> Result<Vec<MachineSummary>, ApiError> {
        let mut all: Vec<MachineSummary> = Vec::new();
        loop {
            let path = match all.last() {
                None => paths::MACHINES.to_owned(),
                Some(last) => format!("{}?after={}", paths::MACHINES, last.name),
            };
            let page: Vec<MachineSummary> = self.get(&path)?;
            let done = page.len() < paths::PAGE;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// One machine.
    pub fn machine(&self, name: &str) -> Result<MachineDetail, ApiError> {
        self.get(&paths::machine(name))
    }

    /// One machine's timeline, oldest first.
    pub fn timeline(&self, name: &str) -> Result<Vec<TimelineEntry>, ApiError> {
        self.get(&paths::timeline(name))
    }

    /// Makes `name` install on its next boot.
    pub fn reprovision(&self, name: &str) -> Result<StateChange, ApiError> {
        let url = format!("{}{}", self.base, paths::reprovision(name));
        Self::answer(url.clone(), self.authorized(self.agent.post(&url)).send_empty())
    }

    /// Begins rotating the site's etcd CA (an admin's credential).
    pub fn rotate(&self) -> Result<RotationStatus, ApiError> {
        let url = format!("{}{}", self.base, paths::PKI_ROTATE);
        Self::answer(url.clone(), self.authorized(self.agent.post(&url)).send_empty())
    }

    /// Where the rotation of the site's etcd CA stands.
    pub fn rotation(&self) -> Result<RotationStatus, ApiError> {
        self.get(paths::PKI_ROTATION)
    }

    /// Approves the keys with `fingerprint` of `name`'s awaiting join (an admin's credential).
    pub fn approve(&self, name: &str, fingerprint: &str) -> Result<Approval, ApiError> {
        let url = format!("{}{}", self.base, paths::approve(name));
        let body = Approval { fingerprint: fingerprint.to_owned() };
        Self::answer(url.clone(), self.authorized(self.agent.post(&url)).send_json(&body))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_renewal_carries_pem_certificates_and_requests_in_pairs() {
        let cert = "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n".to_owned();
        let csr = "-----BEGIN CERTIFICATE REQUEST-----\nMII\n-----END CERTIFICATE REQUEST-----\n".to_owned();
        let ok =
            RenewRequest { machine_cert: cert.clone(), machine_csr: csr.clone(), member_cert: None, member_csr: None };
        assert!(ok.check().is_ok());
        let at = |r: RenewRequest| r.check().unwrap_err().at;
        assert_eq!(at(RenewRequest { machine_cert: csr.clone(), ..ok.clone() }), "machine_cert");
        assert_eq!(at(RenewRequest { machine_csr: cert.clone(), ..ok.clone() }), "machine_csr");
        assert_eq!(at(RenewRequest { member_cert: Some(cert.clone()), ..ok.clone() }), "member_csr");
        let huge = format!("{cert}{}", "A".repeat(CERT_MAX));
        assert_eq!(
            at(RenewRequest { member_cert: Some(huge), member_csr: Some(csr.clone()), ..ok.clone() }),
            "member_cert"
        );
        assert!(
            serde_json::from_str::<RenewRequest>(r#"{"machine_cert":"","machine_csr":"","credential":""}"#).is_err()
        );
    }

    #[test]
    fn a_phone_home_is_checked_and_its_detail_kept_without_control_characters() {
        let report = |stage: &str, detail: &str| PhoneHome { stage: stage.into(), detail: detail.into(), slots: None };
        assert_eq!(report("healthy", "up\nnext line\u{1b}[2J").check().unwrap(), "up next line [2J");
        assert_eq!(report("failed", &"x".repeat(2000)).check().unwrap().len(), PhoneHome::DETAIL_CHARS);
        for stage in ["", "Healthy", "a b", "stage\n", &"s".repeat(33)] {
            assert_eq!(report(stage, "").check().unwrap_err().at, "stage", "{stage:?}");
        }
        let slots: SlotReport = serde_json::from_value(serde_json::json!({
            "disk": "/dev/vda; reboot", "booted": "a", "slots": [],
        }))
        .unwrap();
        let e = PhoneHome { slots: Some(slots), ..report("configured", "") }.check().unwrap_err();
        assert_eq!(
            e.to_string(),
            "slots.disk: a device path under /dev/ (letters, digits, / _ -), at most 64 characters"
        );
    }
}
