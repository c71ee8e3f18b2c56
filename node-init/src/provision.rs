//! The initramfs stage's conversation with the provisioner (when the kernel command line names one): bring up the
//! boot NIC and DHCP, fetch this machine's Ignition config (retrying with backoff), report each stage to the
//! phone-home endpoint, and download the image — into a disk slot (install) or into RAM (diskless).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herd_config::node::{NODE_CONFIG_PATH, NodeConfig};
use herd_images::build::ImageManifest;
use herd_images::slot::{self, ImageStreams, Layout, Slot};
use serde_json::Value;

use crate::cmdline::{Cmdline, CmdlineError};
use crate::error::SysError;

/// What went wrong between this machine and its provisioner.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The command line names the provisioner wrongly.
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    /// A system operation (the NIC, a file) failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// No DHCP lease.
    #[error(transparent)]
    Dhcp(#[from] crate::dhcp::DhcpError),
    /// A request that did not get an answer.
    #[error("{what}")]
    Http {
        /// The request (`GET http://.../assets/manifest.json`).
        what: String,
        /// Why.
        #[source]
        source: ureq::Error,
    },
    /// An answer that is not a success.
    #[error("HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        /// The status code.
        status: u16,
        /// What the provisioner said (its first line).
        body: String,
    },
    /// The provisioner refused this machine's config: no retry helps.
    #[error(
        "the provisioner at {url} refused this machine's config: this boot's token, MAC or address is not what it \
         handed out; its timeline for the machine says which. Power-cycle the machine to PXE-boot again"
    )]
    Refused {
        /// The provisioner.
        url: String,
        /// Its last answer.
        #[source]
        last: Box<ProvisionError>,
    },
    /// The config did not come within the wait.
    #[error("no config from {url} within {secs} s")]
    NoConfig {
        /// The provisioner.
        url: String,
        /// The wait.
        secs: u64,
        /// The last attempt's error.
        #[source]
        last: Box<ProvisionError>,
    },
    /// The provisioner serves an image this boot does not trust.
    #[error(
        "the provisioner serves {name} {release} with root hash {root_hash}, which this boot's command line does not \
         list"
    )]
    Untrusted {
        /// Image name.
        name: String,
        /// Image release.
        release: String,
        /// Its root hash.
        root_hash: String,
    },
    /// The served image is not what its manifest says.
    #[error("the served image: {0}")]
    Image(String),
    /// Writing the image into the slot failed.
    #[error("installing to {}", disk.display())]
    Install {
        /// The disk.
        disk: PathBuf,
        /// Why.
        #[source]
        source: slot::SlotError,
    },
    /// The config lacks node-init's own file, or it does not parse.
    #[error("{NODE_CONFIG_PATH} in the config: {0}")]
    NodeConfig(String),
    /// The machine's keys or certificates (docs/security.md): what is wrong with them or with a join's answer.
    #[error("machine identity: {0}")]
    Identity(String),
    /// The root's mke2fs failed.
    #[error("mke2fs {}: {stderr}", dev.display())]
    Mkfs {
        /// The STATE device.
        dev: PathBuf,
        /// What it said.
        stderr: String,
    },
}

impl ProvisionError {
    fn http(what: impl Into<String>) -> impl FnOnce(ureq::Error) -> ProvisionError {
        let what = what.into();
        move |source| ProvisionError::Http { what, source }
    }
}

/// How long the config may take to arrive before the boot stops (`herd.config_wait=SECONDS` changes it).
const CONFIG_LIMIT: Duration = Duration::from_secs(180);
/// How many times a refused config fetch (HTTP 4xx) is tried before the boot stops: a refusal is the provisioner's
/// answer for this boot (token, MAC or address), not an outage, so it is not retried for long.
const REFUSALS: u32 = 3;
/// How long DHCP may take.
const DHCP_LIMIT: Duration = Duration::from_secs(60);

/// Install, or boot what is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Install the image (or, without a disk, run it from RAM).
    Install,
    /// Boot the installed slot.
    Local,
}

