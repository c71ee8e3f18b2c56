//! A network lab for provisioner tests: a server and a client network namespace joined by a veth pair, the
//! provisioner binary running in the server namespace, and helpers to run real clients (udhcpc, dhclient,
//! perfdhcp) or raw sockets in the client namespace. Everything is torn down on drop. Needs root.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // Shared by several test binaries; each uses part of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const SERVER_IP: &str = "10.99.0.2";

/// The bearer token every lab's provisioner accepts (role operator), by its hash in the tokens file.
pub const TOKEN: &str = "lab-token-for-tests-only-9f2c4e1a";

/// The operator API's base URL.
pub const API: &str = "https://10.99.0.2:8443";

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Polls `check` every 20 ms until it returns Some, or panics after `limit` with `what`.
pub fn poll<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Lab {
    pub server_ns: String,
    pub client_ns: String,
    pub server_if: String,
    pub client_if: String,
    pub dir: PathBuf,
    pub inventory: PathBuf,
    provisioner: Option<Child>,
    pub args: Vec<String>,
    /// The site PKI: the provisioner's operator API certificate, admin and read-only operators.
    pub pki: herd_lab::pki::LabPki,
}

impl Lab {
    /// A lab whose provisioner serves `inventory` (text) with `args` added to its command line.
    pub fn new(inventory: &str, args: &[&str]) -> Lab {
        assert!(nix_is_root(), "provisioner network tests need root (network namespaces, port 67)");
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{n}", std::process::id() % 10_000);
        let dir = std::env::temp_dir().join(format!("herd-lab-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let inv_path = dir.join("inventory.toml");
        std::fs::write(&inv_path, inventory).unwrap();
        let pki = herd_lab::pki::LabPki::make(&dir.join("pki"), SERVER_IP.parse().unwrap()).unwrap();
        let hash = herd_api::token_hash(TOKEN);
        let tokens = format!("version = 1\n[[token]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"{hash}\"\n");
        std::fs::write(dir.join("tokens.toml"), tokens).unwrap();
        let lab = Lab {
            server_ns: format!("hs{id}"),
            client_ns: format!("hc{id}"),
            server_if: format!("vs{id}"),
            client_if: format!("vc{id}"),
            dir,
            inventory: inv_path,
            provisioner: None,
            args: args.iter().map(|s| s.to_string()).collect(),
            pki,
        };
        sh("ip", &["netns", "add", &lab.server_ns]);
        sh("ip", &["netns", "add", &lab.client_ns]);
        sh("ip", &["link", "add", &lab.server_if, "type", "veth", "peer", "name", &lab.client_if]);
        sh("ip", &["link", "set", &lab.server_if, "netns", &lab.server_ns]);
        sh("ip", &["link", "set", &lab.client_if, "netns", &lab.client_ns]);
        sh("ip", &["-n", &lab.server_ns, "addr", "add", &format!("{SERVER_IP}/24"), "dev", &lab.server_if]);
        for (ns, dev) in [(&lab.server_ns, &lab.server_if), (&lab.client_ns, &lab.client_if)] {
            sh("ip", &["-n", ns, "link", "set", dev, "up"]);
            sh("ip", &["-n", ns, "link", "set", "lo", "up"]);
        }
        lab
    }

    /// A lab serving examples/qemu-3.toml (provisioner 10.99.0.2; node1..3 with MACs 52:54:00:99:0N:0{1,2}).
    pub fn qemu3(args: &[&str]) -> Lab {
        let inv = std::fs::read_to_string(repo().join("examples/qemu-3.toml")).unwrap();
        Lab::new(&inv, args)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Served under /assets; created on first use.
    pub fn assets_dir(&self) -> PathBuf {
        let dir = self.dir.join("assets");
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("provisioner.log")
    }

    /// Starts the provisioner and waits until it serves.
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.server_ns, env!("CARGO_BIN_EXE_provisioner")])
            .arg("--inventory")
            .arg(&self.inventory)
            .args(["--interface", &self.server_if])
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--assets")
            .arg(self.assets_dir())
            .arg("--api-credentials")
            .arg(&self.pki.server)
            .arg("--api-tokens")
            .arg(self.dir.join("tokens.toml"))
            .arg("--site-pki")
            .arg(self.dir.join("pki"))
            .args(&self.args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log);
        self.provisioner = Some(cmd.spawn().unwrap());
        let log_path = self.log_path();
        let starts = std::fs::read_to_string(&log_path).unwrap_or_default().matches("provisioner serving").count();
        poll(Duration::from_secs(10), "the provisioner to serve", || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(child) = self.provisioner.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("provisioner exited with {status}:\n{text}");
            }
            (text.matches("provisioner serving").count() > starts).then_some(())
        });
        // Its stderr is a file here, not a terminal: no colour codes (NO_COLOR is not set).
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(!text.contains('\x1b'), "ANSI escapes in a log written to a file:\n{text}");
    }

    /// Kills the provisioner with SIGKILL and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.provisioner.take() {
            // `ip netns exec` execs the provisioner, so the child is the provisioner itself.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Sets the client interface's MAC.
    pub fn set_client_mac(&self, mac: &str) {
        sh("ip", &["-n", &self.client_ns, "link", "set", &self.client_if, "down"]);
        sh("ip", &["-n", &self.client_ns, "link", "set", &self.client_if, "address", mac]);
        sh("ip", &["-n", &self.client_ns, "link", "set", &self.client_if, "up"]);
    }

    /// Gives the client interface an address (for unicast protocols: TFTP, HTTP, INFORM).
    pub fn client_address(&self, cidr: &str) {
        sh("ip", &["-n", &self.client_ns, "addr", "add", cidr, "dev", &self.client_if]);
    }

    /// curl in the client namespace against the operator API (`path` under [`API`]) with the credential in
    /// `credential` (None: none); returns the status code (0: no HTTP answer, e.g. a refused handshake) and body.
    pub fn api(&self, credential: Option<&Path>, args: &[&str], path: &str) -> (u16, String) {
        let mut all: Vec<String> = ["-s", "-w", "\n%{http_code}", "--cacert"].map(String::from).to_vec();
        all.push(self.pki.admin.join("api-ca.crt").display().to_string());
        if let Some(c) = credential {
            all.extend(["--cert".to_owned(), c.join("api.crt").display().to_string()]);
            all.extend(["--key".to_owned(), c.join("api.key").display().to_string()]);
        }
        all.extend(args.iter().map(|a| a.to_string()));
        all.push(format!("{API}{path}"));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let text = String::from_utf8_lossy(&self.in_client("curl", &refs).stdout).into_owned();
        let (content, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), content.to_owned())
    }

    /// [`Lab::api`] as the lab's admin.
    pub fn admin(&self, args: &[&str], path: &str) -> (u16, String) {
        self.api(Some(&self.pki.admin), args, path)
    }

    /// Runs a command in the client namespace.
    pub fn in_client(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.client_ns, cmd]).args(args).output().unwrap()
    }

    /// Runs busybox udhcpc once in the client namespace with extra arguments; returns the environment the
    /// lease script saw on `bound`, or None when no lease was obtained.
    pub fn udhcpc(&self, extra: &[&str]) -> Option<std::collections::BTreeMap<String, String>> {
        let env_file = self.dir.join(format!("udhcpc-{}.env", NEXT.fetch_add(1, Ordering::SeqCst)));
        let script = self.dir.join("udhcpc.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nif [ \"$1\" = bound ]; then env > {}; ip addr replace \"$ip/$mask\" dev \"$interface\"; fi\nexit 0\n",
                env_file.display()
            ),
        )
            .unwrap();
        sh("chmod", &["+x", script.to_str().unwrap()]);
        let mut args = vec!["udhcpc", "-i", &self.client_if, "-n", "-q", "-f", "-t", "3", "-T", "1", "-s"];
        args.push(script.to_str().unwrap());
        args.extend_from_slice(extra);
        self.in_client("busybox", &args);
        let text = std::fs::read_to_string(&env_file).ok()?;
        Some(text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new("ip").args(["netns", "del", &self.server_ns]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.client_ns]).status();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "lab kept for inspection: {} (provisioner log: {})",
                self.dir.display(),
                self.log_path().display()
            );
        }
    }
}

