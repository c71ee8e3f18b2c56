//! The provisioner's HTTP server: per-machine iPXE scripts, boot assets, per-machine Ignition configs (only to the
//! machine itself), phone-home, `/metrics` and the JSON API herdctl uses. Routes are documented in
//! `docs/provisioner-api.md`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herd_images::slot::SlotReport;
use herd_inventory::{Inventory, Mac, Machine};
use herd_pki::Holder;
use serde::Deserialize;
use tower::ServiceExt as _;
use tower_http::services::ServeDir;

use crate::machines::{BootMode, ByAddress, JoinSpend, MachinesError};
use crate::metrics::Metrics;
use herd_api::{MachineDetail, MachineSummary, PhoneHome, StateChange};
use herd_config::ignition;

/// Allows one log line per interval; the rest are only counted.
#[derive(Debug)]
struct LogLimiter {
    last: Mutex<Option<Instant>>,
    every: Duration,
}

impl LogLimiter {
    fn allow(&self) -> bool {
        let Ok(mut last) = self.last.lock() else { return false };
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct HttpState {
    inv: Arc<Inventory>,
    by_address: ByAddress,
    assets: PathBuf,
    ipxe: PathBuf,
    base: String,
    assets_base: String,
    metrics: Arc<Metrics>,
    refusals: Arc<LogLimiter>,
    files: Arc<crate::files::FileCache>,
    joining: Option<Arc<crate::join::Joining>>,
}

/// What the HTTP server serves from where.
#[derive(Debug, Clone)]
pub struct Served {
    /// Directory behind /assets.
    pub assets: PathBuf,
    /// Directory behind /ipxe.
    pub ipxe: PathBuf,
    /// Base URL machines use to reach us, e.g. `http://10.20.0.2`.
    pub base: String,
    /// Base URL of the sendfile asset server, e.g. `http://10.20.0.2:8080` (kernels and initramfs come from there).
    pub assets_base: String,
    /// The file cache shared with TFTP.
    pub files: Arc<crate::files::FileCache>,
}

impl HttpState {
    /// Shared state for the routes.
    pub fn new(inv: Arc<Inventory>, by_address: ByAddress, served: Served, metrics: Arc<Metrics>) -> Self {
        let Served { assets, ipxe, base, assets_base, files } = served;
        metrics.describe("herd_http_requests_total", "HTTP requests, by route.");
        metrics.describe("herd_http_config_refused_total", "Config fetches refused, by reason.");
        metrics.describe("herd_http_phone_home_refused_total", "Phone-home reports refused, by reason.");
        metrics.describe("herd_http_script_refused_total", "Boot scripts not served: a value was unsafe in one.");
        let refusals = Arc::new(LogLimiter { last: Mutex::new(None), every: Duration::from_secs(1) });
        // Canonical once, so confinement checks per request compare against a fixed root (a missing directory
        // stays as given and every request for it is a 404).
        let (assets, ipxe) = (assets.canonicalize().unwrap_or(assets), ipxe.canonicalize().unwrap_or(ipxe));
        metrics.describe("herd_http_join_refused_total", "Join requests refused, by reason.");
        metrics.describe("herd_http_renew_refused_total", "Certificate renewals refused, by reason.");
        metrics.describe("herd_http_report_refused_total", "Signed reports refused, by reason.");
        HttpState { inv, by_address, assets, ipxe, base, assets_base, metrics, refusals, files, joining: None }
    }

    /// The site PKI it issues from, if any.
    pub fn joining(&self) -> Option<Arc<crate::join::Joining>> {
        self.joining.clone()
    }

    /// Issues machine certificates from `joining` (configs then carry the CAs and a join credential).
    pub fn with_joining(mut self, joining: crate::join::Joining) -> Self {
        self.joining = Some(Arc::new(joining));
        self
    }
}

/// The boot port's router: what machines fetch while they boot, `/metrics`, and (with `reads_open`) the machine
/// API's reads, unauthenticated. Every change (reprovision) is refused here: it needs the operator API.
pub fn router(state: HttpState, reads_open: bool) -> Router {
    let boot = Router::new()
        .route("/boot/{file}", get(script))
        .route("/assets/{*path}", get(assets).head(assets))
        .route("/ipxe/{*path}", get(ipxe_binary).head(ipxe_binary))
        .route("/config/{mac}", get(config))
        .route("/phone-home/{mac}", post(phone_home))
        .route("/join/{mac}", post(join).layer(axum::extract::DefaultBodyLimit::max(4 * herd_api::CSR_MAX)))
        .route("/renew/{mac}", post(renew).layer(axum::extract::DefaultBodyLimit::max(6 * herd_api::CSR_MAX)))
        .route("/report/{mac}", post(report).layer(axum::extract::DefaultBodyLimit::max(4 * herd_api::REPORT_MAX)))
        .route("/metrics", get(metrics));
    let api = if reads_open {
        api_reads()
            .route("/api/v1/machines/{name}/reprovision", post(operator_only))
            .route("/api/v1/machines/{name}/approve", post(operator_only))
            .route(herd_api::paths::PKI_ROTATE, post(operator_only))
    } else {
        Router::new().route("/api/v1/{*rest}", axum::routing::any(operator_only))
    };
    boot.merge(api).with_state(state)
}

/// The operator API's router (served over TLS by [`crate::operator::serve`]): every route behind the door.
pub fn operator_router(state: HttpState, door: crate::operator::Door) -> Router {
    api_reads()
        .route("/api/v1/machines/{name}/reprovision", post(reprovision))
        .route("/api/v1/machines/{name}/approve", post(approve))
        .route(herd_api::paths::PKI_ROTATE, post(rotate))
        .fallback(|| async { text(StatusCode::NOT_FOUND, "no such operator API route\n") })
        .layer(axum::middleware::from_fn_with_state(door, crate::operator::require))
        .with_state(state)
}

fn api_reads() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/machines", get(list_machines))
        .route("/api/v1/machines/{name}", get(show_machine))
        .route("/api/v1/machines/{name}/timeline", get(timeline))
        .route(herd_api::paths::PKI_ROTATION, get(rotation))
}

async fn operator_only(State(s): State<HttpState>) -> Response {
    s.metrics.inc("herd_api_refused_total", "reason=\"boot-port\"");
    text(
        StatusCode::FORBIDDEN,
        "the machine API is served to operators only, over HTTPS on the operator API port (herdctl machine \
         --provisioner https://ADDR:8443 --credentials DIR)\n",
    )
}

fn parse_mac(s: &str) -> Option<Mac> {
    s.replace('-', ":").parse().ok()
}

/// The link-layer address this network namespace's neighbor table (`/proc/net/arp`) holds for `ip` on a directly
/// attached network. The kernel learns it from the peer's own ARP before it answers the peer's connection, so it
/// names the NIC the request came from. None without a complete entry (a peer behind a router or relay: nothing to
/// compare).
fn link_address(ip: Ipv4Addr) -> Option<Mac> {
    let table = std::fs::read_to_string("/proc/net/arp").ok()?;
    let ip = ip.to_string();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let flags = f.get(2).and_then(|x| u32::from_str_radix(x.trim_start_matches("0x"), 16).ok()).unwrap_or(0);
        // ATF_COM: the entry is complete.
        if f.first() != Some(&ip.as_str()) || flags & 0x2 == 0 {
            return None;
        }
        f.get(3).and_then(|m| parse_mac(m))
    })
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body.into()).into_response()
}

