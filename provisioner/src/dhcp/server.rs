//! The DHCP server's logic: typed request in, typed answer (and the lease to make durable) out. No sockets, no
//! clock, no wire format: [`super::wire`] converts packets, [`crate::daemon`] owns sockets and the store.
//!
//! RFC 2131 as it applies to a boot network:
//!
//! ```text
//! DISCOVER ──► OFFER (reservation from the inventory, else pool if unknown MACs are served)
//! REQUEST  ├─ option 54 present  (SELECTING)       ours? ACK if the address is right, else NAK; not ours: forget offer
//!          ├─ no 54, no ciaddr   (INIT-REBOOT)     ACK if right; NAK if wrong; silent if we have no record
//!          └─ ciaddr set         (RENEWING/REBINDING) ACK to extend, NAK if not this client's
//! DECLINE  ──► quarantine the address          RELEASE ──► free it          INFORM ──► ACK, options only
//! port 4011 (boot server) and proxy mode ──► boot information only (yiaddr 0)
//! ```
//!
//! Replies are addressed per RFC 2131 §4.1: to the relay (giaddr) if any; NAKs broadcast; to ciaddr if the client
//! has one; broadcast if the client asked for it or has no address yet.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use herd_inventory::{Cidr, Inventory, Mac};

use super::leases::{Lease, LeaseState, LeaseTable};
use crate::boot::{self, BootConfig, BootFile, ClientInfo, NoBoot};

/// Most pool addresses probed for one request.
pub const MAX_SCAN: usize = 256;

/// The DHCP client port.
pub const CLIENT_PORT: u16 = 68;
/// The DHCP server (and relay) port.
pub const SERVER_PORT: u16 = 67;
/// The PXE boot-server port.
pub const BOOT_SERVER_PORT: u16 = 4011;

/// Full DHCP server, or proxyDHCP beside a server we do not own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Hand out addresses and boot information.
    #[default]
    Full,
    /// Boot information only, beside another DHCP server that hands out addresses.
    Proxy,
}

/// What to do with MACs the inventory does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownMacs {
    /// Do not answer (production: a stray laptop must not boot the OS).
    #[default]
    Ignore,
    /// Lease from the pool and boot them (discovery).
    Serve,
}

/// A DHCP message type a client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// DHCPDISCOVER.
    Discover,
    /// DHCPREQUEST.
    Request,
    /// DHCPDECLINE.
    Decline,
    /// DHCPRELEASE.
    Release,
    /// DHCPINFORM.
    Inform,
}

/// Which socket the request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// UDP 67.
    Dhcp,
    /// UDP 4011 (PXE boot server).
    BootServer,
}

/// Relay agent information (option 82), echoed verbatim in replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayEcho(pub Vec<u8>);

/// A client's request, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Message type.
    pub kind: Kind,
    /// Transaction id.
    pub xid: u32,
    /// The broadcast flag.
    pub broadcast: bool,
    /// chaddr.
    pub mac: Mac,
    /// ciaddr.
    pub ciaddr: Ipv4Addr,
    /// giaddr (set by a relay).
    pub giaddr: Ipv4Addr,
    /// Option 50.
    pub requested: Option<Ipv4Addr>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
    /// Firmware and boot-related options.
    pub client: ClientInfo,
    /// Option 82.
    pub relay: Option<RelayEcho>,
    /// Which port it came in on.
    pub port: Port,
    /// Where it came from (for 4011 replies).
    pub source: SocketAddrV4,
    /// Option 57: the largest DHCP message the client accepts (576 when absent, the RFC 2131 minimum).
    pub max_size: u16,
}

/// The message type of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerKind {
    /// DHCPOFFER.
    Offer,
    /// DHCPACK.
    Ack,
    /// DHCPNAK.
    Nak,
}

/// Where an answer goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// To a relay agent's server port.
    Relay(Ipv4Addr),
    /// Unicast to an address that answers ARP (ciaddr, or the source of a 4011 request).
    Unicast(SocketAddrV4),
    /// Limited broadcast on the client port.
    Broadcast,
}

/// Network parameters handed to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetParams {
    /// Option 1.
    pub mask: Ipv4Addr,
    /// Option 28.
    pub broadcast: Ipv4Addr,
    /// Option 3.
    pub router: Option<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 42.
    pub ntp: Vec<Ipv4Addr>,
    /// Option 15.
    pub domain: Option<String>,
    /// Option 26.
    pub mtu: Option<u16>,
}

/// Boot information in an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootAnswer {
    /// File (TFTP) or URL (HTTP).
    pub file: BootFile,
    /// siaddr: the next server. Always us: iPXE ignores a ProxyDHCPACK whose siaddr is zero even when the boot
    /// file is a URL.
    pub next_server: Ipv4Addr,
    /// Option 66 and sname: the TFTP server, for TFTP boot files only.
    pub tftp_server: Option<Ipv4Addr>,
    /// Option 60 to send: `PXEClient` or `HTTPClient`.
    pub vendor_class: &'static str,
    /// Send option 175 sub-option 176 = 1, so iPXE does not wait for ProxyDHCP offers.
    pub ipxe_no_pxedhcp: bool,
    /// Send option 43 with PXE discovery control = 8 (boot from this offer, skip boot-server discovery).
    pub pxe_discovery_control: bool,
}

