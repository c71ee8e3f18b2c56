//! The daemon stage (systemd service `herd-node-init.service`): reports the booted system, commits the A/B slot
//! it booted from once the system is up, and stays as the node's agent host. (etcd, registration and the unit
//! agent come with issue #5.)

use std::path::Path;

use herd_config::node::{NODE_CONFIG_PATH, NodeConfig};
use herd_images::slot;

use crate::report::SystemReport;

/// The line prefix tests and operators look for on the console.
pub const READY: &str = "herd-node-init: ready";

/// Marks the booted slot successful: it reached multi-user with node-init running, so it stays the slot to boot.
/// Returns the slot table as it is now, for the provisioner.
fn commit_slot(report: &SystemReport) -> anyhow::Result<Option<slot::SlotReport>> {
    let Some(boot) = &report.boot else { return Ok(None) };
    let (Some(disk), Some(s)) = (&boot.disk, boot.slot) else { return Ok(None) };
    let slots = anyhow::Context::with_context(slot::update(Path::new(disk), |t| slot::mark_good(t, s)), || {
        format!("committing slot {s} of {disk}")
    })?;
    Ok(Some(slot::SlotReport { disk: disk.clone(), booted: s, slots }))
}

/// The line printed once systemd finished starting the system.
pub const BOOT_COMPLETE: &str = "herd-node-init: boot complete:";

fn systemctl(args: &[&str]) -> String {
    std::process::Command::new("systemctl")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|e| format!("systemctl: {e}"))
}

/// Waits for systemd to finish the boot transaction, then says where it ended (the boot timeline's last stage).
fn report_boot_complete() {
    let state = systemctl(&["is-system-running", "--wait"]);
    let target = systemctl(&["is-active", "multi-user.target"]);
    let reached = systemctl(&["show", "multi-user.target", "-P", "ActiveEnterTimestampMonotonic"]);
    let reached_ms = reached.parse::<u64>().map_or(0, |us| us / 1000);
    let failed = systemctl(&["list-units", "--failed", "--plain", "--no-legend"]);
    let failed: Vec<&str> = failed.lines().filter_map(|l| l.split_whitespace().next()).collect();
    println!(
        "{BOOT_COMPLETE} multi-user.target {target} at {reached_ms} ms, system {state} at {} ms after the kernel; \
         failed units: {}",
        crate::initrd::uptime_ms(),
        if failed.is_empty() { "none".to_owned() } else { failed.join(" ") }
    );
}

/// Tells the provisioner this machine is healthy (which commits its slot there), retrying while the machine's
/// network (systemd-networkd, from its config) comes up.
fn report_healthy(p: &crate::provision::Provisioner, detail: &str, slots: Option<&slot::SlotReport>) {
    let deadline = std::time::Instant::now() + HEALTHY_LIMIT;
    loop {
        match p.try_phone_slots("healthy", detail, slots) {
            Ok(()) => {
                println!("herd-node-init: reported healthy to {}", p.url);
                return;
            }
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            Err(e) => {
                tracing::warn!(provisioner = %p.url, error = %crate::error::chain(&e), "could not report healthy for {} s", HEALTHY_LIMIT.as_secs());
                return;
            }
        }
    }
}

/// How long the healthy report is retried.
const HEALTHY_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// Runs the daemon stage until stopped.
pub fn run() -> anyhow::Result<()> {
    crate::log::init();
    let report = SystemReport::probe();
    if report.usr_writable {
        tracing::warn!("/usr is writable: this system is not running from a verified root");
    }
    let cmd = crate::cmdline::Cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let prov = cmd.map(|c| crate::provision::Provisioner::from_cmdline(&c)).unwrap_or(Ok(None)).unwrap_or(None);
    // The running system reports signed by the machine's key (the token on the command line, which every process
    // here can read, was spent when this boot joined).
    if let Some(p) = &prov {
        p.sign_reports_with(std::path::PathBuf::from(herd_config::node::TLS_DIR));
    }
    println!("{READY} {}", serde_json::to_string(&report)?);
    std::thread::spawn(report_boot_complete);
    let committed = report.clone();
    let renewer = prov.clone();
    let healthy = move |detail: &str| {
        // The slot that got this far stays the one to boot.
        let slots = match commit_slot(&committed) {
            Ok(Some(r)) => {
                println!("herd-node-init: slot {} of {} marked good", r.booted, r.disk);
                Some(r)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "cannot mark the booted slot good");
                None
            }
        };
        if let Some(p) = prov {
            let detail = detail.to_owned();
            std::thread::spawn(move || report_healthy(&p, &detail, slots.as_ref()));
        }
    };
    let slot = report.boot.as_ref().and_then(|b| b.slot).map_or("none (RAM)".to_owned(), |s| s.to_string());
    match std::fs::read_to_string(NODE_CONFIG_PATH) {
        Ok(text) => {
            let node: NodeConfig =
                anyhow::Context::with_context(serde_json::from_str(&text), || format!("reading {NODE_CONFIG_PATH}"))?;
            // Healthy means registered: the provisioner commits the slot only for a machine that joined.
            crate::member::run(&node, &report, renewer, move |detail| healthy(&format!("{detail}, slot {slot}")))
        }
        Err(_) => {
            println!("herd-node-init: no {NODE_CONFIG_PATH}: not joining a cluster");
            healthy(&format!("node-init up, slot {slot}, {} ms after the kernel", report.uptime_ms));
            loop {
                std::thread::park();
            }
        }
    }
}
