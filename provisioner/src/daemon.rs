//! The `provisioner` daemon: loads the inventory, opens the state store, binds the boot interface and runs the
//! services until cancelled: DHCP (67, 4011), TFTP (69), HTTP (scripts, assets, configs, phone-home, metrics,
//! API), and the machines task that keeps state and boot timelines.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::boot::BootConfig;
use crate::dhcp::leases::LeaseTable;
use crate::dhcp::leases::LeaseView;
use crate::dhcp::server::{BOOT_SERVER_PORT, DhcpConfig, DhcpServer, Mode, SERVER_PORT, UnknownMacs};
use crate::dhcp::service::{DhcpService, Observers, bind_udp};
use crate::http::HttpState;
use crate::machines::{ByAddress, Machines};
use crate::metrics::Metrics;
use crate::store::Store;

/// Where Debian's `ipxe` package puts its binaries.
pub const DEBIAN_IPXE_DIR: &str = "/usr/lib/ipxe";

/// What the daemon needs to start.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The inventory file.
    pub inventory: PathBuf,
    /// The boot interface.
    pub interface: String,
    /// Where state lives.
    pub state_dir: PathBuf,
    /// Where the iPXE binaries are.
    pub ipxe_dir: PathBuf,
    /// Full DHCP or proxyDHCP.
    pub mode: Mode,
    /// What to do with MACs not in the inventory.
    pub unknown: UnknownMacs,
    /// HTTP port (the boot URLs point there).
    pub http_port: u16,
    /// Port of the sendfile asset server (kernels, initramfs, images).
    pub assets_port: u16,
    /// Lease time, seconds.
    pub lease_secs: u32,
    /// Directory served over TFTP [default: the iPXE binaries, copied into `STATE_DIR/boot`].
    pub tftp_root: Option<PathBuf>,
    /// Directory served under /assets over HTTP (vmlinuz, initramfs, images).
    pub assets: PathBuf,
    /// The operator API (HTTPS); None serves none (and no change can be made through the provisioner).
    pub api: Option<ApiConfig>,
    /// Whether the machine API's reads are also served, unauthenticated, on the boot port.
    pub api_reads: ApiReads,
    /// The site PKI, from which machines get their certificates at a join and renew them.
    pub site_pki: Option<SitePki>,
}

/// The site PKI's settings.
#[derive(Debug, Clone)]
pub struct SitePki {
    /// Its directory (`herdctl pki init`).
    pub dir: PathBuf,
    /// Whether machines may join.
    pub join: crate::join::JoinPolicy,
    /// How long a machine's certificates are valid.
    pub cert_validity: time::Duration,
    /// Whether the provisioner applies etcd's users and roles itself ([`crate::access`]).
    pub etcd_access: EtcdAccess,
    /// How long after its end a replaced certificate's copy stays in `issued/` ([`crate::join::keep_pruned`]).
    pub prune_after: time::Duration,
}

/// Who turns etcd's users and roles on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EtcdAccess {
    /// The provisioner, as soon as the inventory's etcd members answer, and again every 5 minutes.
    #[default]
    Auto,
    /// An admin, with `herdctl access apply` (until then any certificate of the site's etcd CA may do anything).
    Manual,
}

/// The operator API's settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Its port (on the provisioner address).
    pub port: u16,
    /// The server credential: `api.crt`, `api.key`, `api-ca.crt` (`herdctl pki issue server NAME --ip ADDR`).
    pub credentials: PathBuf,
    /// Bearer tokens (hashes), if any.
    pub tokens: Option<PathBuf>,
}

/// Who may read the machine API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ApiReads {
    /// Operators only, over the operator API.
    #[default]
    Operators,
    /// Anyone on the boot network too, on the boot port (the listing names every MAC: only on a trusted
    /// network).
    Open,
}

