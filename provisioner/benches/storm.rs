//! `cargo bench -p herd-provisioner --bench storm` (root): a boot storm. 450 simulated PXE machines power on at
//! once; each does what a BIOS PXE ROM + iPXE does: DHCP (broadcast, PXE options, the PXE retry timers 4/8/16/32 s),
//! TFTP of a 1 MiB NBP (blksize 1468, lockstep like a ROM), then over HTTP its script, a 12 MiB kernel, a 40 MiB
//! initramfs and its config. Run against herd's provisioner and against dnsmasq (DHCP + TFTP) + nginx (HTTP)
//! serving the same files, in the same run, with the data-copy bound of the veth measured first.
//!
//! Printed: wall time until the last machine has everything, per-machine p50/p99, machines that needed a DHCP
//! retransmission (drops), failures, and the provisioner's peak RSS.
//! Goal (issue #8): all 450 served, ≤ 1.2x the copy bound, zero DHCP drops; provisioner ≤ 64 MiB.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio::sync::mpsc;

use common::{Pair, run, stop};

const NS_SERVER: &str = "hbss";
const NS_CLIENT: &str = "hbsc";
const IF_SERVER: &str = "hbsvs";
const IF_CLIENT: &str = "hbsvc";
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 2);
const MACHINES: usize = 450;
const NBP: usize = 1 << 20;
const KERNEL: usize = 12 << 20;
const INITRAMFS: usize = 40 << 20;

struct Machine {
    mac: [u8; 6],
    ip: Ipv4Addr,
    /// Its NIC on the client side (see `setup`).
    nic: String,
}

/// The NIC of simulated machine `i`: a macvlan on the client veth with the machine's MAC.
fn nic(i: usize) -> String {
    format!("hbm{i}")
}

fn setup(machines: &[Machine]) -> Pair {
    let pair = Pair::create([NS_SERVER, NS_CLIENT, IF_SERVER, IF_CLIENT], "10.20.0.2/16", None);
    // Every simulated machine has a NIC of its own on the client side (the provisioner serves a config and a join
    // only to a NIC of the machine: the kernel's neighbour entry for the source), with its address on it; a
    // machine uses its address only after its ACK. Its DHCP goes out on the veth (broadcast, chaddr its MAC).
    let batch: String = machines
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mac = m.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            let nic = nic(i);
            format!(
                "link add {nic} link {IF_CLIENT} address {mac} type macvlan mode bridge\n\
                 addr add {}/16 dev {nic}\nlink set {nic} up\n",
                m.ip
            )
        })
        .collect();
    let path = std::env::temp_dir().join("herd-storm-nics");
    std::fs::write(&path, batch).expect("write batch");
    // Each NIC answers ARP only for its own address, from its own address; replies arrive on whichever NIC.
    for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2"), ("rp_filter", "0")] {
        for scope in ["all", "default"] {
            let setting = format!("net.ipv4.conf.{scope}.{key}={value}");
            assert!(run("ip", &["netns", "exec", NS_CLIENT, "sysctl", "-qw", &setting]), "sysctl {setting}");
        }
    }
    assert!(run("ip", &["-n", NS_CLIENT, "-batch", path.to_str().expect("utf-8")]), "adding the machines' NICs");
    pair
}

#[derive(Default)]
struct Outcome {
    took: Vec<Duration>,
    retransmits: usize,
    failures: Vec<String>,
}

