//! herdctl's command line, run as a user runs it.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;

fn herdctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herdctl")).args(args).output().expect("herdctl runs")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herdctl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn clap_definition_is_consistent() {
    herdctl::cli::Cli::command().debug_assert();
}

#[test]
fn clap_definition_as_run_is_consistent() {
    herdctl::cli::command().debug_assert();
}

#[test]
fn the_cluster_flags_show_only_on_commands_that_use_them() {
    let help = |args: &[&str]| {
        let out = herdctl(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    for args in [&["inventory", "check", "--help"][..], &["config", "render", "--help"], &["machine", "show", "--help"]]
    {
        let h = help(args);
        for flag in ["--endpoint", "--ca-file", "--tunnel", "--ssh-user", "--request-timeout"] {
            assert!(!h.contains(flag), "{args:?} lists {flag}:\n{h}");
        }
    }
    assert!(help(&["machine", "show", "--help"]).contains("--credentials"), "the operator API's credential");
    for args in [&["start", "--help"][..], &["list-units", "--help"], &["machine", "drain", "--help"]] {
        assert!(help(args).contains("--endpoint"), "{args:?}");
    }
    // Still accepted where hidden, before or after the command: one HERD_ENDPOINT serves every command.
    let lab = repo().join("examples/qemu-3.toml");
    for args in [
        &["--endpoint", "http://127.0.0.1:9", "inventory", "check", lab.to_str().unwrap()][..],
        &["inventory", "check", "--endpoint", "http://127.0.0.1:9", lab.to_str().unwrap()],
    ] {
        let out = herdctl(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
}

#[test]
fn help_lists_the_inventory_commands() {
    let out = herdctl(&["inventory", "--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for cmd in ["check", "show", "gen", "diff"] {
        assert!(help.contains(cmd), "missing {cmd} in:\n{help}");
    }
}

#[test]
fn check_accepts_the_examples() {
    let examples = repo().join("examples");
    let out = herdctl(&[
        "inventory",
        "check",
        examples.join("site-450.toml").to_str().unwrap(),
        examples.join("qemu-3.toml").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("site-450.toml: ok: 456 machines, 12 racks"), "{stdout}");
}

#[test]
fn check_reports_every_problem_located_and_exits_1() {
    let fixture = repo().join("inventory/tests/fixtures/invalid/combined-many-problems.toml");
    let out = herdctl(&["inventory", "check", fixture.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let located: Vec<&str> = stderr.lines().filter(|l| l.starts_with(fixture.to_str().unwrap())).collect();
    assert_eq!(located.len(), 4, "{stderr}");
    for line in located {
        // FILE:LINE:COL: RULE: MESSAGE
        let rest = &line[fixture.to_str().unwrap().len()..];
        let mut parts = rest.splitn(4, ':');
        assert_eq!(parts.next(), Some(""));
        assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
        assert!(parts.next().unwrap().parse::<usize>().is_ok(), "{line}");
        let rule = parts.next().unwrap().trim_start().split(':').next().unwrap();
        assert!(herd_inventory::Rule::from_name(rule).is_some(), "{line}");
    }
    assert!(stderr.contains("4 problem(s) found"));
}

#[test]
fn check_json_lists_diagnostics() {
    let fixture = repo().join("inventory/tests/fixtures/invalid/duplicate-mac.toml");
    let out = herdctl(&["inventory", "check", "--output", "json", fixture.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json[0]["rule"], "duplicate-mac");
    assert_eq!(json[0]["line"], 38);
}

#[test]
fn unreadable_file_exits_2_and_names_it() {
    let out = herdctl(&["inventory", "check", "/nonexistent/inventory.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read inventory /nonexistent/inventory.toml"));
}

#[test]
fn generated_fleets_of_450_and_5000_pass_check() {
    for (n, racks) in [("450", "12"), ("5000", "125")] {
        let out = herdctl(&["inventory", "gen", "--machines", n, "--racks", racks, "--masters", "5"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let file = tmp(&format!("gen-{n}.toml"));
        std::fs::write(&file, &out.stdout).unwrap();
        let check = herdctl(&["inventory", "check", file.to_str().unwrap()]);
        assert!(check.status.success(), "{}", text(&check.stderr));
        assert!(text(&check.stdout).contains(&format!("ok: {n} machines, {racks} racks, 2 roles, 5 etcd members")));
    }
}

#[test]
fn gen_refuses_an_impossible_fleet_with_advice() {
    let out = herdctl(&["inventory", "gen", "--machines", "5000", "--racks", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--racks 21"), "{}", text(&out.stderr));
}

#[test]
fn show_prints_a_table_and_json() {
    let file = repo().join("examples/qemu-3.toml");
    let out = herdctl(&["inventory", "show", file.to_str().unwrap()]);
    assert!(out.status.success());
    let table = text(&out.stdout);
    assert!(table.starts_with("NAME "), "{table}");
    assert!(table.contains("node2  master  vr1   52:54:00:99:02:01  10.99.0.12"), "{table}");
    let out = herdctl(&["inventory", "show", "-o", "json", file.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let machines = json.as_array().unwrap();
    assert_eq!(machines.len(), 3);
    assert_eq!(machines[0]["fqdn"], "node1.qemu.herd.test");
    assert_eq!(machines[0]["effective_labels"]["herd.io/role"], "master");
    assert_eq!(machines[0]["bond"]["mode"], "active-backup");
}

#[test]
fn show_refuses_an_invalid_inventory_and_says_what_to_run() {
    let fixture = repo().join("inventory/tests/fixtures/invalid/unknown-rack.toml");
    let out = herdctl(&["inventory", "show", fixture.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("unknown-rack") && stderr.contains("herdctl inventory check"), "{stderr}");
}

#[test]
fn diff_shows_the_plan() {
    let old = repo().join("examples/qemu-3.toml");
    let new_text = std::fs::read_to_string(&old)
        .unwrap()
        .replace("internal = \"10.99.0.13\"", "internal = \"10.99.0.23\"")
        .replace(
            "role = \"master\"\nrack = \"vr1\"\nmacs = [\"52:54:00:99:02",
            "role = \"worker\"\nrack = \"vr1\"\nmacs = [\"52:54:00:99:02",
        );
    // Demoting node2 leaves two etcd members: diff must refuse the invalid NEW before printing any plan.
    let new = tmp("qemu-changed.toml");
    std::fs::write(&new, &new_text).unwrap();
    let out = herdctl(&["inventory", "diff", old.to_str().unwrap(), new.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "an invalid NEW must be refused before any plan");
    assert!(text(&out.stderr).contains("etcd-quorum"));

    let new_text = new_text.replace("role = \"worker\"", "role = \"master\"");
    std::fs::write(&new, &new_text).unwrap();
    let out = herdctl(&["inventory", "diff", "--exit-code", old.to_str().unwrap(), new.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let plan = text(&out.stdout);
    assert!(plan.contains("~ machine node3: reboot to apply"), "{plan}");
    assert!(plan.contains("internal: \"10.99.0.13\" -> \"10.99.0.23\""), "{plan}");
    assert!(plan.contains("machines: 0 added, 0 removed, 1 changed"), "{plan}");
    let out = herdctl(&["inventory", "diff", "-o", "json", old.to_str().unwrap(), new.to_str().unwrap()]);
    assert!(out.status.success());
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["changes"][0]["effect"], "reboot");
}

#[test]
fn config_render_prints_a_config_that_lints_clean() {
    let site = repo().join("examples/site-450.toml");
    let out = herdctl(&["config", "render", "--inventory", site.to_str().unwrap(), "r01-m01"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ignition"]["version"], "3.3.0");
    let file = tmp("r01-m01.ign");
    std::fs::write(&file, &out.stdout).unwrap();
    let lint = herdctl(&["config", "lint", file.to_str().unwrap()]);
    assert!(lint.status.success(), "{}", text(&lint.stdout));
    assert!(text(&lint.stdout).ends_with(": ok\n"));
}

#[test]
fn config_render_of_an_unknown_machine_says_where_to_look() {
    let site = repo().join("examples/qemu-3.toml");
    let out = herdctl(&["config", "render", "-i", site.to_str().unwrap(), "node9"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no machine named \"node9\"") && stderr.contains("herdctl inventory show"), "{stderr}");
}

#[test]
fn config_lint_names_the_json_path_and_exits_1() {
    let file = tmp("footgun.ign");
    std::fs::write(&file, r#"{"ignition":{"version":"3.3.0"},"storage":{"files":[{"path":"/etc/motd","mode":644}]}}"#)
        .unwrap();
    let out = herdctl(&["config", "lint", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("$.storage.files.0.mode: decimal-mode: mode 644 is decimal"), "{stdout}");
}

#[test]
fn config_translate_turns_cloud_config_into_ignition() {
    let fixture = repo().join("provisioner/config/tests/fixtures/legacy-master.cloud-config");
    let out = herdctl(&["config", "translate", fixture.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ignition"]["version"], "3.3.0");
    let bad = tmp("bad.cloud-config");
    std::fs::write(&bad, "#cloud-config\nmanage_etc_hosts: true\n").unwrap();
    let out = herdctl(&["config", "translate", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot translate manage_etc_hosts"), "{}", text(&out.stderr));
}

#[test]
fn config_render_as_cloud_config_translates_back() {
    let site = repo().join("examples/qemu-3.toml");
    let out = herdctl(&["config", "render", "-i", site.to_str().unwrap(), "--format", "cloud-config", "node2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    assert!(yaml.starts_with("#cloud-config\nhostname: node2\n"), "{yaml}");
    let file = tmp("node2.cloud-config");
    std::fs::write(&file, &yaml).unwrap();
    let back = herdctl(&["config", "translate", file.to_str().unwrap()]);
    assert!(back.status.success(), "{}", text(&back.stderr));
}
