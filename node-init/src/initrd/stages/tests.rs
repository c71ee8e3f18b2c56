#![allow(clippy::unwrap_used)]
//! The boot's decisions over a fake [`System`] that records every side effect in order.

use std::net::Ipv4Addr;

use herd_images::gpt::SlotFlags;
use serde_json::json;

use super::*;
use crate::dhcp::Lease;

const TRUSTED: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const OTHER: &str = "2222222222222222222222222222222222222222222222222222222222222222";
const KERNEL: &str = "6.12.0-herd";

/// A machine whose side effects are lines in `calls`.
struct Fake {
    calls: Vec<String>,
    slots: Vec<SlotState>,
    /// Data devices whose blocks do not match their root hash.
    corrupt: Vec<PathBuf>,
    config: Result<Value, String>,
}

fn header(root_hash: &str, kernel: &str, release: &str) -> SlotHeader {
    SlotHeader {
        magic: slot::MAGIC.into(),
        name: "herd".into(),
        release: release.into(),
        key: "k".into(),
        kernel_version: kernel.into(),
        root_hash: root_hash.into(),
        data_bytes: 4096,
        hash_offset: 8192,
    }
}

fn state(s: Slot, priority: u8, tries: u8, successful: bool, header: Option<SlotHeader>) -> SlotState {
    SlotState { slot: s, flags: SlotFlags { priority, tries, successful }, header, offset: 0, size: 1 << 30 }
}

/// node-init's file inside an Ignition config, as the provisioner renders it.
fn ignition(disk: Option<&str>) -> Value {
    use base64::Engine as _;
    let node = json!({
        "version": 1, "machine": "node1", "fqdn": "node1.lab", "role": "master", "rack": "r1",
        "provisioner_url": "http://10.99.0.2:8080", "etcd_member": true, "etcd_endpoints": [], "labels": {},
        "disk": disk,
    });
    let data = base64::engine::general_purpose::STANDARD.encode(node.to_string());
    json!({
        "ignition": {"version": "3.4.0"},
        "storage": {"files": [{
            "path": herd_config::node::NODE_CONFIG_PATH,
            "contents": {"source": format!("data:;base64,{data}")},
        }]},
    })
}

impl Fake {
    fn new(slots: Vec<SlotState>) -> Fake {
        Fake { calls: Vec::new(), slots, corrupt: Vec::new(), config: Ok(ignition(Some("/dev/vda"))) }
    }

    fn did(&mut self, call: String) {
        self.calls.push(call);
    }

    /// The calls that start with one of `kinds`, in order.
    fn only(&self, kinds: &[&str]) -> Vec<String> {
        self.calls.iter().filter(|c| kinds.iter().any(|k| c.starts_with(k))).cloned().collect()
    }
}

impl System for Fake {
    fn say(&mut self, _: &str) {}

    fn uptime_ms(&self) -> u64 {
        self.calls.len() as u64
    }

    fn network(&mut self) -> Result<Link, BootError> {
        self.did("network".into());
        let address = Ipv4Addr::new(10, 99, 0, 11);
        let server = Ipv4Addr::new(10, 99, 0, 2);
        let lease = Lease { address, prefix: 24, router: None, server, lease_secs: None };
        Ok(Link { ifname: "eth0".into(), lease })
    }

    fn config(&mut self) -> Result<Value, BootError> {
        self.did("config".into());
        self.config.clone().map_err(|e| SysError::Invalid(e).into())
    }

    fn phone(&mut self, stage: &str, _: &str, slots: Option<&SlotReport>) {
        let with = slots.map_or(String::new(), |r| format!(" slots {}", r.booted));
        self.did(format!("phone {stage}{with}"));
    }

    fn install(&mut self, disk: &Path) -> Result<slot::Installed, BootError> {
        self.did(format!("install {}", disk.display()));
        let header = header(TRUSTED, KERNEL, "2");
        self.slots = vec![state(Slot::A, 2, 3, false, Some(header.clone())), state(Slot::B, 0, 0, false, None)];
        let flags = self.slots[0].flags;
        Ok(slot::Installed { slot: Slot::A, header, partitioned: true, flags })
    }

    fn fetch_to_ram(&mut self) -> Result<RamImage, BootError> {
        self.did("fetch_to_ram".into());
        Ok(RamImage { data: "/dev/loop0".into(), hash: "/dev/loop1".into(), root_hash: TRUSTED.into() })
    }

    fn resolve(&mut self, spec: &str) -> Result<PathBuf, BootError> {
        self.did(format!("resolve {spec}"));
        Ok(match spec.strip_prefix("PARTLABEL=") {
            Some("STATE") => "/dev/vda3".into(),
            Some(label) => PathBuf::from(format!("/dev/disk/by-partlabel/{label}")),
            None => spec.into(),
        })
    }