/// One machine's boot: DHCP, TFTP, HTTP. Returns the number of DHCP retransmissions it needed.
async fn boot(
    m: &Machine,
    dhcp_tx: &UdpSocket,
    mut replies: mpsc::Receiver<Message>,
    xid: u32,
) -> Result<usize, String> {
    let mut retransmits = 0;
    let bcast: SocketAddr = "255.255.255.255:67".parse().map_err(|e| format!("{e}"))?;
    let z = Ipv4Addr::UNSPECIFIED;
    let pxe_options = |msg: &mut Message| {
        msg.set_flags(dhcproto::v4::Flags::default().set_broadcast());
        let o = msg.opts_mut();
        o.insert(DhcpOption::ClientSystemArchitecture(dhcproto::v4::Architecture::from(0u16)));
        o.insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()));
        o.insert(DhcpOption::ClientMachineIdentifier([&[0u8][..], &[m.mac[5]; 16]].concat()));
    };
    // The PXE spec's retry schedule.
    let schedule = [4u64, 8, 16, 32];
    let exchange = |kind: MessageType, extra: Vec<DhcpOption>| {
        let mut msg = Message::new_with_id(xid, z, z, z, z, &m.mac);
        msg.opts_mut().insert(DhcpOption::MessageType(kind));
        pxe_options(&mut msg);
        for o in extra {
            msg.opts_mut().insert(o);
        }
        msg
    };
    let discover = exchange(MessageType::Discover, vec![]);
    let mut offer = None;
    for (i, wait) in schedule.iter().enumerate() {
        if i > 0 {
            retransmits += 1;
        }
        dhcp_tx.send_to(&discover.to_vec().map_err(|e| e.to_string())?, bcast).await.map_err(|e| e.to_string())?;
        if let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(*wait), replies.recv()).await {
            offer = Some(reply);
            break;
        }
    }
    let offer = offer.ok_or("no DHCP offer")?;
    let server_id = match offer.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => *ip,
        _ => return Err("offer without server id".into()),
    };
    let request = exchange(
        MessageType::Request,
        vec![DhcpOption::RequestedIpAddress(offer.yiaddr()), DhcpOption::ServerIdentifier(server_id)],
    );
    let mut ack = None;
    for (i, wait) in schedule.iter().enumerate() {
        if i > 0 {
            retransmits += 1;
        }
        dhcp_tx.send_to(&request.to_vec().map_err(|e| e.to_string())?, bcast).await.map_err(|e| e.to_string())?;
        while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(*wait), replies.recv()).await {
            if reply.opts().msg_type() == Some(MessageType::Ack) {
                ack = Some(reply);
                break;
            }
        }
        if ack.is_some() {
            break;
        }
    }
    let ack = ack.ok_or("no DHCP ack")?;
    if ack.yiaddr() != m.ip {
        return Err(format!("got {} instead of {}", ack.yiaddr(), m.ip));
    }
    // The BOOTP file field is NUL-padded to 128 bytes.
    let file =
        ack.fname_str().and_then(Result::ok).unwrap_or("undionly.kpxe").trim_end_matches(char::from(0)).to_owned();
    let got = tftp(m, &file).await?;
    if got != NBP {
        return Err(format!("NBP {got} bytes"));
    }
    http(m).await?;
    Ok(retransmits)
}

async fn tftp(m: &Machine, file: &str) -> Result<usize, String> {
    let socket = UdpSocket::bind((m.ip, 0)).await.map_err(|e| e.to_string())?;
    socket.bind_device(Some(m.nic.as_bytes())).map_err(|e| e.to_string())?;
    let mut rrq = vec![0, 1];
    for part in [file, "octet", "blksize", "1468", "tsize", "0"] {
        rrq.extend_from_slice(part.as_bytes());
        rrq.push(0);
    }
    let server = SocketAddrV4::new(SERVER, 69);
    let mut last: (Vec<u8>, SocketAddr) = (rrq, server.into());
    socket.send_to(&last.0, last.1).await.map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 2048];
    let (mut expected, mut received, mut blksize, mut silent) = (1u16, 0usize, 512usize, 0);
    loop {
        let (n, from) = match tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf)).await {
            Ok(r) => r.map_err(|e| e.to_string())?,
            Err(_) => {
                silent += 1;
                if silent > 5 {
                    return Err("tftp timed out".into());
                }
                socket.send_to(&last.0, last.1).await.map_err(|e| e.to_string())?;
                continue;
            }
        };
        silent = 0;
        match u16::from_be_bytes([buf[0], buf[1]]) {
            6 => {
                let text = String::from_utf8_lossy(&buf[2..n]).to_string();
                let parts: Vec<&str> = text.split('\0').collect();
                if let Some(i) = parts.iter().position(|p| *p == "blksize") {
                    blksize = parts.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(512);
                }
                last = (vec![0, 4, 0, 0], from);
            }
            3 => {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                if block == expected {
                    received += n - 4;
                    expected = expected.wrapping_add(1);
                }
                last = (vec![0, 4, buf[2], buf[3]], from);
                if block.wrapping_add(1) == expected && n - 4 < blksize {
                    socket.send_to(&last.0, last.1).await.map_err(|e| e.to_string())?;
                    return Ok(received);
                }
            }
            5 => return Err(format!("tftp error {}", String::from_utf8_lossy(&buf[4..n]))),
            _ => continue,
        }
        socket.send_to(&last.0, last.1).await.map_err(|e| e.to_string())?;
    }
}