fn source_v4(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
    }
}

async fn script(State(s): State<HttpState>, Path(file): Path<String>) -> Response {
    s.metrics.inc("herd_http_requests_total", "route=\"script\"");
    let Some(mac) = file.strip_suffix(".ipxe").and_then(parse_mac) else {
        return text(StatusCode::NOT_FOUND, "expected /boot/MAC.ipxe\n");
    };
    let Some(name) = s.by_address.macs.get(&mac).cloned() else {
        return text(StatusCode::NOT_FOUND, format!("#!ipxe\necho herd: {mac} is not in the inventory\nshell\n"));
    };
    let Some(machine) = s.inv.machine(&name) else { return text(StatusCode::NOT_FOUND, "unknown machine\n") };
    let (token, mode) = match s.by_address.machines.script(&name).await {
        Ok(v) => v,
        Err(e) => return machines_error(&e),
    };
    // Which image's kernel boots, and the image's own command line (console, `ro`, the root hashes node-init
    // trusts): the served image's, or for a machine booting its installed slot, the image in the slot it will
    // pick, vouching for every slot that holds an image this provisioner served (so a fallback boots too).
    let served = crate::images::keep_served(&s.assets);
    let slots = match mode {
        BootMode::Local => s.by_address.machines.get(&name).await.and_then(|r| r.slots),
        BootMode::Install => None,
    };
    let (files, note) = boot_files(&s.assets, served.as_deref(), slots.as_ref());
    let mut args = files_cmdline(&s.assets, &files, served.as_deref(), slots.as_ref());
    if let Some(role) = s.inv.role_of(machine) {
        args.extend(role.kernel_args.iter().map(ToString::to_string));
    }
    args.extend(machine.kernel_args.iter().map(ToString::to_string));
    let built = crate::ipxe::script(&crate::ipxe::Script {
        machine: &name,
        mac,
        token: &token,
        mode,
        base: &s.base,
        assets_base: &s.assets_base,
        files: &files,
        note: &note,
        args: &args,
    });
    match built {
        Ok(body) => text(StatusCode::OK, body),
        Err(e) => {
            s.metrics.inc("herd_http_script_refused_total", "reason=\"unsafe-value\"");
            tracing::error!(machine = %name, error = %e, "no boot script: a value would not be safe in it");
            s.by_address.machines.event(&name, "script-refused", e.to_string());
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    }
}

/// Where the kernel and initramfs come from, relative to the assets directory (`""`: the served image;
/// `images/HASH/`: a kept one), and a note for the script's comment line.
fn boot_files(assets: &std::path::Path, served: Option<&str>, slots: Option<&SlotReport>) -> (String, String) {
    let Some(next) = slots.and_then(SlotReport::next) else { return (String::new(), String::new()) };
    let Some(h) = &next.header else { return (String::new(), String::new()) };
    let note = format!(", slot {}: {} {}", next.slot, h.name, h.release);
    if served != Some(h.root_hash.as_str()) && crate::images::kept(assets, &h.root_hash) {
        (format!("{}/{}/", crate::images::DIR, h.root_hash), note)
    } else {
        (String::new(), note)
    }
}

/// The image command line of the boot files in `files` (see [`boot_files`]), its `herd.verity.roothash=` listing
/// the served image and every slot's image that was served (kept).
fn files_cmdline(
    assets: &std::path::Path,
    files: &str,
    served: Option<&str>,
    slots: Option<&SlotReport>,
) -> Vec<String> {
    let mut args = image_cmdline(&assets.join(files));
    let Some(report) = slots else { return args };
    let mut trusted: Vec<String> = served.map(str::to_owned).into_iter().collect();
    for h in report.slots.iter().filter_map(|x| x.header.as_ref()) {
        if !trusted.contains(&h.root_hash) && crate::images::kept(assets, &h.root_hash) {
            trusted.push(h.root_hash.clone());
        }
    }
    if trusted.is_empty() {
        return args;
    }
    args.retain(|a| !a.starts_with("herd.verity.roothash="));
    args.push(format!("herd.verity.roothash={}", trusted.join(",")));
    args
}

/// The kernel command line of the image in the assets directory (`manifest.json` from `herdctl image build`),
/// split into words; none when no image is there (test initramfs, or assets not copied yet).
fn image_cmdline(assets: &std::path::Path) -> Vec<String> {
    let path = assets.join("manifest.json");
    if !path.exists() {
        return Vec::new();
    }
    match herd_images::build::ImageManifest::read(&path) {
        Ok(manifest) => manifest.cmdline.split_whitespace().map(str::to_owned).collect(),
        Err(e) => {
            tracing::warn!(error = %crate::report(&e), "ignoring the image in the assets directory");
            Vec::new()
        }
    }
}

async fn assets(State(s): State<HttpState>, ConnectInfo(peer): ConnectInfo<SocketAddr>, req: Request) -> Response {
    s.metrics.inc("herd_http_requests_total", "route=\"assets\"");
    let path = req.uri().path().trim_start_matches("/assets/").to_owned();
    if let (Some(kind), Some(ip)) = (crate::machines::asset_event(&path), source_v4(peer))
        && req.method() == axum::http::Method::GET
    {
        s.by_address.event(ip, kind, format!("GET /assets/{path}"));
    }
    serve_file(&s, &s.assets, &path, req).await
}

/// iPXE binaries for HTTP-boot firmware (the same files TFTP serves).
async fn ipxe_binary(State(s): State<HttpState>, req: Request) -> Response {
    s.metrics.inc("herd_http_requests_total", "route=\"ipxe\"");
    let path = req.uri().path().trim_start_matches("/ipxe/").to_owned();
    serve_file(&s, &s.ipxe, &path, req).await
}

/// Files up to this size are served from the shared cache; larger ones (OS images) stream from disk.
const CACHED_FILE_MAX: usize = 64 << 20;

/// Serves a file below `root` with HEAD and single-range support; never leaves `root` (the same confinement as
/// TFTP). Cached files go out as slices of one shared buffer: no disk read per request.
async fn serve_file(s: &HttpState, root: &std::path::Path, rel: &str, req: Request) -> Response {
    let path = match crate::tftp::resolve(root, rel) {
        Ok(p) => p,
        Err(refusal) if refusal.code == crate::tftp::packet::code::ACCESS => {
            return text(StatusCode::FORBIDDEN, "forbidden\n");
        }
        Err(_) => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    let data = match s.files.get(&path, CACHED_FILE_MAX).await {
        Ok(Some(data)) => data,
        Ok(None) => {
            // Too large to cache: stream it (ServeDir handles HEAD and Range too).
            let mut req = req;
            if let Ok(uri) = format!("/{}", path.strip_prefix(root).unwrap_or(&path).display()).parse() {
                *req.uri_mut() = uri;
            }
            return match ServeDir::new(root).oneshot(req).await {
                Ok(resp) => resp.into_response(),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            };
        }
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    let len = data.len();
    let head = req.method() == axum::http::Method::HEAD;
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(|r| byte_range(r, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(None) => {
            return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))])
                .into_response();
        }
    };
    let mut builder = axum::http::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, end - start);
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", end.saturating_sub(1)));
    }
    let body = if head { axum::body::Body::empty() } else { axum::body::Body::from(data.slice(start..end)) };
    builder.body(body).unwrap_or_else(|e| text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")))
}

