//! `herdctl pki` and `herdctl access` as an admin uses them: a site PKI, credentials, a real etcd with mutual
//! TLS, its users and roles from the inventory, and operators of each role.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use herd_lab::local::LocalEtcd;

fn herdctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herdctl")).args(args).env_remove("HERD_PKI_DIR").output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output) -> String {
    assert!(!out.status.success(), "succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("herdctl-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_issue_status_and_the_refusals_that_lose_nothing() {
    let dir = scratch("pki");
    let pki = dir.join("pki");
    let pki_s = pki.to_str().unwrap();
    let out = ok(&herdctl(&["pki", "--dir", pki_s, "init", "--site", "lab"]));
    assert!(out.contains("etcd CA:") && out.contains("api CA:"), "{out}");
    let admin = pki.join("credentials/admin");
    for f in ["etcd.key", "api.key"] {
        assert_eq!(mode(&admin.join(f)), 0o600, "{f}");
    }
    for f in ["etcd-ca.crt", "etcd.crt", "api-ca.crt", "api.crt"] {
        assert!(admin.join(f).is_file(), "{f}");
    }
    let key = std::fs::read(pki.join("etcd-ca.key")).unwrap();
    let err = refused(&herdctl(&["pki", "--dir", pki_s, "init"]));
    assert!(err.contains("already holds a site PKI"), "{err}");
    assert_eq!(std::fs::read(pki.join("etcd-ca.key")).unwrap(), key);

    ok(&herdctl(&["pki", "--dir", pki_s, "issue", "operator", "olga", "--role", "operator", "--days", "30"]));
    let err = refused(&herdctl(&["pki", "--dir", pki_s, "issue", "operator", "Olga_2"]));
    assert!(err.contains("cannot go into a certificate"), "{err}");
    assert!(!pki.join("credentials/Olga_2").exists(), "a refused issue wrote a credential");
    let err = refused(&herdctl(&["pki", "--dir", pki_s, "issue", "operator", "x", "--role", "root"]));
    assert!(err.contains("unknown role"), "{err}");

    let out = ok(&herdctl(&["pki", "--dir", pki_s, "status", "-o", "json"]));
    let lines: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let subjects: Vec<(&str, &str)> =
        lines.iter().map(|l| (l["authority"].as_str().unwrap(), l["common_name"].as_str().unwrap())).collect();
    assert_eq!(
        subjects,
        [
            ("etcd", "herd lab etcd CA"),
            ("api", "herd lab api CA"),
            ("etcd", "operator:olga"),
            ("api", "operator:olga"),
            ("etcd", "operator:admin"),
            ("api", "operator:admin"),
        ],
        "CAs first, then by expiry (olga's 30 days before the admin's 90)"
    );
    let days = lines[2]["days_left"].as_i64().unwrap();
    assert!((29..=30).contains(&days), "{days}");
    let text = ok(&herdctl(&["pki", "--dir", pki_s, "status"]));
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["CA", "SUBJECT", "ROLE", "NOT", "AFTER", "DAYS", "STANDING", "SERIAL"], "{text}");
    assert!(text.contains("operator:olga     operator"), "{text}");
    // Olga's credential issued again (as a renewal or a rejoin does): status lists her newest, --all both.
    let again = dir.join("olga-again");
    ok(&herdctl(
        &["pki", "--dir", pki_s, "issue", "operator", "olga", "--role", "operator", "--days", "60", "--out"]
            .into_iter()
            .chain([again.to_str().unwrap()])
            .collect::<Vec<_>>(),
    ));
    let olga = |args: &[&str]| -> Vec<i64> {
        let out = ok(&herdctl(&[&["pki", "--dir", pki_s, "status", "-o", "json"][..], args].concat()));
        let lines: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        let of = |l: &&serde_json::Value| l["common_name"] == "operator:olga" && l["authority"] == "etcd";
        lines.iter().filter(of).map(|l| l["days_left"].as_i64().unwrap()).collect()
    };
    let newest = olga(&[]);
    assert!(newest.len() == 1 && (59..=60).contains(&newest[0]), "{newest:?}");
    assert_eq!(olga(&["--all"]).len(), 2);

    // A bearer token: printed once, only its hash kept, in a file the provisioner reads.
    let token = ok(&herdctl(&["pki", "--dir", pki_s, "token", "ci", "--role", "operator"])).trim().to_owned();
    assert_eq!(token.len(), 64, "{token}");
    let file = std::fs::read_to_string(pki.join("api-tokens.toml")).unwrap();
    assert!(file.contains(&herd_api::token_hash(&token)) && !file.contains(&token), "{file}");
    herd_provisioner::operator::Tokens::load(&pki.join("api-tokens.toml")).unwrap();
    let err = refused(&herdctl(&["pki", "--dir", pki_s, "token", "ci"]));
    assert!(err.contains("already has a token named ci"), "{err}");

    std::fs::set_permissions(pki.join("api-ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(&herdctl(&["pki", "--dir", pki_s, "issue", "operator", "late"]));
    assert!(err.contains("chmod 600"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn access_apply_gives_each_operator_its_role_in_a_mutual_tls_etcd() {
    let dir = scratch("access");
    let pki = dir.join("pki");
    let pki_s = pki.to_str().unwrap();
    ok(&herdctl(&["pki", "--dir", pki_s, "init", "--site", "lab"]));
    ok(&herdctl(&["pki", "--dir", pki_s, "issue", "operator", "olga", "--role", "operator"]));
    ok(&herdctl(&["pki", "--dir", pki_s, "issue", "operator", "rita", "--role", "read-only"]));
    let site = herd_pki::Site::open(&pki).unwrap();
    let etcd = LocalEtcd::start_secure(&dir.join("etcd"), 1, &site).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(etcd.ready(Duration::from_secs(60))).unwrap();
    let endpoint = etcd.endpoint(0);
    let inventory = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/qemu-3.toml");
    let cred = |name: &str| pki.join("credentials").join(name).display().to_string();
    let as_ = |name: &str, args: &[&str]| {
        let mut all = vec!["--endpoint", &endpoint, "--request-timeout", "3"];
        let c = cred(name);
        all.extend(["--credentials", c.as_str()]);
        all.extend(args);
        herdctl(&all)
    };

    let out = ok(&as_("admin", &["access", "apply", "--inventory", inventory, "--pki", pki_s]));
    // The lab's etcd issued itself an admin credential from the same site (lab-admin): four operators.
    assert!(out.contains("3 machines (3 run the engine), 4 operators (2 admins)"), "{out}");
    let again = ok(&as_("admin", &["access", "apply", "--inventory", inventory, "--pki", pki_s]));
    assert!(again.contains("nothing changed"), "{again}");

    let unit = dir.join("hello.service");
    std::fs::write(&unit, "[Service]\nExecStart=/bin/true\n").unwrap();
    let unit = unit.to_str().unwrap();
    let err = refused(&as_("rita", &["submit", unit]));
    assert!(err.contains("permission denied"), "{err}");
    ok(&as_("olga", &["submit", unit]));
    let listed = ok(&as_("rita", &["list-unit-files", "-o", "json"]));
    assert!(listed.contains("hello.service"), "{listed}");

    // Without a client certificate etcd does not answer at all.
    let ca = pki.join("credentials/admin/etcd-ca.crt").display().to_string();
    let err = refused(&herdctl(&["--endpoint", &endpoint, "--request-timeout", "2", "--ca-file", &ca, "list-units"]));
    assert!(err.contains("pass --credentials DIR"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn prune_removes_the_copies_of_long_ended_certificates_a_newer_one_replaced() {
    let dir = scratch("prune");
    let pki = dir.join("pki");
    let pki_s = pki.to_str().unwrap();
    ok(&herdctl(&["pki", "--dir", pki_s, "init", "--site", "lab"]));
    // node1's certificate of four minutes ago, for one minute (the CAs are valid from five minutes before init),
    // then the one a renewal gives it now.
    let site = herd_pki::Site::open(&pki).unwrap();
    let ago = time::OffsetDateTime::now_utc() - time::Duration::minutes(4);
    let subject = herd_pki::Subject::new(herd_pki::Holder::Machine("node1".into()), time::Duration::minutes(1));
    let ended = site.issue(herd_pki::Authority::Etcd, &subject, herd_pki::KeySource::Generate, ago).unwrap();
    ok(&herdctl(&["pki", "--dir", pki_s, "issue", "machine", "node1", "--out", dir.join("node1").to_str().unwrap()]));
    let copy = pki.join("issued/etcd").join(format!("{}.crt", ended.info.serial));
    // Not yet 30 days ended: nothing to prune.
    let text = ok(&herdctl(&["pki", "--dir", pki_s, "prune"]));
    assert!(text.contains("removed 0 certificate copies"), "{text}");
    let dry = ok(&herdctl(&["pki", "--dir", pki_s, "prune", "--ended-days", "0", "--dry-run", "-o", "json"]));
    let lines: Vec<serde_json::Value> = serde_json::from_str(&dry).unwrap();
    assert_eq!(lines.len(), 1, "{dry}");
    assert_eq!(lines[0]["serial"], ended.info.serial.as_str());
    assert!(lines[0]["days_left"].as_i64().unwrap() < 0, "{dry}");
    assert!(copy.exists(), "a dry run removes nothing");
    let text = ok(&herdctl(&["pki", "--dir", pki_s, "prune", "--ended-days", "0"]));
    assert!(text.contains("machine:node1") && text.contains("removed 1 certificate copies"), "{text}");
    assert!(!copy.exists());
    let all = ok(&herdctl(&["pki", "--dir", pki_s, "status", "--all", "-o", "json"]));
    let lines: Vec<serde_json::Value> = serde_json::from_str(&all).unwrap();
    let node1: Vec<&serde_json::Value> = lines.iter().filter(|l| l["common_name"] == "machine:node1").collect();
    assert_eq!(node1.len(), 1, "its newest stays: {all}");
    let _ = std::fs::remove_dir_all(&dir);
}