/// An answer to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Message type.
    pub kind: AnswerKind,
    /// Transaction id, copied.
    pub xid: u32,
    /// chaddr, copied.
    pub mac: Mac,
    /// Broadcast flag, copied.
    pub broadcast: bool,
    /// ciaddr, copied for ACKs to clients that have an address.
    pub ciaddr: Ipv4Addr,
    /// yiaddr.
    pub yiaddr: Ipv4Addr,
    /// giaddr, copied.
    pub giaddr: Ipv4Addr,
    /// Option 54: us.
    pub server_id: Ipv4Addr,
    /// Options 51/58/59 (lease, T1, T2), seconds.
    pub lease_secs: Option<u32>,
    /// Network parameters.
    pub net: Option<NetParams>,
    /// Option 12.
    pub hostname: Option<String>,
    /// Boot information.
    pub boot: Option<BootAnswer>,
    /// Option 97, echoed.
    pub uuid: Option<Vec<u8>>,
    /// Option 82, echoed.
    pub relay: Option<RelayEcho>,
    /// Option 56 (why a NAK).
    pub message: Option<String>,
    /// Where to send it.
    pub destination: Destination,
    /// The largest message the client accepts (option 57).
    pub max_size: u16,
}

/// Why a request gets no answer (counted, never fatal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// The MAC is not in the inventory and unknown MACs are ignored.
    UnknownMac,
    /// The client chose another server's offer.
    OtherServer,
    /// Relayed from a subnet we do not serve.
    ForeignSubnet,
    /// No free address in the pools.
    PoolExhausted,
    /// The machine's reserved address is held by someone else or quarantined.
    ReservationBusy,
    /// A boot client whose architecture herd has no binary for.
    UnsupportedArch,
    /// A request that is not for this mode or port (e.g. address requests in proxy mode).
    NotForUs,
    /// INIT-REBOOT from a client we have no record of (RFC 2131: stay silent).
    NoRecord,
    /// A message missing what its type requires.
    Incomplete,
}

/// What happened, for counters and the boot timeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An offer (or proxy offer) was made.
    Offered(Ipv4Addr),
    /// A lease was acknowledged (or an INFORM / boot-server request answered).
    Acked(Ipv4Addr),
    /// A request was refused with a NAK.
    Naked(&'static str),
    /// The client declined an address; it is quarantined.
    Declined(Ipv4Addr),
    /// The client released its address.
    Released(Ipv4Addr),
    /// No answer.
    Ignored(Ignored),
}

/// The result of handling one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What to send, if anything. Send it only after `write` is durable.
    pub answer: Option<Answer>,
    /// A lease change to make durable before answering.
    pub write: Option<Lease>,
    /// What happened.
    pub event: Event,
    /// The inventory machine this MAC belongs to.
    pub machine: Option<String>,
    /// In proxy mode, the address the client is taking from the other server (its REQUEST's option 50): the
    /// config endpoint binds to it in place of a lease of ours.
    pub observed: Option<Ipv4Addr>,
}

/// A reserved address from the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The machine's internal address.
    pub ip: Ipv4Addr,
    /// The machine's name.
    pub machine: String,
}

/// The server's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpConfig {
    /// Full or proxy.
    pub mode: Mode,
    /// Our address (option 54, siaddr).
    pub server_ip: Ipv4Addr,
    /// The served subnet.
    pub subnet: Cidr,
    /// Parameters handed out.
    pub net: NetParams,
    /// Dynamic pools, as inclusive ranges.
    pub pools: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// Reservations by MAC (every MAC of a machine maps to its address).
    pub reservations: HashMap<Mac, Reservation>,
    /// Lease time, seconds.
    pub lease_secs: u32,
    /// How long an offer holds its address, seconds.
    pub offer_secs: u64,
    /// How long a declined address is quarantined, seconds.
    pub decline_secs: u64,
    /// Unknown MACs: ignore or serve.
    pub unknown: UnknownMacs,
    /// Boot answers.
    pub boot: BootConfig,
}

impl DhcpConfig {
    /// The configuration for an inventory: reservations for every MAC of every machine, the internal network's
    /// pools and parameters.
    pub fn from_inventory(inv: &Inventory, mode: Mode, unknown: UnknownMacs, boot: BootConfig) -> Self {
        let net = &inv.network.internal;
        let subnet = *net.cidr.get_ref();
        let mut reservations = HashMap::new();
        for m in &inv.machines {
            for mac in m.macs() {
                reservations.insert(mac, Reservation { ip: m.internal.get_ref().0, machine: m.name().to_string() });
            }
        }
        DhcpConfig {
            mode,
            server_ip: inv.site.provisioner.get_ref().0,
            subnet,
            net: NetParams {
                mask: subnet.netmask(),
                broadcast: subnet.broadcast(),
                router: net.gateway.as_ref().map(|g| g.get_ref().0),
                dns: inv.site.dns.iter().map(|a| a.0).collect(),
                ntp: inv.site.ntp.iter().map(|a| a.0).collect(),
                domain: Some(inv.site.domain.to_string()),
                mtu: net.mtu,
            },
            pools: net.pools.iter().map(|p| (p.get_ref().start.0, p.get_ref().end.0)).collect(),
            reservations,
            lease_secs: 3600,
            offer_secs: 10,
            decline_secs: 600,
            unknown,
            boot,
        }
    }
}

/// The server state: configuration, leases, pool cursor.
#[derive(Debug)]
pub struct DhcpServer {
    config: DhcpConfig,
    leases: LeaseTable,
    cursor: usize,
    reserved_ips: std::collections::HashSet<Ipv4Addr>,
}

