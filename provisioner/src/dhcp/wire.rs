//! The edge: DHCP packets (via `dhcproto`) to typed [`Request`]s, and [`Answer`]s to packets. Anything malformed
//! becomes a [`Drop`] reason, counted by the caller; nothing here panics on input.

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{self, DhcpOption, Message, MessageType, Opcode, OptionCode, UnknownOption};
use dhcproto::{Decodable, Decoder, Encodable};
use herd_inventory::Mac;

use super::server::{Answer, AnswerKind, Kind, Port, RelayEcho, Request};
use crate::boot::{self, Arch, ClientInfo};

/// Why a packet was dropped before reaching the server logic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Not a decodable DHCP message.
    Malformed,
    /// A BOOTREPLY (from another server or ourselves).
    NotARequest,
    /// Not Ethernet, or a hardware address that is not 6 bytes.
    NotEthernet,
    /// No message type, or one a client does not send.
    BadMessageType,
    /// chaddr is not a unicast NIC address.
    BadMac,
}

impl Drop {
    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Drop::Malformed => "malformed",
            Drop::NotARequest => "not-a-request",
            Drop::NotEthernet => "not-ethernet",
            Drop::BadMessageType => "bad-message-type",
            Drop::BadMac => "bad-mac",
        }
    }
}

/// The message size every DHCP client accepts (RFC 2131 §2).
const MIN_MESSAGE: u16 = 576;
/// IP and UDP headers, which option 57 counts.
const IP_UDP_HEADERS: usize = 28;

/// Offset of the magic cookie, and of the first option after it.
const COOKIE_AT: usize = 236;
const OPTIONS_AT: usize = 240;
const COOKIE: [u8; 4] = [99, 130, 83, 99];

/// Options a client's request may carry that herd reads, with their required length (None: any length ≥ 1).
fn accepted_option(code: u8) -> Option<Option<usize>> {
    match code {
        53 => Some(Some(1)),      // message type
        50 | 54 => Some(Some(4)), // requested address, server id
        57 => Some(Some(2)),      // max message size
        93 => Some(None),         // client architectures (a list of u16; checked below)
        94 => Some(Some(3)),      // client network interface id
        12 | 55 | 60 | 61 | 77 | 82 | 97 | 175 => Some(None),
        _ => None,
    }
}

/// Rebuilds the packet with only the options herd reads, after checking the option framing and the lengths of
/// fixed-size options. The codec then never sees an option it could misparse, and a malformed frame is a drop.
fn sanitize(buf: &[u8]) -> Result<Vec<u8>, Drop> {
    if buf.len() < OPTIONS_AT || buf[COOKIE_AT..OPTIONS_AT] != COOKIE {
        return Err(Drop::Malformed);
    }
    let mut out = Vec::with_capacity(buf.len());
    out.extend_from_slice(&buf[..OPTIONS_AT]);
    let mut i = OPTIONS_AT;
    while let Some(&code) = buf.get(i) {
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let len = usize::from(*buf.get(i + 1).ok_or(Drop::Malformed)?);
        let body = buf.get(i + 2..i + 2 + len).ok_or(Drop::Malformed)?;
        match accepted_option(code) {
            Some(Some(required)) if len != required => return Err(Drop::Malformed),
            Some(None) if len == 0 || (code == 93 && len % 2 != 0) => return Err(Drop::Malformed),
            Some(_) if code == 82 && !tlv_ok(body) => return Err(Drop::Malformed),
            Some(_) => out.extend_from_slice(&buf[i..i + 2 + len]),
            None => {}
        }
        i += 2 + len;
    }
    out.push(255);
    Ok(out)
}

/// Whether `body` is a well-formed sequence of (code, len, data) sub-options.
fn tlv_ok(mut body: &[u8]) -> bool {
    while !body.is_empty() {
        let Some(&len) = body.get(1) else { return false };
        let Some(rest) = body.get(2 + usize::from(len)..) else { return false };
        body = rest;
    }
    true
}

