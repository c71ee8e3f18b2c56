//! The site PKI of a lab or the demo: the CAs, the provisioner's server credential and operator credentials, in
//! one directory (the layout `herdctl pki` uses).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use herd_pki::{Holder, Role, Site, Subject};

/// A lab's PKI.
#[derive(Debug)]
pub struct LabPki {
    /// The site PKI.
    pub site: Site,
    /// The provisioner's operator API credential (`--api-credentials`).
    pub server: PathBuf,
    /// An admin operator's credential (`herdctl --credentials`).
    pub admin: PathBuf,
    /// A read-only operator's credential.
    pub reader: PathBuf,
}

impl LabPki {
    /// Opens the PKI in `dir`, or makes it, with a server credential for the provisioner at `server_ip`.
    pub fn make(dir: &Path, server_ip: IpAddr) -> anyhow::Result<LabPki> {
        let now = time::OffsetDateTime::now_utc();
        let site = if dir.join("etcd-ca.crt").exists() { Site::open(dir)? } else { Site::init(dir, "lab", now)? };
        let credentials = dir.join("credentials");
        let (server, admin, reader) =
            (credentials.join("provisioner"), credentials.join("admin"), credentials.join("reader"));
        let day = time::Duration::days(1);
        let mut provisioner = Subject::new(Holder::Server("provisioner".to_owned()), day);
        provisioner.ips = vec![server_ip];
        for (subject, out) in [
            (provisioner, &server),
            (Subject::new(Holder::Operator("admin".to_owned(), Role::Admin), day), &admin),
            (Subject::new(Holder::Operator("reader".to_owned(), Role::ReadOnly), day), &reader),
        ] {
            herd_pki::write_credential(&site, &subject, out, now)?;
        }
        Ok(LabPki { site, server, admin, reader })
    }
}