    fn slot_disk(&mut self) -> Result<(String, Vec<SlotState>), BootError> {
        self.did("slot_disk".into());
        Ok(("vda".into(), self.slots.clone()))
    }

    fn slot_partition(&mut self, disk: &str, s: Slot) -> Result<PathBuf, BootError> {
        Ok(PathBuf::from(format!("{disk}{}", if s == Slot::A { 1 } else { 2 })))
    }

    fn slot_header(&mut self, dev: &Path) -> Result<SlotHeader, BootError> {
        self.did(format!("slot_header {}", dev.display()));
        Ok(header(TRUSTED, KERNEL, "1"))
    }

    fn change_slots(&mut self, disk: &str, change: SlotChange) -> Result<Vec<SlotState>, BootError> {
        self.did(format!("change_slots {disk} {change:?}"));
        for st in &mut self.slots {
            match change {
                SlotChange::SpendTry(s) if st.slot == s => st.flags.tries = st.flags.tries.saturating_sub(1),
                SlotChange::MarkBad(s) if st.slot == s => {
                    st.flags = SlotFlags { priority: 0, tries: 0, successful: false };
                }
                _ => {}
            }
        }
        Ok(self.slots.clone())
    }

    fn mount_verified(&mut self, spec: &VeritySpec) -> Result<(), BootError> {
        self.did(format!(
            "mount_verified {} {} {}@{} {}",
            spec.name,
            spec.data.display(),
            spec.hash.display(),
            spec.hash_offset,
            &spec.root_hash[..4]
        ));
        if self.corrupt.contains(&spec.data) {
            let source = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(BootError::Verity { data: spec.data.clone(), root_hash: spec.root_hash.clone(), source });
        }
        Ok(())
    }

    fn format_state(&mut self, dev: &Path) -> Result<(), BootError> {
        self.did(format!("format_state {}", dev.display()));
        Ok(())
    }

    fn mount(&mut self, m: &Mount) -> Result<(), BootError> {
        self.did(format!("mount {m:?}"));
        Ok(())
    }

    fn apply_config(&mut self, config: &Value) -> Result<Applied, BootError> {
        assert!(!config.to_string().contains(herd_api::JOIN_CREDENTIAL_PATH), "the credential would be written");
        self.did("apply_config".into());
        Ok(Applied { files: 1, ..Applied::default() })
    }

    fn join(&mut self, _: &Value, node: &NodeConfig, credential: &str) -> Result<crate::identity::Joined, BootError> {
        self.did(format!("join {} {credential}", node.machine));
        Ok(crate::identity::Joined { machine: "AA:BB".into(), member: None })
    }
}

fn cmdline(extra: &str) -> Cmdline {
    Cmdline::parse(&format!("herd.verity.roothash={TRUSTED} {extra}")).unwrap()
}

fn report() -> BootReport {
    BootReport { kernel: KERNEL.into(), ..BootReport::default() }
}

#[test]
fn an_installed_disk_boots_its_best_slot_and_a_committed_slot_spends_no_try() {
    let mut fake = Fake::new(vec![
        state(Slot::A, 1, 0, true, Some(header(TRUSTED, KERNEL, "1"))),
        state(Slot::B, 2, 0, true, Some(header(TRUSTED, KERNEL, "2"))),
    ]);
    let mut r = report();
    let got = boot(&mut fake, &cmdline(""), None, &mut r).unwrap();
    assert!(got.is_none());
    assert_eq!(
        fake.only(&["mount_verified", "change_slots"]),
        ["mount_verified herd-usr-b /dev/vda2 /dev/vda2@8192 1111"]
    );
    assert_eq!((r.slot, r.release.as_str(), r.tried), (Some(Slot::B), "2", false));
    assert_eq!(r.source, "slot b of /dev/vda");
    assert_eq!(r.state, "/dev/vda3", "the slot disk's STATE partition holds /etc and /var");
    assert!(fake.only(&["network", "config", "phone", "install", "format_state", "apply_config"]).is_empty());
}

#[test]
fn a_slot_the_command_line_does_not_vouch_for_or_for_another_kernel_is_passed_over_untouched() {
    let mut fake = Fake::new(vec![
        state(Slot::A, 3, 0, true, Some(header(OTHER, KERNEL, "9"))),
        state(Slot::B, 2, 0, true, Some(header(TRUSTED, "5.10.0", "8"))),
    ]);
    let mut r = report();
    let err = boot(&mut fake, &cmdline(""), None, &mut r).unwrap_err();
    let text = crate::error::chain(&err);
    assert!(text.starts_with("no slot of /dev/vda could be booted"), "{text}");
    assert!(text.contains("slot a holds herd 9") && text.contains("does not vouch for"), "{text}");
    assert!(text.contains("slot b is for kernel 5.10.0, this is 6.12.0-herd"), "{text}");
    assert!(fake.only(&["mount", "change_slots"]).is_empty(), "nothing mounted, the table untouched: {:?}", fake.calls);
}

