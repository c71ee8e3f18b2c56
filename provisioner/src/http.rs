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
use herd_inventory::{Inventory, Mac};
use serde::{Deserialize, Serialize};
use tower::ServiceExt as _;
use tower_http::services::ServeDir;

use crate::ignition;
use crate::machines::{BootMode, ByAddress, MachineState, TimelineEntry};
use crate::metrics::Metrics;

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
        let refusals = Arc::new(LogLimiter { last: Mutex::new(None), every: Duration::from_secs(1) });
        // Canonical once, so confinement checks per request compare against a fixed root (a missing directory
        // stays as given and every request for it is a 404).
        let (assets, ipxe) = (assets.canonicalize().unwrap_or(assets), ipxe.canonicalize().unwrap_or(ipxe));
        HttpState { inv, by_address, assets, ipxe, base, assets_base, metrics, refusals, files }
    }
}

/// The router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/boot/{file}", get(script))
        .route("/assets/{*path}", get(assets).head(assets))
        .route("/ipxe/{*path}", get(ipxe_binary).head(ipxe_binary))
        .route("/config/{mac}", get(config))
        .route("/phone-home/{mac}", post(phone_home))
        .route("/metrics", get(metrics))
        .route("/api/v1/machines", get(list_machines))
        .route("/api/v1/machines/{name}", get(show_machine))
        .route("/api/v1/machines/{name}/timeline", get(timeline))
        .route("/api/v1/machines/{name}/reprovision", post(reprovision))
        .with_state(state)
}

fn parse_mac(s: &str) -> Option<Mac> {
    s.replace('-', ":").parse().ok()
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
        Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
    };
    let mut args: Vec<String> = vec![
        "initrd=initramfs".into(),
        format!("herd.provisioner={}", s.base),
        format!("herd.machine={name}"),
        format!("herd.mac={mac}"),
        format!("herd.token={token}"),
        format!(
            "herd.mode={}",
            match mode {
                BootMode::Install => "install",
                BootMode::Local => "local",
            }
        ),
    ];
    // The image's own command line (console, `ro`, and the verity root hash node-init trusts).
    args.extend(image_cmdline(&s.assets));
    if let Some(role) = s.inv.role_of(machine) {
        args.extend(role.kernel_args.iter().cloned());
    }
    args.extend(machine.kernel_args.iter().cloned());
    let dashed = mac.to_string().replace(':', "-");
    let body = format!(
        "#!ipxe\n# herd: {name} ({mode:?})\nkernel {assets}/assets/vmlinuz {args}\ninitrd {assets}/assets/initramfs\n\
         boot || goto failed\n:failed\necho herd: boot failed; retrying in 10 s\nsleep 10\nchain {base}/boot/{dashed}.ipxe\n",
        assets = s.assets_base,
        base = s.base,
        args = args.join(" "),
    );
    text(StatusCode::OK, body)
}

/// The kernel command line of the image in the assets directory (`manifest.json` from `herdctl image build`),
/// split into words; none when no image is there (test initramfs, or assets not copied yet).
fn image_cmdline(assets: &std::path::Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(assets.join("manifest.json")) else { return Vec::new() };
    let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
        tracing::warn!(dir = %assets.display(), "manifest.json in the assets directory is not JSON; ignoring it");
        return Vec::new();
    };
    manifest["cmdline"].as_str().unwrap_or_default().split_whitespace().map(str::to_owned).collect()
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
    let token_ok = match &q.token {
        Some(t) => s.by_address.machines.check_token(&name, t).await,
        None => false,
    };
    if !token_ok {
        s.by_address.machines.event(&name, "config-refused", format!("from {peer}: wrong token"));
        return s.refuse("wrong-token", &mac_text, peer);
    }
    match ignition::render_machine(&s.inv, &name) {
        Ok(cfg) => {
            s.by_address.machines.event(&name, "config", format!("served to {peer}"));
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], ignition::to_json(&cfg)).into_response()
        }
        Err(e) => {
            tracing::error!(machine = %name, error = %format!("{e:#}"), "cannot render config");
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    }
}

/// Body of a phone-home.
#[derive(Debug, Deserialize)]
struct PhoneHome {
    stage: String,
    #[serde(default)]
    detail: String,
}

async fn phone_home(
    State(s): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(mac_text): Path<String>,
    Query(q): Query<TokenQuery>,
    axum::Json(body): axum::Json<PhoneHome>,
) -> Response {
    s.metrics.inc("herd_http_requests_total", "route=\"phone-home\"");
    let Some(name) = parse_mac(&mac_text).and_then(|m| s.by_address.macs.get(&m).cloned()) else {
        return s.refuse("unknown-mac", &mac_text, peer);
    };
    let token_ok = match &q.token {
        Some(t) => s.by_address.machines.check_token(&name, t).await,
        None => false,
    };
    if !token_ok {
        return s.refuse("wrong-token", &mac_text, peer);
    }
    let stage: String = body.stage.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
    let detail: String = body.detail.chars().take(512).collect();
    match s.by_address.machines.phone_home(&name, &stage, &detail).await {
        Ok(state) => axum::Json(serde_json::json!({ "machine": name, "state": state })).into_response(),
        Err(e) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

/// A machine as the API lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
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

async fn list_machines(State(s): State<HttpState>) -> Response {
    let records = s.by_address.machines.list().await;
    let list: Vec<MachineSummary> = s
        .inv
        .machines
        .iter()
        .map(|m| {
            let name = m.name().to_string();
            let record = records.get(&name);
            MachineSummary {
                state: record.map(|r| r.state).unwrap_or_default(),
                last: record.and_then(|r| r.timeline.last().cloned()),
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
    axum::Json(serde_json::json!({
        "name": name,
        "state": record.state,
        "fqdn": s.inv.fqdn(m),
        "role": m.role.get_ref().to_string(),
        "rack": m.rack.get_ref().to_string(),
        "macs": m.macs().map(|x| x.to_string()).collect::<Vec<_>>(),
        "address": m.internal.get_ref().to_string(),
        "leased": m.macs().find_map(|x| s.by_address.leases.of(x)).map(|ip| ip.to_string()),
        "timeline_entries": record.timeline.len(),
    }))
    .into_response()
}

async fn timeline(State(s): State<HttpState>, Path(name): Path<String>) -> Response {
    match s.by_address.machines.get(&name).await {
        Some(record) => axum::Json(record.timeline).into_response(),
        None => text(StatusCode::NOT_FOUND, format!("no machine {name:?}\n")),
    }
}

async fn reprovision(State(s): State<HttpState>, Path(name): Path<String>) -> Response {
    match s.by_address.machines.reprovision(&name).await {
        Ok(state) => axum::Json(serde_json::json!({ "machine": name, "state": state })).into_response(),
        Err(e) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
    }
}

#[cfg(test)]
mod tests {
    use super::byte_range;

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