/// What the provisioner answered a join request.
#[derive(Debug)]
pub enum JoinReply {
    /// The certificates.
    Issued(herd_api::JoinAnswer),
    /// The keys with this fingerprint await an admin's approval (`--join approve`).
    Awaiting(String),
}

/// The provisioner this machine booted from, and this boot's identity.
#[derive(Debug, Clone)]
pub struct Provisioner {
    /// Base URL (`herd.provisioner=`).
    pub url: String,
    /// Machine name (`herd.machine=`).
    pub machine: String,
    /// Boot MAC (`herd.mac=`).
    pub mac: String,
    /// This boot's token (`herd.token=`).
    pub token: String,
    /// `herd.mode=`.
    pub mode: Mode,
    /// How long the config may take to arrive (`herd.config_wait=`).
    pub config_wait: Duration,
    agent: ureq::Agent,
    /// Where the machine's key and certificate are, once this boot has joined (or, in the running system, from an
    /// earlier boot): reports are signed with them from then on ([`Provisioner::sign_reports_with`]).
    signer: Arc<OnceLock<PathBuf>>,
    /// The sequence of the last signed report sent.
    seq: Arc<AtomicU64>,
}

/// The boot NIC once it has its lease.
#[derive(Debug, Clone)]
pub struct Link {
    /// Interface name.
    pub ifname: String,
    /// The lease.
    pub lease: crate::dhcp::Lease,
}

impl Provisioner {
    /// The provisioner named on the command line, if any (all of `herd.provisioner`, `herd.mac` and `herd.token`
    /// must be there).
    pub fn from_cmdline(c: &Cmdline) -> Result<Option<Provisioner>, CmdlineError> {
        let Some(url) = c.all.get("provisioner") else { return Ok(None) };
        let need =
            |k: &'static str| c.all.get(k).cloned().ok_or(CmdlineError::Missing { with: "provisioner", missing: k });
        let mode = match c.all.get("mode").map(String::as_str) {
            Some("install") => Mode::Install,
            Some("local") | None => Mode::Local,
            Some(other) => {
                return Err(CmdlineError::Value { key: "mode", value: other.to_owned(), accepted: "install or local" });
            }
        };
        let config_wait = match c.all.get("config_wait") {
            None => CONFIG_LIMIT,
            Some(s) => s.parse::<u64>().ok().filter(|&n| n > 0).map(Duration::from_secs).ok_or_else(|| {
                CmdlineError::Value { key: "config_wait", value: s.clone(), accepted: "a number of seconds" }
            })?,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Some(Provisioner {
            url: url.trim_end_matches('/').to_owned(),
            machine: c.all.get("machine").cloned().unwrap_or_default(),
            mac: need("mac")?,
            token: need("token")?,
            mode,
            config_wait,
            agent,
            signer: Arc::default(),
            seq: Arc::default(),
        }))
    }

    /// From now on, reports are signed with the machine key and certificate in `dir` (`machine.key`,
    /// `machine.crt`), whenever both are there; this boot's token is spent once it has joined. Set once: later
    /// calls change nothing (every clone of this handle shares it).
    pub fn sign_reports_with(&self, dir: PathBuf) {
        let _ = self.signer.set(dir);
    }

    /// Reports a stage to the provisioner's timeline.
    pub fn try_phone(&self, stage: &str, detail: &str) -> Result<(), ProvisionError> {
        self.try_phone_slots(stage, detail, None)
    }

    /// Reports a stage with the disk's slot table (the provisioner keeps it to boot the right slot's kernel).
    pub fn try_phone_slots(
        &self,
        stage: &str,
        detail: &str,
        slots: Option<&slot::SlotReport>,
    ) -> Result<(), ProvisionError> {
        let body = herd_api::PhoneHome { stage: stage.to_owned(), detail: detail.to_owned(), slots: slots.cloned() };
        let keys = self.signer.get().map(|dir| (dir.join("machine.crt"), dir.join("machine.key")));
        if let Some((cert, key)) = keys.filter(|(c, k)| c.exists() && k.exists()) {
            match self.try_signed(&cert, &key, &body) {
                // A provisioner without a site PKI takes the token (the certificates are from an earlier site).
                Err(ProvisionError::Status { status: 404, .. }) => {}
                other => return other,
            }
        }
        // The token is in the path: the error names the endpoint, not the URL.
        let url = format!("{}{}", self.url, herd_api::paths::phone_home(&self.mac, &self.token));
        let r = self
            .agent
            .post(&url)
            .send_json(&body)
            .map_err(ProvisionError::http(format!("phone-home to {}", self.url)))?;
        status(r).map(drop)
    }