#[test]
fn a_new_slot_spends_a_try_and_one_that_fails_verification_is_marked_bad_and_the_other_boots() {
    let mut fake = Fake::new(vec![
        state(Slot::A, 1, 0, true, Some(header(TRUSTED, KERNEL, "1"))),
        state(Slot::B, 2, 3, false, Some(header(TRUSTED, KERNEL, "2"))),
    ]);
    fake.corrupt.push("/dev/vda2".into());
    let mut r = report();
    boot(&mut fake, &cmdline(""), None, &mut r).unwrap();
    assert_eq!(
        fake.only(&["mount_verified", "change_slots"]),
        [
            "change_slots /dev/vda SpendTry(B)",
            "mount_verified herd-usr-b /dev/vda2 /dev/vda2@8192 1111",
            "change_slots /dev/vda MarkBad(B)",
            "mount_verified herd-usr-a /dev/vda1 /dev/vda1@8192 1111",
        ]
    );
    assert_eq!(r.slot, Some(Slot::A));
    assert!(r.tried);
    assert_eq!(r.failed_slots.len(), 1);
    assert!(r.failed_slots[0].starts_with("slot b: dm-verity: /dev/vda2 does not match"), "{:?}", r.failed_slots);
}

#[test]
fn when_every_slot_fails_the_boot_stops_with_each_reason_and_nothing_writable_is_mounted() {
    let mut fake = Fake::new(vec![
        state(Slot::A, 1, 0, true, Some(header(TRUSTED, KERNEL, "1"))),
        state(Slot::B, 0, 0, false, None),
    ]);
    fake.corrupt.push("/dev/vda1".into());
    let err = boot(&mut fake, &cmdline(""), None, &mut report()).unwrap_err();
    assert!(matches!(&err, BootError::NoSlot { reasons, .. } if reasons.len() == 1), "{err:?}");
    assert!(fake.only(&["mount "]).is_empty(), "{:?}", fake.calls);
    let mut none = Fake::new(vec![state(Slot::A, 0, 0, false, None), state(Slot::B, 0, 0, false, None)]);
    let text = crate::error::chain(&boot(&mut none, &cmdline(""), None, &mut report()).unwrap_err());
    assert!(text.ends_with("both failed or were never installed"), "{text}");
}

#[test]
fn an_install_boot_writes_slot_a_boots_it_on_a_try_and_formats_state_before_mounting_it() {
    let mut fake = Fake::new(Vec::new());
    let mut r = report();
    let got = boot(&mut fake, &cmdline(""), Some(Mode::Install), &mut r).unwrap();
    assert_eq!(got.unwrap().node.machine, "node1");
    let effects = fake.only(&["network", "config", "phone", "install", "change", "mount_verified", "format", "mount"]);
    assert_eq!(
        effects,
        [
            "network",
            "phone initramfs",
            "config",
            "phone installing",
            "install /dev/vda",
            "phone installed",
            "change_slots /dev/vda SpendTry(A)",
            "mount_verified herd-usr-a /dev/vda1 /dev/vda1@8192 1111",
            "format_state /dev/vda3",
            "mount State(\"/dev/vda3\")",
            "mount Overlay(\"etc\")",
            "mount Overlay(\"var\")",
            "mount OnState { dir: \"docker\", at: \"var/lib/docker\" }",
            "mount Tmp",
            "phone configured slots a",
        ]
    );
    assert!(fake.calls.iter().position(|c| c == "apply_config") > fake.calls.iter().position(|c| c == "mount Tmp"));
    assert!(r.installed_ms.is_some() && r.network_ms > 0 && r.config_ms > r.network_ms);
}

#[test]
fn a_local_boot_from_the_provisioner_boots_the_slots_and_never_installs_or_formats() {
    let mut fake = Fake::new(vec![
        state(Slot::A, 1, 0, true, Some(header(TRUSTED, KERNEL, "1"))),
        state(Slot::B, 0, 0, false, None),
    ]);
    let mut r = report();
    boot(&mut fake, &cmdline("herd.usr=/dev/sdz"), Some(Mode::Local), &mut r).unwrap();
    assert!(fake.only(&["install", "fetch_to_ram", "format_state"]).is_empty(), "{:?}", fake.calls);
    assert_eq!(r.source, "slot a of /dev/vda", "a provisioned boot runs the slots, whatever herd.usr says");
    assert!(fake.calls.contains(&"apply_config".to_owned()));
}