/// Opens a keep-alive connection from the machine's own address.
async fn connect(m: &Machine, to: SocketAddr) -> Result<BufReader<tokio::net::TcpStream>, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket.bind_device(Some(m.nic.as_bytes())).map_err(|e| e.to_string())?;
    socket.bind(SocketAddr::from((m.ip, 0))).map_err(|e| e.to_string())?;
    Ok(BufReader::new(socket.connect(to).await.map_err(|e| e.to_string())?))
}

/// Where a script's `kernel`/`initrd` URL points: (server address, path).
fn url_target(url: &str) -> Option<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_once('/')?;
    let addr = if authority.contains(':') {
        authority.parse().ok()?
    } else {
        SocketAddr::from((authority.parse::<Ipv4Addr>().ok()?, 80))
    };
    Some((addr, format!("/{path}")))
}

/// Like iPXE: the script, then the kernel and initramfs wherever the script points, then the config.
async fn http(m: &Machine) -> Result<(), String> {
    let mut main = connect(m, SocketAddr::from((SERVER, 80))).await?;
    let dashed = m.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join("-");
    let script = get(&mut main, &format!("/boot/{dashed}.ipxe")).await?;
    let script = String::from_utf8_lossy(&script.head).to_string();
    let token = script.split_whitespace().find_map(|w| w.strip_prefix("herd.token=")).unwrap_or("none").to_owned();
    let url_of = |verb: &str| {
        script
            .lines()
            .find_map(|l| l.strip_prefix(verb))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(url_target)
    };
    let ((kernel_at, kernel_path), (initrd_at, initrd_path)) =
        (url_of("kernel ").ok_or("no kernel in script")?, url_of("initrd ").ok_or("no initrd in script")?);
    let mut assets = connect(m, kernel_at).await?;
    let kernel = get(&mut assets, &kernel_path).await?;
    if initrd_at != kernel_at {
        assets = connect(m, initrd_at).await?;
    }
    let initramfs = get(&mut assets, &initrd_path).await?;
    if kernel.len != KERNEL || initramfs.len != INITRAMFS {
        return Err(format!("kernel {} initramfs {} bytes", kernel.len, initramfs.len));
    }
    let config = get(&mut main, &format!("/config/{dashed}?token={token}")).await?;
    if config.len == 0 {
        return Err("empty config".into());
    }
    Ok(())
}

/// A response: its length, and its first bytes (scripts and configs are small; kernels are only counted).
struct Got {
    len: usize,
    head: Vec<u8>,
}

