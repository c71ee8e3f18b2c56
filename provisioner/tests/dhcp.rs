//! DHCP against real clients in network namespaces: busybox udhcpc (faking PXE firmware with its -V/-x options),
//! ISC dhclient, and raw packets. Needs root (CI runs as root).

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

mod common;

use common::{Lab, SERVER_IP};

const NODE1: &str = "52:54:00:99:01:01";
const NODE1_SECOND_NIC: &str = "52:54:00:99:01:02";

#[test]
fn a_reserved_machine_gets_its_inventory_address_and_parameters() {
    let mut lab = Lab::qemu3(&[]);
    lab.start();
    lab.set_client_mac(NODE1);
    let env = lab.udhcpc(&[]).expect("a lease");
    assert_eq!(env["ip"], "10.99.0.11");
    assert_eq!(env["subnet"], "255.255.255.0");
    assert_eq!(env["router"], "10.99.0.1");
    assert_eq!(env["hostname"], "node1");
    assert_eq!(env["domain"], "qemu.herd.test");
    assert_eq!(env["serverid"], SERVER_IP);
    assert_eq!(env["lease"], "3600");
    assert!(!env.contains_key("boot_file"), "a plain client gets no boot information: {env:?}");
}

#[test]
fn a_machine_booting_from_its_second_nic_gets_the_same_address() {
    let mut lab = Lab::qemu3(&[]);
    lab.start();
    lab.set_client_mac(NODE1_SECOND_NIC);
    assert_eq!(lab.udhcpc(&[]).expect("a lease")["ip"], "10.99.0.11");
}

#[test]
fn unknown_macs_are_ignored_by_default_and_served_from_the_pool_on_request() {
    let mut lab = Lab::qemu3(&[]);
    lab.start();
    lab.set_client_mac("52:54:00:aa:bb:cc");
    assert!(lab.udhcpc(&[]).is_none(), "an unknown MAC must get no answer by default");
    assert!(lab.log().contains("UnknownMac"), "the ignored request is logged at debug level");

    let mut lab = Lab::qemu3(&["--unknown-macs", "serve"]);
    lab.start();
    lab.set_client_mac("52:54:00:aa:bb:cc");
    let ip: std::net::Ipv4Addr = lab.udhcpc(&[]).expect("a pool lease")["ip"].parse().unwrap();
    let pool: std::ops::RangeInclusive<std::net::Ipv4Addr> =
        "10.99.0.200".parse().unwrap()..="10.99.0.250".parse().unwrap();
    assert!(pool.contains(&ip), "{ip}");
}

/// udhcpc options that make it look like a firmware: option 60, option 93 (0x5d), optionally 77 (0x4d), 97 (0x61).
fn firmware(lab: &Lab, vendor: &str, arch: &str, extra: &[&str]) -> Option<std::collections::BTreeMap<String, String>> {
    let arch_opt = format!("0x5d:{arch}");
    let mut args = vec!["-V", vendor, "-x", &arch_opt];
    args.extend_from_slice(extra);
    lab.udhcpc(&args)
}

#[test]
fn the_firmware_matrix_gets_the_right_boot_file() {
    let mut lab = Lab::qemu3(&[]);
    lab.start();
    lab.set_client_mac(NODE1);
    let uuid = "0x61:00112233445566778899aabbccddeeff00";
    let cases: &[(&str, &str, &[&str], Option<&str>)] = &[
        ("PXEClient:Arch:00000:UNDI:002001", "0000", &[], Some("undionly.kpxe")),
        ("PXEClient:Arch:00000:UNDI:002001", "0000", &[uuid], Some("undionly.kpxe")),
        ("PXEClient:Arch:00007:UNDI:003016", "0007", &[uuid], Some("ipxe.efi")),
        ("PXEClient:Arch:00009:UNDI:003016", "0009", &[], Some("ipxe.efi")),
        ("HTTPClient:Arch:00016:UNDI:003001", "0010", &[], Some("http://10.99.0.2/assets/ipxe.efi")),
        // iPXE, raw user class (as iPXE sends it) and RFC 3004 form: its script, whatever the arch.
        (
            "PXEClient:Arch:00000:UNDI:002001",
            "0000",
            &["-x", "0x4d:69505845"],
            Some("http://10.99.0.2/boot/52-54-00-99-01-01.ipxe"),
        ),
        (
            "PXEClient:Arch:00007:UNDI:003010",
            "0007",
            &["-x", "0x4d:0469505845"],
            Some("http://10.99.0.2/boot/52-54-00-99-01-01.ipxe"),
        ),
        // No binary for arm64 or an unknown architecture: no answer at all, never a wrong binary.
        ("PXEClient:Arch:00011:UNDI:003016", "000b", &[], None),
        ("PXEClient:Arch:00255:UNDI:003016", "00ff", &[], None),
    ];
    for (vendor, arch, extra, expected) in cases {
        let mut args: Vec<&str> = Vec::new();
        for e in *extra {
            if e.starts_with("0x61") {
                args.extend(["-x", e]);
            } else {
                args.push(e);
            }
        }
        let env = firmware(&lab, vendor, arch, &args);
        match expected {
            Some(file) => {
                let env = env.unwrap_or_else(|| panic!("no answer for {vendor} arch {arch} {extra:?}"));
                assert_eq!(env.get("boot_file").map(String::as_str), Some(*file), "{vendor} {arch} {extra:?}");
                if file.starts_with("http") {
                    assert!(env.get("siaddr").is_none_or(|s| s == "0.0.0.0"), "{env:?}");
                } else {
                    assert_eq!(env["siaddr"], SERVER_IP, "TFTP boot names our server in siaddr");
                }
            }
            None => assert!(env.is_none(), "{vendor} arch {arch} must get no answer, got {env:?}"),
        }
    }
}
