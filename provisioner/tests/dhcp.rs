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
        ("HTTPClient:Arch:00016:UNDI:003001", "0010", &[], Some("http://10.99.0.2/ipxe/ipxe.efi")),
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
                // siaddr names us either way (iPXE needs it for URLs too); sname only for TFTP.
                assert_eq!(env["siaddr"], SERVER_IP, "{vendor} {arch}");
                assert_eq!(env.contains_key("sname"), !file.starts_with("http"), "{env:?}");
            }
            None => assert!(env.is_none(), "{vendor} arch {arch} must get no answer, got {env:?}"),
        }
    }
}

mod raw_client {
    use std::net::{Ipv4Addr, SocketAddr};

    use dhcproto::Encodable;
    use dhcproto::v4::{DhcpOption, MessageType, OptionCode, UnknownOption};

    use super::common::{self, Lab, in_netns, raw};

    const NODE2_MAC: [u8; 6] = [0x52, 0x54, 0, 0x99, 2, 1];

    #[test]
    fn inform_is_answered_with_options_to_ciaddr() {
        let mut lab = Lab::qemu3(&[]);
        lab.start();
        common::sh("ip", &["-n", &lab.client_ns, "addr", "add", "10.99.0.50/24", "dev", &lab.client_if]);
        let dev = lab.client_if.clone();
        let reply = in_netns(&lab.client_ns, move || {
            let sock = raw::socket("10.99.0.50:68".parse().unwrap(), &dev);
            let mut inform = raw::message(MessageType::Inform, NODE2_MAC, 77);
            inform.set_ciaddr(Ipv4Addr::new(10, 99, 0, 50));
            raw::exchange(&sock, &inform, "10.99.0.2:67".parse().unwrap())
        })
        .expect("an ACK to the INFORM");
        assert_eq!(raw::msg_type(&reply), Some(MessageType::Ack));
        assert_eq!(reply.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(reply.opts().get(OptionCode::AddressLeaseTime).is_none(), "INFORM gets no lease");
        assert_eq!(
            reply.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
    }

    #[test]
    fn relayed_requests_are_answered_to_the_relay_with_option_82_echoed() {
        let mut lab = Lab::qemu3(&[]);
        lab.start();
        common::sh("ip", &["-n", &lab.client_ns, "addr", "add", "10.99.0.60/24", "dev", &lab.client_if]);
        let dev = lab.client_if.clone();
        let (offer, relay_bytes) = in_netns(&lab.client_ns, move || {
            // We are the relay: listen on the server port of our giaddr.
            let sock = raw::socket("10.99.0.60:67".parse().unwrap(), &dev);
            let mut discover = raw::message(MessageType::Discover, NODE2_MAC, 4242);
            discover.set_giaddr(Ipv4Addr::new(10, 99, 0, 60));
            discover.set_hops(1);
            // Circuit id "eth7", remote id "sw1".
            let agent = vec![1, 4, b'e', b't', b'h', b'7', 2, 3, b's', b'w', b'1'];
            discover
                .opts_mut()
                .insert(DhcpOption::Unknown(UnknownOption::new(OptionCode::RelayAgentInformation, agent.clone())));
            (raw::exchange(&sock, &discover, "10.99.0.2:67".parse().unwrap()), agent)
        });
        let offer = offer.expect("an OFFER sent to the relay");
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 99, 0, 12));
        assert_eq!(offer.giaddr(), Ipv4Addr::new(10, 99, 0, 60));
        let echoed = offer.opts().get(OptionCode::RelayAgentInformation).unwrap().to_vec().unwrap();
        assert_eq!(&echoed[2..], relay_bytes.as_slice());
    }

    #[test]
    fn garbage_is_dropped_counted_and_the_server_keeps_answering() {
        let mut lab = Lab::qemu3(&[]);
        lab.start();
        lab.client_address("10.99.0.60/24");
        let dev = lab.client_if.clone();
        let leased = in_netns(&lab.client_ns, move || {
            let sock = raw::socket("0.0.0.0:68".parse().unwrap(), &dev);
            let tftp = std::net::UdpSocket::bind("10.99.0.60:0").unwrap();
            let bcast: SocketAddr = "255.255.255.255:67".parse().unwrap();
            let tftp_to: SocketAddr = "10.99.0.2:69".parse().unwrap();
            let valid = raw::message(MessageType::Discover, NODE2_MAC, 1).to_vec().unwrap();
            let valid_rrq = b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001468\x00".to_vec();
            let mut seed = 0x9e37_79b9_u32;
            for i in 0..2000usize {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                let mutate = |valid: &[u8]| -> Vec<u8> {
                    match i % 3 {
                        // Truncations of a valid packet.
                        0 => valid[..(seed as usize % valid.len())].to_vec(),
                        // A valid packet with one byte flipped.
                        1 => {
                            let mut p = valid.to_vec();
                            let at = seed as usize % p.len();
                            p[at] ^= (seed >> 8) as u8 | 1;
                            p
                        }
                        // Random bytes.
                        _ => (0..(seed % 600)).map(|j| (seed.wrapping_mul(j + 1) >> 7) as u8).collect(),
                    }
                };
                let _ = sock.send_to(&mutate(&valid), bcast);
                let _ = tftp.send_to(&mutate(&valid_rrq), tftp_to);
            }
            raw::lease(&sock, NODE2_MAC, 99)
        });
        assert_eq!(leased, Some(Ipv4Addr::new(10, 99, 0, 12)), "still serving after 2000 bad packets");
        assert!(!lab.log().contains("panicked"));
        // The drops are counted, by reason.
        let metrics = lab.in_client("curl", &["-sf", "http://10.99.0.2/metrics"]);
        let metrics = String::from_utf8_lossy(&metrics.stdout);
        let sum = |prefix: &str| -> u64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        assert!(sum("herd_dhcp_dropped_total") > 100, "{metrics}");
        assert!(sum("herd_tftp_dropped_total") > 100, "{metrics}");
    }
}