    /// Sends `phone` signed by the machine key at `key` with its certificate at `cert` (read for each report: a
    /// renewal swaps them). Its sequence is above every one sent before; a provisioner that has seen a higher one
    /// (this machine's clock went back) says which, and the report goes once more above it.
    fn try_signed(&self, cert: &Path, key: &Path, phone: &herd_api::PhoneHome) -> Result<(), ProvisionError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| ProvisionError::Identity(format!("{}: {e}", p.display())))
        };
        let (machine_cert, key) = (read(cert)?, read(key)?);
        let url = format!("{}{}", self.url, herd_api::paths::report(&self.mac));
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let mut seq = self.seq.fetch_max(now_ms, Ordering::SeqCst).max(now_ms) + 1;
        for _ in 0..2 {
            self.seq.fetch_max(seq, Ordering::SeqCst);
            let report = herd_api::Report { mac: self.mac.clone(), seq, phone: phone.clone() };
            let report = serde_json::to_string(&report).map_err(|e| ProvisionError::Identity(e.to_string()))?;
            let signature = herd_pki::sign(&key, &herd_api::SignedReport::signed_bytes(&report))
                .map_err(|e| ProvisionError::Identity(format!("{}: {e}", cert.display())))?;
            let signature: String = signature.iter().map(|b| format!("{b:02x}")).collect();
            let body = herd_api::SignedReport { machine_cert: machine_cert.clone(), report, signature };
            let what = format!("signed report to {}", self.url);
            let mut r = self.agent.post(&url).send_json(&body).map_err(ProvisionError::http(what.clone()))?;
            if r.status() == ureq::http::StatusCode::CONFLICT {
                let stale: herd_api::StaleReport =
                    r.body_mut().read_json().map_err(ProvisionError::http(format!("{what} (as JSON)")))?;
                seq = stale.last + 1;
                continue;
            }
            return status(r).map(drop);
        }
        Err(ProvisionError::Status { status: 409, body: "the provisioner refused the report's sequence twice".into() })
    }

    /// Trades this boot's join credential for certificates (`POST /join/MAC`), or learns that its keys await an
    /// admin's approval (202).
    pub fn join(&self, body: &herd_api::JoinRequest) -> Result<JoinReply, ProvisionError> {
        let url = format!("{}{}", self.url, herd_api::paths::join(&self.mac));
        let what = format!("join at {}", self.url);
        let r = self.agent.post(&url).send_json(body).map_err(ProvisionError::http(what.clone()))?;
        let mut r = status(r)?;
        let json = ProvisionError::http(format!("{what} (as JSON)"));
        if r.status() == ureq::http::StatusCode::ACCEPTED {
            let awaiting: herd_api::JoinAwaiting = r.body_mut().read_json().map_err(json)?;
            return Ok(JoinReply::Awaiting(awaiting.fingerprint));
        }
        Ok(JoinReply::Issued(r.body_mut().read_json().map_err(json)?))
    }

    /// Renews the machine's certificates (`POST /renew/MAC`).
    pub fn renew(&self, body: &herd_api::RenewRequest) -> Result<herd_api::JoinAnswer, ProvisionError> {
        let url = format!("{}{}", self.url, herd_api::paths::renew(&self.mac));
        let what = format!("renewal at {}", self.url);
        let r = self.agent.post(&url).send_json(body).map_err(ProvisionError::http(what.clone()))?;
        status(r)?.body_mut().read_json().map_err(ProvisionError::http(format!("{what} (as JSON)")))
    }

    /// Reports a stage, best effort: a report that cannot be sent is logged.
    pub fn phone(&self, stage: &str, detail: &str) {
        if let Err(e) = self.try_phone(stage, detail) {
            eprintln!("node-init: could not report {stage} to the provisioner: {}", crate::error::chain(&e));
        }
    }

    /// Brings up the boot NIC and gets its DHCP lease.
    pub fn network(&self) -> Result<Link, ProvisionError> {
        let mac = crate::dhcp::parse_mac(&self.mac).ok_or_else(|| CmdlineError::Value {
            key: "mac",
            value: self.mac.clone(),
            accepted: "a MAC such as 52:54:00:12:34:56",
        })?;
        let ifname = crate::initrd::wait_for(&format!("the NIC with MAC {}", self.mac), || {
            crate::net::interface_by_mac(&self.mac)
        })?;
        crate::net::link_up(&ifname)?;
        if !crate::net::entropy_ready() {
            eprintln!(
                "herd-initrd: waiting for the kernel's random pool (no RDRAND or hardware RNG? give VMs virtio-rng)"
            );
        }
        let lease = crate::dhcp::lease(&ifname, mac, DHCP_LIMIT)?;
        crate::net::set_address(&ifname, lease.address, lease.prefix)?;
        if let Some(gw) = lease.router.filter(|g| *g != Ipv4Addr::UNSPECIFIED) {
            crate::net::add_default_route(gw)?;
        }
        Ok(Link { ifname, lease })
    }

    /// This machine's Ignition config, retried with backoff for [`Provisioner::config_wait`] while the provisioner
    /// cannot be reached or fails; a refusal (HTTP 4xx) ends it after [`REFUSALS`] tries.
    pub fn config(&self) -> Result<Value, ProvisionError> {
        let url = format!("{}{}", self.url, herd_api::paths::config(&self.mac, &self.token));
        let deadline = Instant::now() + self.config_wait;
        let mut wait = Duration::from_secs(1);
        let mut refusals = 0;
        loop {
            let what = || format!("the config from {}", self.url);
            let result = self.agent.get(&url).call().map_err(ProvisionError::http(what())).and_then(|r| {
                let refused = r.status().is_client_error();
                let mut r = status(r).inspect_err(|_| refusals += u32::from(refused))?;
                r.body_mut().read_json::<Value>().map_err(ProvisionError::http(format!("{} (as JSON)", what())))
            });
            match result {
                Ok(v) => return Ok(v),
                Err(e) if refusals >= REFUSALS => {
                    return Err(ProvisionError::Refused { url: self.url.clone(), last: Box::new(e) });
                }
                Err(e) if Instant::now() + wait < deadline => {
                    let e = crate::error::chain(&e);
                    eprintln!("herd-initrd: config from {}: {e}; retrying in {} s", self.url, wait.as_secs());
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(15));
                }
                Err(e) => {
                    let secs = self.config_wait.as_secs();
                    return Err(ProvisionError::NoConfig { url: self.url.clone(), secs, last: Box::new(e) });
                }
            }
        }
    }

    fn asset(&self, name: &str) -> Result<ureq::http::Response<ureq::Body>, ProvisionError> {
        let url = format!("{}/assets/{name}", self.url);
        let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(None).build().into();
        agent.get(&url).call().map_err(ProvisionError::http(format!("GET {url}")))
    }

    /// The image the provisioner serves; its root hash must be one the command line trusts.
    pub fn image(&self, cmd: &Cmdline) -> Result<ImageManifest, ProvisionError> {
        let what = format!("{}/assets/manifest.json (as JSON)", self.url);
        let m: ImageManifest =
            self.asset("manifest.json")?.body_mut().read_json().map_err(ProvisionError::http(what))?;
        if !cmd.trusts(&m.verity.root_hash) {
            return Err(ProvisionError::Untrusted { name: m.name, release: m.release, root_hash: m.verity.root_hash });
        }
        Ok(m)
    }

    /// Partitions `disk` afresh and writes the served image into slot A (streamed from HTTP).
    pub fn install(&self, cmd: &Cmdline, disk: &Path) -> Result<slot::Installed, ProvisionError> {
        let image = self.image(cmd)?;
        let len = |name: &str| {
            image
                .files
                .get(name)
                .map(|f| f.size)
                .ok_or_else(|| ProvisionError::Image(format!("the manifest lists no {name}")))
        };
        let (squash_len, verity_len) = (len("root.squashfs")?, len("root.verity")?);
        let squash = self.asset("root.squashfs")?.into_body().into_reader();
        let verity = self.asset("root.verity")?.into_body().into_reader();
        let streams = ImageStreams {
            manifest: image,
            squash: (Box::new(squash), squash_len),
            verity: (Box::new(verity), verity_len),
        };
        let installed = slot::install_streams(disk, Slot::A, streams, slot::DEFAULT_SLOT_BYTES, Layout::Fresh)
            .map_err(|source| ProvisionError::Install { disk: disk.to_owned(), source })?;
        let f = std::fs::File::open(disk).map_err(SysError::with(disk.display().to_string()))?;
        crate::net::reread_partitions(&f)?;
        Ok(installed)
    }

    /// Downloads the served image into RAM (`/run/herd/image`); returns the squashfs and verity files and the
    /// image's root hash.
    pub fn fetch_to_ram(&self, cmd: &Cmdline) -> Result<(PathBuf, PathBuf, String), ProvisionError> {
        let image = self.image(cmd)?;
        let dir = Path::new("/run/herd/image");
        std::fs::create_dir_all(dir).map_err(SysError::with(dir.display().to_string()))?;
        let mut out = Vec::new();
        for name in ["root.squashfs", "root.verity"] {
            let want = image.files.get(name).map(|f| f.size).unwrap_or_default();
            let path = dir.join(name);
            let mut file = std::fs::File::create(&path).map_err(SysError::with(path.display().to_string()))?;
            let mut body = self.asset(name)?.into_body().into_reader();
            let got = std::io::copy(&mut body, &mut file)
                .map_err(SysError::with(format!("downloading {name} into RAM (is there RAM for it?)")))?;
            if got != want {
                return Err(ProvisionError::Image(format!("{name}: got {got} bytes, the manifest says {want}")));
            }
            out.push(path);
        }
        Ok((out[0].clone(), out[1].clone(), image.verity.root_hash))
    }
}