impl DhcpServer {
    /// A server with the leases recovered from the store.
    pub fn new(config: DhcpConfig, leases: LeaseTable) -> Self {
        let reserved_ips = config.reservations.values().map(|r| r.ip).collect();
        DhcpServer { config, leases, cursor: 0, reserved_ips }
    }

    /// The configuration.
    pub fn config(&self) -> &DhcpConfig {
        &self.config
    }

    /// The lease table.
    pub fn leases(&self) -> &LeaseTable {
        &self.leases
    }

    /// Handles one request at unix time `now`.
    pub fn handle(&mut self, req: &Request, now: u64) -> Outcome {
        let machine = self.config.reservations.get(&req.mac).map(|r| r.machine.clone());
        let mut outcome = self.dispatch(req, now);
        outcome.machine = machine;
        outcome
    }

    fn dispatch(&mut self, req: &Request, now: u64) -> Outcome {
        if !req.giaddr.is_unspecified() && !self.config.subnet.contains(req.giaddr) {
            return ignored(Ignored::ForeignSubnet);
        }
        match (self.config.mode, req.port, req.kind) {
            (_, Port::BootServer, Kind::Request | Kind::Discover) => self.boot_server(req),
            (_, Port::BootServer, _) => ignored(Ignored::NotForUs),
            (Mode::Proxy, Port::Dhcp, Kind::Discover) => self.proxy_offer(req),
            (Mode::Proxy, Port::Dhcp, Kind::Request) => {
                let observed = req.requested.or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr));
                Outcome { observed, ..ignored(Ignored::NotForUs) }
            }
            (Mode::Proxy, Port::Dhcp, _) => ignored(Ignored::NotForUs),
            (Mode::Full, Port::Dhcp, Kind::Discover) => self.discover(req, now),
            (Mode::Full, Port::Dhcp, Kind::Request) => self.request(req, now),
            (Mode::Full, Port::Dhcp, Kind::Decline) => self.decline(req, now),
            (Mode::Full, Port::Dhcp, Kind::Release) => self.release(req, now),
            (Mode::Full, Port::Dhcp, Kind::Inform) => self.inform(req),
        }
    }

    fn known(&self, mac: Mac) -> bool {
        self.config.reservations.contains_key(&mac)
    }

    /// Whether `ip` is free for `mac`: available in the table, or held by another NIC of the same machine (a
    /// machine that booted from its other NIC).
    fn free_for(&self, ip: Ipv4Addr, mac: Mac, now: u64) -> bool {
        if self.leases.available_for(ip, mac, now) {
            return true;
        }
        let Some(lease) = self.leases.get(ip) else { return false };
        let same_machine = match (self.config.reservations.get(&lease.mac), self.config.reservations.get(&mac)) {
            (Some(a), Some(b)) => a.machine == b.machine,
            _ => false,
        };
        lease.state == LeaseState::Bound && same_machine
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.config.pools.iter().any(|(s, e)| *s <= ip && ip <= *e)
    }

    /// The address to offer, or why there is none.
    fn choose(&mut self, req: &Request, now: u64) -> Result<Ipv4Addr, Ignored> {
        if let Some(r) = self.config.reservations.get(&req.mac) {
            let ip = r.ip;
            return if self.free_for(ip, req.mac, now) { Ok(ip) } else { Err(Ignored::ReservationBusy) };
        }
        if self.config.unknown == UnknownMacs::Ignore {
            return Err(Ignored::UnknownMac);
        }
        if let Some(ip) = self.leases.offered_to(req.mac, now) {
            return Ok(ip);
        }
        if let Some(lease) = self.leases.of_mac(req.mac)
            && self.in_pool(lease.ip)
            && self.free_for(lease.ip, req.mac, now)
        {
            return Ok(lease.ip);
        }
        if let Some(ip) = req.requested
            && self.in_pool(ip)
            && self.free_for(ip, req.mac, now)
        {
            return Ok(ip);
        }
        self.next_free(req.mac, now).ok_or(Ignored::PoolExhausted)
    }

    fn pool_size(&self) -> usize {
        self.config.pools.iter().map(|(s, e)| (u32::from(*e) - u32::from(*s) + 1) as usize).sum()
    }

    fn pool_address(&self, mut index: usize) -> Option<Ipv4Addr> {
        for (s, e) in &self.config.pools {
            let size = (u32::from(*e) - u32::from(*s) + 1) as usize;
            if index < size {
                return Some(Ipv4Addr::from(u32::from(*s) + index as u32));
            }
            index -= size;
        }
        None
    }

    /// Scans the pools from a rotating cursor, so allocation is amortized O(1) while the pool has room. The scan is
    /// bounded: a nearly full pool costs at most [`MAX_SCAN`] probes per request (the cursor keeps moving, so free
    /// addresses are still found by later requests), never a walk of the whole pool per packet.
    fn next_free(&mut self, mac: Mac, now: u64) -> Option<Ipv4Addr> {
        let size = self.pool_size();
        for step in 0..size.min(MAX_SCAN) {
            let index = (self.cursor + step) % size;
            let ip = self.pool_address(index)?;
            if self.free_for(ip, mac, now) && !self.is_reserved(ip) {
                self.cursor = (index + 1) % size;
                return Some(ip);
            }
        }
        self.cursor = (self.cursor + size.min(MAX_SCAN)) % size.max(1);
        None
    }

    fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        self.reserved_ips.contains(&ip)
    }

    /// Whether `mac` may have `ip` (REQUEST in any state).
    fn acceptable(&self, mac: Mac, ip: Ipv4Addr, now: u64) -> bool {
        match self.config.reservations.get(&mac) {
            Some(r) => r.ip == ip && self.free_for(ip, mac, now),
            None => self.config.unknown == UnknownMacs::Serve && self.in_pool(ip) && self.free_for(ip, mac, now),
        }
    }

    fn boot_for(&self, req: &Request) -> Result<Option<BootAnswer>, NoBoot> {
        if !req.client.wants_boot() {
            return Ok(None);
        }
        let file = boot::boot_file(&req.client, req.mac, &self.config.boot)?;
        let http = req.client.http_client || req.client.arch.is_some_and(|a| a.is_http_boot());
        Ok(Some(BootAnswer {
            next_server: self.config.server_ip,
            tftp_server: boot::tftp_server(&file, self.config.server_ip),
            vendor_class: if http { "HTTPClient" } else { "PXEClient" },
            ipxe_no_pxedhcp: req.client.ipxe && self.config.mode == Mode::Full,
            // PXE vendor options on every PXEClient answer: ROMs skip boot-server discovery, and iPXE ignores a
            // ProxyDHCPACK without them.
            pxe_discovery_control: !http,
            file,
        }))
    }

    fn answer(&self, req: &Request, kind: AnswerKind, yiaddr: Ipv4Addr) -> Answer {
        Answer {
            kind,
            xid: req.xid,
            mac: req.mac,
            broadcast: req.broadcast,
            ciaddr: if kind == AnswerKind::Nak { Ipv4Addr::UNSPECIFIED } else { req.ciaddr },
            yiaddr,
            giaddr: req.giaddr,
            server_id: self.config.server_ip,
            lease_secs: None,
            net: None,
            hostname: None,
            boot: None,
            uuid: req.client.uuid.clone(),
            relay: req.relay.clone(),
            message: None,
            destination: destination(req, kind),
            max_size: req.max_size,
        }
    }

    fn lease_answer(&self, req: &Request, kind: AnswerKind, ip: Ipv4Addr, boot: Option<BootAnswer>) -> Answer {
        let mut a = self.answer(req, kind, ip);
        a.lease_secs = Some(self.config.lease_secs);
        a.net = Some(self.config.net.clone());
        a.hostname = self.config.reservations.get(&req.mac).map(|r| r.machine.clone());
        a.boot = boot;
        a
    }

    fn discover(&mut self, req: &Request, now: u64) -> Outcome {
        let ip = match self.choose(req, now) {
            Ok(ip) => ip,
            Err(why) => return ignored(why),
        };
        let boot = match self.boot_for(req) {
            Ok(b) => b,
            Err(NoBoot::UnsupportedArch(_)) => return ignored(Ignored::UnsupportedArch),
        };
        self.leases.offer(ip, req.mac, now + self.config.offer_secs);
        let answer = self.lease_answer(req, AnswerKind::Offer, ip, boot);
        Outcome { answer: Some(answer), write: None, event: Event::Offered(ip), machine: None, observed: None }
    }

    fn nak(&self, req: &Request, why: &'static str) -> Outcome {
        let mut a = self.answer(req, AnswerKind::Nak, Ipv4Addr::UNSPECIFIED);
        a.message = Some(why.to_owned());
        Outcome { answer: Some(a), write: None, event: Event::Naked(why), machine: None, observed: None }
    }

    fn ack(&mut self, req: &Request, ip: Ipv4Addr, now: u64) -> Outcome {
        // An ACK still goes to a client whose firmware we cannot boot: it asked for its address.
        let boot = self.boot_for(req).unwrap_or_default();
        let lease =
            Lease { ip, mac: req.mac, expires: now + u64::from(self.config.lease_secs), state: LeaseState::Bound };
        self.leases.put(lease);
        let answer = self.lease_answer(req, AnswerKind::Ack, ip, boot);
        Outcome { answer: Some(answer), write: Some(lease), event: Event::Acked(ip), machine: None, observed: None }
    }

    fn request(&mut self, req: &Request, now: u64) -> Outcome {
        if let Some(server) = req.server_id {
            // SELECTING: the client picked an offer.
            if server != self.config.server_ip {
                self.leases.withdraw_offer(req.mac);
                return ignored(Ignored::OtherServer);
            }
            let Some(ip) = req.requested.or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr)) else {
                return ignored(Ignored::Incomplete);
            };
            return if self.acceptable(req.mac, ip, now) {
                self.ack(req, ip, now)
            } else {
                self.nak(req, "requested address is not yours")
            };
        }
        if req.ciaddr.is_unspecified() {
            // INIT-REBOOT: the client remembers an address.
            let Some(ip) = req.requested else { return ignored(Ignored::Incomplete) };
            if !self.config.subnet.contains(ip) {
                return self.nak(req, "wrong network");
            }
            if self.acceptable(req.mac, ip, now) {
                return self.ack(req, ip, now);
            }
            let has_record = self.known(req.mac) || self.leases.of_mac(req.mac).is_some();
            return if has_record {
                self.nak(req, "requested address is not yours")
            } else {
                ignored(Ignored::NoRecord)
            };
        }
        // RENEWING (unicast) or REBINDING (broadcast).
        if self.acceptable(req.mac, req.ciaddr, now) {
            self.ack(req, req.ciaddr, now)
        } else {
            self.nak(req, "lease not renewable")
        }
    }

    fn decline(&mut self, req: &Request, now: u64) -> Outcome {
        let Some(ip) = req.requested else { return ignored(Ignored::Incomplete) };
        let ours = self.leases.get(ip).is_some_and(|l| l.mac == req.mac);
        if !ours && self.config.reservations.get(&req.mac).is_none_or(|r| r.ip != ip) {
            return ignored(Ignored::Incomplete);
        }
        let lease = Lease { ip, mac: req.mac, expires: now + self.config.decline_secs, state: LeaseState::Declined };
        self.leases.put(lease);
        Outcome { answer: None, write: Some(lease), event: Event::Declined(ip), machine: None, observed: None }
    }

    fn release(&mut self, req: &Request, now: u64) -> Outcome {
        let ip = req.ciaddr;
        match self.leases.get(ip) {
            Some(l) if l.mac == req.mac && l.state == LeaseState::Bound => {
                let lease = Lease { expires: now, state: LeaseState::Released, ..*l };
                self.leases.put(lease);
                Outcome { answer: None, write: Some(lease), event: Event::Released(ip), machine: None, observed: None }
            }
            _ => ignored(Ignored::Incomplete),
        }
    }

    fn inform(&self, req: &Request) -> Outcome {
        if req.ciaddr.is_unspecified() {
            return ignored(Ignored::Incomplete);
        }
        let mut a = self.answer(req, AnswerKind::Ack, Ipv4Addr::UNSPECIFIED);
        a.net = Some(self.config.net.clone());
        a.boot = self.boot_for(req).ok().flatten();
        Outcome { answer: Some(a), write: None, event: Event::Acked(req.ciaddr), machine: None, observed: None }
    }

    /// proxyDHCP: boot information only, yiaddr 0, to boot clients.
    fn proxy_offer(&self, req: &Request) -> Outcome {
        if !req.client.wants_boot() {
            return ignored(Ignored::NotForUs);
        }
        if !self.known(req.mac) && self.config.unknown == UnknownMacs::Ignore {
            return ignored(Ignored::UnknownMac);
        }
        match self.boot_for(req) {
            Ok(Some(boot)) => {
                let mut a = self.answer(req, AnswerKind::Offer, Ipv4Addr::UNSPECIFIED);
                a.boot = Some(boot);
                Outcome {
                    answer: Some(a),
                    write: None,
                    event: Event::Offered(Ipv4Addr::UNSPECIFIED),
                    machine: None,
                    observed: None,
                }
            }
            Ok(None) => ignored(Ignored::NotForUs),
            Err(_) => ignored(Ignored::UnsupportedArch),
        }
    }

    /// Port 4011: a PXE client asking the boot server directly; ACK with boot information to its source.
    fn boot_server(&self, req: &Request) -> Outcome {
        if !self.known(req.mac) && self.config.unknown == UnknownMacs::Ignore {
            return ignored(Ignored::UnknownMac);
        }
        match self.boot_for(req) {
            Ok(Some(boot)) => {
                let mut a = self.answer(req, AnswerKind::Ack, Ipv4Addr::UNSPECIFIED);
                a.boot = Some(boot);
                a.destination = Destination::Unicast(req.source);
                Outcome {
                    answer: Some(a),
                    write: None,
                    event: Event::Acked(*req.source.ip()),
                    machine: None,
                    observed: None,
                }
            }
            Ok(None) => ignored(Ignored::NotForUs),
            Err(_) => ignored(Ignored::UnsupportedArch),
        }
    }
}

