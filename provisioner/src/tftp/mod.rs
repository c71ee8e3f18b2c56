//! TFTP for PXE ROMs: RFC 1350 read-only, with options (RFC 2347 OACK), blksize (RFC 2348, clamped to the
//! interface MTU), tsize and timeout (RFC 2349) and windowsize (RFC 7440).
//!
//! Each transfer is a tokio task on its own ephemeral port (no thread per client); a semaphore caps concurrent
//! transfers. Files are served from a shared in-memory cache (500 clients fetching the same NBP share one copy).
//! Paths never leave the root: `..` is refused, a leading `/` is taken relative to the root, symlinks that resolve
//! outside it are refused, only regular files are served. Write requests are refused. The PXE ROM habit of asking
//! for `tsize`, reading the OACK and aborting with error 8 ends the transfer cleanly.

pub mod packet;

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::files::FileCache;
use crate::metrics::Metrics;
use packet::{ClientPacket, Mode, code};

/// The TFTP port.
pub const PORT: u16 = 69;
/// Largest file served over TFTP (kernels and images go over HTTP).
pub const MAX_FILE: usize = 64 << 20;

/// Server settings.
#[derive(Debug, Clone)]
pub struct TftpConfig {
    /// Directory served.
    pub root: PathBuf,
    /// Address transfer sockets bind to.
    pub bind_ip: Ipv4Addr,
    /// Largest block size granted (interface MTU − IP, UDP and TFTP headers).
    pub max_blksize: u16,
    /// Largest window granted.
    pub max_window: u16,
    /// Concurrent transfers allowed.
    pub max_transfers: usize,
    /// Retransmission timeout when the client does not ask for one.
    pub timeout: Duration,
    /// The longest `timeout` option granted (RFC 2349 lets a client ask for up to 255 s; with the retries, that
    /// would hold a transfer slot for 20 minutes): a larger one is not acknowledged and the default applies.
    pub max_timeout: Duration,
    /// Retransmissions of one packet before giving up.
    pub retries: u32,
    /// The longest a transfer may take in all, however it is paced (an iPXE binary takes well under a second).
    pub max_transfer: Duration,
}

impl TftpConfig {
    /// Defaults for a root and address, with the block size fitting `mtu`.
    pub fn new(root: PathBuf, bind_ip: Ipv4Addr, mtu: u16) -> Self {
        TftpConfig {
            root,
            bind_ip,
            max_blksize: mtu.saturating_sub(20 + 8 + 4).max(512),
            max_window: 64,
            max_transfers: 1024,
            timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(5),
            retries: 5,
            max_transfer: Duration::from_secs(300),
        }
    }
}

/// The MTU of an interface, from sysfs (1500 if unknown).
pub fn interface_mtu(interface: &str) -> u16 {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1500)
}

/// Why a request is refused, as a TFTP error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// TFTP error code.
    pub code: u16,
    /// Message sent to the client.
    pub message: String,
    /// Label for metrics.
    pub label: &'static str,
}

fn refuse(code: u16, label: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { code, message: message.into(), label }
}

/// Resolves a requested name inside `root` (which must be canonical), refusing every escape.
pub fn resolve(root: &Path, requested: &str) -> Result<PathBuf, Refusal> {
    let normalized = requested.replace('\\', "/");
    let relative = normalized.trim_start_matches('/');
    let rel = Path::new(relative);
    if relative.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
        return Err(refuse(code::ACCESS, "path-escape", "access violation"));
    }
    let path = root.join(rel);
    let canonical = match path.canonicalize() {
        Ok(p) => p,
        Err(_) => return Err(refuse(code::NOT_FOUND, "not-found", "file not found")),
    };
    if !canonical.starts_with(root) {
        return Err(refuse(code::ACCESS, "path-escape", "access violation"));
    }
    if !canonical.is_file() {
        return Err(refuse(code::NOT_FOUND, "not-found", "file not found"));
    }
    Ok(canonical)
}

/// Converts text to netascii: LF → CR LF, CR → CR NUL.
fn to_netascii(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 16);
    for &b in data {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            other => out.push(other),
        }
    }
    out
}

