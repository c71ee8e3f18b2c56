//! What the initramfs stage leaves for the running system (`/run/herd/boot.json`) and what `node-init status`
//! and the daemon's ready line show: which image and slot booted, how long each stage took, and whether the
//! system is laid out as it must be (`/usr` read-only, `/etc` and `/var` writable).

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where the initramfs stage writes its report.
pub const BOOT_REPORT: &str = "/run/herd/boot.json";

/// The initramfs stage's account of the boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootReport {
    /// Image name.
    pub image: String,
    /// Image release (from the slot header; empty for a device root).
    pub release: String,
    /// Kernel version.
    pub kernel: String,
    /// Where the root came from.
    pub source: String,
    /// The installed disk, if any.
    pub disk: Option<String>,
    /// The slot booted, if any.
    pub slot: Option<herd_images::slot::Slot>,
    /// Whether this boot spent a try of a not-yet-successful slot.
    pub tried: bool,
    /// Slots passed over, and why.
    pub failed_slots: Vec<String>,
    /// The verity root hash of the mounted root.
    pub root_hash: String,
    /// What holds /etc and /var (`tmpfs` or the STATE device).
    pub state: String,
    /// Milliseconds since the kernel started when node-init began.
    pub initrd_started_ms: u64,
    /// ... when the modules were loaded.
    pub modules_loaded_ms: u64,
    /// ... when the boot NIC had its address (provisioned boots).
    pub network_ms: u64,
    /// ... when the config had arrived (provisioned boots).
    pub config_ms: u64,
    /// ... when the image was installed or fetched into RAM (install boots).
    pub installed_ms: Option<u64>,
    /// ... when the verified root was mounted.
    pub root_mounted_ms: u64,
    /// ... when the bond had its address (when the node config has one and it could be built).
    #[serde(default)]
    pub bond_ms: Option<u64>,
    /// ... at switch_root.
    pub switch_root_ms: u64,
    /// Time spent in the initramfs stage.
    pub initrd_ms: u64,
}

/// The running system, as the daemon and `node-init status` see it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemReport {
    /// The initramfs's report, if this system booted through it.
    pub boot: Option<BootReport>,
    /// `PRETTY_NAME` of /etc/os-release.
    pub os: String,
    /// `/etc/herd-release`.
    pub herd_release: String,
    /// Whether a file can be created under /usr (must be false).
    pub usr_writable: bool,
    /// Whether /etc is writable (must be true).
    pub etc_writable: bool,
    /// Whether /var is writable (must be true).
    pub var_writable: bool,
    /// `/etc/machine-id` (kept across boots on an installed node: /etc lives on STATE).
    pub machine_id: String,
    /// Milliseconds since the kernel started, now.
    pub uptime_ms: u64,
}

fn writable(dir: &str) -> bool {
    let probe = Path::new(dir).join(format!(".herd-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

fn os_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(&format!("{key}=")).map(|v| v.trim_matches('"').to_owned()))
}

impl SystemReport {
    /// Looks at the running system.
    pub fn probe() -> SystemReport {
        let boot = std::fs::read_to_string(BOOT_REPORT).ok().and_then(|t| serde_json::from_str(&t).ok());
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        SystemReport {
            boot,
            os: os_field(&os_release, "PRETTY_NAME").unwrap_or_default(),
            herd_release: std::fs::read_to_string("/etc/herd-release").unwrap_or_default().trim().to_owned(),
            usr_writable: writable("/usr"),
            etc_writable: writable("/etc"),
            var_writable: writable("/var"),
            machine_id: std::fs::read_to_string("/etc/machine-id").unwrap_or_default().trim().to_owned(),
            uptime_ms: crate::initrd::uptime_ms(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn os_release_fields_are_read_unquoted() {
        let t = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n";
        assert_eq!(os_field(t, "PRETTY_NAME").unwrap(), "Debian GNU/Linux 12 (bookworm)");
        assert_eq!(os_field(t, "ID").unwrap(), "debian");
        assert!(os_field(t, "VERSION_ID").is_none());
    }
}
