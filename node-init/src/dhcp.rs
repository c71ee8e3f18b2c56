//! A small DHCPv4 client for the initramfs: DISCOVER → OFFER → REQUEST → ACK on one interface (UDP socket bound to
//! the device, broadcast flag set so the reply reaches a client without an address), retransmitting with backoff.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};

use crate::error::SysError;

/// Why no lease came.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The socket could not be set up or used.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A message could not be encoded.
    #[error("encoding a DHCP message")]
    Encode(#[from] dhcproto::error::EncodeError),
    /// No server answered in time.
    #[error("no DHCP lease on {ifname} within {secs} s ({attempts} attempts)")]
    NoLease {
        /// The interface.
        ifname: String,
        /// How long it tried.
        secs: u64,
        /// How many DISCOVERs it sent.
        attempts: u32,
    },
}

/// What the server granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Our address.
    pub address: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway, if any.
    pub router: Option<Ipv4Addr>,
    /// The server that answered.
    pub server: Ipv4Addr,
    /// Lease time, seconds.
    pub lease_secs: Option<u32>,
}

fn message(xid: u32, mac: [u8; 6], kind: MessageType, extra: &[DhcpOption]) -> Result<Vec<u8>, DhcpError> {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut msg = Message::new_with_id(xid, z, z, z, z, &mac);
    msg.set_flags(v4::Flags::default().set_broadcast());
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::AddressLeaseTime,
    ]));
    opts.insert(DhcpOption::ClassIdentifier(b"herd-node-init".to_vec()));
    for o in extra {
        opts.insert(o.clone());
    }
    Ok(msg.to_vec()?)
}

/// Parses a MAC `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = text.split([':', '-']).map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    parts.try_into().ok()
}

fn wait_reply(sock: &UdpSocket, xid: u32, want: MessageType, until: Instant) -> Option<Message> {
    let mut buf = [0u8; 1500];
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let _ = sock.set_read_timeout(Some(left));
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let Ok(msg) = Message::decode(&mut Decoder::new(&buf[..n])) else { continue };
        if msg.xid() == xid && msg.opcode() == v4::Opcode::BootReply && msg.opts().msg_type() == Some(want) {
            return Some(msg);
        }
    }
    None
}

fn lease_from(ack: &Message) -> Lease {
    let opts = ack.opts();
    let prefix = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(m)) => u32::from(*m).count_ones() as u8,
        _ => 24,
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => ack.siaddr(),
    };
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => Some(*t),
        _ => None,
    };
    Lease { address: ack.yiaddr(), prefix, router, server, lease_secs }
}

/// Gets a lease on `ifname` (which must be up) for `mac`, trying for at most `limit`.
pub fn lease(ifname: &str, mac: [u8; 6], limit: Duration) -> Result<Lease, DhcpError> {
    let sock = UdpSocket::bind("0.0.0.0:68").map_err(SysError::with("DHCP client port 68"))?;
    sock.set_broadcast(true).map_err(SysError::with("DHCP: allowing broadcasts"))?;
    socket2::SockRef::from(&sock)
        .bind_device(Some(ifname.as_bytes()))
        .map_err(SysError::with(format!("DHCP: binding to {ifname}")))?;
    let send = |bytes: &[u8], to| sock.send_to(bytes, to).map_err(SysError::with(format!("DHCP: sending on {ifname}")));
    let to = SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let deadline = Instant::now() + limit;
    let mut wait = Duration::from_secs(1);
    let mut attempt = 0u32;
    while Instant::now() < deadline {
        attempt += 1;
        let xid = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) ^ attempt.wrapping_mul(0x9e37_79b9);
        send(&message(xid, mac, MessageType::Discover, &[])?, to)?;
        let Some(offer) = wait_reply(&sock, xid, MessageType::Offer, (Instant::now() + wait).min(deadline)) else {
            wait = (wait * 2).min(Duration::from_secs(8));
            continue;
        };
        let server = lease_from(&offer).server;
        let request = message(
            xid,
            mac,
            MessageType::Request,
            &[DhcpOption::RequestedIpAddress(offer.yiaddr()), DhcpOption::ServerIdentifier(server)],
        )?;
        send(&request, to)?;
        if let Some(ack) = wait_reply(&sock, xid, MessageType::Ack, (Instant::now() + wait).min(deadline)) {
            return Ok(lease_from(&ack));
        }
    }
    Err(DhcpError::NoLease { ifname: ifname.to_owned(), secs: limit.as_secs(), attempts: attempt })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_discover_carries_the_broadcast_flag_and_the_mac() {
        let mac = parse_mac("52:54:00:99:01:01").unwrap();
        let bytes = message(7, mac, MessageType::Discover, &[]).unwrap();
        let msg = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert!(msg.flags().broadcast());
        assert_eq!(&msg.chaddr()[..6], &mac);
        assert_eq!(msg.opts().msg_type(), Some(MessageType::Discover));
        assert!(parse_mac("52:54:00:99:01").is_none());
    }

    #[test]
    fn a_lease_reads_mask_router_and_server() {
        let mut ack = Message::new_with_id(
            1,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 99, 0, 11),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &[0x52, 0x54, 0, 0, 0, 1],
        );
        ack.opts_mut().insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        ack.opts_mut().insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 99, 0, 1)]));
        ack.opts_mut().insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 99, 0, 2)));
        let l = lease_from(&ack);
        assert_eq!(
            (l.address, l.prefix, l.router),
            (Ipv4Addr::new(10, 99, 0, 11), 24, Some(Ipv4Addr::new(10, 99, 0, 1)))
        );
        assert_eq!(l.server, Ipv4Addr::new(10, 99, 0, 2));
    }
}
