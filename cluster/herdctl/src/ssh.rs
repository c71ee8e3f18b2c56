//! SSH to machines (ssh2): run a command and stream its output, and tunnel TCP connections (for `--tunnel`: etcd
//! behind a bastion or a master's external address).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use ssh2::{CheckResult, KnownHostFileKind, Session};

/// How to log in.
#[derive(Debug, Clone)]
pub(crate) struct Login {
    pub(crate) user: String,
    pub(crate) port: u16,
    pub(crate) identity: Option<PathBuf>,
}

/// Splits `[USER@]HOST[:PORT]`.
pub(crate) fn parse_target(spec: &str, login: &Login) -> (String, String, u16) {
    let (user, rest) = spec.split_once('@').map_or((login.user.clone(), spec), |(u, r)| (u.to_owned(), r));
    match rest.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (user, h.to_owned(), port),
            Err(_) => (user, rest.to_owned(), login.port),
        },
        _ => (user, rest.to_owned(), login.port),
    }
}

/// Opens an authenticated session to `host`.
pub(crate) fn connect(host: &str, port: u16, user: &str, identity: Option<&Path>) -> anyhow::Result<Session> {
    let tcp = TcpStream::connect((host, port)).with_context(|| format!("cannot reach {host}:{port} over SSH"))?;
    let mut session = Session::new()?;
    session.set_tcp_stream(tcp);
    session.handshake().with_context(|| format!("SSH handshake with {host}:{port}"))?;
    check_host_key(&session, host, port)?;
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let mut tried = Vec::new();
    if let Some(key) = identity {
        tried.push(key.display().to_string());
        session
            .userauth_pubkey_file(user, None, key, None)
            .with_context(|| format!("SSH login as {user}@{host} with {}", key.display()))?;
    } else {
        if session.userauth_agent(user).is_err() {
            tried.push("the SSH agent".into());
        }
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            if session.authenticated() {
                break;
            }
            let key = home.join(".ssh").join(name);
            if key.exists() {
                tried.push(key.display().to_string());
                let _ = session.userauth_pubkey_file(user, None, &key, None);
            }
        }
    }
    if !session.authenticated() {
        bail!(
            "SSH login as {user}@{host}:{port} refused (tried {}); pass --ssh-identity FILE or --ssh-user USER",
            tried.join(", ")
        );
    }
    Ok(session)
}

/// Refuses a host whose key differs from `~/.ssh/known_hosts`; a host not listed there is accepted (machines are
/// reinstalled often, and their keys come from the provisioner's configs).
fn check_host_key(session: &Session, host: &str, port: u16) -> anyhow::Result<()> {
    let Some((key, _)) = session.host_key() else { bail!("{host} sent no host key") };
    let mut known = session.known_hosts()?;
    let file = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default().join(".ssh/known_hosts");
    if file.exists() {
        let _ = known.read_file(&file, KnownHostFileKind::OpenSSH);
    }
    match known.check_port(host, port, key) {
        CheckResult::Mismatch => bail!(
            "the SSH host key of {host}:{port} does not match {} (reinstalled machine? remove its old line)",
            file.display()
        ),
        CheckResult::Match | CheckResult::NotFound | CheckResult::Failure => Ok(()),
    }
}

