//! The DHCP service: sockets on UDP 67 (and 4011), bound to the boot interface, feeding [`DhcpServer`].
//!
//! One task owns the server state. Each wake-up drains every queued datagram from both sockets, decides all of
//! them, commits the resulting lease changes in **one** durable transaction, and only then sends the answers:
//! an ACK never leaves before its lease is on disk, and a burst costs one fsync, not one per client.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::leases::{Lease, LeaseState, LeaseView};
use super::server::{
    Answer, AnswerKind, CLIENT_PORT, Destination, DhcpServer, Event, Ignored, Kind, Port, SERVER_PORT,
};
use super::wire;
use crate::machines::Machines;
use crate::metrics::Metrics;
use crate::store::Store;

/// Most datagrams handled per commit.
const BATCH: usize = 1024;
/// Receive buffer asked of the kernel, so a boot storm queues instead of dropping.
const RECV_BUFFER: usize = 8 << 20;

/// Binds a UDP socket on `0.0.0.0:port` (broadcasts arrive there), limited to `interface` when given.
pub fn bind_udp(port: u16, interface: Option<&str>) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER);
    if let Some(iface) = interface {
        socket.bind_device(Some(iface.as_bytes()))?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
    UdpSocket::from_std(socket.into())
}

/// The running DHCP service.
#[derive(Debug)]
pub struct DhcpService {
    server: DhcpServer,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    dhcp: UdpSocket,
    boot: Option<UdpSocket>,
    observers: Option<Observers>,
}

/// Who hears about DHCP decisions: the machines task (boot timelines) and the lease view (config binding).
#[derive(Debug, Clone)]
pub struct Observers {
    /// Machine timelines.
    pub machines: Machines,
    /// Bound leases, for the HTTP config check.
    pub leases: Arc<LeaseView>,
}

fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Discover => "type=\"discover\"",
        Kind::Request => "type=\"request\"",
        Kind::Decline => "type=\"decline\"",
        Kind::Release => "type=\"release\"",
        Kind::Inform => "type=\"inform\"",
    }
}

fn ignored_label(why: Ignored) -> &'static str {
    match why {
        Ignored::UnknownMac => "reason=\"unknown-mac\"",
        Ignored::OtherServer => "reason=\"other-server\"",
        Ignored::ForeignSubnet => "reason=\"foreign-subnet\"",
        Ignored::PoolExhausted => "reason=\"pool-exhausted\"",
        Ignored::ReservationBusy => "reason=\"reservation-busy\"",
        Ignored::UnsupportedArch => "reason=\"unsupported-arch\"",
        Ignored::NotForUs => "reason=\"not-for-us\"",
        Ignored::NoRecord => "reason=\"no-record\"",
        Ignored::Incomplete => "reason=\"incomplete\"",
    }
}

/// Describes the DHCP metrics.
pub fn describe_metrics(m: &Metrics) {
    m.describe("herd_dhcp_received_total", "DHCP requests decoded, by message type.");
    m.describe("herd_dhcp_dropped_total", "Datagrams dropped before the server logic, by reason.");
    m.describe("herd_dhcp_ignored_total", "Requests deliberately left unanswered, by reason.");
    m.describe("herd_dhcp_answers_total", "Answers sent, by message type.");
    m.describe("herd_dhcp_lease_writes_total", "Lease changes made durable.");
    m.describe("herd_dhcp_commits_total", "Durable commits (each covers a batch of lease changes).");
    m.describe("herd_dhcp_errors_total", "Store or socket failures, by kind.");
}

impl DhcpService {
    /// A service over bound sockets.
    pub fn new(
        server: DhcpServer,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        dhcp: UdpSocket,
        boot: Option<UdpSocket>,
        observers: Option<Observers>,
    ) -> Self {
        describe_metrics(&metrics);
        if let Some(o) = &observers {
            for lease in server.leases().iter().filter(|l| l.holds(unix_now()) && l.state == LeaseState::Bound) {
                o.leases.set(lease.mac, Some(lease.ip));
            }
        }
        DhcpService { server, store, metrics, dhcp, boot, observers }
    }