async fn get(stream: &mut BufReader<tokio::net::TcpStream>, path: &str) -> Result<Got, String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: 10.20.0.2\r\nUser-Agent: iPXE/1.21\r\n\r\n");
    stream.get_mut().write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut status = String::new();
    stream.read_line(&mut status).await.map_err(|e| e.to_string())?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    // Keep the first 64 KiB, count the rest through a small buffer, as the copy-bound receiver does.
    let mut head = vec![0u8; length.min(64 << 10)];
    stream.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    let mut left = length - head.len();
    let mut sink = vec![0u8; 256 << 10];
    while left > 0 {
        let want = left.min(sink.len());
        let n = stream.read(&mut sink[..want]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("GET {path}: connection closed with {left} bytes to go"));
        }
        left -= n;
    }
    if !status.contains(" 200 ") {
        return Err(format!("GET {path}: {}", status.trim()));
    }
    Ok(Got { len: length, head })
}

fn storm(machines: Arc<Vec<Machine>>) -> Outcome {
    Pair::in_ns(NS_CLIENT, move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async move {
            let socket = {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
                s.set_reuse_address(true).expect("reuse");
                s.set_broadcast(true).expect("broadcast");
                let _ = s.set_recv_buffer_size(8 << 20);
                s.bind_device(Some(IF_CLIENT.as_bytes())).expect("bind device");
                s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into()).expect("bind 68");
                s.set_nonblocking(true).expect("nonblocking");
                Arc::new(UdpSocket::from_std(s.into()).expect("tokio socket"))
            };
            // One receiver hands each reply to the machine whose transaction it answers.
            let routes: Arc<Mutex<HashMap<u32, mpsc::Sender<Message>>>> = Arc::default();
            let rx_socket = Arc::clone(&socket);
            let rx_routes = Arc::clone(&routes);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1500];
                while let Ok((n, _)) = rx_socket.recv_from(&mut buf).await {
                    let Ok(msg) = Message::decode(&mut Decoder::new(&buf[..n])) else { continue };
                    if msg.opcode() != Opcode::BootReply {
                        continue;
                    }
                    let tx = rx_routes.lock().ok().and_then(|r| r.get(&msg.xid()).cloned());
                    if let Some(tx) = tx {
                        let _ = tx.try_send(msg);
                    }
                }
            });
            let start = Instant::now();
            let mut tasks = Vec::new();
            for i in 0..machines.len() {
                let (tx, rx) = mpsc::channel(8);
                let xid = 0x4800_0000 + i as u32;
                if let Ok(mut r) = routes.lock() {
                    r.insert(xid, tx);
                }
                let (socket, machines) = (Arc::clone(&socket), Arc::clone(&machines));
                tasks.push(tokio::spawn(async move {
                    let result = boot(&machines[i], &socket, rx, xid).await;
                    (result, start.elapsed())
                }));
            }
            let mut out = Outcome::default();
            for t in tasks {
                match t.await {
                    Ok((Ok(retransmits), took)) => {
                        out.took.push(took);
                        out.retransmits += usize::from(retransmits > 0);
                    }
                    Ok((Err(e), _)) => out.failures.push(e),
                    Err(e) => out.failures.push(e.to_string()),
                }
            }
            out
        })
    })
}

