//! A real etcd cluster on loopback (Debian's `etcd-server`), for tests, benchmarks and `herdctl bench`: each member
//! its own process, data dir and ports; members can be killed (`SIGKILL`) and restarted.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::daemon::{Daemon, Spec};

use herd_cluster::store::{Store, TlsFiles};
use herd_pki::{Authority, Holder, KeySource, Role, Site, Subject};

/// One member.
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Daemon>,
}

/// A local etcd cluster.
#[derive(Debug)]
pub struct LocalEtcd {
    dir: PathBuf,
    members: Vec<Member>,
    cluster: String,
    /// With mutual TLS: the site CA's certificate file and the lab's own admin credential.
    secure: Option<TlsFiles>,
}

/// The name of the operator credential a secure [`LocalEtcd`] connects with (an admin).
pub const LAB_ADMIN: &str = "lab-admin";

/// A port nothing listens on, below Linux's ephemeral range (32768-60999): a port the kernel handed out for
/// `bind(0)` could be taken by some outgoing connection's local end before etcd binds it ("address already in
/// use", seen when many labs ran at once). Each process starts at its own offset and counts on.
fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() % 600) * 20;
    for _ in 0..SPAN {
        let port = (LOW + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port in 20000-31999"))
}

impl LocalEtcd {
    /// Starts `n` members with data under `dir`, with etcd's default timing (100 ms heartbeat, 1 s election
    /// timeout: members sharing a few cores must not mistake a busy peer for a dead one; leases down to 2 s work).
    /// Returns once every process is spawned; see [`LocalEtcd::ready`].
    pub fn start(dir: &Path, n: usize) -> std::io::Result<LocalEtcd> {
        LocalEtcd::launch(dir, n, None)
    }

    /// Like [`LocalEtcd::start`], with mutual TLS on every client and peer URL: each member gets its own
    /// certificate from `site`'s etcd CA (`member:etcdI`, for 127.0.0.1), and only clients with a certificate from
    /// that CA are let in. The lab connects as the admin operator [`LAB_ADMIN`] (see [`LocalEtcd::tls`]).
    pub fn start_secure(dir: &Path, n: usize, site: &Site) -> std::io::Result<LocalEtcd> {
        std::fs::create_dir_all(dir)?;
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        let ca = tls.join("ca.crt");
        issue_files(&tls, n, site)?;
        let files = TlsFiles {
            ca: Some(ca.display().to_string()),
            cert: Some(tls.join(format!("{LAB_ADMIN}.crt")).display().to_string()),
            key: Some(tls.join(format!("{LAB_ADMIN}.key")).display().to_string()),
        };
        LocalEtcd::launch(dir, n, Some(files))
    }

    /// Follows a rotation of `site`'s etcd CA as herd's members do: the trusted-CA file lists every CA `site` trusts,
    /// the members' and the lab admin's certificates come again from the one that issues, and each member restarts
    /// in turn (etcd reads its trusted CAs at start), the next once the cluster answers through every member again.
    pub async fn follow_rotation(&mut self, site: &Site) -> std::io::Result<()> {
        issue_files(&self.dir.join("tls"), self.members.len(), site)?;
        for i in 0..self.members.len() {
            self.restart(i)?;
            self.ready(Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    fn launch(dir: &Path, n: usize, secure: Option<TlsFiles>) -> std::io::Result<LocalEtcd> {
        std::fs::create_dir_all(dir)?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member { name: format!("etcd{i}"), client: free_port()?, peer: free_port()?, child: None });
        }
        let scheme = if secure.is_some() { "https" } else { "http" };
        let cluster =
            members.iter().map(|m| format!("{}={scheme}://127.0.0.1:{}", m.name, m.peer)).collect::<Vec<_>>().join(",");
        let mut etcd = LocalEtcd { dir: dir.to_path_buf(), members, cluster, secure };
        for i in 0..n {
            etcd.spawn(i)?;
        }
        Ok(etcd)
    }

    fn scheme(&self) -> &'static str {
        if self.secure.is_some() { "https" } else { "http" }
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        let state = if data.exists() { "existing" } else { "new" };
        let scheme = self.scheme();
        let (client, peer) = (format!("{scheme}://127.0.0.1:{}", m.client), format!("{scheme}://127.0.0.1:{}", m.peer));
        let mut spec = Spec::new(&m.name, "etcd")
            .args(["--name", &m.name, "--data-dir"])
            .args([&data])
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.cluster, "--initial-cluster-state", state])
            .args(["--initial-cluster-token", "herd-local", "--log-level", "warn"])
            .args(["--quota-backend-bytes", &(8u64 << 30).to_string(), "--max-txn-ops", "128"]);
        if self.secure.is_some() {
            let tls = self.dir.join("tls");
            let (cert, key, ca) =
                (tls.join(format!("{}.crt", m.name)), tls.join(format!("{}.key", m.name)), tls.join("ca.crt"));
            for (side, on) in [("", "--client-cert-auth"), ("peer-", "--peer-client-cert-auth")] {
                spec = spec
                    .args([format!("--{side}cert-file"), cert.display().to_string()])
                    .args([format!("--{side}key-file"), key.display().to_string()])
                    .args([format!("--{side}trusted-ca-file"), ca.display().to_string()])
                    .args([on]);
            }
            spec = spec.args(["--peer-cert-allowed-hostname", herd_pki::PEER_NAME]);
        }
        let child = spec.log(&self.dir.join(format!("{}.log", m.name))).spawn()?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// The TLS material the lab connects with (none without TLS): the CA and the [`LAB_ADMIN`] credential.
    pub fn tls(&self) -> TlsFiles {
        self.secure.clone().unwrap_or_default()
    }

    /// The peer URL of member `i`.
    pub fn peer_url(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.members[i].peer)
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.members[i].client)
    }

    /// Waits (bounded) until the cluster answers a read through all members, and returns a store on it.
    pub async fn ready(&self, within: Duration) -> std::io::Result<Store> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let attempt = async {
                let store = Store::connect(&self.endpoints(), &self.tls(), Duration::from_secs(2)).await.ok()?;
                for e in self.endpoints() {
                    let one = Store::connect(&[e], &self.tls(), Duration::from_secs(2)).await.ok()?;
                    one.get("/herd/ready-probe").await.ok()?;
                }
                Some(store)
            };
            if let Some(store) = attempt.await {
                return Ok(store);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "etcd did not become ready within {within:?}; see the logs in {}",
                    self.dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the member that is the raft leader, as member 0..n see it (the first that answers).
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            let Ok(store) = Store::connect(&[self.endpoint(i)], &self.tls(), Duration::from_secs(2)).await else {
                continue;
            };
            let Ok(status) = store.client().status().await else { continue };
            let leader = status.leader();
            let members = store.client().member_list().await.ok()?;
            let urls = members.members().iter().find(|m| m.id() == leader)?.client_urls().to_vec();
            return (0..self.members.len()).find(|&j| urls.contains(&self.endpoint(j)));
        }
        None
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(child) = self.members[i].child.take() {
            child.stop();
        }
    }

    /// Restarts a killed member `i` on its old data.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i);
        self.spawn(i)
    }
}