/// The provisioner's settings: one type for the config file (`provisioner --config FILE`, versioned TOML, keys as
/// the flags with `_`, unknown keys and values refused) and for the flags, which override it; the defaults are
/// [`Settings::defaults`], in one place. [`Settings::resolve`] makes the daemon's [`DaemonConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Format version of a config file (1); not a flag.
    #[arg(skip)]
    pub version: Option<u32>,
    /// The inventory file (required, here or in the config file; in the file, relative to it).
    #[arg(long, value_name = "FILE")]
    pub inventory: Option<PathBuf>,
    /// The boot interface; it must carry the inventory's `[site]` provisioner address (required).
    #[arg(long, value_name = "IFACE")]
    pub interface: Option<String>,
    /// Where leases and boot state are kept, crash-safe (required).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Where the iPXE binaries are (undionly.kpxe, ipxe.efi, snponly.efi) [default: /usr/lib/ipxe].
    #[arg(long, value_name = "DIR")]
    pub ipxe_dir: Option<PathBuf>,
    /// Full DHCP, or proxyDHCP beside another server [default: full].
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// MACs not in the inventory [default: ignore].
    #[arg(long, value_enum)]
    pub unknown_macs: Option<UnknownMacs>,
    /// HTTP port the boot URLs point at [default: 80].
    #[arg(long)]
    pub http_port: Option<u16>,
    /// Port of the boot-asset server (kernels, initramfs, images, sent with sendfile) [default: 8080].
    #[arg(long)]
    pub assets_port: Option<u16>,
    /// Lease time in seconds [default: 3600].
    #[arg(long)]
    pub lease_secs: Option<u32>,
    /// Directory served over TFTP [default: the iPXE binaries, copied into STATE_DIR/boot].
    #[arg(long, value_name = "DIR")]
    pub tftp_root: Option<PathBuf>,
    /// Directory served under /assets: vmlinuz, initramfs and OS images [default: /var/lib/herd/assets].
    #[arg(long, value_name = "DIR")]
    pub assets: Option<PathBuf>,
    /// Port of the operator API (HTTPS, client certificates or bearer tokens) [default: 8443].
    #[arg(long)]
    pub api_port: Option<u16>,
    /// The operator API's server credential (`herdctl pki issue server NAME --ip ADDR`); without it no operator
    /// API is served and nothing can be changed through the provisioner.
    #[arg(long, value_name = "DIR")]
    pub api_credentials: Option<PathBuf>,
    /// Bearer tokens for automation: a TOML file of names, roles and SHA-256 hashes (`herdctl pki token`).
    #[arg(long, value_name = "FILE")]
    pub api_tokens: Option<PathBuf>,
    /// Who may read the machine API [default: operators].
    #[arg(long, value_enum)]
    pub api_reads: Option<ApiReads>,
    /// The site PKI's directory (`herdctl pki init`): configs then carry its CA certificates and a one-time join
    /// credential, and machines trade it for their certificates.
    #[arg(long, value_name = "DIR")]
    pub site_pki: Option<PathBuf>,
    /// Whether machines may join (get certificates) [default: open].
    #[arg(long, value_enum)]
    pub join: Option<crate::join::JoinPolicy>,
    /// How long a machine's certificates are valid, in seconds (60 to 31536000); the machine renews them once two
    /// thirds of that have passed (30 days) [default: 2592000].
    #[arg(long, value_name = "SECONDS")]
    pub cert_validity_secs: Option<u64>,
    /// Who turns etcd's users and roles on, with --site-pki [default: auto].
    #[arg(long, value_enum)]
    pub etcd_access: Option<EtcdAccess>,
    /// With a site PKI: once a day, remove from its issued/ the copies of certificates that ended this many
    /// days ago and that a newer one of the same holder replaced (as `herdctl pki prune`) [default: 30].
    #[arg(long, value_name = "DAYS")]
    pub prune_certificates_days: Option<u32>,
}