    /// Serves until `cancel` fires.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut buf = vec![0u8; 4096];
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.dhcp.readable() => if let Err(e) = r { self.socket_error("readable", &e); continue },
                r = readable(self.boot.as_ref()) => if let Err(e) = r { self.socket_error("readable", &e); continue },
            }
            let now = unix_now();
            let mut answers: Vec<(Answer, Port)> = Vec::new();
            let mut writes: Vec<Lease> = Vec::new();
            self.drain(Port::Dhcp, &mut buf, now, &mut answers, &mut writes);
            self.drain(Port::BootServer, &mut buf, now, &mut answers, &mut writes);
            if !writes.is_empty() {
                let store = Arc::clone(&self.store);
                let count = writes.len() as u64;
                let committed = tokio::task::spawn_blocking(move || store.write_leases(&writes).map(|()| writes)).await;
                match committed {
                    Ok(Ok(written)) => {
                        self.metrics.add("herd_dhcp_lease_writes_total", "", count);
                        self.metrics.inc("herd_dhcp_commits_total", "");
                        if let Some(o) = &self.observers {
                            for lease in written {
                                o.leases.set(lease.mac, (lease.state == LeaseState::Bound).then_some(lease.ip));
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        // Nothing is acknowledged that is not durable: drop this batch's answers; clients retry.
                        tracing::error!(error = %format!("{e:#}"), "lease commit failed; not answering this batch");
                        self.metrics.inc("herd_dhcp_errors_total", "kind=\"commit\"");
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "lease commit task failed");
                        self.metrics.inc("herd_dhcp_errors_total", "kind=\"commit\"");
                        continue;
                    }
                }
            }
            for (answer, port) in answers {
                self.send(&answer, port).await;
            }
        }
    }

    fn socket(&self, port: Port) -> Option<&UdpSocket> {
        match port {
            Port::Dhcp => Some(&self.dhcp),
            Port::BootServer => self.boot.as_ref(),
        }
    }

    fn drain(
        &mut self,
        port: Port,
        buf: &mut [u8],
        now: u64,
        answers: &mut Vec<(Answer, Port)>,
        writes: &mut Vec<Lease>,
    ) {
        for _ in 0..BATCH {
            let Some(socket) = self.socket(port) else { return };
            let (len, from) = match socket.try_recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.socket_error("recv", &e);
                    return;
                }
            };
            let SocketAddr::V4(from) = from else { continue };
            let req = match wire::decode(&buf[..len], port, from) {
                Ok(r) => r,
                Err(drop) => {
                    self.metrics.inc("herd_dhcp_dropped_total", &format!("reason=\"{}\"", drop.label()));
                    continue;
                }
            };
            self.metrics.inc("herd_dhcp_received_total", kind_label(req.kind));
            let outcome = self.server.handle(&req, now);
            if let Event::Ignored(why) = outcome.event {
                self.metrics.inc("herd_dhcp_ignored_total", ignored_label(why));
                // Rate-limited by nature: one debug line per ignored packet is cheap only at debug level.
                tracing::debug!(mac = %req.mac, ?why, "dhcp request ignored");
            }
            match outcome.event {
                Event::Declined(ip) => {
                    // Someone else answers on this address: a misconfigured host, or a duplicate in the inventory.
                    tracing::warn!(mac = %req.mac, %ip, machine = ?outcome.machine, "address declined by the client; quarantined");
                }
                Event::Released(ip) => tracing::info!(mac = %req.mac, %ip, "lease released"),
                _ => {}
            }
            if let (Some(machine), Some(o)) = (&outcome.machine, &self.observers) {
                let (event, detail) = match &outcome.event {
                    Event::Offered(ip) => ("dhcp-offer", ip.to_string()),
                    Event::Acked(ip) => ("dhcp-ack", ip.to_string()),
                    Event::Naked(why) => ("dhcp-nak", (*why).to_owned()),
                    Event::Declined(ip) => ("dhcp-decline", ip.to_string()),
                    Event::Released(ip) => ("dhcp-release", ip.to_string()),
                    Event::Ignored(why) => ("dhcp-ignored", format!("{why:?}")),
                };
                let firmware =
                    req.client.arch.map(|a| format!(" ({a}{})", if req.client.ipxe { ", iPXE" } else { "" }));
                o.machines.event(machine, event, format!("{detail}{}", firmware.unwrap_or_default()));
            }
            if let (Some(ip), Some(o)) = (outcome.observed, &self.observers) {
                o.leases.set(req.mac, Some(ip));
            }
            writes.extend(outcome.write);
            if let Some(answer) = outcome.answer {
                answers.push((answer, port));
            }
        }
    }

    async fn send(&self, answer: &Answer, port: Port) {
        let to = match answer.destination {
            Destination::Relay(giaddr) => SocketAddrV4::new(giaddr, SERVER_PORT),
            Destination::Unicast(addr) => addr,
            Destination::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT),
        };
        let Some(bytes) = wire::encode(answer) else {
            self.metrics.inc("herd_dhcp_errors_total", "kind=\"too-large\"");
            tracing::warn!(mac = %answer.mac, max = answer.max_size, "answer does not fit the client's maximum size");
            return;
        };
        let Some(socket) = self.socket(port) else { return };
        match socket.send_to(&bytes, to).await {
            Ok(_) => {
                let label = match answer.kind {
                    AnswerKind::Offer => "type=\"offer\"",
                    AnswerKind::Ack => "type=\"ack\"",
                    AnswerKind::Nak => "type=\"nak\"",
                };
                self.metrics.inc("herd_dhcp_answers_total", label);
            }
            Err(e) => self.socket_error("send", &e),
        }
    }

    fn socket_error(&self, what: &'static str, e: &io::Error) {
        self.metrics.inc("herd_dhcp_errors_total", &format!("kind=\"{what}\""));
        tracing::warn!(error = %e, what, "dhcp socket error");
    }
}

async fn readable(socket: Option<&UdpSocket>) -> io::Result<()> {
    match socket {
        Some(s) => s.readable().await,
        None => std::future::pending().await,
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
