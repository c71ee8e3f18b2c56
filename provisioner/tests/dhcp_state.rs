//! DHCP state over time and across crashes: renew/release with ISC dhclient, DECLINE quarantine, and `kill -9`
//! in the middle of a load run losing no acknowledged lease. Needs root.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Lab, in_netns, poll, raw, spawn_in_netns};
use dhcproto::v4::{DhcpOption, MessageType};
use herd_provisioner::dhcp::leases::LeaseState;
use herd_provisioner::store::Store;

#[test]
fn dhclient_renews_then_releases() {
    let mut lab = Lab::qemu3(&["--lease-secs", "4"]);
    lab.start();
    lab.set_client_mac("52:54:00:99:01:01");
    let log = lab.dir.join("dhclient.log");
    let script = lab.dir.join("dhclient-script.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncase \"$reason\" in\n  BOUND|RENEW|REBIND|REBOOT) ip addr replace \"$new_ip_address/24\" dev \"$interface\"; \
             echo \"$reason $new_ip_address\" >> {log};;\n  RELEASE) echo RELEASE >> {log};;\nesac\nexit 0\n",
            log = log.display()
        ),
    )
    .unwrap();
    common::sh("chmod", &["+x", script.to_str().unwrap()]);
    let lease_file = lab.dir.join("dhclient.leases");
    let pid_file = lab.dir.join("dhclient.pid");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> =
            vec!["netns".into(), "exec".into(), lab.client_ns.clone(), "dhclient".into(), "-4".into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend([
            "-sf".into(),
            script.display().to_string(),
            "-lf".into(),
            lease_file.display().to_string(),
            "-pf".into(),
            pid_file.display().to_string(),
            lab.client_if.clone(),
        ]);
        v
    };
    let mut client =
        Command::new("ip").args(args(&["-d"])).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    poll(Duration::from_secs(15), "dhclient BOUND", || read().contains("BOUND 10.99.0.11").then_some(()));
    // T1 is half of the 4 s lease: the renewal is a unicast REQUEST from ciaddr.
    poll(Duration::from_secs(15), "dhclient RENEW", || read().contains("RENEW 10.99.0.11").then_some(()));
    let release = Command::new("ip").args(args(&["-r"])).output().unwrap();
    assert!(release.status.success(), "{}", String::from_utf8_lossy(&release.stderr));
    let _ = client.kill();
    let _ = client.wait();
    poll(Duration::from_secs(5), "the release to reach the server", || {
        lab.log().contains("lease released").then_some(())
    });
    lab.kill9();
    let store = Store::open(&lab.state_dir()).unwrap();
    let lease = store.leases().unwrap().into_iter().find(|l| l.ip == Ipv4Addr::new(10, 99, 0, 11)).unwrap();
    assert_eq!(lease.state, LeaseState::Released);
}

#[test]
fn a_declined_address_stays_quarantined_across_a_restart() {
    let mut lab = Lab::qemu3(&[]);
    lab.start();
    let dev = lab.client_if.clone();
    let mac = [0x52, 0x54, 0, 0x99, 3, 1];
    let ip = in_netns(&lab.client_ns, {
        let dev = dev.clone();
        move || {
            let sock = raw::socket("0.0.0.0:68".parse().unwrap(), &dev);
            let ip = raw::lease(&sock, mac, 10).unwrap();
            let mut decline = raw::message(MessageType::Decline, mac, 12);
            decline.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
            decline.opts_mut().insert(DhcpOption::ServerIdentifier("10.99.0.2".parse().unwrap()));
            sock.send_to(
                &dhcproto::Encodable::to_vec(&decline).unwrap(),
                "255.255.255.255:67".parse::<SocketAddr>().unwrap(),
            )
            .unwrap();
            ip
        }
    });
    assert_eq!(ip, Ipv4Addr::new(10, 99, 0, 13));
    let discover_answered = |lab: &Lab| {
        let dev = lab.client_if.clone();
        in_netns(&lab.client_ns, move || {
            let sock = raw::socket("0.0.0.0:68".parse().unwrap(), &dev);
            raw::lease(&sock, mac, 20).is_some()
        })
    };
    poll(Duration::from_secs(5), "the decline to take effect", || (!discover_answered(&lab)).then_some(()));
    lab.kill9();
    let store = Store::open(&lab.state_dir()).unwrap();
    let lease = store.leases().unwrap().into_iter().find(|l| l.ip == ip).unwrap();
    assert_eq!(lease.state, LeaseState::Declined);
    drop(store);
    lab.start();
    assert!(!discover_answered(&lab), "still quarantined after a restart");
    assert!(lab.log().contains("ReservationBusy"));
    assert!(lab.log().contains("address declined by the client; quarantined"));
}