/// A single `bytes=` range as a half-open interval, or None if unsatisfiable or not understood.
pub(crate) fn byte_range(header: &str, len: usize) -> Option<(usize, usize)> {
    let spec = header.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: usize = suffix.parse().ok()?;
            (len.saturating_sub(n), len)
        }
        (a, "") => (a.parse().ok()?, len),
        (a, b) => (a.parse().ok()?, b.parse::<usize>().ok()?.saturating_add(1).min(len)),
    };
    (start < end && start < len).then_some((start, end))
}

/// Query string carrying a per-boot token.
#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

impl HttpState {
    /// Whether a request from `peer` came from one of `name`'s own NICs, when the kernel knows which NIC it came
    /// from (a peer on the boot network). A spoofed DHCPREQUEST (proxy mode, where the provisioner learns a
    /// machine's address from what it overhears) can make another host's address the one "leased" to the
    /// machine's MAC, but that host's packets still come from its own NIC. Err: the NIC they came from.
    fn sent_by_nic_of(&self, peer: SocketAddr, name: &str) -> Result<(), Mac> {
        match source_v4(peer).and_then(link_address) {
            Some(nic) if self.by_address.macs.get(&nic).map(String::as_str) != Some(name) => Err(nic),
            _ => Ok(()),
        }
    }

    fn refuse(&self, reason: &'static str, mac: &str, peer: SocketAddr) -> Response {
        self.metrics.inc("herd_http_config_refused_total", &format!("reason=\"{reason}\""));
        if self.refusals.allow() {
            tracing::warn!(%peer, %mac, reason, "config fetch refused (further refusals within 1 s are only counted)");
        }
        text(StatusCode::FORBIDDEN, "forbidden\n")
    }
}

