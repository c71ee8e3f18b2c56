//! The provisioner's optional config file and its command line: the shipped example parses, flags override the
//! file, and mistakes are refused with the file named.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::path::Path;
use std::process::Command;

use herd_provisioner::daemon::FileConfig;

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/provisioner/provisioner.toml")
}

#[test]
fn the_example_config_parses_with_paths_relative_to_it() {
    let config = FileConfig::load(&example()).unwrap();
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
        ("version = 1\nmode = \"half\"\n", "unknown value \"half\""),
        ("version = 2\n", "version 2 is not supported"),
    ] {
        let path = dir.join("p.toml");
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", FileConfig::load(&path).unwrap_err());
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
}