fn ignored(why: Ignored) -> Outcome {
    Outcome { answer: None, write: None, event: Event::Ignored(why), machine: None, observed: None }
}

/// RFC 2131 §4.1 reply addressing.
fn destination(req: &Request, kind: AnswerKind) -> Destination {
    if !req.giaddr.is_unspecified() {
        Destination::Relay(req.giaddr)
    } else if kind == AnswerKind::Nak {
        Destination::Broadcast
    } else if !req.ciaddr.is_unspecified() {
        Destination::Unicast(SocketAddrV4::new(req.ciaddr, CLIENT_PORT))
    } else {
        // The client has no address yet. Unicasting to yiaddr needs an ARP entry we cannot add without raw
        // sockets; RFC 2131 allows broadcasting instead.
        Destination::Broadcast
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::Arch;

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn mac(n: u8) -> Mac {
        Mac::from_octets([0x52, 0x54, 0, 0, 0, n])
    }

    fn config(unknown: UnknownMacs, mode: Mode) -> DhcpConfig {
        let mut reservations = HashMap::new();
        reservations.insert(mac(1), Reservation { ip: Ipv4Addr::new(10, 0, 0, 11), machine: "m1".into() });
        reservations.insert(mac(2), Reservation { ip: Ipv4Addr::new(10, 0, 0, 11), machine: "m1".into() });
        reservations.insert(mac(3), Reservation { ip: Ipv4Addr::new(10, 0, 0, 12), machine: "m2".into() });
        DhcpConfig {
            mode,
            server_ip: SERVER,
            subnet: "10.0.0.0/24".parse().unwrap(),
            net: NetParams {
                mask: Ipv4Addr::new(255, 255, 255, 0),
                broadcast: Ipv4Addr::new(10, 0, 0, 255),
                router: Some(Ipv4Addr::new(10, 0, 0, 1)),
                dns: vec![],
                ntp: vec![],
                domain: Some("lab".into()),
                mtu: None,
            },
            pools: vec![(Ipv4Addr::new(10, 0, 0, 200), Ipv4Addr::new(10, 0, 0, 202))],
            reservations,
            lease_secs: 3600,
            offer_secs: 30,
            decline_secs: 600,
            unknown,
            boot: BootConfig {
                http_base: "http://10.0.0.2".into(),
                binaries: ["undionly.kpxe", "ipxe.efi"].into_iter().map(String::from).collect(),
                prefer_snponly: false,
            },
        }
    }

    fn server(unknown: UnknownMacs) -> DhcpServer {
        DhcpServer::new(config(unknown, Mode::Full), LeaseTable::default())
    }

    fn req(kind: Kind, m: Mac) -> Request {
        Request {
            kind,
            xid: 7,
            broadcast: false,
            mac: m,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            requested: None,
            server_id: None,
            client: ClientInfo::default(),
            relay: None,
            port: Port::Dhcp,
            source: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT),
            max_size: 576,
        }
    }

    fn select(m: Mac, ip: Ipv4Addr) -> Request {
        Request { requested: Some(ip), server_id: Some(SERVER), ..req(Kind::Request, m) }
    }

    #[test]
    fn reserved_machine_gets_its_address_through_the_four_way_exchange() {
        let mut s = server(UnknownMacs::Ignore);
        let offer = s.handle(&req(Kind::Discover, mac(3)), 100);
        let a = offer.answer.unwrap();
        assert_eq!((a.kind, a.yiaddr), (AnswerKind::Offer, Ipv4Addr::new(10, 0, 0, 12)));
        assert_eq!(a.lease_secs, Some(3600));
        assert_eq!(a.hostname.as_deref(), Some("m2"));
        assert_eq!(a.destination, Destination::Broadcast);
        assert!(offer.write.is_none(), "offers are not durable");
        let ack = s.handle(&select(mac(3), a.yiaddr), 101);
        assert_eq!(ack.answer.unwrap().kind, AnswerKind::Ack);
        assert_eq!(ack.write.unwrap().expires, 101 + 3600);
        assert_eq!(ack.machine.as_deref(), Some("m2"));
    }

    #[test]
    fn unknown_macs_are_ignored_by_default_and_served_from_the_pool_when_asked() {
        let mut s = server(UnknownMacs::Ignore);
        assert_eq!(s.handle(&req(Kind::Discover, mac(9)), 0).event, Event::Ignored(Ignored::UnknownMac));
        let mut s = server(UnknownMacs::Serve);
        let ips: Vec<_> = (9..12).map(|n| s.handle(&req(Kind::Discover, mac(n)), 0).answer.unwrap().yiaddr).collect();
        assert_eq!(ips, [Ipv4Addr::new(10, 0, 0, 200), Ipv4Addr::new(10, 0, 0, 201), Ipv4Addr::new(10, 0, 0, 202)]);
        assert_eq!(s.handle(&req(Kind::Discover, mac(12)), 0).event, Event::Ignored(Ignored::PoolExhausted));
        // Offers lapse: the address comes back.
        assert!(s.handle(&req(Kind::Discover, mac(12)), 31).answer.is_some());
    }

    #[test]
    fn selecting_another_server_withdraws_our_offer() {
        let mut s = server(UnknownMacs::Serve);
        let ip = s.handle(&req(Kind::Discover, mac(9)), 0).answer.unwrap().yiaddr;
        let other = Request { server_id: Some(Ipv4Addr::new(10, 0, 0, 3)), ..select(mac(9), ip) };
        assert_eq!(s.handle(&other, 1).event, Event::Ignored(Ignored::OtherServer));
        assert!(s.leases().available_for(ip, mac(10), 1));
    }

    #[test]
    fn a_wrong_request_is_naked_and_nak_is_broadcast() {
        let mut s = server(UnknownMacs::Ignore);
        let out = s.handle(&select(mac(3), Ipv4Addr::new(10, 0, 0, 11)), 0);
        let a = out.answer.unwrap();
        assert_eq!(a.kind, AnswerKind::Nak);
        assert_eq!(a.destination, Destination::Broadcast);
        assert!(a.message.is_some());
    }

    #[test]
    fn init_reboot_acks_the_right_address_naks_a_wrong_one_and_ignores_strangers() {
        let mut s = server(UnknownMacs::Ignore);
        let reboot = |ip| Request { requested: Some(ip), ..req(Kind::Request, mac(3)) };
        assert_eq!(s.handle(&reboot(Ipv4Addr::new(10, 0, 0, 12)), 0).answer.unwrap().kind, AnswerKind::Ack);
        assert_eq!(s.handle(&reboot(Ipv4Addr::new(10, 0, 0, 99)), 0).answer.unwrap().kind, AnswerKind::Nak);
        assert_eq!(s.handle(&reboot(Ipv4Addr::new(192, 168, 0, 9)), 0).event, Event::Naked("wrong network"));
        let stranger = Request { requested: Some(Ipv4Addr::new(10, 0, 0, 200)), ..req(Kind::Request, mac(9)) };
        assert_eq!(s.handle(&stranger, 0).event, Event::Ignored(Ignored::NoRecord));
    }

    #[test]
    fn renewing_extends_and_is_unicast_to_ciaddr() {
        let mut s = server(UnknownMacs::Ignore);
        s.handle(&select(mac(3), Ipv4Addr::new(10, 0, 0, 12)), 0);
        let renew = Request { ciaddr: Ipv4Addr::new(10, 0, 0, 12), ..req(Kind::Request, mac(3)) };
        let out = s.handle(&renew, 1800);
        assert_eq!(out.write.unwrap().expires, 1800 + 3600);
        assert_eq!(out.answer.unwrap().destination, Destination::Unicast("10.0.0.12:68".parse().unwrap()));
    }

    #[test]
    fn decline_quarantines_and_release_frees() {
        let mut s = server(UnknownMacs::Serve);
        let ip = s.handle(&req(Kind::Discover, mac(9)), 0).answer.unwrap().yiaddr;
        s.handle(&select(mac(9), ip), 0);
        let decline = Request { requested: Some(ip), ..req(Kind::Decline, mac(9)) };
        let out = s.handle(&decline, 5);
        assert_eq!(out.event, Event::Declined(ip));
        assert_eq!(out.write.unwrap().state, LeaseState::Declined);
        assert!(out.answer.is_none());
        let next = s.handle(&req(Kind::Discover, mac(9)), 6).answer.unwrap().yiaddr;
        assert_ne!(next, ip, "a declined address is not offered again during quarantine");
        s.handle(&select(mac(9), next), 6);
        let release = Request { ciaddr: next, ..req(Kind::Release, mac(9)) };
        assert_eq!(s.handle(&release, 7).write.unwrap().state, LeaseState::Released);
        assert!(s.leases().available_for(next, mac(10), 7));
    }

    #[test]
    fn a_machine_booting_from_its_second_nic_gets_its_address() {
        let mut s = server(UnknownMacs::Ignore);
        s.handle(&select(mac(1), Ipv4Addr::new(10, 0, 0, 11)), 0);
        let out = s.handle(&req(Kind::Discover, mac(2)), 10);
        assert_eq!(out.answer.unwrap().yiaddr, Ipv4Addr::new(10, 0, 0, 11));
        assert_eq!(s.handle(&select(mac(2), Ipv4Addr::new(10, 0, 0, 11)), 11).answer.unwrap().kind, AnswerKind::Ack);
    }

    #[test]
    fn relayed_requests_go_back_to_the_relay_and_foreign_subnets_are_ignored() {
        let mut s = server(UnknownMacs::Ignore);
        let relayed = Request {
            giaddr: Ipv4Addr::new(10, 0, 0, 1),
            relay: Some(RelayEcho(vec![1, 2, 0x61, 0x62])),
            ..req(Kind::Discover, mac(3))
        };
        let a = s.handle(&relayed, 0).answer.unwrap();
        assert_eq!(a.destination, Destination::Relay(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(a.relay, relayed.relay);
        let foreign = Request { giaddr: Ipv4Addr::new(172, 16, 0, 1), ..req(Kind::Discover, mac(3)) };
        assert_eq!(s.handle(&foreign, 0).event, Event::Ignored(Ignored::ForeignSubnet));
    }

    #[test]
    fn pxe_clients_get_the_right_binary_and_ipxe_gets_its_script() {
        let mut s = server(UnknownMacs::Ignore);
        let bios = Request {
            client: ClientInfo { arch: Some(Arch::Bios), pxe_client: true, ..ClientInfo::default() },
            ..req(Kind::Discover, mac(3))
        };
        let boot = s.handle(&bios, 0).answer.unwrap().boot.unwrap();
        assert_eq!(boot.file, BootFile::Tftp("undionly.kpxe".into()));
        assert_eq!((boot.next_server, boot.tftp_server), (SERVER, Some(SERVER)));
        assert!(boot.pxe_discovery_control && !boot.ipxe_no_pxedhcp);
        let ipxe = Request { client: ClientInfo { ipxe: true, ..bios.client.clone() }, ..bios.clone() };
        let boot = s.handle(&ipxe, 0).answer.unwrap().boot.unwrap();
        assert_eq!(boot.file, BootFile::Http("http://10.0.0.2/boot/52-54-00-00-00-03.ipxe".into()));
        assert!(boot.ipxe_no_pxedhcp);
        let arm = Request {
            client: ClientInfo { arch: Some(Arch::EfiArm64), pxe_client: true, ..ClientInfo::default() },
            ..req(Kind::Discover, mac(3))
        };
        assert_eq!(s.handle(&arm, 0).event, Event::Ignored(Ignored::UnsupportedArch));
        // A plain client (the OS's own dhclient) gets an address and no boot information.
        assert!(s.handle(&req(Kind::Discover, mac(3)), 0).answer.unwrap().boot.is_none());
    }

    #[test]
    fn proxy_mode_offers_boot_information_only() {
        let mut s = DhcpServer::new(config(UnknownMacs::Ignore, Mode::Proxy), LeaseTable::default());
        let pxe = Request {
            client: ClientInfo {
                arch: Some(Arch::EfiX64),
                pxe_client: true,
                uuid: Some(vec![0; 17]),
                ..ClientInfo::default()
            },
            ..req(Kind::Discover, mac(3))
        };
        let a = s.handle(&pxe, 0).answer.unwrap();
        assert_eq!(a.yiaddr, Ipv4Addr::UNSPECIFIED);
        assert!(a.lease_secs.is_none() && a.net.is_none());
        assert_eq!(a.boot.unwrap().file, BootFile::Tftp("ipxe.efi".into()));
        assert_eq!(a.uuid, Some(vec![0; 17]));
        let theirs = s.handle(&select(mac(3), Ipv4Addr::new(10, 0, 0, 99)), 0);
        assert_eq!(theirs.event, Event::Ignored(Ignored::NotForUs));
        assert_eq!(theirs.observed, Some(Ipv4Addr::new(10, 0, 0, 99)), "the address the other server leases");
        let on_4011 = Request {
            port: Port::BootServer,
            source: "10.0.0.77:4011".parse().unwrap(),
            ciaddr: Ipv4Addr::new(10, 0, 0, 77),
            ..pxe.clone()
        };
        let a = s.handle(&on_4011, 0).answer.unwrap();
        assert_eq!((a.kind, a.destination), (AnswerKind::Ack, Destination::Unicast("10.0.0.77:4011".parse().unwrap())));
    }

    #[test]
    fn inform_answers_options_without_a_lease() {
        let mut s = server(UnknownMacs::Ignore);
        let inform = Request { ciaddr: Ipv4Addr::new(10, 0, 0, 50), ..req(Kind::Inform, mac(9)) };
        let a = s.handle(&inform, 0).answer.unwrap();
        assert_eq!((a.kind, a.yiaddr, a.lease_secs), (AnswerKind::Ack, Ipv4Addr::UNSPECIFIED, None));
        assert!(a.net.is_some());
        assert_eq!(a.destination, Destination::Unicast("10.0.0.50:68".parse().unwrap()));
    }

    #[test]
    fn a_repeated_discover_gets_the_same_offer_and_a_full_pool_costs_bounded_probes() {
        let mut c = config(UnknownMacs::Serve, Mode::Full);
        c.subnet = "10.0.0.0/16".parse().unwrap();
        c.pools = vec![(Ipv4Addr::new(10, 0, 1, 0), Ipv4Addr::new(10, 0, 4, 255))];
        let mut s = DhcpServer::new(c, LeaseTable::default());
        let first = s.handle(&req(Kind::Discover, mac(50)), 0).answer.unwrap().yiaddr;
        assert_eq!(s.handle(&req(Kind::Discover, mac(50)), 1).answer.unwrap().yiaddr, first);
        // Fill all but the last address with leases.
        for n in 0..1023u32 {
            let m = Mac::from_octets([2, 0, 0, 1, (n >> 8) as u8, n as u8]);
            let ip = s.handle(&req(Kind::Discover, m), 2).answer.unwrap().yiaddr;
            s.handle(&select(m, ip), 2);
        }
        s.leases.withdraw_offer(mac(50));
        // Probes are bounded per request; the cursor moves on, so within pool/MAX_SCAN requests the free
        // address is found.
        let found = (0..(1024 / MAX_SCAN + 1)).find_map(|_| s.handle(&req(Kind::Discover, mac(51)), 3).answer);
        assert!(found.is_some());
    }

    /// One client message of a random exchange: who sends it, what, about which address, how long after the last.
    #[derive(Debug, Clone)]
    struct Step {
        mac: u8,
        kind: u8,
        ip: Ipv4Addr,
        after: u64,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let ips = [[10, 0, 0, 11], [10, 0, 0, 12], [10, 0, 0, 200], [10, 0, 0, 201], [10, 0, 0, 202], [10, 0, 0, 50]];
        (1u8..=7, 0u8..6, proptest::sample::select(ips.to_vec()), prop_oneof![Just(0u64), 1u64..60, 500u64..4000])
            .prop_map(|(mac, kind, ip, after)| Step { mac, kind, ip: Ipv4Addr::from(ip), after })
    }

    proptest::proptest! {
        /// Whatever clients send, in whatever order and timing, the server never acknowledges an address to one
        /// machine while another still holds an unexpired lease of it that it has not released or declined (the
        /// two NICs of one machine share its reserved address).
        #[test]
        fn no_address_is_ever_bound_to_two_machines(steps in proptest::collection::vec(step(), 1..80)) {
            let mut s = server(UnknownMacs::Serve);
            // MACs 1 and 2 are m1's, 3 is m2's, 4..7 are strangers.
            let owner = |m: u8| match m {
                1 | 2 => "m1".to_owned(),
                3 => "m2".to_owned(),
                n => format!("stranger{n}"),
            };
            // What each client believes it holds: address -> (owner, lease end).
            let mut held: HashMap<Ipv4Addr, (String, u64)> = HashMap::new();
            let mut now = 0;
            for st in steps {
                now += st.after;
                let m = mac(st.mac);
                let r = match st.kind {
                    0 => req(Kind::Discover, m),
                    1 => select(m, st.ip),
                    2 => Request { requested: Some(st.ip), ..req(Kind::Request, m) },
                    3 => Request { ciaddr: st.ip, ..req(Kind::Request, m) },
                    4 => Request { ciaddr: st.ip, ..req(Kind::Release, m) },
                    _ => Request { requested: Some(st.ip), ..req(Kind::Decline, m) },
                };
                let out = s.handle(&r, now);
                let me = owner(st.mac);
                match (r.kind, &out.answer) {
                    // The client gives the address up (the server may have ignored it: the client is done).
                    (Kind::Release | Kind::Decline, _) if held.get(&st.ip).is_some_and(|(o, _)| *o == me) => {
                        held.remove(&st.ip);
                    }
                    (_, Some(a)) if a.kind == AnswerKind::Ack && !a.yiaddr.is_unspecified() => {
                        if let Some((other, until)) = held.get(&a.yiaddr) {
                            proptest::prop_assert!(
                                *other == me || *until <= now,
                                "{} acknowledged to {me} at {now} while {other} holds it until {until}",
                                a.yiaddr
                            );
                        }
                        let until = now + u64::from(a.lease_secs.unwrap_or(0));
                        // A client holding another address moves to this one.
                        held.retain(|_, (o, _)| *o != me);
                        held.insert(a.yiaddr, (me, until));
                    }
                    _ => {}
                }
            }
        }
    }
}