/// Negotiated transfer parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Data bytes per block.
    pub blksize: u16,
    /// Blocks sent before waiting for an ACK.
    pub window: u16,
    /// Retransmission timeout.
    pub timeout: Duration,
}

/// Negotiates options (RFC 2347-2349, 7440); returns the parameters and the options to acknowledge (empty: no
/// OACK, plain RFC 1350).
pub fn negotiate(
    options: &BTreeMap<String, String>,
    size: u64,
    config: &TftpConfig,
) -> (Negotiated, BTreeMap<String, String>) {
    let mut n = Negotiated { blksize: 512, window: 1, timeout: config.timeout };
    let mut ack = BTreeMap::new();
    if let Some(v) = options.get("blksize").and_then(|v| v.parse::<u32>().ok())
        && (8..=65464).contains(&v)
    {
        n.blksize = (v as u16).min(config.max_blksize);
        ack.insert("blksize".into(), n.blksize.to_string());
    }
    if options.contains_key("tsize") {
        ack.insert("tsize".into(), size.to_string());
    }
    if let Some(v) = options.get("timeout").and_then(|v| v.parse::<u64>().ok())
        && (1..=255).contains(&v)
        && Duration::from_secs(v) <= config.max_timeout
    {
        n.timeout = Duration::from_secs(v);
        ack.insert("timeout".into(), v.to_string());
    }
    if let Some(v) = options.get("windowsize").and_then(|v| v.parse::<u32>().ok())
        && (1..=65535).contains(&v)
    {
        n.window = (v as u16).min(config.max_window);
        ack.insert("windowsize".into(), n.window.to_string());
    }
    (n, ack)
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Every block acknowledged.
    Complete,
    /// The client aborted (error packet), e.g. after a tsize probe.
    Aborted,
    /// The client stopped answering.
    TimedOut,
    /// A socket failed.
    Failed,
}

/// Called when a transfer ends: peer address, file, how it ended.
pub type OnTransfer = Arc<dyn Fn(SocketAddr, &str, Ending) + Send + Sync>;

/// The TFTP server.
pub struct TftpServer {
    config: Arc<TftpConfig>,
    socket: UdpSocket,
    cache: Arc<FileCache>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    on_transfer: Option<OnTransfer>,
}

impl std::fmt::Debug for TftpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TftpServer").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Describes the TFTP metrics.
pub fn describe_metrics(m: &Metrics) {
    m.describe("herd_tftp_requests_total", "TFTP requests, by kind.");
    m.describe("herd_tftp_refused_total", "Requests refused, by reason.");
    m.describe("herd_tftp_dropped_total", "Datagrams dropped as malformed, by reason.");
    m.describe("herd_tftp_transfers_total", "Transfers ended, by outcome.");
    m.describe(
        "herd_tftp_strangers_total",
        "Packets to a transfer's port from another address or port (answered with ERROR 5).",
    );
    m.describe("herd_tftp_bytes_total", "File bytes sent in completed transfers.");
}

impl TftpServer {
    /// A server on an already bound port-69 socket. `config.root` is canonicalized.
    pub fn new(
        mut config: TftpConfig,
        socket: UdpSocket,
        cache: Arc<FileCache>,
        metrics: Arc<Metrics>,
    ) -> io::Result<Self> {
        config.root = config.root.canonicalize()?;
        describe_metrics(&metrics);
        let permits = Arc::new(Semaphore::new(config.max_transfers));
        Ok(TftpServer { config: Arc::new(config), socket, cache, metrics, permits, on_transfer: None })
    }

    /// Calls `hook` when each transfer ends (the daemon records it in the machine's timeline).
    pub fn on_transfer(mut self, hook: OnTransfer) -> Self {
        self.on_transfer = Some(hook);
        self
    }

