//! The provisioner's part in a machine's life beyond the first install.
//!
//! A/B slots: a machine installed with one release gets a newer one written into slot B (to be tried once) while
//! the provisioner starts serving that release; it boots B, which node-init commits and reports; then B is
//! damaged, and the machine falls back to A in the same boot, which it may do only because the provisioner
//! vouches for the root hashes of both of its slots (it kept the older release's boot files).
//!
//! A provisioner restart in the middle of a boot: the machine, already in its initramfs, rides it out (DHCP and
//! the config fetch retry) and boots once the provisioner is back, with the per-boot token it was given before.
//!
//! Needs root, QEMU and iPXE.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use herd_images::slot::{self, Slot};
use herd_qemu::image::herd_os;
use herd_qemu::{Firmware, Lab, VmSpec};
use serde_json::Value;

const READY: &str = herd_qemu::NODE_INIT_READY;
const HEALTHY: &str = "herd-node-init: reported healthy";
const LIMIT: Duration = Duration::from_secs(600);
const MACS: [&str; 2] = ["52:54:00:99:01:01", "52:54:00:99:01:02"];

fn report(line: &str) -> Value {
    herd_qemu::ready_report(line).unwrap()
}

/// Boots node1 (again) from the network with its disk and waits until it reported healthy; returns its report.
fn boot(lab: &mut Lab, name: &str, disk: &Path) -> (usize, Value) {
    let i = lab.start_vm(VmSpec::new(name, Firmware::SeabiosIpxe, &MACS).with_disk(disk).memory(1024)).unwrap();
    let (took, _) = lab.vms()[i].wait_for(HEALTHY, LIMIT).unwrap();
    let (_, line) = lab.vms()[i].wait_for_within(READY, Duration::from_secs(1)).unwrap();
    println!("figures: {name}: power-on -> reported healthy {:.1} s", took.as_secs_f64());
    (i, report(&line))
}

/// examples/qemu-3.toml cut to its first machine (one master: a one-member etcd), changed by `edit`.
fn one_machine(name: &str, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/qemu-3.toml")).unwrap();
    let second = text.match_indices("[[machines]]").nth(1).unwrap().0;
    let scratch = std::env::temp_dir().join(format!("herd-qemu-{name}-{}.toml", std::process::id()));
    std::fs::write(&scratch, edit(text[..second].to_owned())).unwrap();
    scratch
}

/// The slot table the provisioner keeps for node1.
fn kept_slots(lab: &Lab) -> Value {
    lab.api("/api/v1/machines/node1").unwrap()["slots"].clone()
}

