//! `herdctl machine` against a real provisioner (run in-process inside a network namespace). Needs root.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use herd_provisioner::daemon::{ApiConfig, ApiReads, DaemonConfig, run};
use herd_provisioner::dhcp::server::{Mode, UnknownMacs};
use tokio_util::sync::CancellationToken;

fn sh(args: &[&str]) {
    assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
}

struct Ns(String);

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn herdctl(ns: &str, args: &[&str]) -> Output {
    Command::new("ip").args(["netns", "exec", ns, env!("CARGO_BIN_EXE_herdctl")]).args(args).output().unwrap()
}

#[test]
fn list_show_timeline_and_reprovision() {
    let ns = Ns(format!("hm{}", std::process::id() % 100_000));
    sh(&["netns", "add", &ns.0]);
    sh(&["-n", &ns.0, "link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    sh(&["-n", &ns.0, "addr", "add", "10.99.0.2/24", "dev", "d0"]);
    sh(&["-n", &ns.0, "link", "set", "d0", "up"]);
    sh(&["-n", &ns.0, "link", "set", "d1", "up"]);
    sh(&["-n", &ns.0, "link", "set", "lo", "up"]);
    let dir = std::env::temp_dir().join(format!("herdctl-machine-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let pki = herd_lab::pki::LabPki::make(&dir.join("pki"), "10.99.0.2".parse().unwrap()).unwrap();
    let config = DaemonConfig {
        inventory: repo.join("examples/qemu-3.toml"),
        interface: "d0".into(),
        state_dir: dir.join("state"),
        ipxe_dir: "/usr/lib/ipxe".into(),
        mode: Mode::Full,
        unknown: UnknownMacs::Ignore,
        http_port: 8080,
        assets_port: 8081,
        lease_secs: 3600,
        tftp_root: None,
        assets: dir.join("assets"),
        api: Some(ApiConfig { port: 8443, credentials: pki.server.clone(), tokens: None }),
        api_reads: ApiReads::Operators,
        site_pki: None,
    };
    let cancel = CancellationToken::new();
    let daemon_cancel = cancel.clone();
    let path = format!("/run/netns/{}", ns.0);
    let daemon = std::thread::spawn(move || {
        nix::sched::setns(std::fs::File::open(path).unwrap(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(run(config, daemon_cancel))
    });
    let admin = format!("--credentials={}", pki.admin.display());
    let reader = format!("--credentials={}", pki.reader.display());
    let api = "--provisioner=https://10.99.0.2:8443";
    let start = Instant::now();
    let list = loop {
        let out = herdctl(&ns.0, &["machine", "list", api, &reader]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(list.starts_with("NAME   STATE"), "{list}");
    assert!(list.contains("node3  unknown  master  vr1   10.99.0.13"), "{list}");

    let out = herdctl(&ns.0, &["machine", "reprovision", "node2", api, &reader]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("needs an operator or admin credential"), "{err}");
    let out = herdctl(&ns.0, &["machine", "list", api]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--credentials DIR"), "{err}");
    let out = herdctl(&ns.0, &["machine", "reprovision", "node2", api, &admin]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("node2: provisioning"));
    let out = herdctl(&ns.0, &["machine", "timeline", "node2", api, &reader]);
    let timeline = String::from_utf8_lossy(&out.stdout);
    assert!(timeline.contains("reprovision") && timeline.contains("unknown -> provisioning"), "{timeline}");
    assert!(timeline.contains("requested by operator:admin"), "{timeline}");
    let out = herdctl(&ns.0, &["machine", "show", "-o", "json", "node2", api, &reader]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["state"], "provisioning");
    assert_eq!(json["fqdn"], "node2.qemu.herd.test");

    let out = herdctl(&ns.0, &["machine", "list", "--provisioner=http://10.99.0.2:9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the provisioner"));

    cancel.cancel();
    daemon.join().unwrap().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}