/// The copy bound: the same bytes (per machine: NBP + kernel + initramfs) through the veth over 16 TCP streams.
fn copy_bound() -> Duration {
    let total = MACHINES * (NBP + KERNEL + INITRAMFS);
    let streams = 16;
    let per = total / streams;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        Pair::in_ns(NS_SERVER, move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::bind((SERVER, 9999)).await.expect("listen");
                ready_tx.send(()).expect("ready");
                let chunk = vec![0x5au8; 1 << 20];
                let mut tasks = Vec::new();
                for _ in 0..streams {
                    let (mut s, _) = listener.accept().await.expect("accept");
                    let chunk = chunk.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut left = per;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            s.write_all(&chunk[..n]).await.expect("write");
                            left -= n;
                        }
                    }));
                }
                for t in tasks {
                    t.await.expect("sender");
                }
            })
        })
    });
    ready_rx.recv().expect("server ready");
    let took = Pair::in_ns(NS_CLIENT, move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async move {
            let start = Instant::now();
            let tasks: Vec<_> = (0..streams)
                .map(|_| {
                    tokio::spawn(async move {
                        let mut s = tokio::net::TcpStream::connect((SERVER, 9999)).await.expect("connect");
                        let mut buf = vec![0u8; 1 << 20];
                        let mut got = 0;
                        while got < per {
                            let n = s.read(&mut buf).await.expect("read");
                            if n == 0 {
                                break;
                            }
                            got += n;
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("receiver");
            }
            start.elapsed()
        })
    });
    server.join().expect("server thread");
    took
}

/// The provisioner's peak memory goal through the storm, MiB.
const RSS_GOAL_MIB: f64 = 64.0;

fn report(name: &str, o: &Outcome, bound: Duration, extra: &str) {
    let mut took = o.took.clone();
    took.sort();
    let pick = |q: f64| took.get(((took.len() as f64 - 1.0) * q) as usize).copied().unwrap_or_default();
    let wall = took.last().copied().unwrap_or_default();
    println!(
        "  {name:<22} served {:>3}/{MACHINES}  wall {:>6.2} s ({:.2}x bound)  p50 {:>6.2} s  p99 {:>6.2} s  DHCP retransmits {:>3}  failed {}{extra}",
        o.took.len(),
        wall.as_secs_f64(),
        wall.as_secs_f64() / bound.as_secs_f64(),
        pick(0.5).as_secs_f64(),
        pick(0.99).as_secs_f64(),
        o.retransmits,
        o.failures.len(),
    );
    if let Some(first) = o.failures.first() {
        println!("    first failure: {first}");
    }
}

fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|k| k.parse::<f64>().ok()))
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn write_file(path: &Path, len: usize, seed: u8) {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    std::fs::write(path, data).expect("write asset");
}