async fn config(
    State(s): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(mac_text): Path<String>,
    Query(q): Query<TokenQuery>,
) -> Response {
    s.metrics.inc("herd_http_requests_total", "route=\"config\"");
    let Some(mac) = parse_mac(&mac_text) else { return s.refuse("bad-mac", &mac_text, peer) };
    let Some(name) = s.by_address.macs.get(&mac).cloned() else { return s.refuse("unknown-mac", &mac_text, peer) };
    // Bound to the machine three ways: its MAC, the address leased to that MAC, and this boot's token.
    if s.by_address.leases.of(mac).is_none() || s.by_address.leases.of(mac) != source_v4(peer) {
        s.by_address.machines.event(&name, "config-refused", format!("from {peer}: not the address leased to {mac}"));
        return s.refuse("wrong-source", &mac_text, peer);
    }
    if let Err(nic) = s.sent_by_nic_of(peer, &name) {
        let why = format!("from {peer}: its packets come from {nic}, not a NIC of {name} (a spoofed DHCP request?)");
        s.by_address.machines.event(&name, "config-refused", why);
        return s.refuse("wrong-link-address", &mac_text, peer);
    }
    let token_ok = match &q.token {
        Some(t) => s.by_address.machines.check_token(&name, t).await,
        None => false,
    };
    if !token_ok {
        s.by_address.machines.event(&name, "config-refused", format!("from {peer}: wrong token"));
        return s.refuse("wrong-token", &mac_text, peer);
    }
    let options = ignition::RenderOptions { etcd_tls: s.joining.is_some() };
    match ignition::render_machine_with(&s.inv, &name, options) {
        Ok(mut cfg) => {
            if let Some(joining) = &s.joining {
                for (file, pem) in joining.ca_files() {
                    ignition::add_file(&mut cfg, &format!("{}/{file}", herd_api::CA_DIR), &pem, 0o644);
                }
                if joining.policy != crate::join::JoinPolicy::Closed {
                    match s.by_address.machines.issue_join(&name).await {
                        Ok(credential) => {
                            ignition::add_file(&mut cfg, herd_api::JOIN_CREDENTIAL_PATH, &credential, 0o600);
                        }
                        Err(e) => return machines_error(&e),
                    }
                }
            }
            s.by_address.machines.event(&name, "config", format!("served to {peer}"));
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], ignition::to_json(&cfg)).into_response()
        }
        Err(e) => {
            tracing::error!(machine = %name, error = %format!("{e:#}"), "cannot render config");
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    }
}

/// The answer to a failure of the machines task: 404 for a machine not in the inventory, 503 while shutting down,
/// 500 when the change could not be made durable.
fn machines_error(e: &MachinesError) -> Response {
    let status = match e {
        MachinesError::Unknown(_) => StatusCode::NOT_FOUND,
        MachinesError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        MachinesError::NotDurable(_) => StatusCode::INTERNAL_SERVER_ERROR,
        MachinesError::JoinRefused(_) => StatusCode::FORBIDDEN,
        MachinesError::Stale(_) => StatusCode::CONFLICT,
    };
    text(status, format!("{e}\n"))
}

/// Refusals of a certificate route (`join`, `renew`, `report`): counted in `herd_http_ROUTE_refused_total{reason}`, a
/// `ROUTE-refused` event on the machine's timeline (when the MAC names one), logged at most once a second.
struct Refusals<'a> {
    s: &'a HttpState,
    peer: SocketAddr,
    mac: &'a str,
    route: &'static str,
}

impl Refusals<'_> {
    fn refuse(&self, name: Option<&str>, reason: &'static str, status: StatusCode, why: String) -> Response {
        let (s, peer, route) = (self.s, self.peer, self.route);
        let counter = match route {
            "join" => "herd_http_join_refused_total",
            "renew" => "herd_http_renew_refused_total",
            _ => "herd_http_report_refused_total",
        };
        s.metrics.inc(counter, &format!("reason=\"{reason}\""));
        if let Some(name) = name {
            s.by_address.machines.event(name, &format!("{route}-refused"), format!("from {peer}: {why}"));
        }
        if s.refusals.allow() {
            tracing::warn!(%peer, mac = %self.mac, reason, route, "refused (further refusals within 1 s are only counted)");
        }
        text(status, format!("{why}\n"))
    }

    /// Counts the request, then finds who sent it: a MAC of the inventory, a provisioner holding the site PKI, and
    /// the machine's own address (its lease's or its inventory address). Returns its name, its entry and the PKI.
    fn requester(&self) -> Result<(String, &Machine, Arc<crate::join::Joining>), Box<Response>> {
        let (s, route) = (self.s, self.route);
        s.metrics.inc("herd_http_requests_total", &format!("route=\"{route}\""));
        let Some(mac) = parse_mac(self.mac) else {
            let why = format!("expected /{route}/MAC");
            return Err(Box::new(self.refuse(None, "bad-mac", StatusCode::NOT_FOUND, why)));
        };
        let Some(name) = s.by_address.macs.get(&mac).cloned() else {
            let why = format!("{mac} is not a machine of the inventory");
            return Err(Box::new(self.refuse(None, "unknown-mac", StatusCode::FORBIDDEN, why)));
        };
        let Some(machine) = s.inv.machine(&name) else {
            return Err(Box::new(text(StatusCode::NOT_FOUND, "unknown machine\n")));
        };
        let Some(joining) = s.joining.clone() else {
            let why = "this provisioner issues no certificates".to_owned();
            return Err(Box::new(self.refuse(Some(&name), "no-pki", StatusCode::NOT_FOUND, why)));
        };
        let from = source_v4(self.peer);
        if from.is_none() || (from != s.by_address.leases.of(mac) && from != Some(machine.internal.get_ref().0)) {
            let why = format!("not {name}'s address");
            return Err(Box::new(self.refuse(Some(&name), "wrong-source", StatusCode::FORBIDDEN, why)));
        }
        Ok((name, machine, joining))
    }
}