fn nix_is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false)
}

/// Runs `f` on a thread that has entered network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(ns, f).join().unwrap()
}

/// Starts `f` on a thread that has entered network namespace `ns`.
pub fn spawn_in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// A hand-driven DHCP client on raw UDP, for what real clients cannot be made to send (INFORM, relayed
/// requests, DECLINE at will, garbage).
pub mod raw {
    use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
    use std::time::Duration;

    use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
    use dhcproto::{Decodable, Decoder, Encodable};

    pub fn socket(bind: SocketAddr, device: &str) -> UdpSocket {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_reuse_address(true).unwrap();
        s.set_broadcast(true).unwrap();
        s.bind_device(Some(device.as_bytes())).unwrap();
        s.bind(&bind.into()).unwrap();
        let s: UdpSocket = s.into();
        s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        s
    }

    pub fn message(kind: MessageType, mac: [u8; 6], xid: u32) -> Message {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut m = Message::new_with_id(xid, z, z, z, z, &mac);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m
    }

    /// Sends `msg` to `to` and waits for a reply with the same xid.
    pub fn exchange(sock: &UdpSocket, msg: &Message, to: SocketAddr) -> Option<Message> {
        sock.send_to(&msg.to_vec().unwrap(), to).unwrap();
        let mut buf = [0u8; 1500];
        loop {
            let (n, _) = sock.recv_from(&mut buf).ok()?;
            let Ok(reply) = Message::decode(&mut Decoder::new(&buf[..n])) else { continue };
            if reply.opcode() == Opcode::BootReply && reply.xid() == msg.xid() {
                return Some(reply);
            }
        }
    }

    pub fn msg_type(m: &Message) -> Option<MessageType> {
        m.opts().msg_type()
    }

    pub fn server_id(m: &Message) -> Option<Ipv4Addr> {
        match m.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        }
    }

    /// DISCOVER + REQUEST from `mac` by broadcast; the acknowledged address.
    pub fn lease(sock: &UdpSocket, mac: [u8; 6], xid: u32) -> Option<Ipv4Addr> {
        let bcast: SocketAddr = "255.255.255.255:67".parse().unwrap();
        let mut discover = message(MessageType::Discover, mac, xid);
        discover.set_flags(dhcproto::v4::Flags::default().set_broadcast());
        let offer = exchange(sock, &discover, bcast)?;
        let mut request = message(MessageType::Request, mac, xid.wrapping_add(1));
        request.set_flags(dhcproto::v4::Flags::default().set_broadcast());
        request.opts_mut().insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
        request.opts_mut().insert(DhcpOption::ServerIdentifier(server_id(&offer)?));
        let ack = exchange(sock, &request, bcast)?;
        (msg_type(&ack) == Some(MessageType::Ack)).then_some(ack.yiaddr())
    }
}