fn main() {
    let dir: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-storm");
    let _ = std::fs::remove_dir_all(&dir);
    for d in ["ipxe", "assets", "www/boot", "www/assets", "www/config"] {
        std::fs::create_dir_all(dir.join(d)).expect("dirs");
    }
    let spec = herd_inventory::FleetSpec { machines: MACHINES, racks: 12, masters: 3 };
    let text = herd_inventory::generate(spec).expect("fleet");
    std::fs::write(dir.join("inventory.toml"), &text).expect("inventory");
    let inv = herd_inventory::parse("storm", &text).expect("valid fleet");
    let machines: Vec<Machine> = inv
        .machines
        .iter()
        .enumerate()
        .map(|(i, m)| Machine { mac: m.boot_mac().expect("mac").octets(), ip: m.internal.get_ref().0, nic: nic(i) })
        .collect();
    write_file(&dir.join("ipxe/undionly.kpxe"), NBP, 1);
    write_file(&dir.join("assets/vmlinuz"), KERNEL, 2);
    write_file(&dir.join("assets/initramfs"), INITRAMFS, 3);
    // The peer serves the same bytes: static scripts and configs per machine.
    for m in &inv.machines {
        let dashed = m.boot_mac().expect("mac").to_string().replace(':', "-");
        std::fs::write(
            dir.join(format!("www/boot/{dashed}.ipxe")),
            "#!ipxe\nkernel http://10.20.0.2/assets/vmlinuz herd.token=static\ninitrd http://10.20.0.2/assets/initramfs\nboot\n",
        )
        .expect("script");
        let cfg = herd_config::ignition::render(&inv, m).expect("config");
        std::fs::write(dir.join(format!("www/config/{dashed}")), herd_config::ignition::to_json(&cfg)).expect("cfg");
    }
    for (from, to) in [("assets/vmlinuz", "www/assets/vmlinuz"), ("assets/initramfs", "www/assets/initramfs")] {
        std::fs::hard_link(dir.join(from), dir.join(to)).expect("link");
    }
    run("chmod", &["-R", "a+rX", dir.to_str().expect("utf-8")]);
    let machines = Arc::new(machines);
    let pair = setup(&machines);
    println!("Boot storm: {MACHINES} simulated PXE machines at once (DHCP + TFTP 1 MiB + HTTP 12 + 40 MiB + config):");
    let bound = copy_bound();
    println!(
        "  data-copy bound through the veth ({} MiB, 16 TCP streams): {:.2} s",
        MACHINES * 53,
        bound.as_secs_f64()
    );

    let state = dir.join("state");
    let (ipxe_dir, assets_dir) = (dir.join("ipxe"), dir.join("assets"));
    let extra = ["--ipxe-dir", ipxe_dir.to_str().expect("utf-8"), "--assets", assets_dir.to_str().expect("utf-8")];
    let herd = pair.start_provisioner(&dir.join("inventory.toml"), &state, &extra, "10.20.0.2:80");
    let herd_pid = herd.pid();
    let herd_outcome = storm(Arc::clone(&machines));
    let rss = peak_rss_mib(herd_pid);
    stop(herd);
    report("herd provisioner", &herd_outcome, bound, &format!("  peak RSS {rss:.1} MiB (goal ≤ {RSS_GOAL_MIB})"));
    // The outcome, not the timing: herd serves every machine of the storm, within its memory goal. (The peers'
    // unserved machines are a figure.)
    assert!(
        herd_outcome.failures.is_empty() && herd_outcome.took.len() == MACHINES,
        "herd served {}/{MACHINES} machines; first failure: {:?}",
        herd_outcome.took.len(),
        herd_outcome.failures.first()
    );
    assert!(rss <= RSS_GOAL_MIB, "herd's peak RSS {rss:.1} MiB is over its goal of {RSS_GOAL_MIB} MiB");

    let hosts: String = inv
        .machines
        .iter()
        .map(|m| format!("dhcp-host={},{}\n", m.boot_mac().expect("mac"), m.internal.get_ref()))
        .collect();
    std::fs::write(dir.join("dnsmasq-hosts.conf"), hosts).expect("hosts");
    let dnsmasq = pair.start(
        &[
            "dnsmasq",
            "-d",
            "-k",
            "--port=0",
            &format!("--interface={IF_SERVER}"),
            "--bind-interfaces",
            "--dhcp-range=10.20.250.1,10.20.255.254,255.255.0.0,1h",
            &format!("--conf-file={}", dir.join("dnsmasq-hosts.conf").display()),
            "--dhcp-boot=undionly.kpxe",
            "--enable-tftp",
            &format!("--tftp-root={}", dir.join("ipxe").display()),
            "--no-ping",
            "--dhcp-authoritative",
            &format!("--dhcp-leasefile={}", dir.join("dnsmasq.leases").display()),
            &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
            "--log-facility=/dev/null",
        ],
        ":67 ",
    );
    // Every path nginx would take from its build (PID, error log, temp directories) is in the scratch directory.
    let nginx_dir = dir.join("nginx");
    std::fs::create_dir_all(&nginx_dir).expect("nginx dir");
    let nginx_conf = format!(
        "daemon off; worker_processes 2; pid {d}/nginx.pid; error_log /dev/null; events {{ worker_connections 4096; }}\n\
         http {{ access_log off; sendfile on; tcp_nopush on; keepalive_requests 1000; default_type application/octet-stream;\n\
         client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
         server {{ listen 10.20.0.2:80; root {root}; location /config/ {{ try_files $uri =404; }} }} }}\n",
        d = nginx_dir.display(),
        root = dir.join("www").display()
    );
    std::fs::write(nginx_dir.join("nginx.conf"), nginx_conf).expect("nginx conf");
    let nginx = pair.start(
        &[
            "nginx",
            "-p",
            nginx_dir.to_str().expect("utf-8"),
            "-e",
            "stderr",
            "-c",
            nginx_dir.join("nginx.conf").to_str().expect("utf-8"),
        ],
        "10.20.0.2:80",
    );
    let peer_outcome = storm(Arc::clone(&machines));
    stop(nginx);
    stop(dnsmasq);
    report("dnsmasq + nginx", &peer_outcome, bound, "");
    drop(pair);
}