/// A lease our client got acknowledged: (MAC, address).
type Acked = ([u8; 6], Ipv4Addr);

#[test]
fn kill_9_during_load_loses_no_acknowledged_lease_and_never_duplicates_an_address() {
    let inventory = std::fs::read_to_string(common::repo().join("examples/qemu-3.toml"))
        .unwrap()
        .replace("cidr = \"10.99.0.0/24\"", "cidr = \"10.99.0.0/16\"")
        .replace(
            "pools = [{ start = \"10.99.0.200\", end = \"10.99.0.250\" }]",
            "pools = [{ start = \"10.99.1.0\", end = \"10.99.200.255\" }]",
        );
    let mut lab = Lab::new(&inventory, &["--unknown-macs", "serve"]);
    common::sh("ip", &["-n", &lab.server_ns, "addr", "flush", "dev", &lab.server_if]);
    common::sh("ip", &["-n", &lab.server_ns, "addr", "add", "10.99.0.2/16", "dev", &lab.server_if]);
    common::sh("ip", &["-n", &lab.client_ns, "addr", "add", "10.99.0.60/16", "dev", &lab.client_if]);
    lab.start();

    // Background load from perfdhcp (as a relay), so the crash hits a busy server.
    let mut perf = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.client_ns,
            "perfdhcp",
            "-4",
            "-r",
            "500",
            "-p",
            "20",
            "-R",
            "1000000",
            "10.99.0.2",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Our own client records every ACK it gets.
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let attempts = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = spawn_in_netns(&lab.client_ns, {
        let (acked, attempts, stop, dev) = (acked.clone(), attempts.clone(), stop.clone(), lab.client_if.clone());
        move || {
            let sock = raw::socket("0.0.0.0:68".parse().unwrap(), &dev);
            let mut n: u32 = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let mac = [0x02, 0xee, (n >> 16) as u8, (n >> 8) as u8, n as u8, 0x01];
                if let Some(ip) = raw::lease(&sock, mac, n * 4) {
                    acked.lock().unwrap().push((mac, ip));
                }
                attempts.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let count = || acked.lock().unwrap().len();
    poll(Duration::from_secs(30), "60 leases before the crash", || (count() >= 60).then_some(()));
    lab.kill9();
    let before = count();
    lab.start();
    poll(Duration::from_secs(30), "60 more leases after the restart", || (count() >= before + 60).then_some(()));
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    let _ = perf.kill();
    let _ = perf.wait();
    lab.kill9();

    let store = Store::open(&lab.state_dir()).unwrap();
    let by_ip: HashMap<Ipv4Addr, _> = store.leases().unwrap().into_iter().map(|l| (l.ip, l)).collect();
    let acked = acked.lock().unwrap();
    let mut seen: HashMap<Ipv4Addr, [u8; 6]> = HashMap::new();
    for (mac, ip) in acked.iter() {
        if let Some(other) = seen.insert(*ip, *mac) {
            panic!("{ip} was acknowledged to {other:02x?} and to {mac:02x?}");
        }
        let lease = by_ip.get(ip).unwrap_or_else(|| panic!("acknowledged {ip} is not in the store"));
        assert_eq!(lease.mac.octets(), *mac, "{ip}");
        assert_eq!(lease.state, LeaseState::Bound);
    }
    assert!(by_ip.len() > acked.len(), "perfdhcp's leases are in the store too ({} vs {})", by_ip.len(), acked.len());
}