    /// Serves until `cancel` fires; running transfers finish or time out.
    pub async fn run(self, cancel: CancellationToken) {
        let tracker = TaskTracker::new();
        let mut buf = vec![0u8; 2048];
        loop {
            let (len, from) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "tftp receive failed");
                        continue;
                    }
                },
            };
            match packet::parse(&buf[..len]) {
                Ok(ClientPacket::Read { file, mode, options }) => {
                    self.metrics.inc("herd_tftp_requests_total", "kind=\"read\"");
                    let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
                        self.metrics.inc("herd_tftp_refused_total", "reason=\"busy\"");
                        let _ = self.socket.send_to(&packet::error(code::UNDEFINED, "server busy, retry"), from).await;
                        continue;
                    };
                    let (config, cache, metrics) =
                        (Arc::clone(&self.config), Arc::clone(&self.cache), Arc::clone(&self.metrics));
                    let hook = self.on_transfer.clone();
                    tracker.spawn(async move {
                        let ending = serve(config, cache, metrics, from, &file, mode, options).await;
                        if let (Some(hook), Some(ending)) = (hook, ending) {
                            hook(from, &file, ending);
                        }
                        drop(permit);
                    });
                }
                Ok(ClientPacket::Write { file }) => {
                    self.metrics.inc("herd_tftp_requests_total", "kind=\"write\"");
                    self.metrics.inc("herd_tftp_refused_total", "reason=\"write\"");
                    tracing::debug!(%from, %file, "tftp write refused");
                    let _ = self.socket.send_to(&packet::error(code::ACCESS, "read-only server"), from).await;
                }
                Ok(ClientPacket::Ack(_) | ClientPacket::Error { .. }) => {
                    self.metrics.inc("herd_tftp_dropped_total", "reason=\"stray\"");
                }
                Err(e) => {
                    self.metrics.inc("herd_tftp_dropped_total", &format!("reason=\"{}\"", e.label()));
                }
            }
        }
        tracker.close();
        tracker.wait().await;
    }
}

/// Serves one read request; returns how the transfer ended (None if it never started).
async fn serve(
    config: Arc<TftpConfig>,
    cache: Arc<FileCache>,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
    file: &str,
    mode: Mode,
    options: BTreeMap<String, String>,
) -> Option<Ending> {
    let socket = match UdpSocket::bind((config.bind_ip, 0)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot bind a tftp transfer socket");
            return None;
        }
    };
    // Not connected: a packet from anyone but the peer must reach us, to be answered with ERROR 5 (RFC 1350 §4).
    let link = Link { socket: &socket, peer, metrics: &metrics };
    let content = match resolve(&config.root, file) {
        Ok(path) => match cache.get(&path, MAX_FILE).await {
            Ok(Some(data)) => data,
            Ok(None) => {
                metrics.inc("herd_tftp_refused_total", "reason=\"too-large\"");
                let _ = link.send(&packet::error(code::UNDEFINED, "file too large for TFTP; boot it over HTTP")).await;
                return None;
            }
            Err(e) => {
                metrics.inc("herd_tftp_refused_total", "reason=\"unreadable\"");
                let _ = link.send(&packet::error(code::UNDEFINED, &e.to_string())).await;
                return None;
            }
        },
        Err(refusal) => {
            metrics.inc("herd_tftp_refused_total", &format!("reason=\"{}\"", refusal.label));
            tracing::debug!(%peer, %file, reason = refusal.label, "tftp read refused");
            let _ = link.send(&packet::error(refusal.code, &refusal.message)).await;
            return None;
        }
    };
    let content: bytes::Bytes = match mode {
        Mode::Octet => content,
        Mode::Netascii => to_netascii(&content).into(),
    };
    let (negotiated, oack) = negotiate(&options, content.len() as u64, &config);
    let sending = send_file(&link, &content, negotiated, (!oack.is_empty()).then_some(oack), config.retries);
    let ending = tokio::time::timeout(config.max_transfer, sending).await.unwrap_or(Ending::TimedOut);
    let label = match ending {
        Ending::Complete => {
            metrics.add("herd_tftp_bytes_total", "", content.len() as u64);
            "outcome=\"complete\""
        }
        Ending::Aborted => "outcome=\"aborted\"",
        Ending::TimedOut => "outcome=\"timed-out\"",
        Ending::Failed => "outcome=\"failed\"",
    };
    metrics.inc("herd_tftp_transfers_total", label);
    tracing::debug!(%peer, %file, ?ending, bytes = content.len(), "tftp transfer ended");
    Some(ending)
}

