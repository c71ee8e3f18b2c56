//! Rendering against the real oracle: every machine of the seed site renders, passes herd's lint and Debian's
//! `ignition-validate` (installed by scripts/setup-host.sh). Golden files pin one master and one worker;
//! `UPDATE_GOLDEN=1` rewrites them.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::path::{Path, PathBuf};
use std::process::Command;

use herd_config::{ignition, lint};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn seed_site() -> herd_inventory::Inventory {
    herd_inventory::load(&repo().join("examples/site-450.toml")).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herd-render-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn every_seed_site_config_passes_ignition_validate_and_lint() {
    let inv = seed_site();
    let dir = scratch("site");
    let mut paths = Vec::new();
    for machine in &inv.machines {
        let json = ignition::to_json(&ignition::render(&inv, machine).unwrap());
        let findings = lint::lint_str(&json).unwrap();
        assert!(findings.is_empty(), "{}: {findings:?}", machine.name());
        let path = dir.join(format!("{}.ign", machine.name()));
        std::fs::write(&path, json).unwrap();
        paths.push(path);
    }
    assert!(paths.len() >= 450);
    // ignition-validate takes one file per run; four runs at a time keep this to a few seconds.
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .chunks(paths.len().div_ceil(4))
            .map(|chunk| {
                s.spawn(move || {
                    let mut bad = Vec::new();
                    for path in chunk {
                        let out = Command::new("ignition-validate").arg(path).output().unwrap_or_else(|e| {
                            panic!("cannot run ignition-validate ({e}); run scripts/setup-host.sh to install it")
                        });
                        if !out.status.success() || !out.stdout.is_empty() || !out.stderr.is_empty() {
                            bad.push(format!(
                                "{}: {}{}",
                                path.display(),
                                String::from_utf8_lossy(&out.stdout),
                                String::from_utf8_lossy(&out.stderr)
                            ));
                        }
                    }
                    bad
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ignition_validate_is_a_real_oracle() {
    // The oracle must be able to say no, or the test above proves nothing.
    let dir = scratch("oracle");
    let path = dir.join("bad.ign");
    std::fs::write(&path, r#"{"ignition":{"version":"3.3.0"},"storage":{"files":[{"path":"etc/x"}]}}"#).unwrap();
    let out = Command::new("ignition-validate").arg(&path).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn golden_master_and_worker() {
    let inv = seed_site();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, golden) in [("r01-m01", "master-r01-m01.ign"), ("r01-m02", "worker-r01-m02.ign")] {
        let json = ignition::to_json(&ignition::render_machine(&inv, name).unwrap());
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(golden);
        if update {
            std::fs::write(&path, &json).unwrap();
        } else {
            let expected = std::fs::read_to_string(&path).unwrap();
            if let Some((n, (want, got))) =
                expected.lines().zip(json.lines()).enumerate().find(|(_, (want, got))| want != got)
            {
                panic!(
                    "{golden}:{}: expected\n{want}\ngot\n{got}\n(UPDATE_GOLDEN=1 rewrites it; review the diff)",
                    n + 1
                );
            }
            assert_eq!(json.lines().count(), expected.lines().count(), "{golden}: length differs");
        }
    }
}

#[test]
fn the_master_runs_the_provisioner_unit_and_the_worker_gets_the_role_file() {
    let inv = seed_site();
    let master = ignition::render_machine(&inv, "r01-m01").unwrap();
    let units = master.systemd.unwrap().units.unwrap();
    let unit = units.iter().find(|u| u.name == "herd-provisioner.service").unwrap();
    assert_eq!(unit.enabled, Some(true));
    assert!(unit.contents.as_ref().unwrap().contains("--interface bond0"));
    let worker = ignition::render_machine(&inv, "r01-m02").unwrap();
    let files = worker.storage.unwrap().files.unwrap();
    assert!(files.iter().any(|f| f.path == "/etc/docker/daemon.json" && f.mode == Some(0o644)));
}

fn inventory_with_master_role(dir: &Path, role_extra: &str) -> PathBuf {
    let base = std::fs::read_to_string(repo().join("examples/qemu-3.toml")).unwrap();
    let text = base.replace(
        "labels = { \"herd.io/control-plane\" = \"true\" }",
        &format!("labels = {{ \"herd.io/control-plane\" = \"true\" }}\n{role_extra}"),
    );
    assert_ne!(text, base);
    let path = dir.join("inventory.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_role_naming_a_missing_unit_file_is_refused_with_its_location() {
    let dir = scratch("missing-unit");
    let path = inventory_with_master_role(&dir, "units = [\"units/nope.service\"]");
    let err = herd_inventory::load(&path).unwrap_err().to_string();
    assert!(err.contains("missing-file") && err.contains("units/nope.service"), "{err}");
    assert!(err.contains(&format!("{}:26:10", path.display())), "{err}");
}

#[test]
fn a_role_unit_without_install_section_is_a_render_error() {
    let dir = scratch("no-install");
    std::fs::create_dir_all(dir.join("units")).unwrap();
    std::fs::write(dir.join("units/x.service"), "[Service]\nExecStart=/bin/true\n").unwrap();
    let path = inventory_with_master_role(&dir, "units = [\"units/x.service\"]");
    let inv = herd_inventory::load(&path).unwrap();
    let err = ignition::render_machine(&inv, "node1").unwrap_err().to_string();
    assert!(err.contains("x.service has no [Install] section"), "{err}");
}

#[test]
fn a_legacy_cloud_config_translates_to_a_valid_config() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/legacy-master.cloud-config"),
    )
    .unwrap();
    let config = herd_config::cloud_config::translate(&text).unwrap();
    let json = ignition::to_json(&config);
    assert!(lint::lint_str(&json).unwrap().is_empty());
    let dir = scratch("cloud-config");
    let path = dir.join("legacy.ign");
    std::fs::write(&path, &json).unwrap();
    let out = Command::new("ignition-validate").arg(&path).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    let users = config.passwd.as_ref().unwrap().users.as_ref().unwrap();
    let ops = users.iter().find(|u| u.name == "ops").unwrap();
    assert_eq!(ops.groups.as_deref(), Some(&["sudo".to_owned(), "docker".to_owned()][..]));
    assert!(ops.password_hash.as_ref().unwrap().starts_with("$6$"));
    assert!(users.iter().any(|u| u.name == "core" && u.ssh_authorized_keys.as_ref().is_some_and(|k| k.len() == 1)));
    let files = config.storage.as_ref().unwrap().files.as_ref().unwrap();
    let hello = files.iter().find(|f| f.path == "/opt/bin/hello").unwrap();
    assert_eq!(hello.mode, Some(0o755));
    assert_eq!(hello.contents.as_ref().unwrap().source.as_deref(), Some("data:;base64,IyEvYmluL3NoCmVjaG8gaGVsbG8K"));
    let motd = files.iter().find(|f| f.path == "/etc/motd").unwrap();
    assert_eq!(motd.user.as_ref().unwrap().name.as_deref(), Some("root"));
    assert!(json.contains("ETCD_INITIAL_CLUSTER=core-01=http://10.0.0.11:2380"));
    let units = config.systemd.as_ref().unwrap().units.as_ref().unwrap();
    let by_name = |n: &str| units.iter().find(|u| u.name == n).unwrap();
    assert_eq!(by_name("hello.service").enabled, Some(true));
    assert_eq!(by_name("etcd.service").enabled, Some(true));
    assert!(units.iter().all(|u| u.name != "etcd2.service"));
    assert_eq!(units.iter().filter(|u| u.name == "etcd.service").count(), 1);
    assert_eq!(by_name("update-engine.service").mask, Some(true));
    assert_eq!(by_name("docker.service").dropins.as_ref().unwrap()[0].name, "50-opts.conf");
}
