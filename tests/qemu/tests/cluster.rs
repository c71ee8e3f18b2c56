//! Machines booted by the provisioner into herd's image: PXE, node-init's network and config stages, install into
//! slot A of the machine's disk, the verified root, the config applied, healthy reported. Needs root, QEMU, OVMF,
//! iPXE, and the network mirror for the first image build.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use herd_qemu::image::herd_os;
use herd_qemu::{Firmware, Lab, VmSpec};
use serde_json::Value;

const READY: &str = "herd-node-init: ready";
const LIMIT: Duration = Duration::from_secs(300);

fn qcow2(path: &Path) {
    let ok = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("4G")
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn report(line: &str) -> Value {
    serde_json::from_str(line[line.find(READY).unwrap() + READY.len()..].trim()).unwrap()
}

#[test]
fn a_machine_installs_from_the_provisioner_applies_its_config_and_reboots_into_its_slot() {
    let inventory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/qemu-3.toml");
    let mut lab = Lab::new(&inventory).unwrap();
    let image = lab.dir.join("image");
    herd_os(&image, None).unwrap();
    lab.boot_assets_image(&image).unwrap();
    lab.start_provisioner().unwrap();
    let disk = lab.dir.join("node1.qcow2");
    qcow2(&disk);
    let spec = VmSpec::new("node1", Firmware::SeabiosIpxe, &["52:54:00:99:01:01", "52:54:00:99:01:02"])
        .with_disk(&disk)
        .memory(1024);
    let i = lab.start_vm(spec.clone()).unwrap();
    let (took, line) = lab.vms()[i].wait_for(READY, LIMIT).unwrap();
    let r = report(&line);
    assert_eq!(r["boot"]["slot"], "a", "{r}");
    assert_eq!(r["usr_writable"], false, "{r}");
    let console = lab.vms()[i].console();
    assert!(console.contains("herd-initrd: installed"), "the first boot installs");
    let b = &r["boot"];
    println!(
        "figures: node1 first boot: QEMU start -> ready {:.1} s; after the kernel: initramfs {} ms, network {} ms, \
         config {} ms, installed {} ms, root {} ms, switch_root {} ms",
        took.as_secs_f64(),
        b["initrd_started_ms"],
        b["network_ms"],
        b["config_ms"],
        b["installed_ms"],
        b["root_mounted_ms"],
        b["switch_root_ms"]
    );
    lab.vms()[i].wait_for("reported healthy", Duration::from_secs(120)).unwrap();
    let machine = lab.api("/api/v1/machines/node1").unwrap();
    assert_eq!(machine["state"], "running", "{machine}");
    let timeline = lab.api("/api/v1/machines/node1/timeline").unwrap();
    let events: Vec<String> =
        timeline.as_array().unwrap().iter().filter_map(|e| e["event"].as_str().map(str::to_owned)).collect();
    for stage in ["initramfs", "installing", "installed", "configured", "healthy"] {
        assert!(events.contains(&format!("phone-home:{stage}")), "no {stage} in {events:?}");
    }
}