/// What the client said while we waited.
enum Reply {
    Ack(u16),
    Abort,
    Timeout,
    Failed,
}

/// One transfer's socket and the client it serves.
struct Link<'a> {
    /// The transfer's own socket (its port is the server's TID), not connected.
    socket: &'a UdpSocket,
    /// The client's address and port (its TID).
    peer: SocketAddr,
    /// Where strangers are counted.
    metrics: &'a Metrics,
}

impl Link<'_> {
    async fn send(&self, packet: &[u8]) -> std::io::Result<usize> {
        self.socket.send_to(packet, self.peer).await
    }

    /// The client's next reply within `timeout`. A packet from any other address or port is not the client's:
    /// it gets ERROR 5 and is counted, and the transfer goes on (RFC 1350 §4).
    async fn reply(&self, timeout: Duration, buf: &mut [u8]) -> Reply {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.socket.recv_from(buf)).await {
                Err(_) => return Reply::Timeout,
                Ok(Err(_)) => return Reply::Failed,
                Ok(Ok((_, from))) if from != self.peer => {
                    self.metrics.inc("herd_tftp_strangers_total", "");
                    tracing::debug!(%from, peer = %self.peer, "tftp packet from a stranger to a transfer port");
                    let _ = self.socket.send_to(&packet::error(code::UNKNOWN_TID, "unknown transfer ID"), from).await;
                }
                Ok(Ok((n, _))) => match packet::parse(&buf[..n]) {
                    Ok(ClientPacket::Ack(block)) => return Reply::Ack(block),
                    Ok(ClientPacket::Error { .. }) => return Reply::Abort,
                    // Anything else from the peer on this port is ignored (RFC 1350 leaves it to us).
                    _ => continue,
                },
            }
        }
    }
}