/// `POST /join/MAC`: the machine's certificate requests with its one-time credential ([`crate::join`]).
async fn join(
    State(s): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(mac_text): Path<String>,
    axum::Json(req): axum::Json<herd_api::JoinRequest>,
) -> Response {
    let refusals = Refusals { s: &s, peer, mac: &mac_text, route: "join" };
    let refuse = |name: Option<&str>, reason: &'static str, status: StatusCode, why: String| {
        refusals.refuse(name, reason, status, why)
    };
    let (name, machine, joining) = match refusals.requester() {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    if joining.policy == crate::join::JoinPolicy::Closed {
        return refuse(Some(&name), "closed", StatusCode::FORBIDDEN, "registration is closed".into());
    }
    // A machine joins from its boot NIC (node-init's initramfs, before the bond): from any other NIC is another host.
    if let Err(nic) = s.sent_by_nic_of(peer, &name) {
        let why = format!("sent from {nic}, not a NIC of {name}");
        return refuse(Some(&name), "wrong-link-address", StatusCode::FORBIDDEN, why);
    }
    if let Err(e) = req.check() {
        return refuse(Some(&name), "invalid-request", StatusCode::BAD_REQUEST, e.to_string());
    }
    let member = s.inv.etcd_members().any(|m| m.name() == machine.name());
    if req.member_csr.is_some() && !member {
        let why = format!("{name} is not an etcd member: it gets no member certificate");
        return refuse(Some(&name), "not-a-member", StatusCode::BAD_REQUEST, why);
    }
    for (at, csr) in [("machine_csr", Some(&req.machine_csr)), ("member_csr", req.member_csr.as_ref())] {
        if let Some(Err(why)) = csr.map(|c| herd_pki::check_request(c)) {
            return refuse(Some(&name), "invalid-request", StatusCode::BAD_REQUEST, format!("{at}: {why}"));
        }
    }
    let approval = match joining.policy {
        crate::join::JoinPolicy::Approve => {
            let requests: Vec<&str> =
                std::iter::once(req.machine_csr.as_str()).chain(req.member_csr.as_deref()).collect();
            match herd_pki::requests_fingerprint(&requests) {
                Ok(fp) => Some(fp),
                Err(why) => return refuse(Some(&name), "invalid-request", StatusCode::BAD_REQUEST, why),
            }
        }
        _ => None,
    };
    match s.by_address.machines.spend_join(&name, &req.credential, approval.as_deref()).await {
        Ok(JoinSpend::Spent) => {}
        Ok(JoinSpend::Awaiting) => {
            let fingerprint = approval.unwrap_or_default();
            return (StatusCode::ACCEPTED, axum::Json(herd_api::JoinAwaiting { fingerprint })).into_response();
        }
        Err(MachinesError::JoinRefused(reason)) => {
            let why = format!("the join credential is refused ({reason})");
            return refuse(Some(&name), reason, StatusCode::FORBIDDEN, why);
        }
        Err(e) => return machines_error(&e),
    }
    match joining.issue(&s.inv, machine, member, &req.machine_csr, req.member_csr.as_deref()) {
        Ok(answer) => match s.by_address.machines.issued(&name, "join", held(&answer), None).await {
            Ok(()) => axum::Json(answer).into_response(),
            Err(e) => machines_error(&e),
        },
        Err(e) => refuse(Some(&name), "not-issued", StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// The fingerprints of the certificates in `answer`.
fn held(answer: &herd_api::JoinAnswer) -> crate::machines::HeldCerts {
    let fingerprint = |pem: &str| herd_pki::parse(pem).map(|i| i.fingerprint).unwrap_or_default();
    crate::machines::HeldCerts {
        machine: fingerprint(&answer.machine_cert),
        member: answer.member_cert.as_deref().map(fingerprint),
    }
}

/// `POST /renew/MAC`: a machine renews the certificates it holds before they end ([`crate::join`]). No credential:
/// from the machine's own address, each certificate still valid, from the site's etcd CA, naming the machine, the
/// one it was issued last (not one a rejoin replaced), and each request signed by its certificate's key. Allowed
/// with registration closed: closing it stops new machines, not the ones the site has.
async fn renew(
    State(s): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(mac_text): Path<String>,
    axum::Json(req): axum::Json<herd_api::RenewRequest>,
) -> Response {
    let refusals = Refusals { s: &s, peer, mac: &mac_text, route: "renew" };
    let refuse = |name: Option<&str>, reason: &'static str, status: StatusCode, why: String| {
        refusals.refuse(name, reason, status, why)
    };
    let (name, machine, joining) = match refusals.requester() {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    if let Err(e) = req.check() {
        return refuse(Some(&name), "invalid-request", StatusCode::BAD_REQUEST, e.to_string());
    }
    let member = s.inv.etcd_members().any(|m| m.name() == machine.name());
    if req.member_cert.is_some() && !member {
        let why = format!("{name} is not an etcd member: it gets no member certificate");
        return refuse(Some(&name), "not-a-member", StatusCode::BAD_REQUEST, why);
    }
    let pairs = [
        ("machine", Some((&req.machine_cert, &req.machine_csr)), Holder::Machine(name.clone())),
        ("member", req.member_cert.as_ref().zip(req.member_csr.as_ref()), Holder::Member(name.clone())),
    ];
    let mut presented = crate::machines::HeldCerts::default();
    for (at, pair, holder) in pairs {
        let Some((cert, csr)) = pair else { continue };
        let info = match joining.current(cert, &holder) {
            Ok(info) => info,
            Err(why) => return refuse(Some(&name), "not-current", StatusCode::FORBIDDEN, format!("{at}_cert: {why}")),
        };
        if let Err(why) = herd_pki::request_proves(csr, cert) {
            return refuse(Some(&name), "no-proof", StatusCode::FORBIDDEN, format!("{at}_csr: {why}"));
        }
        match at {
            "machine" => presented.machine = info.fingerprint,
            _ => presented.member = Some(info.fingerprint),
        }
    }
    let answer = match joining.issue(&s.inv, machine, member, &req.machine_csr, req.member_csr.as_deref()) {
        Ok(answer) => answer,
        Err(e) => return refuse(Some(&name), "not-issued", StatusCode::BAD_REQUEST, e.to_string()),
    };
    match s.by_address.machines.issued(&name, "renewed", held(&answer), Some(presented)).await {
        Ok(()) => axum::Json(answer).into_response(),
        Err(MachinesError::JoinRefused(reason)) => {
            let why = format!(
                "these certificates are no longer {name}'s (a later join replaced them): power-cycle it to join again"
            );
            refuse(Some(&name), reason, StatusCode::FORBIDDEN, why)
        }
        Err(e) => machines_error(&e),
    }
}

async fn phone_home(
    State(s): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(mac_text): Path<String>,
    Query(q): Query<TokenQuery>,
    axum::Json(body): axum::Json<PhoneHome>,
) -> Response {
    s.metrics.inc("herd_http_requests_total", "route=\"phone-home\"");
    let refuse = |reason: &'static str, status: StatusCode, why: String| {
        s.metrics.inc("herd_http_phone_home_refused_total", &format!("reason=\"{reason}\""));
        if s.refusals.allow() {
            tracing::warn!(%peer, mac = %mac_text, reason, "phone-home refused (further refusals within 1 s are only counted)");
        }
        text(status, format!("{why}\n"))
    };
    let Some(mac) = parse_mac(&mac_text) else {
        return refuse("bad-mac", StatusCode::FORBIDDEN, "forbidden".into());
    };
    let Some(name) = s.by_address.macs.get(&mac).cloned() else {
        return refuse("unknown-mac", StatusCode::FORBIDDEN, "forbidden".into());
    };
    // Only from the machine itself: the address leased to this MAC (the initramfs) or its inventory address (the
    // running system, on its bond).
    let own = s.inv.machine(&name).map(|m| m.internal.get_ref().0);
    let from = source_v4(peer);
    if from.is_none() || (from != s.by_address.leases.of(mac) && from != own) {
        s.by_address.machines.event(&name, "phone-home-refused", format!("from {peer}: not the machine's address"));
        return refuse("wrong-source", StatusCode::FORBIDDEN, "forbidden".into());
    }
    let token_ok = match &q.token {
        Some(t) => s.by_address.machines.check_token(&name, t).await,
        None => false,
    };
    if !token_ok {
        return refuse("wrong-token", StatusCode::FORBIDDEN, "forbidden".into());
    }
    // Everything reported is checked before any of it is stored (the slot table names the next boot's image).
    let detail = match body.check() {
        Ok(detail) => detail,
        Err(e) => {
            s.by_address.machines.event(&name, "phone-home-refused", format!("from {peer}: {e}"));
            return refuse("invalid-report", StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    match s.by_address.machines.phone_home(&name, &body.stage, &detail, body.slots, None).await {
        Ok(state) => axum::Json(StateChange { machine: name, state }).into_response(),
        Err(e) => machines_error(&e),
    }
}

/// `POST /report/MAC`: a phone-home signed by the machine's key, the way a boot reports once it has joined (its
/// token is spent then). From the machine's own address, with the machine certificate it was issued last (of the
/// site's etcd CA, naming it, valid), signed by that certificate's key, for this MAC, above the last sequence
/// accepted; then checked and applied like a phone-home.
async fn report(
    State(s): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(mac_text): Path<String>,
    axum::Json(req): axum::Json<herd_api::SignedReport>,
) -> Response {
    let refusals = Refusals { s: &s, peer, mac: &mac_text, route: "report" };
    let refuse = |name: Option<&str>, reason: &'static str, status: StatusCode, why: String| {
        refusals.refuse(name, reason, status, why)
    };
    let (name, _, joining) = match refusals.requester() {
        Ok(found) => found,
        Err(refused) => return *refused,
    };
    let signature = match req.check() {
        Ok(signature) => signature,
        Err(e) => return refuse(Some(&name), "invalid-request", StatusCode::BAD_REQUEST, e.to_string()),
    };
    let cert = match joining.current(&req.machine_cert, &Holder::Machine(name.clone())) {
        Ok(info) => info,
        Err(why) => return refuse(Some(&name), "not-current", StatusCode::FORBIDDEN, format!("machine_cert: {why}")),
    };
    let signed = herd_api::SignedReport::signed_bytes(&req.report);
    if let Err(why) = herd_pki::signed_by(&req.machine_cert, &signed, &signature) {
        return refuse(Some(&name), "bad-signature", StatusCode::FORBIDDEN, format!("signature: {why}"));
    }
    let report: herd_api::Report = match serde_json::from_str(&req.report) {
        Ok(report) => report,
        Err(e) => return refuse(Some(&name), "invalid-request", StatusCode::BAD_REQUEST, format!("report: {e}")),
    };
    if parse_mac(&report.mac) != parse_mac(&mac_text) {
        let why = format!("report.mac: signed for {:?}, sent for {mac_text}", report.mac);
        return refuse(Some(&name), "wrong-mac", StatusCode::FORBIDDEN, why);
    }
    // Everything reported is checked before any of it is stored (the slot table names the next boot's image).
    let detail = match report.phone.check() {
        Ok(detail) => detail,
        Err(e) => return refuse(Some(&name), "invalid-report", StatusCode::BAD_REQUEST, format!("report.phone.{e}")),
    };
    let by = crate::machines::Signed { fingerprint: cert.fingerprint, seq: report.seq };
    let phone = report.phone;
    match s.by_address.machines.phone_home(&name, &phone.stage, &detail, phone.slots, Some(by)).await {
        Ok(state) => axum::Json(StateChange { machine: name, state }).into_response(),
        Err(MachinesError::Stale(last)) => {
            s.metrics.inc("herd_http_report_refused_total", "reason=\"stale\"");
            (StatusCode::CONFLICT, axum::Json(herd_api::StaleReport { last })).into_response()
        }
        Err(MachinesError::JoinRefused(reason)) => {
            let why = format!("machine_cert: no longer {name}'s (a later join replaced it)");
            refuse(Some(&name), reason, StatusCode::FORBIDDEN, why)
        }
        Err(e) => machines_error(&e),
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    let mut text = s.metrics.render();
    if let Some(joining) = &s.joining {
        text.push_str(&joining.expiry_metrics(time::OffsetDateTime::now_utc()));
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /api/v1/machines?after=NAME&limit=N`: a page of the listing.
#[derive(Debug, Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_machines(State(s): State<HttpState>, Query(page): Query<Page>) -> Response {
    let limit = page.limit.unwrap_or(herd_api::paths::PAGE).min(herd_api::paths::PAGE);
    if limit == 0 {
        return text(StatusCode::BAD_REQUEST, format!("limit must be 1-{}\n", herd_api::paths::PAGE));
    }
    let start = match &page.after {
        None => 0,
        Some(after) => match s.inv.machines.iter().position(|m| m.name().as_str() == after) {
            Some(i) => i + 1,
            None => return text(StatusCode::BAD_REQUEST, format!("after={after:?} is not a machine\n")),
        },
    };
    let records = s.by_address.machines.list().await;
    let list: Vec<MachineSummary> = s
        .inv
        .machines
        .iter()
        .skip(start)
        .take(limit)
        .map(|m| {
            let name = m.name().to_string();
            let record = records.get(&name);
            MachineSummary {
                state: record.map(|r| r.state).unwrap_or_default(),
                last: record.and_then(|r| r.last.clone()),
                role: m.role.get_ref().to_string(),
                rack: m.rack.get_ref().to_string(),
                boot_mac: m.boot_mac().map(|x| x.to_string()).unwrap_or_default(),
                address: m.internal.get_ref().to_string(),
                name,
            }
        })
        .collect();
    axum::Json(list).into_response()
}

async fn show_machine(State(s): State<HttpState>, Path(name): Path<String>) -> Response {
    let Some(m) = s.inv.machine(&name) else { return text(StatusCode::NOT_FOUND, format!("no machine {name:?}\n")) };
    let record = s.by_address.machines.get(&name).await.unwrap_or_default();
    axum::Json(MachineDetail {
        state: record.state,
        fqdn: s.inv.fqdn(m),
        role: m.role.get_ref().to_string(),
        rack: m.rack.get_ref().to_string(),
        macs: m.macs().map(|x| x.to_string()).collect(),
        address: m.internal.get_ref().to_string(),
        leased: m.macs().find_map(|x| s.by_address.leases.of(x)).map(|ip| ip.to_string()),
        timeline_entries: record.timeline.len(),
        slots: record.slots,
        name,
    })
    .into_response()
}

async fn timeline(State(s): State<HttpState>, Path(name): Path<String>) -> Response {
    match s.by_address.machines.get(&name).await {
        Some(record) => axum::Json(record.timeline).into_response(),
        None => text(StatusCode::NOT_FOUND, format!("no machine {name:?}\n")),
    }
}

async fn reprovision(
    State(s): State<HttpState>,
    axum::Extension(caller): axum::Extension<crate::operator::Caller>,
    Path(name): Path<String>,
) -> Response {
    tracing::info!(machine = %name, by = %caller.name, "reprovision requested");
    match s.by_address.machines.reprovision(&name, &caller.name).await {
        Ok(state) => axum::Json(StateChange { machine: name, state }).into_response(),
        Err(e) => machines_error(&e),
    }
}

/// `POST /api/v1/machines/NAME/approve` `{"fingerprint": "..."}`: an admin approves the keys of NAME's awaiting
/// join (`--join approve`), having compared the fingerprint with the machine's console.
async fn approve(
    State(s): State<HttpState>,
    axum::Extension(caller): axum::Extension<crate::operator::Caller>,
    Path(name): Path<String>,
    axum::Json(body): axum::Json<herd_api::Approval>,
) -> Response {
    if caller.role != herd_pki::Role::Admin {
        s.metrics.inc("herd_api_refused_total", "reason=\"role\"");
        tracing::warn!(caller = %caller.name, role = %caller.role, machine = %name, "approve refused (role)");
        return text(
            StatusCode::FORBIDDEN,
            format!("{} has role {}: approving a machine needs admin\n", caller.name, caller.role),
        );
    }
    if s.joining.as_ref().is_none_or(|j| j.policy != crate::join::JoinPolicy::Approve) {
        return text(
            StatusCode::CONFLICT,
            "this provisioner does not approve joins (start it with --join approve)\n".to_owned(),
        );
    }
    match s.by_address.machines.approve(&name, body.fingerprint.trim(), &caller.name).await {
        Ok(()) => {
            tracing::info!(machine = %name, by = %caller.name, "join approved");
            axum::Json(body).into_response()
        }
        Err(MachinesError::JoinRefused(_)) => text(
            StatusCode::CONFLICT,
            format!(
                "{name} has no join awaiting approval with keys {}: see herdctl machine timeline {name}\n",
                body.fingerprint
            ),
        ),
        Err(e) => machines_error(&e),
    }
}

/// `POST /api/v1/pki/rotate`: an admin begins rotating the site's etcd CA (the rotation keeper takes it on).
async fn rotate(
    State(s): State<HttpState>,
    axum::Extension(caller): axum::Extension<crate::operator::Caller>,
) -> Response {
    if caller.role != herd_pki::Role::Admin {
        s.metrics.inc("herd_api_refused_total", "reason=\"role\"");
        tracing::warn!(caller = %caller.name, role = %caller.role, "pki rotate refused (role)");
        return text(
            StatusCode::FORBIDDEN,
            format!("{} has role {}: rotating the site's CA needs admin\n", caller.name, caller.role),
        );
    }
    let Some(joining) = s.joining.as_ref().filter(|j| j.rotation_keeper) else {
        return text(
            StatusCode::CONFLICT,
            "this provisioner does not rotate the site's CA: it needs --site-pki and --etcd-access auto\n".to_owned(),
        );
    };
    let now = time::OffsetDateTime::now_utc();
    match joining.rotate(|site| site.begin_rotation(herd_pki::Authority::Etcd, now)) {
        Ok(next) => {
            tracing::info!(by = %caller.name, ca = %next.common_name, "etcd CA rotation begun: machines learn the next CA");
            let mut seen = joining.rotation_status();
            seen.machines.iter_mut().for_each(|m| m.trusts = false);
            let fresh = crate::rotation::status(
                &joining.site(),
                seen.machines,
                Some("every registered machine to trust the next CA".to_owned()),
            );
            joining.set_rotation_status(fresh.clone());
            (StatusCode::ACCEPTED, axum::Json(fresh)).into_response()
        }
        Err(e @ herd_pki::PkiError::Rotation { .. }) => text(StatusCode::CONFLICT, format!("{e}\n")),
        Err(e) => {
            tracing::error!(error = %e, "cannot begin the etcd CA rotation");
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    }
}

/// `GET /api/v1/pki/rotation`: where the rotation of the site's etcd CA stands.
async fn rotation(State(s): State<HttpState>) -> Response {
    match &s.joining {
        Some(joining) => axum::Json(joining.rotation_status()).into_response(),
        None => text(StatusCode::NOT_FOUND, "this provisioner holds no site PKI (--site-pki)\n".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::{SlotReport, boot_files, byte_range, files_cmdline};
    use herd_images::build::ImageManifest;
    use herd_images::gpt::SlotFlags;
    use herd_images::slot::{MAGIC, Slot, SlotHeader, SlotState};

    fn image(dir: &std::path::Path, hash: &str, kernel: &str) {
        std::fs::create_dir_all(dir).unwrap();
        let manifest = ImageManifest::for_tests(hash, &format!("console=ttyS0 herd.verity.roothash={hash}"));
        std::fs::write(dir.join("manifest.json"), serde_json::to_string(&manifest).unwrap()).unwrap();
        std::fs::write(dir.join("vmlinuz"), kernel).unwrap();
        std::fs::write(dir.join("initramfs"), kernel).unwrap();
    }

    fn slot(slot: Slot, hash: &str, priority: u8, successful: bool) -> SlotState {
        let header = SlotHeader {
            magic: MAGIC.into(),
            name: "herd-os".into(),
            release: hash[..4].into(),
            key: String::new(),
            kernel_version: "6.12".into(),
            root_hash: hash.into(),
            data_bytes: 0,
            hash_offset: 0,
        };
        SlotState {
            slot,
            flags: SlotFlags { priority, tries: 0, successful },
            header: Some(header),
            offset: 0,
            size: 0,
        }
    }

    #[test]
    fn a_local_boot_gets_its_next_slots_kernel_and_both_kept_root_hashes() {
        let assets = std::env::temp_dir().join(format!("herd-http-slots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&assets);
        let (old, new, foreign) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        // The old release was served first (and kept), the new one is served now.
        image(&assets, &old, "old kernel");
        assert_eq!(crate::images::keep_served(&assets).as_deref(), Some(old.as_str()));
        image(&assets, &new, "new kernel");
        let served = crate::images::keep_served(&assets);
        assert_eq!(served.as_deref(), Some(new.as_str()));

        // Slot A (old, good, higher priority) boots next; B holds an image this provisioner never served.
        let report = SlotReport {
            disk: "/dev/vda".into(),
            booted: Slot::A,
            slots: vec![slot(Slot::A, &old, 2, true), slot(Slot::B, &foreign, 1, true)],
        };
        let (files, note) = boot_files(&assets, served.as_deref(), Some(&report));
        assert_eq!(files, format!("images/{old}/"));
        assert!(note.contains("slot a"), "{note}");
        assert_eq!(std::fs::read_to_string(assets.join(&files).join("vmlinuz")).unwrap(), "old kernel");
        let args = files_cmdline(&assets, &files, served.as_deref(), Some(&report));
        let trusted: Vec<&String> = args.iter().filter(|a| a.starts_with("herd.verity.roothash=")).collect();
        assert_eq!(trusted, [&format!("herd.verity.roothash={new},{old}")], "never the foreign hash: {args:?}");

        // The new release in B, to be tried first: the served files, both hashes.
        let report = SlotReport {
            disk: "/dev/vda".into(),
            booted: Slot::A,
            slots: vec![slot(Slot::A, &old, 1, true), slot(Slot::B, &new, 2, false)],
        };
        let mut tried = report.clone();
        tried.slots[1].flags.tries = 1;
        let (files, _) = boot_files(&assets, served.as_deref(), Some(&tried));
        assert_eq!(files, "", "the served image's own files");
        // Without a table (an install, or nothing reported yet): the served image only.
        assert_eq!(boot_files(&assets, served.as_deref(), None).0, "");
        let args = files_cmdline(&assets, "", served.as_deref(), None);
        assert!(args.contains(&format!("herd.verity.roothash={new}")), "{args:?}");
        std::fs::remove_dir_all(&assets).unwrap();
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range("bytes=0-99", 1000), Some((0, 100)));
        assert_eq!(byte_range("bytes=900-", 1000), Some((900, 1000)));
        assert_eq!(byte_range("bytes=-100", 1000), Some((900, 1000)));
        assert_eq!(byte_range("bytes=990-2000", 1000), Some((990, 1000)));
        assert_eq!(byte_range("bytes=1000-", 1000), None);
        assert_eq!(byte_range("bytes=5-1", 1000), None);
        assert_eq!(byte_range("bytes=0-1,5-6", 1000), None);
        assert_eq!(byte_range("items=0-1", 1000), None);
    }
}