#[test]
fn a_diskless_install_runs_the_image_from_ram_with_its_root_hash_on_a_tmpfs_state() {
    let mut fake = Fake::new(Vec::new());
    fake.config = Ok(ignition(None));
    let mut r = report();
    boot(&mut fake, &cmdline(""), Some(Mode::Install), &mut r).unwrap();
    assert_eq!(
        fake.only(&["fetch_to_ram", "install", "mount_verified", "format", "mount State"]),
        ["fetch_to_ram", "mount_verified herd-usr /dev/loop0 /dev/loop1@0 1111", "mount StateTmpfs",]
    );
    assert_eq!((r.source.as_str(), r.state.as_str()), ("device /dev/loop0", "tmpfs"));
}

#[test]
fn a_device_root_takes_its_hash_offset_from_the_slot_header_unless_a_hash_device_is_given() {
    let mut fake = Fake::new(Vec::new());
    let mut r = report();
    boot(&mut fake, &cmdline("herd.usr=/dev/vdb"), None, &mut r).unwrap();
    assert_eq!(
        fake.only(&["slot_header", "mount_verified"]),
        ["slot_header /dev/vdb", "mount_verified herd-usr /dev/vdb /dev/vdb@8192 1111"]
    );
    assert_eq!(r.state, "tmpfs", "a device root without herd.state= keeps /etc and /var in RAM");

    let mut fake = Fake::new(Vec::new());
    let mut r = report();
    boot(&mut fake, &cmdline("herd.usr=/dev/vdb herd.usr.hash=/dev/vdc herd.state=PARTLABEL=DATA"), None, &mut r)
        .unwrap();
    assert_eq!(fake.only(&["slot_header", "mount_verified"]), ["mount_verified herd-usr /dev/vdb /dev/vdc@0 1111"]);
    assert_eq!(r.state, "/dev/disk/by-partlabel/DATA");
}

#[test]
fn herd_state_tmpfs_keeps_etc_and_var_in_ram_even_on_a_slot_disk() {
    let mut fake = Fake::new(vec![
        state(Slot::A, 1, 0, true, Some(header(TRUSTED, KERNEL, "1"))),
        state(Slot::B, 0, 0, false, None),
    ]);
    let mut r = report();
    boot(&mut fake, &cmdline("herd.state=tmpfs"), None, &mut r).unwrap();
    assert_eq!(r.state, "tmpfs");
    assert!(fake.calls.contains(&"mount StateTmpfs".to_owned()));
}

#[test]
fn a_config_that_does_not_come_stops_the_boot_before_any_disk_is_touched() {
    let mut fake = Fake::new(Vec::new());
    fake.config = Err("no config from http://10.99.0.2 within 10 s".into());
    let err = boot(&mut fake, &cmdline(""), Some(Mode::Install), &mut report()).unwrap_err();
    assert!(crate::error::chain(&err).contains("no config from"), "{err}");
    assert_eq!(fake.calls, ["network", "phone initramfs", "config"]);

    // A config without node-init's file: refused the same way, before the disk.
    let mut fake = Fake::new(Vec::new());
    fake.config = Ok(json!({"ignition": {"version": "3.4.0"}}));
    let err = boot(&mut fake, &cmdline(""), Some(Mode::Install), &mut report()).unwrap_err();
    assert!(crate::error::chain(&err).contains("node-init.json in the config: missing"), "{err}");
    assert!(fake.only(&["install", "resolve", "mount"]).is_empty());
}

#[test]
fn a_join_credential_is_traded_after_state_is_mounted_and_never_applied_to_the_root() {
    let mut fake = Fake::new(Vec::new());
    let mut config = ignition(Some("/dev/vda"));
    let credential = json!({"path": herd_api::JOIN_CREDENTIAL_PATH, "contents": {"source": "data:,c0ffee"}});
    config["storage"]["files"].as_array_mut().unwrap().push(credential);
    fake.config = Ok(config);
    boot(&mut fake, &cmdline(""), Some(Mode::Install), &mut report()).unwrap();
    assert_eq!(
        fake.only(&["mount State", "join", "phone joined", "apply_config", "phone configured"]),
        ["mount State(\"/dev/vda3\")", "join node1 c0ffee", "phone joined", "apply_config", "phone configured slots a"],
        "keys go to STATE, so it is mounted first; the config applied holds no credential (Fake::apply_config)"
    );
    // Without a credential (a provisioner without a site PKI) there is no join.
    let mut plain = Fake::new(Vec::new());
    boot(&mut plain, &cmdline(""), Some(Mode::Install), &mut report()).unwrap();
    assert!(plain.only(&["join"]).is_empty());
}