/// Sends `content` in windows of blocks (go-back-N on a short ACK, RFC 7440), after an OACK if options were
/// negotiated. Block numbers wrap at 65536, so files beyond 65535 blocks work with clients that roll over.
async fn send_file(
    link: &Link<'_>,
    content: &[u8],
    n: Negotiated,
    oack: Option<BTreeMap<String, String>>,
    retries: u32,
) -> Ending {
    let mut buf = vec![0u8; 1024];
    if let Some(options) = oack {
        let oack = packet::oack(&options);
        let mut tries = 0;
        loop {
            if link.send(&oack).await.is_err() {
                return Ending::Failed;
            }
            match link.reply(n.timeout, &mut buf).await {
                Reply::Ack(0) => break,
                Reply::Ack(_) => continue,
                Reply::Abort => return Ending::Aborted,
                Reply::Failed => return Ending::Failed,
                Reply::Timeout => {
                    tries += 1;
                    if tries > retries {
                        return Ending::TimedOut;
                    }
                }
            }
        }
    }
    let blksize = usize::from(n.blksize);
    // The last block is shorter than blksize, possibly empty.
    let total = (content.len() / blksize + 1) as u64;
    let mut acked: u64 = 0;
    let mut tries = 0;
    let mut packet = Vec::with_capacity(blksize + 4);
    while acked < total {
        let last = (acked + u64::from(n.window)).min(total);
        for block in acked + 1..=last {
            let start = ((block - 1) as usize) * blksize;
            let end = (start + blksize).min(content.len());
            packet::data(&mut packet, block as u16, &content[start..end]);
            if link.send(&packet).await.is_err() {
                return Ending::Failed;
            }
        }
        loop {
            match link.reply(n.timeout, &mut buf).await {
                Reply::Ack(block) => {
                    // Map the 16-bit ACK onto the window just sent.
                    let delta = u64::from(block.wrapping_sub(acked as u16));
                    if delta == 0 && n.window > 1 {
                        // With windows, a repeated ACK means the window was lost: resend it now.
                        break;
                    }
                    if delta == 0 || delta > last - acked {
                        // Lockstep duplicate (ignored, against the Sorcerer's Apprentice) or a stale ACK.
                        continue;
                    }
                    acked += delta;
                    tries = 0;
                    break;
                }
                Reply::Abort => return Ending::Aborted,
                Reply::Failed => return Ending::Failed,
                Reply::Timeout => {
                    tries += 1;
                    if tries > retries {
                        return Ending::TimedOut;
                    }
                    break;
                }
            }
        }
    }
    Ending::Complete
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> TftpConfig {
        TftpConfig::new(PathBuf::from("/nonexistent"), Ipv4Addr::LOCALHOST, 1500)
    }

    #[test]
    fn blksize_is_clamped_to_the_mtu_and_windowsize_to_the_maximum() {
        let opts: BTreeMap<String, String> =
            [("blksize", "65464"), ("windowsize", "1000"), ("tsize", "0"), ("timeout", "3"), ("bogus", "1")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        let (n, ack) = negotiate(&opts, 4242, &config());
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.window, 64);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert_eq!(ack["tsize"], "4242");
        assert_eq!(ack["blksize"], "1468");
        assert!(!ack.contains_key("bogus"));
    }

    #[test]
    fn out_of_range_options_are_ignored_not_acknowledged() {
        let opts: BTreeMap<String, String> = [("blksize", "4"), ("windowsize", "0"), ("timeout", "6")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (n, ack) = negotiate(&opts, 1, &config());
        assert!(ack.is_empty());
        assert_eq!((n.blksize, n.window, n.timeout), (512, 1, config().timeout), "timeout 6 s is over the bound");
    }

    #[tokio::test]
    async fn a_client_pacing_its_acks_cannot_hold_a_transfer_past_the_bound() {
        let root = std::env::temp_dir().join(format!("herd-tftp-pace-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("f"), vec![1u8; 512 * 20]).unwrap();
        let mut cfg = TftpConfig::new(root.clone(), Ipv4Addr::LOCALHOST, 1500);
        cfg.max_transfer = Duration::from_millis(400);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = client.local_addr().unwrap();
        // Each ACK comes 100 ms after its block: inside the 1 s retransmission timeout, 2 s for the whole file.
        let pacer = std::thread::spawn(move || {
            client.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = [0u8; 600];
            let mut acks = 0;
            while let Ok((_, from)) = client.recv_from(&mut buf) {
                std::thread::sleep(Duration::from_millis(100));
                let _ = client.send_to(&[0, 4, buf[2], buf[3]], from);
                acks += 1;
            }
            acks
        });
        let metrics = Arc::new(Metrics::default());
        let started = std::time::Instant::now();
        let ending = serve(
            Arc::new(cfg),
            Arc::new(FileCache::default()),
            Arc::clone(&metrics),
            peer,
            "f",
            Mode::Octet,
            BTreeMap::new(),
        )
        .await;
        assert_eq!(ending, Some(Ending::TimedOut));
        assert!(started.elapsed() < Duration::from_secs(2), "ended at the bound, not with the file");
        assert_eq!(metrics.get("herd_tftp_transfers_total", "outcome=\"timed-out\""), 1);
        assert!(pacer.join().unwrap() < 20, "the client never got the whole file");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn paths_cannot_escape_the_root() {
        let root = std::env::temp_dir().join(format!("herd-tftp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/file"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("escape")).unwrap();
        let root = root.canonicalize().unwrap();
        assert!(resolve(&root, "sub/file").is_ok());
        assert!(resolve(&root, "/sub/file").is_ok(), "a leading slash is relative to the root");
        assert!(resolve(&root, "sub\\file").is_ok(), "backslashes from DOS-minded ROMs");
        assert_eq!(resolve(&root, "../etc/passwd").unwrap_err().code, code::ACCESS);
        assert_eq!(resolve(&root, "sub/../../etc/passwd").unwrap_err().code, code::ACCESS);
        assert_eq!(resolve(&root, "escape").unwrap_err().code, code::ACCESS);
        assert_eq!(resolve(&root, "sub").unwrap_err().code, code::NOT_FOUND);
        assert_eq!(resolve(&root, "missing").unwrap_err().code, code::NOT_FOUND);
        assert_eq!(resolve(&root, "").unwrap_err().code, code::ACCESS);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn netascii_converts_line_ends() {
        assert_eq!(to_netascii(b"a\nb\rc"), b"a\r\nb\r\0c");
    }
}
