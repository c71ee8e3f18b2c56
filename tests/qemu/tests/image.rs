//! The herd OS image under QEMU (TCG, direct kernel boot): it reaches multi-user with node-init's service running
//! on a verified, read-only root; a tampered root never runs; an installed disk boots its slot, tries a new one,
//! and falls back when that one is corrupted (a qcow2 disk, written as herdctl image install writes it). Needs
//! root, QEMU, and the network mirror for the first image build.
#![allow(clippy::unwrap_used)]

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use herd_images::slot::{self, Slot};
use herd_qemu::image::herd_os;
use herd_qemu::{DirectBoot, Drive, Vm};
use serde_json::Value;

const READY: &str = herd_qemu::NODE_INIT_READY;
/// node-init's line once systemd finished the boot.
const BOOT_COMPLETE: &str = "herd-node-init: boot complete:";
const BOOT_LIMIT: Duration = Duration::from_secs(150);

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("herd-qemu-image-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept for inspection: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn boot(dir: &Path, name: &str, image: &Path, append: String, drives: Vec<Drive>) -> Vm {
    let b = DirectBoot {
        name: name.into(),
        kernel: image.join("vmlinuz"),
        initrd: image.join("initramfs"),
        append: format!("console=ttyS0 panic=-1 herd.failure=poweroff {append}"),
        drives,
        memory_mb: 768,
    };
    Vm::start_direct(&b, dir).unwrap()
}

/// The JSON the daemon stage prints once the system is up.
fn ready_report(vm: &Vm) -> (Duration, Value) {
    let (at, line) = vm.wait_for(READY, BOOT_LIMIT).unwrap();
    (at, herd_qemu::ready_report(&line).unwrap())
}

#[test]
fn the_image_boots_to_multi_user_with_node_init_running_and_a_read_only_usr() {
    let s = Scratch::new("boot");
    let out = s.0.join("image");
    let m = herd_os(&out, None).unwrap();
    let vm = boot(
        &s.0,
        "direct",
        &out,
        format!("ro herd.usr=/dev/vda herd.usr.hash=/dev/vdb herd.verity.roothash={}", m.verity.root_hash),
        vec![
            Drive { path: out.join("root.squashfs"), readonly: true },
            Drive { path: out.join("root.verity"), readonly: true },
        ],
    );
    let (ready_at, r) = ready_report(&vm);
    let (_, complete) = vm.wait_for(BOOT_COMPLETE, BOOT_LIMIT).unwrap();
    assert!(complete.contains("multi-user.target active"), "{complete}");
    assert!(complete.contains("failed units: none"), "{complete}");
    assert_eq!(r["usr_writable"], false, "{r}");
    assert_eq!(r["etc_writable"], true, "{r}");
    assert_eq!(r["var_writable"], true, "{r}");
    assert!(r["os"].as_str().unwrap().starts_with("Debian GNU/Linux 12"), "{r}");
    assert_eq!(r["herd_release"], format!("herd {} {}", m.name, m.release));
    assert_eq!(r["boot"]["root_hash"], m.verity.root_hash.as_str());
    assert_eq!(r["boot"]["state"], "tmpfs");
    assert!(!r["machine_id"].as_str().unwrap().is_empty(), "systemd wrote a machine id into the writable /etc");
    let b = &r["boot"];
    println!(
        "figures: QEMU start -> node-init ready {:.1} s; after the kernel started: initramfs {} ms, modules {} ms, \
         verified root mounted {} ms, switch_root {} ms (initramfs stage {} ms); {}",
        ready_at.as_secs_f64(),
        b["initrd_started_ms"],
        b["modules_loaded_ms"],
        b["root_mounted_ms"],
        b["switch_root_ms"],
        b["initrd_ms"],
        &complete[complete.find(BOOT_COMPLETE).unwrap() + BOOT_COMPLETE.len()..].trim()
    );
    let sizes: Vec<String> =
        m.files.iter().map(|(n, f)| format!("{n} {:.1} MiB", f.size as f64 / (1 << 20) as f64)).collect();
    println!("figures: image {}", sizes.join(", "));
}

