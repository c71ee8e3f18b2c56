//! herdctl's fleetctl-like commands against a real 3-member etcd, the engine and two agents running real
//! processes, and a real sshd for `ssh` and `--tunnel`.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use herd_cluster::agent::{Agent, AgentConfig};
use herd_cluster::docker::DockerExecutor;
use herd_cluster::engine::{Engine, EngineConfig};
use herd_cluster::exec::Dispatch;
use herd_cluster::exec::ProcessExecutor;
use herd_cluster::record::MachineRecord;
use herd_lab::daemon::{Daemon, Spec};
use herd_lab::local::{LocalDocker, LocalEtcd};
use tokio_util::sync::CancellationToken;

struct Site {
    dir: PathBuf,
    _etcd: LocalEtcd,
    docker: Option<LocalDocker>,
    endpoint: String,
    ssh_port: u16,
    sshd: Option<Daemon>,
    stop: CancellationToken,
}

impl Drop for Site {
    fn drop(&mut self) {
        self.stop.cancel();
        drop(self.sshd.take());
        drop(self.docker.take());
        self._etcd.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn sshd(dir: &Path, env: &str) -> (Option<Daemon>, u16) {
    let d = dir.join("ssh");
    std::fs::create_dir_all(&d).unwrap();
    for key in ["host", "id"] {
        run(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(d.join(key)));
    }
    std::fs::copy(d.join("id.pub"), d.join("authorized_keys")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {keys}\nPidFile {dir}/sshd.pid\n\
         StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\nAllowTcpForwarding yes\n{env}",
        host = d.join("host").display(),
        keys = d.join("authorized_keys").display(),
        dir = d.display(),
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    // sshd's privilege separation directory (/run/sshd) is compiled in: its private /run gets it, as the
    // package's systemd unit (RuntimeDirectory=sshd) would make it.
    let child = Spec::new("sshd", "/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .args([d.join("sshd_config")])
        .run_dir("sshd")
        .log(&d.join("sshd.log"))
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "sshd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Some(child), port)
}

async fn site(name: &str) -> Site {
    site_with(name, false).await
}

/// A site; with `docker`, a dockerd and registry too, container units run there, and SSH sessions reach it.
async fn site_with(name: &str, docker: bool) -> Site {
    let dir = std::env::temp_dir().join(format!("herdctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let docker = docker.then(|| LocalDocker::start(&dir).unwrap());
    let engine_socket = match &docker {
        Some(d) => Some(DockerExecutor::connect(Some(&d.socket)).await.unwrap()),
        None => None,
    };
    let etcd = LocalEtcd::start(&dir.join("etcd"), 3).unwrap();
    let store = etcd.ready(Duration::from_secs(60)).await.unwrap();
    let stop = CancellationToken::new();
    let cfg = EngineConfig { ttl: Duration::from_secs(2), grace: Duration::from_secs(1), ..EngineConfig::new("e0") };
    let engine = Engine::new(store.clone(), cfg);
    let s = stop.clone();
    tokio::spawn(async move { engine.run(s).await });
    for (id, rack) in [("m1", "r1"), ("m2", "r2")] {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("rack".to_owned(), rack.to_owned());
        let machine = MachineRecord {
            id: id.into(),
            hostname: id.into(),
            address: Some("127.0.0.1".into()),
            labels,
            rack: Some(rack.into()),
            cpu_millis: 2000,
            memory: 4 << 30,
            instance: format!("i-{id}"),
            version: None,
            since_ms: 0,
            reserved: Default::default(),
        };
        let cfg = AgentConfig { machine, ttl: Duration::from_secs(2), status_interval: Duration::from_millis(300) };
        let s = stop.clone();
        match &engine_socket {
            Some(containers) => {
                let exec = Arc::new(Dispatch { services: ProcessExecutor::default(), containers: containers.clone() });
                let agent = Agent::new(store.clone(), cfg, exec).unwrap();
                tokio::spawn(async move { agent.run(s).await });
            }
            None => {
                let agent = Agent::new(store.clone(), cfg, Arc::new(ProcessExecutor::default())).unwrap();
                tokio::spawn(async move { agent.run(s).await });
            }
        }
    }
    let env = docker.as_ref().map_or(String::new(), |d| format!("SetEnv DOCKER_HOST=unix://{}\n", d.socket));
    let (sshd, ssh_port) = sshd(&dir, &env);
    Site { endpoint: etcd.endpoints().join(","), _etcd: etcd, docker, dir, ssh_port, sshd, stop }
}

impl Site {
    async fn herdctl(&self, args: &[&str]) -> Output {
        self.herdctl_in(Path::new("."), args).await
    }

    /// herdctl run in `dir`.
    async fn herdctl_in(&self, dir: &Path, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_herdctl"));
        cmd.current_dir(dir);
        cmd.args(["--endpoint", &self.endpoint, "--ssh-user", "root", "--ssh-port"])
            .arg(self.ssh_port.to_string())
            .arg("--ssh-identity")
            .arg(self.dir.join("ssh/id"))
            .args(args)
            .env("HOME", &self.dir);
        tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap()
    }

    fn unit(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn units_json(out: &Output) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(out)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_unit_lifecycle_listings_cordon_drain_ssh_and_tunnel() {
    let s = site("lifecycle").await;
    let web = s.unit("web.service", "[Service]\nExecStart=/bin/sleep 7303\n");

    // submit, start (blocking), and where it landed.
    let out = ok(&s.herdctl(&["submit", &web]).await);
    assert_eq!(out, "web.service: submitted\n");
    let out = ok(&s.herdctl(&["start", "web.service"]).await);
    assert!(out.starts_with("web.service: launched on m") && out.contains("(active)"), "{out}");
    let listed = units_json(&s.herdctl(&["list-units", "-o", "json"]).await);
    assert_eq!(listed.len(), 1);
    let on = listed[0]["machines"][0]["machine"].as_str().unwrap().to_owned();
    assert_eq!(listed[0]["machines"][0]["state"], "active");
    let table = ok(&s.herdctl(&["list-units"]).await);
    assert!(table.starts_with("UNIT") && table.contains(&format!("web.service  {on}")), "{table}");
    assert_eq!(ok(&s.herdctl(&["cat", "web.service"]).await), "[Service]\nExecStart=/bin/sleep 7303\n");

    // The machines, as JSON and as a table.
    let machines = units_json(&s.herdctl(&["list-machines", "-o", "json"]).await);
    let ids: Vec<&str> = machines.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["m1", "m2"]);

    // ssh: to a machine, and to the machine running a unit; the unit's process is really there.
    let out = ok(&s.herdctl(&["ssh", "m1", "--", "echo", "hello from", "m1"]).await);
    assert_eq!(out, "hello from m1\n");
    let out = ok(&s.herdctl(&["ssh", "--unit", "web.service", "--", "pgrep", "-f", "^/bin/sleep 7303$"]).await);
    assert!(out.trim().parse::<u32>().is_ok(), "{out}");
    let failed = s.herdctl(&["ssh", "m1", "--", "false"]).await;
    assert_eq!(failed.status.code(), Some(1), "the remote exit status comes back");

    // --tunnel: etcd reached through SSH.
    let tunnel = format!("root@127.0.0.1:{}", s.ssh_port);
    let out = ok(&s.herdctl(&["--tunnel", &tunnel, "list-machines"]).await);
    assert!(out.contains("m1") && out.contains("m2"), "{out}");

    // A different file needs --replace.
    let changed = s.unit("web.service", "[Service]\nExecStart=/bin/sleep 7304\n");
    let refused = s.herdctl(&["submit", &changed]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--replace"));
    ok(&s.herdctl(&["submit", "--replace", &changed]).await);

    // Drain the machine: the unit moves, and the machine is listed as draining; uncordon.
    let out = ok(&s.herdctl(&["machine", "drain", &on]).await);
    let other = if on == "m1" { "m2" } else { "m1" };
    assert!(out.contains(&format!("web.service: launched on {other} (active)")), "{out}");
    let machines = units_json(&s.herdctl(&["list-machines", "-o", "json"]).await);
    let drained = machines.iter().find(|m| m["id"] == on.as_str()).unwrap();
    assert_eq!(drained["cordon"]["drain"], true);
    assert_eq!(drained["units"], 0);
    ok(&s.herdctl(&["machine", "uncordon", &on]).await);

    // Restart, stop, unload, destroy.
    let out = ok(&s.herdctl(&["restart", "web.service"]).await);
    assert!(out.contains("loaded on") && out.contains("launched on"), "{out}");
    let out = ok(&s.herdctl(&["stop", "web.service"]).await);
    assert!(out.contains("(loaded)"), "{out}");
    ok(&s.herdctl(&["unload", "web.service"]).await);
    let files = units_json(&s.herdctl(&["list-unit-files", "-o", "json"]).await);
    assert_eq!(files[0]["desired"], "inactive");
    assert_eq!(files[0]["placed"], 0);
    let out = ok(&s.herdctl(&["destroy", "web.service"]).await);
    assert_eq!(out, "web.service: destroyed\n");
    assert!(units_json(&s.herdctl(&["list-unit-files", "-o", "json"]).await).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unplaceable_units_time_out_with_advice_and_wrong_endpoints_say_what_to_do() {
    let s = site("errors").await;
    let pinned = s.unit("pinned.service", "[Service]\nExecStart=/bin/sleep 1\n[X-Fleet]\nMachineID=nowhere\n");
    let out = s.herdctl(&["start", "--timeout", "2", &pinned]).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = "not its MachineID on 2 of 2 machines";
    assert!(stdout.contains(&format!("pinned.service: launched, not placed: {summary}")), "{stdout}");
    // The table says unplaced; the summary follows it once per reason; each machine's reason is in status.
    let table = ok(&s.herdctl(&["list-units"]).await);
    let row = table.lines().find(|l| l.starts_with("pinned.service")).unwrap();
    assert_eq!(row.split_whitespace().collect::<Vec<_>>(), ["pinned.service", "-", "unplaced", "launched", "-"]);
    assert!(table.contains(&format!("unplaced: pinned.service: {summary}\n")), "{table}");
    let status = s.herdctl(&["status", "pinned.service"]).await;
    assert_eq!(status.status.code(), Some(3));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("  m1: MachineID\n  m2: MachineID"), "{text}");
    let json = units_json(&s.herdctl(&["list-units", "--output", "json"]).await);
    let pinned = json.iter().find(|u| u["name"] == "pinned.service").unwrap();
    assert_eq!(pinned["unplaced"]["summary"], summary);
    assert_eq!(pinned["unplaced"]["machines"][1]["reason"], "MachineID");
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = Command::new(env!("CARGO_BIN_EXE_herdctl"))
        .args(["--endpoint", "http://127.0.0.1:9", "--request-timeout", "1", "list-units"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--endpoint"), "{err}");
    let invalid = s.unit("bad.service", "[Service]\nExecStart=/bin/true\n[X-Fleet]\nCPU=lots\n");
    let out = s.herdctl(&["submit", &invalid]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CPU"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_and_journal_reach_a_container_over_ssh() {
    let s = site_with("container", true).await;
    let docker = s.docker.as_ref().unwrap();
    let image = docker.publish("herd/echo:1", &s.dir).unwrap();
    let unit = s.unit(
        "echo.service",
        &format!("[Container]\nImage={image}\nCommand=/bin/sh -c \"echo hello from the container; exec sleep 3600\"\n"),
    );
    let out = ok(&s.herdctl(&["start", &unit]).await);
    assert!(out.contains("(active)"), "{out}");
    let status = ok(&s.herdctl(&["status", "echo.service"]).await);
    assert!(status.contains("herd-echo.service") && status.contains("Up"), "{status}");
    assert!(status.contains("\"Running\":true"), "{status}");
    let journal = ok(&s.herdctl(&["journal", "-n", "5", "echo.service"]).await);
    assert_eq!(journal, "hello from the container\n");
    ok(&s.herdctl(&["destroy", "echo.service"]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_starts_from_its_template_in_the_current_directory_as_fleetctl_does() {
    let s = site("local-template").await;
    s.unit("pong@.service", "[Service]\nExecStart=/bin/sleep 3601\n");
    let out = ok(&s.herdctl_in(&s.dir, &["start", "pong@1.service"]).await);
    assert!(out.contains("pong@.service: submitted from ./pong@.service (the template of pong@1.service)"), "{out}");
    assert!(out.contains("pong@1.service: launched on m"), "{out}");
    // Now the cluster has the template: the next instance uses it and the local file is not submitted again.
    s.unit("pong@.service", "[Service]\nExecStart=/bin/sleep 3602\n");
    let out = ok(&s.herdctl_in(&s.dir, &["start", "pong@2.service"]).await);
    assert!(!out.contains("submitted"), "{out}");
    assert!(ok(&s.herdctl(&["cat", "pong@2.service"]).await).contains("sleep 3601"));
    // Without a template anywhere, the error says what to do.
    let out = s.herdctl_in(&s.dir, &["start", "ping@1.service"]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("submit it first"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