impl Settings {
    /// Every setting that has a default, with it (the required ones stay unset).
    pub fn defaults() -> Settings {
        Settings {
            version: None,
            inventory: None,
            interface: None,
            state_dir: None,
            ipxe_dir: Some(DEBIAN_IPXE_DIR.into()),
            mode: Some(Mode::Full),
            unknown_macs: Some(UnknownMacs::Ignore),
            http_port: Some(80),
            assets_port: Some(8080),
            lease_secs: Some(3600),
            tftp_root: None,
            assets: Some("/var/lib/herd/assets".into()),
            api_port: Some(8443),
            api_credentials: None,
            api_tokens: None,
            api_reads: Some(ApiReads::Operators),
            site_pki: None,
            join: Some(crate::join::JoinPolicy::Open),
            cert_validity_secs: Some(crate::join::MACHINE_VALIDITY.whole_seconds().unsigned_abs()),
            etcd_access: Some(EtcdAccess::Auto),
            prune_certificates_days: Some(30),
        }
    }

    /// Reads and checks a config file; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut config: Settings =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        match config.version {
            Some(1) => {}
            Some(v) => bail!("{}: version {v} is not supported; this provisioner reads version 1", path.display()),
            None => bail!("{}: no `version`; add `version = 1` at the top", path.display()),
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.inventory,
            &mut config.state_dir,
            &mut config.ipxe_dir,
            &mut config.tftp_root,
            &mut config.assets,
            &mut config.api_credentials,
            &mut config.api_tokens,
            &mut config.site_pki,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// These settings, with `under`'s where these have none.
    pub fn over(self, under: Settings) -> Settings {
        Settings {
            version: self.version.or(under.version),
            inventory: self.inventory.or(under.inventory),
            interface: self.interface.or(under.interface),
            state_dir: self.state_dir.or(under.state_dir),
            ipxe_dir: self.ipxe_dir.or(under.ipxe_dir),
            mode: self.mode.or(under.mode),
            unknown_macs: self.unknown_macs.or(under.unknown_macs),
            http_port: self.http_port.or(under.http_port),
            assets_port: self.assets_port.or(under.assets_port),
            lease_secs: self.lease_secs.or(under.lease_secs),
            tftp_root: self.tftp_root.or(under.tftp_root),
            assets: self.assets.or(under.assets),
            api_port: self.api_port.or(under.api_port),
            api_credentials: self.api_credentials.or(under.api_credentials),
            api_tokens: self.api_tokens.or(under.api_tokens),
            api_reads: self.api_reads.or(under.api_reads),
            site_pki: self.site_pki.or(under.site_pki),
            join: self.join.or(under.join),
            cert_validity_secs: self.cert_validity_secs.or(under.cert_validity_secs),
            etcd_access: self.etcd_access.or(under.etcd_access),
            prune_certificates_days: self.prune_certificates_days.or(under.prune_certificates_days),
        }
    }

    /// The daemon's config: these settings over [`Settings::defaults`]; a missing required one is named.
    pub fn resolve(self) -> anyhow::Result<DaemonConfig> {
        let s = self.over(Settings::defaults());
        let missing = |what: &str| anyhow::anyhow!("--{what} is required (on the command line or in --config)");
        let defaulted = |what: &str| anyhow::anyhow!("no default for {what}");
        Ok(DaemonConfig {
            inventory: s.inventory.ok_or_else(|| missing("inventory"))?,
            interface: s.interface.ok_or_else(|| missing("interface"))?,
            state_dir: s.state_dir.ok_or_else(|| missing("state-dir"))?,
            ipxe_dir: s.ipxe_dir.ok_or_else(|| defaulted("ipxe_dir"))?,
            mode: s.mode.unwrap_or_default(),
            unknown: s.unknown_macs.unwrap_or_default(),
            http_port: s.http_port.ok_or_else(|| defaulted("http_port"))?,
            assets_port: s.assets_port.ok_or_else(|| defaulted("assets_port"))?,
            lease_secs: s.lease_secs.ok_or_else(|| defaulted("lease_secs"))?,
            tftp_root: s.tftp_root,
            assets: s.assets.ok_or_else(|| defaulted("assets"))?,
            api: match s.api_credentials {
                Some(credentials) => Some(ApiConfig {
                    port: s.api_port.ok_or_else(|| defaulted("api_port"))?,
                    credentials,
                    tokens: s.api_tokens,
                }),
                None if s.api_tokens.is_some() => {
                    bail!("--api-tokens needs --api-credentials: tokens are only accepted over the operator API's TLS")
                }
                None => None,
            },
            api_reads: s.api_reads.unwrap_or_default(),
            site_pki: match s.site_pki {
                Some(dir) => {
                    let secs = s.cert_validity_secs.ok_or_else(|| defaulted("cert_validity_secs"))?;
                    if !crate::join::VALIDITY_RANGE.contains(&secs) {
                        bail!(
                            "--cert-validity-secs {secs} is out of range: use {} to {} seconds",
                            crate::join::VALIDITY_RANGE.start(),
                            crate::join::VALIDITY_RANGE.end()
                        );
                    }
                    Some(SitePki {
                        dir,
                        join: s.join.unwrap_or_default(),
                        cert_validity: time::Duration::seconds(secs as i64),
                        etcd_access: s.etcd_access.unwrap_or_default(),
                        prune_after: time::Duration::days(i64::from(
                            s.prune_certificates_days.ok_or_else(|| defaulted("prune_certificates_days"))?,
                        )),
                    })
                }
                None => None,
            },
        })
    }
}

