//! The operator API's door: HTTPS with the site's api CA (docs/security.md).
//!
//! The provisioner serves `/api/v1` on its own TLS listener with a server certificate from the api CA
//! (`herdctl pki issue server NAME --ip ADDR`). A caller is authenticated by a client certificate from that CA
//! naming an operator (`operator:NAME`, role in the organization), or by a bearer token (for automation) whose
//! SHA-256 is in the tokens file; everything else is refused, counted, and logged without the secret. Reads need
//! any operator role; every mutating request needs `operator` or `admin` (default deny: a method not known to
//! be a read is a change).
//!
//! The tokens file (`api_tokens`) holds hashes only, so reading it gives no credential:
//!
//! ```toml
//! version = 1
//! [[token]]
//! name = "ci"
//! role = "operator"
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use herd_pki::{Holder, Role};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `operator:NAME` (a certificate) or `token:NAME` (a bearer token).
    pub name: String,
    /// What they may do.
    pub role: Role,
}

/// The client certificate a connection presented (verified by rustls against the api CA), read.
#[derive(Debug, Clone, Default)]
pub struct Peer(pub Option<Holder>);

/// How long a TLS handshake may take.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// How many operator connections are served at once.
const CONNECTIONS: usize = 64;

/// Bearer tokens, by the hex SHA-256 of the token.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, Caller>);

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    version: u32,
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: String,
    sha256: String,
}

impl Tokens {
    /// Reads a tokens file; every entry is checked (a name, a role, 64 hex digits).
    pub fn load(path: &Path) -> anyhow::Result<Tokens> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let file: TokensFile =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        anyhow::ensure!(
            file.version == 1,
            "{}: version {} is not supported; use version = 1",
            path.display(),
            file.version
        );
        let mut out = HashMap::new();
        for (i, t) in file.token.iter().enumerate() {
            let at = format!("{}: token[{i}]", path.display());
            anyhow::ensure!(herd_pki::is_name(&t.name), "{at}: name {:?}: use 1-63 of a-z, 0-9 and '-'", t.name);
            let role: Role = t.role.parse().map_err(|e: String| anyhow::anyhow!("{at}: {e}"))?;
            let hash = t.sha256.to_ascii_lowercase();
            anyhow::ensure!(
                hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
                "{at}: sha256 must be 64 hex digits (the token's SHA-256, never the token)"
            );
            out.insert(hash, Caller { name: format!("token:{}", t.name), role });
        }
        Ok(Tokens(out))
    }

    fn find(&self, token: &str) -> Option<&Caller> {
        self.0.get(&herd_api::token_hash(token))
    }
}

/// What the door needs.
#[derive(Debug, Clone)]
pub struct Door {
    tokens: Arc<Tokens>,
    metrics: Arc<Metrics>,
}

impl Door {
    /// A door letting in `tokens` and the api CA's operator certificates.
    pub fn new(tokens: Tokens, metrics: Arc<Metrics>) -> Door {
        metrics.describe("herd_api_refused_total", "Operator API requests refused, by reason.");
        metrics.describe("herd_api_requests_total", "Operator API requests let in, by role.");
        Door { tokens: Arc::new(tokens), metrics }
    }

    /// Who `request` comes from, if anyone herd knows.
    fn caller(&self, request: &Request) -> Result<Caller, &'static str> {
        let bearer = request.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap_or_default());
        if let Some(value) = bearer {
            let token = value.strip_prefix("Bearer ").ok_or("malformed-authorization")?;
            return self.tokens.find(token.trim()).cloned().ok_or("unknown-token");
        }
        match request.extensions().get::<Peer>().and_then(|p| p.0.clone()) {
            Some(Holder::Operator(name, role)) => Ok(Caller { name: format!("operator:{name}"), role }),
            Some(_) => Err("not-an-operator"),
            None => Err("no-credential"),
        }
    }
}

/// Whether a method only reads.
fn reads(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// The middleware in front of every operator route: authenticate, authorize by role, count.
pub async fn require(State(door): State<Door>, mut request: Request, next: Next) -> Response {
    let caller = match door.caller(&request) {
        Ok(c) => c,
        Err(reason) => {
            door.metrics.inc("herd_api_refused_total", &format!("reason=\"{reason}\""));
            tracing::warn!(reason, path = %request.uri().path(), "operator API: refused an unauthenticated request");
            return refuse(
                StatusCode::UNAUTHORIZED,
                "an operator credential is required: herdctl --credentials DIR (a client certificate from the site's api CA) or a bearer token",
            );
        }
    };
    let allowed = reads(request.method()) || matches!(caller.role, Role::Admin | Role::Operator);
    if !allowed {
        door.metrics.inc("herd_api_refused_total", "reason=\"role\"");
        tracing::warn!(caller = %caller.name, role = %caller.role, method = %request.method(), path = %request.uri().path(), "operator API: refused (role)");
        return refuse(
            StatusCode::FORBIDDEN,
            &format!("{} has role {}: changes need role operator or admin", caller.name, caller.role),
        );
    }
    door.metrics.inc("herd_api_requests_total", &format!("role=\"{}\"", caller.role));
    request.extensions_mut().insert(caller);
    next.run(request).await
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{message}\n")).into_response()
}

/// The server's TLS settings from a credential directory (`api.crt`, `api.key`, `api-ca.crt`): its certificate,
/// and client certificates verified against the api CA (optional, so that a bearer token can be used instead).
pub fn tls_config(dir: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let (cert, key, ca) = (dir.join("api.crt"), dir.join("api.key"), dir.join("api-ca.crt"));
    herd_pki::check_private(&key)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| anyhow::anyhow!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca).map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))? {
        roots.add(c.map_err(|e| anyhow::anyhow!("{}: {e}", ca.display()))?).context("the api CA certificate")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("cannot verify client certificates against the api CA")?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .with_context(|| format!("{} and its key do not make a server certificate", cert.display()))?;
    Ok(config)
}

/// Serves `app` over TLS on `listener` until `cancel`: each connection's client certificate (if any) is read
/// into a [`Peer`] for [`require`]. Handshakes are bounded in time and connections in number.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: rustls::ServerConfig,
    app: axum::Router,
    cancel: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS));
    loop {
        let (tcp, peer) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "operator API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let (acceptor, app, cancel) = (acceptor.clone(), app.clone(), cancel.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let stream = match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "operator API: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let holder = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| herd_pki::parse_der(der.as_ref()).ok())
                .and_then(|info| info.holder);
            let app = app.layer(axum::Extension(Peer(holder)));
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let serving = conn.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                r = serving => if let Err(e) = r { tracing::debug!(%peer, error = %e, "operator API connection ended") },
                () = cancel.cancelled() => {}
            }
        });
    }
}