/// node-init's own config inside an Ignition config (the `/etc/herd/node-init.json` file).
pub fn node_config(config: &Value) -> Result<NodeConfig, ProvisionError> {
    let empty = Vec::new();
    let file = config["storage"]["files"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .find(|f| f["path"] == NODE_CONFIG_PATH)
        .ok_or_else(|| ProvisionError::NodeConfig("missing".into()))?;
    let source = file["contents"]["source"].as_str().unwrap_or_default();
    let bytes = crate::ignition::data_url(source).map_err(|e| ProvisionError::NodeConfig(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| ProvisionError::NodeConfig(e.to_string()))
}

/// A response with a success status, or the status and the first line of what the server said.
fn status(mut r: ureq::http::Response<ureq::Body>) -> Result<ureq::http::Response<ureq::Body>, ProvisionError> {
    if r.status().is_success() {
        return Ok(r);
    }
    let body = r.body_mut().read_to_string().unwrap_or_default();
    let body = body.lines().next().unwrap_or_default().trim().chars().take(200).collect();
    Err(ProvisionError::Status { status: r.status().as_u16(), body })
}

/// Formats the STATE partition with the verified root's own `mke2fs` (run through the root's dynamic loader: the
/// initramfs carries no file system tools).
pub fn format_state(root: &Path, dev: &Path) -> Result<(), ProvisionError> {
    let ld = root.join("usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2");
    let libs = format!("{0}/usr/lib/x86_64-linux-gnu:{0}/lib/x86_64-linux-gnu", root.display());
    let out = std::process::Command::new(&ld)
        .arg("--library-path")
        .arg(&libs)
        .arg(root.join("usr/sbin/mke2fs"))
        .args(["-q", "-F", "-t", "ext4", "-L", "STATE"])
        .arg(dev)
        .env("MKE2FS_CONFIG", root.join("etc/mke2fs.conf"))
        .output()
        .map_err(SysError::with("running the root's mke2fs"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(ProvisionError::Mkfs { dev: dev.to_owned(), stderr });
    }
    Ok(())
}
