//! TFTP against real clients in network namespaces: atftp (the client that asks for windowsize) with several
//! block and window sizes, curl, a raw tsize-probe-then-abort like PXE ROMs do, and refusals. Needs root.

#![allow(clippy::unwrap_used)] // Tests fail loudly on purpose; the lint guards daemons.

mod common;

use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::Duration;

use common::{Lab, in_netns, poll};

/// A lab whose TFTP root holds a 1 MiB pseudo-random file, a text file and a symlink pointing outside.
fn lab() -> (Lab, Vec<u8>) {
    let mut lab = Lab::qemu3(&[]);
    let root = lab.dir.join("tftproot");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    let mut data = Vec::with_capacity(1 << 20);
    let mut x: u32 = 12345;
    while data.len() < (1 << 20) + 77 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        data.push((x >> 16) as u8);
    }
    std::fs::write(root.join("big.bin"), &data).unwrap();
    std::fs::write(root.join("sub/hello.txt"), b"hello\nworld\n").unwrap();
    // Exactly 2 blocks of 512: the transfer must end with an empty third block.
    std::fs::write(root.join("even.bin"), vec![7u8; 1024]).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("escape")).unwrap();
    lab.args.extend(["--tftp-root".into(), root.display().to_string()]);
    lab.start();
    lab.client_address("10.99.0.60/24");
    (lab, data)
}

fn atftp(lab: &Lab, remote: &str, options: &[&str]) -> (bool, Vec<u8>, String) {
    let local: PathBuf = lab.dir.join(format!("got-{}", remote.replace('/', "_")));
    let _ = std::fs::remove_file(&local);
    let mut args = vec!["--get", "-r", remote, "-l", local.to_str().unwrap()];
    for o in options {
        args.extend(["--option", o]);
    }
    args.push(common::SERVER_IP);
    let out = lab.in_client("atftp", &args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success() && !text.contains("error"), std::fs::read(&local).unwrap_or_default(), text)
}

#[test]
fn atftp_gets_the_file_with_every_block_and_window_size() {
    let (lab, data) = lab();
    for (blksize, window) in [(512, 1), (1468, 1), (1468, 4), (1468, 16), (1468, 64), (8, 1), (8, 16)] {
        let (ok, got, text) = atftp(
            &lab,
            if blksize == 8 { "sub/hello.txt" } else { "big.bin" },
            &[&format!("blksize {blksize}"), &format!("windowsize {window}"), "tsize 0"],
        );
        assert!(ok, "blksize {blksize} window {window}: {text}");
        let expected: &[u8] = if blksize == 8 { b"hello\nworld\n" } else { &data };
        assert_eq!(got, expected, "blksize {blksize} window {window}");
    }
    let (ok, got, text) = atftp(&lab, "even.bin", &[]);
    assert!(ok, "{text}");
    assert_eq!(got.len(), 1024);
}

#[test]
fn curl_gets_the_file() {
    let (lab, data) = lab();
    for blksize in ["512", "1468"] {
        let out = lab.in_client("curl", &["-sS", "--tftp-blksize", blksize, "tftp://10.99.0.2/big.bin", "-o", "-"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, data, "blksize {blksize}");
    }
}

#[test]
fn escapes_missing_files_and_writes_are_refused() {
    let (lab, _) = lab();
    for name in ["../../etc/passwd", "escape", "sub/../../../etc/hostname", "missing.bin"] {
        let (ok, got, text) = atftp(&lab, name, &[]);
        assert!(!ok && got.is_empty(), "{name} must be refused: {text}");
    }
    let upload = lab.dir.join("upload.txt");
    std::fs::write(&upload, b"x").unwrap();
    let out = lab.in_client("atftp", &["--put", "-r", "new.txt", "-l", upload.to_str().unwrap(), common::SERVER_IP]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("read-only"), "{text}");
    assert!(!lab.dir.join("tftproot/new.txt").exists());
}

#[test]
fn a_tsize_probe_then_abort_ends_cleanly_and_the_next_request_is_served() {
    let (lab, data) = lab();
    let got = in_netns(&lab.client_ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // First request: tsize only, like a PXE ROM sizing the NBP.
        sock.send_to(b"\x00\x01big.bin\x00octet\x00tsize\x000\x00", "10.99.0.2:69").unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..2], b"\x00\x06", "an OACK");
        let oack = String::from_utf8_lossy(&buf[2..n]).to_string();
        assert!(oack.contains(&format!("tsize\0{}\0", (1 << 20) + 77)), "{oack:?}");
        // Abort with error 8, as the ROM does.
        sock.send_to(b"\x00\x05\x00\x08tsize probe\x00", from).unwrap();
        // Second request: the real one, lockstep blksize 1456.
        sock.send_to(b"\x00\x01big.bin\x00octet\x00blksize\x001456\x00", "10.99.0.2:69").unwrap();
        let (_, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..2], b"\x00\x06");
        sock.send_to(b"\x00\x04\x00\x00", from).unwrap();
        let mut out = Vec::new();
        loop {
            let (n, _) = sock.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..2], b"\x00\x03");
            out.extend_from_slice(&buf[4..n]);
            sock.send_to(&[0, 4, buf[2], buf[3]], from).unwrap();
            if n - 4 < 1456 {
                return out;
            }
        }
    });
    assert_eq!(got, data);
    poll(Duration::from_secs(5), "the aborted transfer to be logged", || {
        lab.log().contains("ending=Aborted").then_some(())
    });
}

#[test]
fn a_packet_from_a_stranger_to_a_transfer_port_gets_error_5_and_the_transfer_goes_on() {
    let (lab, data) = lab();
    let (got, stranger_heard) = in_netns(&lab.client_ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        let stranger = UdpSocket::bind("0.0.0.0:0").unwrap();
        for s in [&sock, &stranger] {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        }
        sock.send_to(b"\x00\x01big.bin\x00octet\x00", "10.99.0.2:69").unwrap();
        let mut buf = [0u8; 2048];
        let mut out = Vec::new();
        let mut heard = Vec::new();
        loop {
            let (n, from) = sock.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..2], b"\x00\x03", "a DATA packet");
            out.extend_from_slice(&buf[4..n]);
            let block = [buf[2], buf[3]];
            if out.len() == 512 * 3 {
                // Another port ACKs the transfer's block: not the client's TID.
                stranger.send_to(&[0, 4, block[0], block[1]], from).unwrap();
                let (m, said_from) = stranger.recv_from(&mut buf).unwrap();
                assert_eq!(said_from, from, "the ERROR comes from the transfer's port");
                heard = buf[..m].to_vec();
            }
            sock.send_to(&[0, 4, block[0], block[1]], from).unwrap();
            if n - 4 < 512 {
                return (out, heard);
            }
        }
    });
    assert_eq!(&stranger_heard[..4], b"\x00\x05\x00\x05", "ERROR 5 (unknown transfer ID): {stranger_heard:?}");
    assert_eq!(got, data, "the client's transfer is undisturbed");
    let metrics = lab.in_client("curl", &["-sf", "http://10.99.0.2/metrics"]);
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(metrics.lines().any(|l| l == "herd_tftp_strangers_total 1"), "{metrics}");
}