#[test]
fn a_machine_boots_its_new_slot_through_the_provisioner_and_falls_back_to_the_old_one_it_vouches_for() {
    // One master alone: a one-member etcd, so the machine registers and reports healthy by itself.
    let scratch = one_machine("slots", |t| t);
    let mut lab = Lab::new(&scratch).unwrap();
    let (old, new) = (lab.dir.join("image-old"), lab.dir.join("image-new"));
    let a = herd_os(&old, None).unwrap();
    let b = herd_os(&new, Some("2026.11.99")).unwrap();
    assert_ne!(a.verity.root_hash, b.verity.root_hash);
    lab.boot_assets_image(&old).unwrap();
    lab.start_provisioner().unwrap();
    let disk = lab.dir.join("node1.qcow2");
    herd_qemu::qcow2(&disk).unwrap();

    // Installed with the old release, slot A: the provisioner learns the slot table.
    let (i, first) = boot(&mut lab, "install", &disk);
    assert_eq!(
        (first["boot"]["slot"].as_str(), first["boot"]["release"].as_str()),
        (Some("a"), Some(a.release.as_str()))
    );
    let slots = kept_slots(&lab);
    assert_eq!(slots["booted"], "a", "{slots}");
    assert_eq!(slots["slots"][0]["flags"]["successful"], true, "{slots}");
    lab.power_off(i);

    // The newer release goes into slot B, to be tried once, and the provisioner now serves it.
    let staged = slot::on_raw(&disk, |raw| slot::install(raw, Slot::B, &new, slot::DEFAULT_SLOT_BYTES)).unwrap();
    assert_eq!((staged.flags.tries, staged.flags.successful), (1, false));
    lab.boot_assets_image(&new).unwrap();
    let (i, second) = boot(&mut lab, "slot-b", &disk);
    assert_eq!((second["boot"]["slot"].as_str(), second["boot"]["release"].as_str()), (Some("b"), Some("2026.11.99")));
    assert!(!lab.vms()[i].console().contains("installing to"), "no reinstall");
    let slots = kept_slots(&lab);
    assert_eq!(slots["booted"], "b", "{slots}");
    let b_state = slots["slots"].as_array().unwrap().iter().find(|s| s["slot"] == "b").unwrap().clone();
    assert_eq!(b_state["flags"]["successful"], true, "B committed: {slots}");
    lab.power_off(i);

    // B is damaged: verity refuses it and node-init falls back to A in the same boot, because the provisioner's
    // command line vouches for both slots' images.
    let offset = b_state["offset"].as_u64().unwrap();
    slot::on_raw(&disk, |raw| {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(raw)?;
        let mut byte = [0u8; 1];
        f.seek(SeekFrom::Start(offset + 1000))?;
        f.read_exact(&mut byte)?;
        f.seek(SeekFrom::Start(offset + 1000))?;
        f.write_all(&[byte[0] ^ 0xff])?;
        Ok(())
    })
    .unwrap();
    let (i, third) = boot(&mut lab, "fallback", &disk);
    assert_eq!(
        (third["boot"]["slot"].as_str(), third["boot"]["release"].as_str()),
        (Some("a"), Some(a.release.as_str()))
    );
    let passed = third["boot"]["failed_slots"].to_string();
    assert!(passed.contains("slot b") && passed.contains("dm-verity"), "{passed}");
    let console = lab.vms()[i].console();
    let cmdline = console.lines().find(|l| l.contains("Kernel command line:")).unwrap();
    let vouched = format!("herd.verity.roothash={},{}", b.verity.root_hash, a.verity.root_hash);
    assert!(cmdline.contains(&vouched), "the served image's hash and the kept one's: {cmdline}");
    let slots = kept_slots(&lab);
    assert_eq!(slots["booted"], "a", "{slots}");
    let timeline = lab.api("/api/v1/machines/node1/timeline").unwrap();
    let reported: Vec<&str> = timeline
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "slots")
        .filter_map(|e| e["detail"].as_str())
        .collect();
    assert!(
        reported.last().is_some_and(|d| d.contains("booted a") && d.contains("b: herd-os 2026.11.99 bad")),
        "{reported:?}"
    );
    drop(lab);
    std::fs::remove_file(&scratch).unwrap();
}

#[test]
fn a_machine_in_its_initramfs_rides_out_a_provisioner_restart() {
    // Diskless: the shortest way from the initramfs to a running system.
    let scratch = one_machine("outage", |t| t.replacen("disk = \"/dev/vda\"\n", "", 1));
    let mut lab = Lab::new(&scratch).unwrap();
    let image = lab.dir.join("image");
    herd_os(&image, None).unwrap();
    lab.boot_assets_image(&image).unwrap();
    lab.start_provisioner().unwrap();
    let i = lab.start_vm(VmSpec::new("node1", Firmware::SeabiosIpxe, &MACS).memory(1024)).unwrap();

    // Once the kernel runs (kernel and initramfs fetched; node-init's DHCP is seconds away), the provisioner goes
    // away: DHCP, TFTP, HTTP, all of it, for OUTAGE, then comes back on the same state (leases, tokens).
    lab.vms()[i].wait_for("Linux version", LIMIT).unwrap();
    lab.stop_provisioner().unwrap();
    const OUTAGE: Duration = Duration::from_secs(15);
    // The outage's length is what is tested, not a wait for an event.
    std::thread::sleep(OUTAGE);
    lab.start_provisioner().unwrap();

    let (took, line) = lab.vms()[i].wait_for(READY, LIMIT).unwrap();
    let r = report(&line);
    let b = &r["boot"];
    let waited = b["network_ms"].as_u64().unwrap() - b["modules_loaded_ms"].as_u64().unwrap();
    println!(
        "figures: a provisioner restart ({} s down) during the initramfs: the machine got its lease {:.1} s after \
         its modules, node-init ready {:.1} s after power-on",
        OUTAGE.as_secs(),
        waited as f64 / 1000.0,
        took.as_secs_f64()
    );
    assert!(waited >= OUTAGE.as_millis() as u64 / 2, "DHCP waited for the provisioner ({waited} ms)");
    assert!(!lab.vms()[i].console().contains("BOOT STOPPED"));
    let timeline = lab.api("/api/v1/machines/node1/timeline").unwrap();
    let events: Vec<&str> = timeline.as_array().unwrap().iter().filter_map(|e| e["event"].as_str()).collect();
    for stage in ["phone-home:initramfs", "phone-home:configured"] {
        assert!(events.contains(&stage), "{stage} recorded after the restart: {events:?}");
    }
    drop(lab);
    std::fs::remove_file(&scratch).unwrap();
}