/// Decodes a datagram received on `port` from `source`.
pub fn decode(buf: &[u8], port: Port, source: SocketAddrV4) -> Result<Request, Drop> {
    let clean = sanitize(buf)?;
    let msg = Message::decode(&mut Decoder::new(&clean)).map_err(|_| Drop::Malformed)?;
    if msg.opcode() != Opcode::BootRequest {
        return Err(Drop::NotARequest);
    }
    if msg.htype() != v4::HType::Eth || msg.hlen() != 6 || msg.chaddr().len() < 6 {
        return Err(Drop::NotEthernet);
    }
    let mut octets = [0u8; 6];
    octets.copy_from_slice(&msg.chaddr()[..6]);
    let mac: Mac = Mac::from_octets(octets);
    if octets == [0; 6] || octets[0] & 1 == 1 {
        return Err(Drop::BadMac);
    }
    let opts = msg.opts();
    let kind = match opts.msg_type() {
        Some(MessageType::Discover) => Kind::Discover,
        Some(MessageType::Request) => Kind::Request,
        Some(MessageType::Decline) => Kind::Decline,
        Some(MessageType::Release) => Kind::Release,
        Some(MessageType::Inform) => Kind::Inform,
        _ => return Err(Drop::BadMessageType),
    };
    let mut client = ClientInfo::default();
    if let Some(DhcpOption::ClientSystemArchitecture(a)) = opts.get(OptionCode::ClientSystemArchitecture) {
        client.arch = Some(Arch::from_code(u16::from(*a)));
    }
    if let Some(DhcpOption::ClassIdentifier(class)) = opts.get(OptionCode::ClassIdentifier) {
        client.pxe_client = class.starts_with(b"PXEClient");
        client.http_client = class.starts_with(b"HTTPClient");
    }
    let user_class_ipxe =
        matches!(opts.get(OptionCode::UserClass), Some(DhcpOption::UserClass(uc)) if boot::user_class_is_ipxe(uc));
    client.ipxe = user_class_ipxe || opts.contains(OptionCode::from(175u8));
    if let Some(DhcpOption::ClientMachineIdentifier(id)) = opts.get(OptionCode::ClientMachineIdentifier) {
        client.uuid = Some(id.clone());
    }
    let relay = opts.get(OptionCode::RelayAgentInformation).and_then(|o| {
        // Keep the option's body verbatim, to echo it.
        o.to_vec().ok().and_then(|bytes| bytes.get(2..).map(|b| RelayEcho(b.to_vec())))
    });
    let requested = match opts.get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    };
    // RFC 2131: a client accepts at least 576 bytes; option 57 may raise that, never lower it.
    let max_size = match opts.get(OptionCode::MaxMessageSize) {
        Some(DhcpOption::MaxMessageSize(n)) => (*n).max(MIN_MESSAGE),
        _ => MIN_MESSAGE,
    };
    let server_id = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    };
    Ok(Request {
        kind,
        xid: msg.xid(),
        broadcast: msg.flags().broadcast(),
        mac,
        ciaddr: msg.ciaddr(),
        giaddr: msg.giaddr(),
        requested,
        server_id,
        client,
        relay,
        port,
        source,
        max_size,
    })
}

/// Encodes an answer as a BOOTREPLY that fits the client's maximum message size (option 57): if the full answer
/// is too large, the informational options (NTP, DNS, domain, host name) are left out; None if even that is too
/// large.
pub fn encode(a: &Answer) -> Option<Vec<u8>> {
    let limit = usize::from(a.max_size).saturating_sub(IP_UDP_HEADERS);
    let full = encode_with(a, true);
    if full.len() <= limit {
        return Some(full);
    }
    let lean = encode_with(a, false);
    (lean.len() <= limit).then_some(lean)
}