/// Quotes words for a POSIX shell.
pub(crate) fn shell_quote(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            if !w.is_empty() && w.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b)) {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `command` on the session, copying its stdout and stderr to ours; returns its exit status.
/// Runs `command` and returns its exit status, discarding its output.
pub(crate) fn run_quiet(session: &Session, command: &str) -> anyhow::Result<i32> {
    use std::io::Read as _;
    let mut channel = session.channel_session()?;
    channel.exec(command).with_context(|| format!("running {command:?}"))?;
    let mut sink = Vec::new();
    channel.read_to_end(&mut sink)?;
    channel.stderr().read_to_end(&mut sink)?;
    channel.wait_close()?;
    Ok(channel.exit_status()?)
}

pub(crate) fn run(session: &Session, command: &str) -> anyhow::Result<i32> {
    let mut channel = session.channel_session()?;
    channel.exec(command).with_context(|| format!("running {command:?}"))?;
    let mut stderr = channel.stderr();
    let mut buf = [0u8; 16 * 1024];
    session.set_blocking(false);
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    loop {
        let mut progressed = false;
        for (stream, sink) in [(&mut channel as &mut dyn Read, &mut out as &mut dyn Write), (&mut stderr, &mut err)] {
            match stream.read(&mut buf) {
                Ok(0) => {}
                Ok(n) => {
                    sink.write_all(&buf[..n])?;
                    sink.flush()?;
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
        if channel.eof() && !progressed {
            break;
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    session.set_blocking(true);
    channel.wait_close()?;
    Ok(channel.exit_status()?)
}

/// Local ports forwarded through one SSH session; the forwarding thread ends with the process.
#[derive(Debug)]
pub(crate) struct Tunnel {
    /// `http://127.0.0.1:PORT` for each remote endpoint, in order.
    pub(crate) endpoints: Vec<String>,
}

/// Forwards a local port per endpoint (`http://HOST:PORT` as seen from the tunnel host) through SSH to `spec`.
pub(crate) fn tunnel(spec: &str, login: &Login, endpoints: &[String]) -> anyhow::Result<Tunnel> {
    let (user, host, port) = parse_target(spec, login);
    let session = connect(&host, port, &user, login.identity.as_deref())?;
    let mut listeners = Vec::new();
    let mut local = Vec::new();
    for e in endpoints {
        let hostport = e.trim_start_matches("http://").trim_start_matches("https://").trim_end_matches('/');
        let (h, p) = hostport.rsplit_once(':').with_context(|| format!("endpoint {e} needs a port"))?;
        let p: u16 = p.parse().with_context(|| format!("endpoint {e}: bad port"))?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let scheme = if e.starts_with("https://") { "https" } else { "http" };
        local.push(format!("{scheme}://{}", listener.local_addr()?));
        listeners.push((listener, h.to_owned(), p));
    }
    std::thread::spawn(move || forward(session, listeners));
    Ok(Tunnel { endpoints: local })
}

/// The forwarding loop: one thread, the session non-blocking, every connection pumped both ways.
fn forward(session: Session, listeners: Vec<(TcpListener, String, u16)>) {
    let mut pairs: Vec<(TcpStream, ssh2::Channel, bool)> = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let mut progressed = false;
        for (listener, host, port) in &listeners {
            if let Ok((stream, _)) = listener.accept() {
                session.set_blocking(true);
                match session.channel_direct_tcpip(host, *port, None) {
                    Ok(channel) => {
                        let _ = stream.set_nonblocking(true);
                        pairs.push((stream, channel, true));
                    }
                    Err(e) => eprintln!("herdctl: tunnel to {host}:{port}: {e}"),
                }
                session.set_blocking(false);
                progressed = true;
            }
        }
        for (stream, channel, open) in pairs.iter_mut() {
            match stream.read(&mut buf) {
                Ok(0) => *open = false,
                Ok(n) => {
                    if write_fully(channel, &buf[..n]).is_err() {
                        *open = false;
                    }
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *open = false,
            }
            match channel.read(&mut buf) {
                Ok(0) => {
                    if channel.eof() {
                        *open = false;
                    }
                }
                Ok(n) => {
                    if write_fully(stream, &buf[..n]).is_err() {
                        *open = false;
                    }
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => *open = false,
            }
        }
        pairs.retain(|(_, _, open)| *open);
        if !progressed {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Writes all of `data` to a non-blocking writer, waiting out `WouldBlock`.
fn write_fully(w: &mut dyn Write, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match w.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(k) => data = &data[k..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_quoting() {
        let login = Login { user: "herd".into(), port: 22, identity: None };
        assert_eq!(parse_target("10.0.0.1", &login), ("herd".into(), "10.0.0.1".into(), 22));
        assert_eq!(parse_target("root@bastion:2222", &login), ("root".into(), "bastion".into(), 2222));
        assert_eq!(shell_quote(&["echo".into(), "a b".into(), "it's".into()]), "echo 'a b' 'it'\\''s'");
    }
}
