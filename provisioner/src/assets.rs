//! The boot-asset server: kernels, initramfs and images over HTTP/1.1 with `sendfile(2)`, on its own port.
//!
//! A boot storm is hundreds of machines pulling tens of MiB each. Copying those bytes through user space costs
//! the provisioner most of its CPU (and its memory, for the buffers); the kernel can send them from the page cache
//! directly. This responder speaks just enough HTTP/1.1 for iPXE and node-init: GET and HEAD, one `Range`,
//! keep-alive; everything else gets a 4xx and the connection closes. Paths are confined to the assets directory
//! exactly as TFTP's are.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 << 10;
/// Idle time before a keep-alive connection is closed.
const IDLE: Duration = Duration::from_secs(30);

/// Called for each file served: peer, path below the root, bytes.
pub type OnServe = Arc<dyn Fn(SocketAddr, &str) + Send + Sync>;

/// A parsed request head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    head_only: bool,
    path: String,
    range: Option<String>,
    close: bool,
}

fn parse_head(text: &str) -> Option<Head> {
    let mut lines = text.split("\r\n");
    let mut request = lines.next()?.split(' ');
    let (method, target, version) = (request.next()?, request.next()?, request.next()?);
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return None,
    };
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let path = target.split('?').next()?.to_owned();
    let mut range = None;
    let mut close = version == "HTTP/1.0";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        match name.trim().to_ascii_lowercase().as_str() {
            "range" => range = Some(value.trim().to_owned()),
            "connection" => close = value.trim().eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    Some(Head { head_only, path, range, close })
}

/// Serves `root` on `listener` until cancelled.
pub async fn run(
    listener: TcpListener,
    root: PathBuf,
    metrics: Arc<Metrics>,
    on_serve: Option<OnServe>,
    cancel: CancellationToken,
) {
    metrics.describe("herd_assets_requests_total", "Boot-asset requests, by outcome.");
    metrics.describe("herd_assets_bytes_total", "Boot-asset bytes sent with sendfile.");
    let tracker = TaskTracker::new();
    let permits = Arc::new(Semaphore::new(4096));
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "asset server accept failed");
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            metrics.inc("herd_assets_requests_total", "outcome=\"busy\"");
            continue;
        };
        let (root, metrics, on_serve, cancel) = (root.clone(), Arc::clone(&metrics), on_serve.clone(), cancel.clone());
        tracker.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = connection(stream, peer, &root, &metrics, on_serve.as_ref()) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "asset connection ended");
                    }
                }
            }
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

