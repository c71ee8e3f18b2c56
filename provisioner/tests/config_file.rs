//! The provisioner's optional config file and its command line: the shipped example parses, flags override the
//! file, and mistakes are refused with the file named.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::path::Path;
use std::process::Command;

use herd_provisioner::daemon::Settings;

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/provisioner/provisioner.toml")
}

#[test]
fn the_example_config_parses_with_paths_relative_to_it() {
    let config = Settings::load(&example()).unwrap();
    assert_eq!(config.interface.as_deref(), Some("bond0"));
    let inventory = config.inventory.unwrap();
    assert!(inventory.ends_with("examples/provisioner/../site-450.toml"), "{}", inventory.display());
    assert!(herd_inventory::load(&inventory).is_ok());
    assert_eq!(config.assets_port, Some(8080));
}

#[test]
fn unknown_keys_bad_values_and_versions_are_refused() {
    let dir = std::env::temp_dir().join(format!("herd-provisioner-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (text, expect) in [
        ("version = 1\nbogus = 1\n", "unknown field `bogus`"),
        ("version = 1\nmode = \"half\"\n", "unknown variant `half`, expected `full` or `proxy`"),
        ("version = 1\nmode = \"serve\"\n", "unknown variant `serve`, expected `full` or `proxy`"),
        ("version = 1\nunknown_macs = \"proxy\"\n", "unknown variant `proxy`, expected `ignore` or `serve`"),
        ("interface = \"eth0\"\n", "no `version`"),
        ("version = 2\n", "version 2 is not supported"),
    ] {
        let path = dir.join("p.toml");
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", Settings::load(&path).unwrap_err());
        assert!(err.contains(expect) && err.contains("p.toml"), "{err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn flags_override_the_file_and_missing_settings_are_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_provisioner")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--inventory is required"));
    let out = Command::new(env!("CARGO_BIN_EXE_provisioner"))
        .args(["--config", example().to_str().unwrap(), "--interface", "no-such-nic0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // The inventory came from the file (it loaded), the interface from the flag.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no network interface named \"no-such-nic0\""), "{stderr}");
    // A certificate validity out of range is named before anything starts.
    let pki = |secs| Settings {
        inventory: Some("i.toml".into()),
        interface: Some("eth0".into()),
        state_dir: Some("/tmp/s".into()),
        site_pki: Some("/tmp/pki".into()),
        cert_validity_secs: Some(secs),
        ..Settings::default()
    };
    let err = pki(59).resolve().unwrap_err().to_string();
    assert!(err.contains("--cert-validity-secs 59 is out of range: use 60 to 31536000 seconds"), "{err}");
    assert_eq!(pki(3600).resolve().unwrap().site_pki.unwrap().cert_validity, time::Duration::hours(1));
}

#[test]
fn the_help_states_the_defaults_the_daemon_uses() {
    let out = Command::new(env!("CARGO_BIN_EXE_provisioner")).arg("--help").output().unwrap();
    // clap wraps long lines: compare with the line breaks and indentation taken out.
    let help: String = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    let d = Settings::defaults();
    let path = |p: Option<std::path::PathBuf>| p.unwrap().display().to_string();
    for (flag, value) in [
        ("--ipxe-dir", path(d.ipxe_dir)),
        ("--mode", "full".to_owned()),
        ("--unknown-macs", "ignore".to_owned()),
        ("--http-port", d.http_port.unwrap().to_string()),
        ("--assets-port", d.assets_port.unwrap().to_string()),
        ("--lease-secs", d.lease_secs.unwrap().to_string()),
        ("--assets", path(d.assets)),
        ("--cert-validity-secs", d.cert_validity_secs.unwrap().to_string()),
        ("--prune-certificates-days", d.prune_certificates_days.unwrap().to_string()),
    ] {
        let at = help.find(&format!("{flag} <")).unwrap_or_else(|| panic!("no {flag} in {help}"));
        let text = &help[at..];
        let end = text[2..].find(" --").map_or(text.len(), |i| i + 2);
        assert!(text[..end].contains(&format!("[default: {value}]")), "{flag}: {}", &text[..end]);
    }
    assert_eq!(d.mode, Some(herd_provisioner::dhcp::server::Mode::Full));
    assert_eq!(d.unknown_macs, Some(herd_provisioner::dhcp::server::UnknownMacs::Ignore));
}