impl LocalEtcd {
    /// Kills every member (their data stays until the directory is removed).
    pub fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Writes into `tls` every etcd CA `site` trusts (`ca.crt`) and, from the one that issues, a certificate and key
/// for each of `n` members (`etcdI`, for 127.0.0.1) and for the lab admin.
fn issue_files(tls: &Path, n: usize, site: &Site) -> std::io::Result<()> {
    herd_pki::write_public(&tls.join("ca.crt"), site.trust_pem(Authority::Etcd).as_bytes())
        .map_err(std::io::Error::other)?;
    let issue = |holder: Holder, stem: &str| -> std::io::Result<()> {
        let mut subject = Subject::new(holder, time::Duration::days(1));
        subject.dns = vec!["localhost".to_owned()];
        subject.ips = vec![std::net::Ipv4Addr::LOCALHOST.into()];
        let now = time::OffsetDateTime::now_utc();
        let issued = site.issue(Authority::Etcd, &subject, KeySource::Generate, now).map_err(std::io::Error::other)?;
        herd_pki::write_public(&tls.join(format!("{stem}.crt")), issued.cert_pem.as_bytes())
            .map_err(std::io::Error::other)?;
        let key = issued.key_pem.unwrap_or_default();
        herd_pki::write_private(&tls.join(format!("{stem}.key")), key.as_bytes()).map_err(std::io::Error::other)
    };
    for i in 0..n {
        issue(Holder::Member(format!("etcd{i}")), &format!("etcd{i}"))?;
    }
    issue(Holder::Operator(LAB_ADMIN.to_owned(), Role::Admin), LAB_ADMIN)
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The configuration of Debian's docker-registry storing under `root` and listening on `addr` (`IP:PORT`).
pub fn registry_config(root: &std::path::Path, addr: &str) -> String {
    format!(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
        root.display()
    )
}

/// A Docker Engine (Debian's docker.io) and a registry (Debian's docker-registry), each with its own state under
/// a scratch dir; both stopped on drop with everything they started (dockerd's own containerd and the shims).
/// dockerd never sees a containerd this host may run (its private `/run` has no `/run/containerd`), nor the host's
/// `/etc/docker/daemon.json`. Only one such dockerd at a time per host (it manages docker0).
#[derive(Debug)]
pub struct LocalDocker {
    /// The engine's Unix socket path.
    pub socket: String,
    /// The registry's `127.0.0.1:PORT`.
    pub registry: String,
    dockerd: Option<Daemon>,
    registry_proc: Option<Daemon>,
}

impl LocalDocker {
    /// Starts both under `dir/docker` and waits (bounded) until they answer.
    pub fn start(dir: &std::path::Path) -> std::io::Result<LocalDocker> {
        let dir = dir.join("docker");
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let registry = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        std::fs::write(&config, registry_config(&dir.join("registry"), &registry))?;
        let registry_proc = Spec::new("docker-registry", "docker-registry")
            .args(["serve"])
            .args([&config])
            .log(&dir.join("registry.log"));
        let registry_proc = Some(registry_proc.spawn()?);
        let socket = dir.join("docker.sock").display().to_string();
        let daemon_json = dir.join("daemon.json");
        std::fs::write(&daemon_json, "{}\n")?;
        let dockerd = Spec::new("dockerd", "dockerd")
            .args(["--config-file"])
            .args([&daemon_json])
            .args(["--data-root"])
            .args([dir.join("root")])
            .args(["--exec-root"])
            .args([dir.join("exec")])
            .args(["--pidfile"])
            .args([dir.join("dockerd.pid")])
            .args(["-H", &format!("unix://{socket}")])
            .log(&dir.join("dockerd.log"))
            // Containers first (dockerd stops them on SIGTERM), then whatever is left of the group.
            .grace(Duration::from_secs(15));
        let dockerd = Some(dockerd.spawn()?);
        let d = LocalDocker { socket, registry, dockerd, registry_proc };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let up = d.cli(&["version"]).is_ok_and(|o| o.status.success())
                && std::net::TcpStream::connect(d.registry.as_str()).is_ok();
            if up {
                return Ok(d);
            }
            if std::time::Instant::now() >= deadline {
                return Err(std::io::Error::other(format!(
                    "dockerd or the registry did not answer within 60 s; see the logs in {}",
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs the docker CLI against this engine.
    pub fn cli(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        std::process::Command::new("docker").env("DOCKER_HOST", format!("unix://{}", self.socket)).args(args).output()
    }

    fn must(&self, what: &str, args: &[&str]) -> std::io::Result<()> {
        let out = self.cli(args)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("docker {what}: {}", String::from_utf8_lossy(&out.stderr).trim())))
        }
    }

    /// Makes an image from a busybox-static root (`docker import`), pushes it to the registry as `repo:tag`, and
    /// removes it locally so that using it means pulling it. Returns the registry reference.
    pub fn publish(&self, repo_tag: &str, scratch: &std::path::Path) -> std::io::Result<String> {
        let root = scratch.join(format!("rootfs-{}", repo_tag.replace(['/', ':'], "-")));
        std::fs::create_dir_all(root.join("bin"))?;
        std::fs::create_dir_all(root.join("www"))?;
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
        for applet in ["sh", "httpd", "sleep"] {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
        std::fs::write(root.join("www/index.html"), format!("served by {repo_tag}\n"))?;
        let tar = scratch.join(format!("{}.tar", repo_tag.replace(['/', ':'], "-")));
        let st = std::process::Command::new("tar").arg("-C").arg(&root).arg("-cf").arg(&tar).arg(".").status()?;
        if !st.success() {
            return Err(std::io::Error::other("tar of the image root failed"));
        }
        let reference = format!("{}/{repo_tag}", self.registry);
        self.must("import", &["import", &tar.display().to_string(), &reference])?;
        self.must("push", &["push", &reference])?;
        self.must("rmi", &["rmi", &reference])?;
        Ok(reference)
    }
}

impl Drop for LocalDocker {
    fn drop(&mut self) {
        if let Some(dockerd) = self.dockerd.take() {
            dockerd.stop();
        }
        if let Some(registry) = self.registry_proc.take() {
            registry.stop();
        }
    }
}