async fn respond(stream: &mut BufReader<TcpStream>, status: &str, close: bool) -> io::Result<()> {
    let conn = if close { "close" } else { "keep-alive" };
    let text = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: {conn}\r\n\r\n");
    stream.get_mut().write_all(text.as_bytes()).await
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    root: &Path,
    metrics: &Metrics,
    on_serve: Option<&OnServe>,
) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut stream = BufReader::new(stream);
    loop {
        let mut head = String::new();
        // The whole head within IDLE (a client trickling a byte at a time does not hold the connection longer), and
        // never more than MAX_HEAD bytes read for it: a line without an end is cut at the bound, not buffered.
        let deadline = tokio::time::Instant::now() + IDLE;
        loop {
            let mut line = String::new();
            let room = (MAX_HEAD + 1).saturating_sub(head.len()) as u64;
            let mut bounded = (&mut stream).take(room);
            let n = match tokio::time::timeout_at(deadline, bounded.read_line(&mut line)).await {
                Ok(r) => r?,
                Err(_) => return Ok(()),
            };
            if n == 0 {
                return Ok(());
            }
            head.push_str(&line);
            if head.len() > MAX_HEAD {
                metrics.inc("herd_assets_requests_total", "outcome=\"bad-request\"");
                return respond(&mut stream, "431 Request Header Fields Too Large", true).await;
            }
            if line == "\r\n" {
                break;
            }
        }
        let Some(req) = parse_head(head.trim_end_matches("\r\n")) else {
            metrics.inc("herd_assets_requests_total", "outcome=\"bad-request\"");
            return respond(&mut stream, "400 Bad Request", true).await;
        };
        let rel = req.path.trim_start_matches('/').trim_start_matches("assets/").to_owned();
        let path = match crate::tftp::resolve(root, &rel) {
            Ok(p) => p,
            Err(refusal) => {
                let (status, label) = if refusal.code == crate::tftp::packet::code::ACCESS {
                    ("403 Forbidden", "outcome=\"forbidden\"")
                } else {
                    ("404 Not Found", "outcome=\"not-found\"")
                };
                metrics.inc("herd_assets_requests_total", label);
                respond(&mut stream, status, req.close).await?;
                if req.close {
                    return Ok(());
                }
                continue;
            }
        };
        let file = std::fs::File::open(&path)?;
        let len = file.metadata()?.len();
        let (status, start, end) = match req.range.as_deref().map(|r| crate::http::byte_range(r, len as usize)) {
            None => ("200 OK", 0u64, len),
            Some(Some((a, b))) => ("206 Partial Content", a as u64, b as u64),
            Some(None) => {
                metrics.inc("herd_assets_requests_total", "outcome=\"bad-range\"");
                let text = format!(
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\n\r\n"
                );
                stream.get_mut().write_all(text.as_bytes()).await?;
                continue;
            }
        };
        let mut text = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/octet-stream\r\nAccept-Ranges: bytes\r\nContent-Length: {}\r\n",
            end - start
        );
        if status.starts_with("206") {
            text.push_str(&format!("Content-Range: bytes {start}-{}/{len}\r\n", end.saturating_sub(1)));
        }
        text.push_str(if req.close { "Connection: close\r\n\r\n" } else { "Connection: keep-alive\r\n\r\n" });
        stream.get_mut().write_all(text.as_bytes()).await?;
        metrics.inc("herd_assets_requests_total", "outcome=\"served\"");
        if !req.head_only {
            if let Some(hook) = on_serve {
                hook(peer, &rel);
            }
            send(stream.get_ref(), &file, start, end).await?;
            metrics.add("herd_assets_bytes_total", "", end - start);
        }
        if req.close {
            return Ok(());
        }
    }
}

/// Sends `file[start..end]` on a non-blocking socket with sendfile, waiting for writability as needed.
async fn send(stream: &TcpStream, file: &std::fs::File, start: u64, end: u64) -> io::Result<()> {
    let mut offset = start as i64;
    while (offset as u64) < end {
        stream.writable().await?;
        let count = ((end - offset as u64) as usize).min(1 << 30);
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile64(stream.as_fd(), file.as_fd(), Some(&mut offset), count)
                .map_err(io::Error::from)
        }) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than announced")),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads() {
        let h = parse_head("GET /assets/vmlinuz HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9").unwrap();
        assert_eq!(
            h,
            Head { head_only: false, path: "/assets/vmlinuz".into(), range: Some("bytes=0-9".into()), close: false }
        );
        let h = parse_head("HEAD /a?x=1 HTTP/1.0").unwrap();
        assert!(h.head_only && h.close);
        assert_eq!(h.path, "/a");
        assert!(parse_head("POST /a HTTP/1.1").is_none());
        assert!(parse_head("GET /a SPDY/3").is_none());
        assert!(parse_head("").is_none());
    }

    #[tokio::test]
    async fn a_head_without_an_end_is_cut_at_the_bound_and_refused() {
        let dir = std::env::temp_dir().join(format!("herd-assets-bound-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("vmlinuz"), b"kernel").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let cancel = CancellationToken::new();
        let server = tokio::spawn(run(listener, dir.clone(), Arc::clone(&metrics), None, cancel.clone()));
        // 1 MiB of one header line that never ends: answered 431 after at most MAX_HEAD bytes, then closed.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut flood = b"GET /vmlinuz HTTP/1.1\r\nX-Long: ".to_vec();
        flood.resize(1 << 20, b'a');
        // The server stops reading at the bound: the write may fail once it has closed the connection.
        let _ = c.write_all(&flood).await;
        let mut reply = Vec::new();
        let _ = c.read_to_end(&mut reply).await;
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 431 "), "{reply}");
        assert_eq!(metrics.get("herd_assets_requests_total", "outcome=\"bad-request\""), 1);
        // An honest request still works.
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /vmlinuz HTTP/1.1\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut reply = Vec::new();
        c.read_to_end(&mut reply).await.unwrap();
        assert!(String::from_utf8_lossy(&reply).ends_with("\r\n\r\nkernel"));
        cancel.cancel();
        server.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
