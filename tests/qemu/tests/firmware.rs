//! The firmware matrix, booted for real: each VM PXE-boots from the provisioner into a test initramfs that prints a
//! marker with its kernel command line. Needs root, QEMU, OVMF, iPXE and the test kernel (scripts/setup-host.sh).

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

use std::path::Path;
use std::time::Duration;

use herd_qemu::{Firmware, Lab, TEST_MARKER, VmSpec};

#[test]
fn every_firmware_boots_its_machine_from_the_provisioner() {
    let inventory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/qemu-3.toml");
    let mut lab = Lab::new(&inventory).unwrap();
    lab.boot_assets_test_initramfs().unwrap();
    lab.start_provisioner().unwrap();
    // Four VMs at once: SeaBIOS + iPXE ROM; OVMF + iPXE EFI ROM; OVMF's own PXE chainloading ipxe.efi; and a
    // two-NIC machine booting from its second NIC.
    let cases = [
        (VmSpec::new("bios-ipxe", Firmware::SeabiosIpxe, &["52:54:00:99:01:01"]), "node1"),
        (VmSpec::new("ovmf-ipxe-rom", Firmware::OvmfIpxeRom, &["52:54:00:99:02:01"]), "node2"),
        (VmSpec::new("ovmf-native-pxe", Firmware::OvmfNativePxe, &["52:54:00:99:03:01"]), "node3"),
    ];
    for (spec, _) in &cases {
        lab.start_vm(spec.clone()).unwrap();
    }
    let mut report = Vec::new();
    for (vm, (_, machine)) in lab.vms().iter().zip(cases.iter()) {
        let (took, _) = vm.wait_for(TEST_MARKER, Duration::from_secs(150)).unwrap();
        let args = vm.test_args();
        assert!(args.contains(&format!("herd.machine={machine}")), "{}: {args:?}", vm.spec.name);
        assert!(args.iter().any(|a| a.starts_with("herd.token=")), "{}: {args:?}", vm.spec.name);
        report.push(format!("{:<16} {:>5.1} s", vm.spec.name, took.as_secs_f64()));
    }
    // The native-PXE machine went through TFTP (ipxe.efi) before its script: its timeline says so.
    let timeline = lab.api("/api/v1/machines/node3/timeline").unwrap();
    let events: Vec<&str> = timeline.as_array().unwrap().iter().filter_map(|e| e["event"].as_str()).collect();
    for expected in ["dhcp-offer", "dhcp-ack", "tftp", "script", "kernel", "initramfs"] {
        assert!(events.contains(&expected), "node3 timeline lacks {expected}: {events:?}");
    }
    println!("power-on → test init, in parallel under TCG:\n  {}", report.join("\n  "));
}

#[test]
fn a_two_nic_machine_boots_from_its_second_nic() {
    let inventory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/qemu-3.toml");
    let mut lab = Lab::new(&inventory).unwrap();
    lab.boot_assets_test_initramfs().unwrap();
    lab.start_provisioner().unwrap();
    let spec = VmSpec::new("two-nics", Firmware::SeabiosIpxe, &["52:54:00:99:01:01", "52:54:00:99:01:02"]).boot_from(1);
    let i = lab.start_vm(spec).unwrap();
    let vm = &lab.vms()[i];
    let (took, _) = vm.wait_for(TEST_MARKER, Duration::from_secs(150)).unwrap();
    println!("two-NIC machine, power-on → test init: {:.1} s", took.as_secs_f64());
    // iPXE's Router Solicitation was answered (otherwise every boot waits ~16 s for IPv6).
    let metrics = lab.metrics().unwrap();
    assert!(metrics.lines().any(|l| l.starts_with("herd_ra_sent_total ") && !l.ends_with(" 0")), "{metrics}");
    let args = vm.test_args();
    assert!(args.contains(&"herd.machine=node1".to_owned()), "{args:?}");
    assert!(args.contains(&"herd.mac=52:54:00:99:01:02".to_owned()), "{args:?}");
}

#[test]
fn proxy_dhcp_boots_beside_a_dhcp_server_we_do_not_own() {
    let inventory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/qemu-3.toml");
    let mut lab = Lab::new(&inventory).unwrap();
    lab.mode = herd_qemu::Mode::Proxy;
    lab.boot_assets_test_initramfs().unwrap();
    // The site's own DHCP server: dnsmasq on another host of the segment, handing out 10.99.0.100-150.
    let leases = lab.dir.join("dnsmasq.leases");
    lab.add_host(
        "10.99.0.3/24",
        &[
            "dnsmasq",
            "-d",
            "-k",
            "--port=0",
            "--interface=eth0",
            "--bind-interfaces",
            "--dhcp-range=10.99.0.100,10.99.0.150,1h",
            "--no-ping",
            &format!("--dhcp-leasefile={}", leases.display()),
            &format!("--pid-file={}", lab.dir.join("dnsmasq.pid").display()),
        ],
    )
    .unwrap();
    lab.start_provisioner().unwrap();
    let i = lab.start_vm(VmSpec::new("proxy-bios", Firmware::SeabiosIpxe, &["52:54:00:99:01:01"])).unwrap();
    let vm = &lab.vms()[i];
    let waited = vm.wait_for(TEST_MARKER, Duration::from_secs(150));
    let (took, _) =
        waited.unwrap_or_else(|e| panic!("{e:#}\nprovisioner metrics:\n{}", lab.metrics().unwrap_or_default()));
    let args = vm.test_args();
    assert!(args.contains(&"herd.machine=node1".to_owned()), "{args:?}");
    // The address came from dnsmasq, the boot information from herd, which leased nothing.
    let dnsmasq_leases = std::fs::read_to_string(&leases).unwrap();
    assert!(dnsmasq_leases.contains("52:54:00:99:01:01"), "{dnsmasq_leases}");
    let metrics = lab.metrics().unwrap();
    assert!(!metrics.contains("herd_dhcp_answers_total{type=\"ack\"}"), "{metrics}");
    assert!(metrics.contains("herd_dhcp_answers_total{type=\"offer\"}"), "{metrics}");
    println!("proxyDHCP beside dnsmasq, power-on → test init: {:.1} s", took.as_secs_f64());
}