fn encode_with(a: &Answer, informational: bool) -> Vec<u8> {
    let siaddr = a.boot.as_ref().map_or(Ipv4Addr::UNSPECIFIED, |b| b.next_server);
    let mut msg = Message::new_with_id(a.xid, a.ciaddr, a.yiaddr, siaddr, a.giaddr, &a.mac.octets());
    msg.set_opcode(Opcode::BootReply);
    if a.broadcast {
        msg.set_flags(v4::Flags::default().set_broadcast());
    }
    if let Some(boot) = &a.boot {
        // PXE ROMs read the BOOTP header fields; option 66/67 carry the same for clients that prefer options.
        if boot.file.as_str().len() < 128 {
            msg.set_fname_str(boot.file.as_str());
        }
        if let Some(tftp) = boot.tftp_server {
            msg.set_sname_str(tftp.to_string());
        }
    }
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(match a.kind {
        AnswerKind::Offer => MessageType::Offer,
        AnswerKind::Ack => MessageType::Ack,
        AnswerKind::Nak => MessageType::Nak,
    }));
    opts.insert(DhcpOption::ServerIdentifier(a.server_id));
    if let Some(lease) = a.lease_secs {
        opts.insert(DhcpOption::AddressLeaseTime(lease));
        opts.insert(DhcpOption::Renewal(lease / 2));
        opts.insert(DhcpOption::Rebinding(lease / 8 * 7));
    }
    if let Some(net) = &a.net {
        opts.insert(DhcpOption::SubnetMask(net.mask));
        opts.insert(DhcpOption::BroadcastAddr(net.broadcast));
        if let Some(router) = net.router {
            opts.insert(DhcpOption::Router(vec![router]));
        }
        if let Some(mtu) = net.mtu {
            opts.insert(DhcpOption::InterfaceMtu(mtu));
        }
    }
    if let (Some(net), true) = (&a.net, informational) {
        if !net.dns.is_empty() {
            opts.insert(DhcpOption::DomainNameServer(net.dns.clone()));
        }
        if !net.ntp.is_empty() {
            opts.insert(DhcpOption::NtpServers(net.ntp.clone()));
        }
        if let Some(domain) = &net.domain {
            opts.insert(DhcpOption::DomainName(domain.clone()));
        }
    }
    if let (Some(hostname), true) = (&a.hostname, informational) {
        opts.insert(DhcpOption::Hostname(hostname.clone()));
    }
    if let Some(message) = &a.message {
        opts.insert(DhcpOption::Message(message.clone()));
    }
    if let Some(boot) = &a.boot {
        opts.insert(DhcpOption::ClassIdentifier(boot.vendor_class.as_bytes().to_vec()));
        opts.insert(DhcpOption::BootfileName(boot.file.as_str().as_bytes().to_vec()));
        if let Some(tftp) = boot.tftp_server {
            opts.insert(DhcpOption::TFTPServerName(tftp.to_string().into_bytes()));
        }
        if boot.pxe_discovery_control {
            // PXE vendor options: sub-option 6 (discovery control) = 8: boot from the file in this reply.
            opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
        if boot.ipxe_no_pxedhcp {
            // iPXE encapsulated options: 176 (no-pxedhcp) = 1.
            opts.insert(DhcpOption::Unknown(UnknownOption::new(OptionCode::from(175u8), vec![176, 1, 1])));
        }
    }
    if let Some(uuid) = &a.uuid {
        opts.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
    }
    if let Some(RelayEcho(body)) = &a.relay {
        opts.insert(DhcpOption::Unknown(UnknownOption::new(OptionCode::RelayAgentInformation, body.clone())));
    }
    // Encoding a message we built from valid parts only fails on oversized options, which we never build.
    msg.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::server::{BootAnswer, Destination, NetParams};

    fn discover(opts: Vec<DhcpOption>) -> Vec<u8> {
        let mut msg = Message::new_with_id(
            0x1234,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[0x52, 0x54, 0, 0, 0, 1],
        );
        msg.opts_mut().insert(DhcpOption::MessageType(MessageType::Discover));
        for o in opts {
            msg.opts_mut().insert(o);
        }
        msg.to_vec().unwrap()
    }

    fn src() -> SocketAddrV4 {
        "0.0.0.0:68".parse().unwrap()
    }

    #[test]
    fn decodes_an_ipxe_bios_discover() {
        let buf = discover(vec![
            DhcpOption::ClientSystemArchitecture(v4::Architecture::from(0u16)),
            DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
            DhcpOption::UserClass(b"iPXE".to_vec()),
            DhcpOption::ClientMachineIdentifier(vec![0; 17]),
        ]);
        let req = decode(&buf, Port::Dhcp, src()).unwrap();
        assert_eq!(req.kind, Kind::Discover);
        assert_eq!(req.xid, 0x1234);
        assert_eq!(req.client.arch, Some(Arch::Bios));
        assert!(req.client.pxe_client && req.client.ipxe);
        assert_eq!(req.client.uuid, Some(vec![0; 17]));
    }

    #[test]
    fn option_175_alone_marks_ipxe() {
        let buf = discover(vec![DhcpOption::Unknown(UnknownOption::new(OptionCode::from(175u8), vec![19, 1, 1]))]);
        assert!(decode(&buf, Port::Dhcp, src()).unwrap().client.ipxe);
    }

    #[test]
    fn garbage_and_replies_are_dropped_not_panicked_on() {
        assert_eq!(decode(&[], Port::Dhcp, src()), Err(Drop::Malformed));
        assert_eq!(decode(&[1; 100], Port::Dhcp, src()), Err(Drop::Malformed));
        let mut reply = Message::decode(&mut Decoder::new(&discover(vec![]))).unwrap();
        reply.set_opcode(Opcode::BootReply);
        assert_eq!(decode(&reply.to_vec().unwrap(), Port::Dhcp, src()), Err(Drop::NotARequest));
    }

    #[test]
    fn bad_option_framing_is_a_drop_and_unknown_options_are_skipped() {
        let good = discover(vec![DhcpOption::ClientSystemArchitecture(v4::Architecture::from(7u16))]);
        // An unread option with a length the codec would trip on (BULK_LEASE_QUERY base time, 3 bytes).
        let mut with_odd = good[..good.len() - 1].to_vec();
        with_odd.extend_from_slice(&[154, 3, 1, 2, 3, 255]);
        assert_eq!(decode(&with_odd, Port::Dhcp, src()).unwrap().client.arch, Some(Arch::EfiX64));
        // A requested address of 3 bytes, an option running past the end, no cookie: drops.
        let mut short_50 = good[..good.len() - 1].to_vec();
        short_50.extend_from_slice(&[50, 3, 10, 0, 0, 255]);
        assert_eq!(decode(&short_50, Port::Dhcp, src()), Err(Drop::Malformed));
        let mut overrun = good[..good.len() - 1].to_vec();
        overrun.extend_from_slice(&[60, 40, b'P']);
        assert_eq!(decode(&overrun, Port::Dhcp, src()), Err(Drop::Malformed));
        let mut no_cookie = good.clone();
        no_cookie[236] = 0;
        assert_eq!(decode(&no_cookie, Port::Dhcp, src()), Err(Drop::Malformed));
    }

    fn sample_answer() -> Answer {
        Answer {
            kind: AnswerKind::Offer,
            xid: 9,
            mac: Mac::from_octets([0x52, 0x54, 0, 0, 0, 1]),
            broadcast: true,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::new(10, 0, 0, 11),
            giaddr: Ipv4Addr::new(10, 0, 0, 1),
            server_id: Ipv4Addr::new(10, 0, 0, 2),
            lease_secs: Some(3600),
            net: Some(NetParams {
                mask: Ipv4Addr::new(255, 255, 255, 0),
                broadcast: Ipv4Addr::new(10, 0, 0, 255),
                router: Some(Ipv4Addr::new(10, 0, 0, 1)),
                dns: vec![Ipv4Addr::new(10, 0, 0, 3)],
                ntp: vec![],
                domain: Some("lab".into()),
                mtu: Some(9000),
            }),
            hostname: Some("m1".into()),
            boot: Some(BootAnswer {
                file: crate::boot::BootFile::Http("http://10.0.0.2/boot/x.ipxe".into()),
                next_server: Ipv4Addr::new(10, 0, 0, 2),
                tftp_server: None,
                vendor_class: "PXEClient",
                ipxe_no_pxedhcp: true,
                pxe_discovery_control: false,
            }),
            uuid: Some(vec![0; 17]),
            relay: Some(RelayEcho(vec![1, 3, b'a', b'b', b'c'])),
            message: None,
            destination: Destination::Relay(Ipv4Addr::new(10, 0, 0, 1)),
            max_size: 1500,
        }
    }

    #[test]
    fn an_answer_round_trips_with_boot_options() {
        let answer = sample_answer();
        let bytes = encode(&answer).unwrap();
        let msg = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(msg.opcode(), Opcode::BootReply);
        assert_eq!(msg.yiaddr(), Ipv4Addr::new(10, 0, 0, 11));
        assert_eq!(msg.giaddr(), Ipv4Addr::new(10, 0, 0, 1));
        assert!(msg.flags().broadcast());
        let o = msg.opts();
        assert_eq!(o.msg_type(), Some(MessageType::Offer));
        assert_eq!(o.get(OptionCode::Renewal), Some(&DhcpOption::Renewal(1800)));
        assert_eq!(o.get(OptionCode::Rebinding), Some(&DhcpOption::Rebinding(3150)));
        assert_eq!(
            o.get(OptionCode::BootfileName),
            Some(&DhcpOption::BootfileName(b"http://10.0.0.2/boot/x.ipxe".to_vec()))
        );
        let ipxe = o.get(OptionCode::from(175u8)).unwrap().to_vec().unwrap();
        assert_eq!(ipxe, [175, 3, 176, 1, 1]);
        let relay = o.get(OptionCode::RelayAgentInformation).unwrap().to_vec().unwrap();
        assert_eq!(relay, [82, 5, 1, 3, b'a', b'b', b'c']);
        assert_eq!(o.get(OptionCode::ClientMachineIdentifier), Some(&DhcpOption::ClientMachineIdentifier(vec![0; 17])));
    }

    #[test]
    fn answers_fit_the_clients_maximum_message_size() {
        let req = decode(&discover(vec![DhcpOption::MaxMessageSize(300)]), Port::Dhcp, src()).unwrap();
        assert_eq!(req.max_size, 576, "option 57 cannot go below 576");
        let req = decode(&discover(vec![DhcpOption::MaxMessageSize(1500)]), Port::Dhcp, src()).unwrap();
        assert_eq!(req.max_size, 1500);
        let mut a = sample_answer();
        a.net.as_mut().unwrap().dns = (0..60).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect();
        a.max_size = 576;
        let lean = encode(&a).expect("fits without the informational options");
        assert!(lean.len() <= 576 - 28);
        let msg = Message::decode(&mut Decoder::new(&lean)).unwrap();
        assert!(msg.opts().get(OptionCode::DomainNameServer).is_none());
        assert!(msg.opts().get(OptionCode::SubnetMask).is_some());
        a.max_size = 1500;
        let full = Message::decode(&mut Decoder::new(&encode(&a).unwrap())).unwrap();
        assert!(full.opts().get(OptionCode::DomainNameServer).is_some());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 2000, ..Default::default() })]

        #[test]
        fn decode_never_panics_on_random_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700)) {
            let _ = decode(&bytes, Port::Dhcp, src());
        }

        #[test]
        fn decode_never_panics_on_mutated_requests(
            edits in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 1..12),
            cut in 0usize..400,
        ) {
            let mut p = discover(vec![
                DhcpOption::ClientSystemArchitecture(v4::Architecture::from(0u16)),
                DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()),
                DhcpOption::UserClass(b"iPXE".to_vec()),
            ]);
            for (at, b) in edits {
                let n = p.len();
                p[at % n] = b;
            }
            p.truncate(cut.max(1).min(p.len()));
            let _ = decode(&p, Port::Dhcp, src());
        }
    }
}