/// The IPv4 addresses of an interface.
pub fn interface_addresses(interface: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let addrs = nix::ifaddrs::getifaddrs().context("cannot list network interfaces")?;
    let mut found = false;
    let mut out = Vec::new();
    for ifa in addrs.filter(|a| a.interface_name == interface) {
        found = true;
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            out.push(sin.ip());
        }
    }
    if !found {
        bail!("no network interface named {interface:?}; `ip -br link` lists them");
    }
    Ok(out)
}

/// The iPXE binaries herd knows how to hand out.
const IPXE_BINARIES: [&str; 5] = ["undionly.kpxe", "ipxe.efi", "snponly.efi", "ipxe-ia32.efi", "ipxe-arm64.efi"];

/// The iPXE binaries present in `dir`.
pub fn ipxe_binaries(dir: &Path) -> BTreeSet<String> {
    IPXE_BINARIES.into_iter().filter(|f| dir.join(f).is_file()).map(String::from).collect()
}

/// Copies the iPXE binaries found in `from` into `to` (resolving symlinks: Debian links `ipxe.efi` to
/// `/boot/ipxe.efi`, which the TFTP server would rightly refuse as an escape from its root).
pub fn prepare_boot_dir(from: &Path, to: &Path) -> anyhow::Result<BTreeSet<String>> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for file in ipxe_binaries(from) {
        let (src, dst) = (from.join(&file), to.join(&file));
        let same = matches!((std::fs::metadata(&src), std::fs::metadata(&dst)), (Ok(a), Ok(b)) if a.len() == b.len());
        if !same {
            std::fs::copy(&src, &dst).with_context(|| format!("cannot copy {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(ipxe_binaries(to))
}

/// Runs the daemon until `cancel` fires.
pub async fn run(config: DaemonConfig, cancel: CancellationToken) -> anyhow::Result<()> {
    let inv = herd_inventory::load(&config.inventory)
        .with_context(|| format!("cannot use inventory {}", config.inventory.display()))?;
    let server_ip = inv.site.provisioner.get_ref().0;
    let addrs = interface_addresses(&config.interface)?;
    if !addrs.contains(&server_ip) {
        bail!(
            "interface {} has {:?}, not the inventory's provisioner address {server_ip}; add it (ip addr add \
             {server_ip}/{} dev {}) or fix [site] provisioner",
            config.interface,
            addrs,
            inv.network.internal.cidr.get_ref().prefix(),
            config.interface
        );
    }
    let boot_dir = config.state_dir.join("boot");
    let binaries = prepare_boot_dir(&config.ipxe_dir, &boot_dir)?;
    if binaries.is_empty() {
        tracing::warn!(dir = %config.ipxe_dir.display(), "no iPXE binaries found: PXE ROMs will get no answer (apt install ipxe)");
    }
    let boot_base = if config.http_port == 80 {
        format!("http://{server_ip}")
    } else {
        format!("http://{server_ip}:{}", config.http_port)
    };
    let boot = BootConfig { http_base: boot_base.clone(), binaries, prefer_snponly: false };
    let mut dhcp_config = DhcpConfig::from_inventory(&inv, config.mode, config.unknown, boot);
    dhcp_config.lease_secs = config.lease_secs;

    let store = Arc::new(Store::open(&config.state_dir)?);
    let leases = LeaseTable::from_leases(store.leases()?);
    let lease_count = leases.iter().count();
    let metrics = Arc::new(Metrics::default());
    let dhcp_socket = bind_udp(SERVER_PORT, Some(&config.interface)).with_context(|| {
        format!("cannot bind UDP {SERVER_PORT} on {} (root, and no other DHCP server?)", config.interface)
    })?;
    let boot_socket = bind_udp(BOOT_SERVER_PORT, Some(&config.interface))
        .with_context(|| format!("cannot bind UDP {BOOT_SERVER_PORT} on {}", config.interface))?;
    let inv = Arc::new(inv);
    let files = Arc::new(crate::files::FileCache::default());
    let machines = Machines::start(&inv, Arc::clone(&store), Arc::clone(&metrics))?;
    let lease_view = Arc::new(LeaseView::default());
    let observers = Observers { machines: machines.clone(), leases: Arc::clone(&lease_view) };
    let dhcp = DhcpService::new(
        DhcpServer::new(dhcp_config, leases),
        Arc::clone(&store),
        Arc::clone(&metrics),
        dhcp_socket,
        Some(boot_socket),
        Some(observers),
    );
    // TFTP and HTTP see addresses, not MACs: one recorder maps them to machines for the timelines.
    let by_address = ByAddress::new(&inv, machines.clone(), Arc::clone(&lease_view));
    std::fs::create_dir_all(&config.assets)
        .with_context(|| format!("cannot create the assets directory {}", config.assets.display()))?;
    let assets_root = config
        .assets
        .canonicalize()
        .with_context(|| format!("cannot use the assets directory {}", config.assets.display()))?;
    let http_listener = tokio::net::TcpListener::bind((server_ip, config.http_port))
        .await
        .with_context(|| format!("cannot listen on {server_ip}:{} for HTTP", config.http_port))?;
    let http_state = HttpState::new(
        Arc::clone(&inv),
        by_address.clone(),
        crate::http::Served {
            assets: assets_root.clone(),
            ipxe: boot_dir.clone(),
            base: boot_base.clone(),
            assets_base: format!("http://{server_ip}:{}", config.assets_port),
            files: Arc::clone(&files),
        },
        Arc::clone(&metrics),
    );
    let http_state = match &config.site_pki {
        Some(pki) => {
            let mut joining = crate::join::Joining::open(&pki.dir, pki.join, pki.cert_validity)
                .with_context(|| format!("cannot use the site PKI in {}", pki.dir.display()))?;
            joining.rotation_keeper = pki.etcd_access == EtcdAccess::Auto;
            http_state.with_joining(joining)
        }
        None => http_state,
    };
    let operator = match &config.api {
        Some(api) => {
            let tls = crate::operator::tls_config(&api.credentials)
                .with_context(|| format!("cannot use the operator API credential {}", api.credentials.display()))?;
            let tokens = match &api.tokens {
                Some(path) => crate::operator::Tokens::load(path)?,
                None => crate::operator::Tokens::default(),
            };
            let listener = tokio::net::TcpListener::bind((server_ip, api.port))
                .await
                .with_context(|| format!("cannot listen on {server_ip}:{} for the operator API", api.port))?;
            let door = crate::operator::Door::new(tokens, Arc::clone(&metrics));
            Some((listener, tls, crate::http::operator_router(http_state.clone(), door)))
        }
        None => {
            tracing::warn!("no --api-credentials: the operator API is off (machines cannot be reprovisioned)");
            None
        }
    };
    let reads_open = config.api_reads == ApiReads::Open;
    let joining = http_state.joining();
    let app = crate::http::router(http_state, reads_open).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let http_cancel = cancel.clone();
    let assets_listener = tokio::net::TcpListener::bind((server_ip, config.assets_port))
        .await
        .with_context(|| format!("cannot listen on {server_ip}:{} for boot assets", config.assets_port))?;
    let asset_recorder = by_address.clone();
    let on_asset: crate::assets::OnServe = Arc::new(move |peer, path| {
        if let (Some(kind), std::net::SocketAddr::V4(peer)) = (crate::machines::asset_event(path), peer) {
            asset_recorder.event(*peer.ip(), kind, format!("GET /assets/{path}"));
        }
    });
    let tftp_socket = bind_udp(crate::tftp::PORT, Some(&config.interface))
        .with_context(|| format!("cannot bind UDP {} on {}", crate::tftp::PORT, config.interface))?;
    let tftp_root = config.tftp_root.clone().unwrap_or_else(|| boot_dir.clone());
    let tftp_config =
        crate::tftp::TftpConfig::new(tftp_root.clone(), server_ip, crate::tftp::interface_mtu(&config.interface));
    let tftp = crate::tftp::TftpServer::new(tftp_config, tftp_socket, Arc::clone(&files), Arc::clone(&metrics))
        .with_context(|| format!("cannot serve TFTP from {}", tftp_root.display()))?
        .on_transfer(Arc::new(move |peer, file, ending| {
            if let std::net::SocketAddr::V4(peer) = peer {
                by_address.event(*peer.ip(), "tftp", format!("{file}: {ending:?}"));
            }
        }));
    tracing::info!(
        interface = %config.interface,
        %server_ip,
        machines = inv.machines.len(),
        leases = lease_count,
        mode = ?config.mode,
        http_port = config.http_port,
        api_port = config.api.as_ref().map(|a| a.port),
        "provisioner serving DHCP, TFTP and HTTP"
    );
    let tracker = TaskTracker::new();
    if let Some(pki) = config.site_pki.as_ref().filter(|p| p.etcd_access == EtcdAccess::Auto) {
        let state = config.state_dir.join("etcd-access");
        tracker.spawn(crate::access::keep_applied(
            Arc::clone(&inv),
            pki.dir.clone(),
            state.clone(),
            Arc::clone(&metrics),
            cancel.clone(),
        ));
        if let Some(joining) = joining {
            tracker.spawn(crate::rotation::keep_rotating(
                joining,
                Arc::clone(&inv),
                state,
                Arc::clone(&metrics),
                cancel.clone(),
            ));
        }
    }
    if let Some(pki) = &config.site_pki {
        let (dir, after) = (pki.dir.clone(), pki.prune_after);
        tracker.spawn(crate::join::keep_pruned(dir, after, Arc::clone(&metrics), cancel.clone()));
    }
    tracker.spawn(dhcp.run(cancel.clone()));
    tracker.spawn(tftp.run(cancel.clone()));
    tracker.spawn(crate::assets::run(
        assets_listener,
        assets_root,
        Arc::clone(&metrics),
        Some(on_asset),
        cancel.clone(),
    ));
    let (ra_interface, ra_metrics, ra_cancel) = (config.interface.clone(), Arc::clone(&metrics), cancel.clone());
    tracker.spawn(async move {
        if let Err(e) = crate::ra::run(ra_interface, ra_metrics, ra_cancel).await {
            tracing::warn!(error = %e, "IPv6 router advertisements disabled: iPXE will wait ~16 s for IPv6 on each boot");
        }
    });
    tracker.spawn(async move {
        let shutdown = http_cancel.cancelled_owned();
        if let Err(e) = axum::serve(http_listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "http server failed");
        }
    });
    if let Some((listener, tls, app)) = operator {
        tracker.spawn(crate::operator::serve(listener, tls, app, cancel.clone()));
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}