fn flip_byte(path: &Path, at: u64) {
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    std::io::Read::read_exact(&mut f, &mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
}

#[test]
fn a_root_with_one_byte_changed_stops_the_boot_with_a_verity_error() {
    let s = Scratch::new("tamper");
    let out = s.0.join("image");
    let m = herd_os(&out, None).unwrap();
    let tampered = s.0.join("root.squashfs");
    std::fs::copy(out.join("root.squashfs"), &tampered).unwrap();
    // Inside the first data block (the squashfs superblock's block): read by every mount.
    flip_byte(&tampered, 1000);
    let mut vm = boot(
        &s.0,
        "tampered",
        &out,
        format!("ro herd.usr=/dev/vda herd.usr.hash=/dev/vdb herd.verity.roothash={}", m.verity.root_hash),
        vec![Drive { path: tampered, readonly: true }, Drive { path: out.join("root.verity"), readonly: true }],
    );
    let (_, line) = vm.wait_for("BOOT STOPPED", BOOT_LIMIT).unwrap();
    assert!(line.contains("dm-verity") && line.contains("does not match root hash"), "{line}");
    assert!(vm.wait_exit(Duration::from_secs(30)).unwrap(), "herd.failure=poweroff powers the machine off");
    let console = vm.console();
    assert!(!console.contains("switching to"), "the tampered root was never switched to");
    assert!(!console.contains("systemd[1]"), "nothing from the tampered root ran");
}

#[test]
fn an_installed_disk_boots_its_slot_tries_a_new_one_and_falls_back_when_it_is_corrupted() {
    let s = Scratch::new("slots");
    let (out_a, out_b) = (s.0.join("image-a"), s.0.join("image-b"));
    let a = herd_os(&out_a, None).unwrap();
    let b = herd_os(&out_b, Some("2026.11.99")).unwrap();
    assert_ne!(a.verity.root_hash, b.verity.root_hash);
    let disk = s.0.join("disk.qcow2");
    herd_qemu::qcow2(&disk).unwrap();
    let install = |slot: Slot, image: &Path| {
        slot::on_raw(&disk, |raw| slot::install(raw, slot, image, slot::DEFAULT_SLOT_BYTES)).unwrap()
    };
    let read_slots = || slot::on_raw(&disk, |raw| Ok(slot::read_slots(&mut std::fs::File::open(raw)?)?.1)).unwrap();
    let installed = install(Slot::A, &out_a);
    assert!(installed.partitioned && installed.flags.successful);
    assert!(slot::is_qcow2(&disk), "the disk is still a qcow2 image");

    // sgdisk, an independent reader, finds a valid table with herd's partitions.
    let check = s.0.join("check.raw");
    let converted =
        std::process::Command::new("qemu-img").args(["convert", "-O", "raw"]).arg(&disk).arg(&check).status().unwrap();
    assert!(converted.success());
    let verify = std::process::Command::new("sgdisk").arg("-v").arg(&check).output().unwrap();
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(text.contains("No problems found"), "{text}");
    let print = std::process::Command::new("sgdisk").arg("-p").arg(&check).output().unwrap();
    let text = String::from_utf8_lossy(&print.stdout);
    for name in ["USR-A", "USR-B", "STATE"] {
        assert!(text.contains(name), "{text}");
    }
    std::fs::remove_file(&check).unwrap();

    let trust = format!("herd.verity.roothash={},{}", a.verity.root_hash, b.verity.root_hash);
    let run = |name: &str| {
        let vm = boot(&s.0, name, &out_a, trust.clone(), vec![Drive { path: disk.clone(), readonly: false }]);
        let (at, r) = ready_report(&vm);
        println!("figures: {name}: QEMU start -> node-init ready {:.1} s", at.as_secs_f64());
        (vm, r)
    };

    let (vm, first) = run("slot-a");
    assert_eq!(first["boot"]["slot"], "a", "{first}");
    assert_eq!(first["boot"]["release"], a.release.as_str());
    assert_eq!(first["usr_writable"], false);
    assert!(first["boot"]["state"].as_str().unwrap().starts_with("/dev/vda"), "{first}");
    drop(vm);

    let installed = install(Slot::B, &out_b);
    assert!(!installed.partitioned);
    assert_eq!((installed.flags.tries, installed.flags.successful), (1, false), "B is to be tried once");
    let (vm, second) = run("slot-b");
    assert_eq!(second["boot"]["slot"], "b", "{second}");
    assert_eq!(second["boot"]["release"], "2026.11.99");
    assert_eq!(second["boot"]["tried"], true);
    assert_eq!(second["machine_id"], first["machine_id"], "/etc on STATE survived the slot change");
    vm.wait_for_within("slot b of /dev/vda marked good", Duration::from_secs(10)).unwrap();
    drop(vm);
    let slots = read_slots();
    assert_eq!(slot::boot_order(&slots), [Slot::B, Slot::A], "B committed, A kept as the fallback");

    // Corrupt B's first block: verity refuses it, node-init marks it bad and boots A in the same boot.
    let b_offset = slots.iter().find(|x| x.slot == Slot::B).unwrap().offset;
    slot::on_raw(&disk, |raw| {
        flip_byte(raw, b_offset + 1000);
        Ok(())
    })
    .unwrap();
    let (vm, third) = run("fallback");
    assert_eq!(third["boot"]["slot"], "a", "{third}");
    let passed = third["boot"]["failed_slots"].to_string();
    assert!(passed.contains("slot b") && passed.contains("dm-verity"), "{passed}");
    assert!(vm.console().contains("slot b failed"), "the console says why B was passed over");
    drop(vm);
    assert_eq!(slot::boot_order(&read_slots()), [Slot::A], "B is marked bad");
}
