//! A minimal IPv6 Router Advertisement responder for the boot interface.
//!
//! iPXE starts IPv6 autoconfiguration on every NIC and waits (about 16 s under QEMU) for a router to answer its
//! Router Solicitation before it gives up. Answering with an RA whose router lifetime is 0 ("I am not a default
//! router", no prefixes) ends the wait at once and configures nothing.

use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;

/// The RA sent: type 134, code 0, checksum (the kernel fills it for ICMPv6 raw sockets), hop limit 64, no flags,
/// router lifetime 0, reachable time 0, retransmission timer 0, no options.
pub fn advertisement() -> [u8; 16] {
    let mut ra = [0u8; 16];
    ra[0] = ROUTER_ADVERTISEMENT;
    ra[4] = 64;
    ra
}

/// Whether an ICMPv6 message (as a raw socket delivers it, without the IPv6 header) is a Router Solicitation.
pub fn is_solicitation(msg: &[u8]) -> bool {
    msg.len() >= 8 && msg[0] == ROUTER_SOLICITATION && msg[1] == 0
}

/// Answers Router Solicitations on `interface` until cancelled.
pub async fn run(interface: String, metrics: Arc<Metrics>, cancel: CancellationToken) -> io::Result<()> {
    let index = nix::net::if_::if_nametoindex(interface.as_str()).map_err(io::Error::from)?;
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    socket.bind_device(Some(interface.as_bytes()))?;
    // RFC 4861: RAs carry hop limit 255 and receivers drop anything else.
    socket.set_multicast_hops_v6(255)?;
    socket.set_unicast_hops_v6(255)?;
    // Solicitations go to all-routers (ff02::2), which a host that is not forwarding has not joined.
    socket.join_multicast_v6(&Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2), index)?;
    socket.set_nonblocking(true)?;
    // tokio has no safe wrapper for raw sockets; its UdpSocket only issues recv/send_to, which behave the same on
    // a raw ICMPv6 socket, so it serves as the async handle.
    let fd = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket))?;
    metrics.describe("herd_ra_sent_total", "Router Advertisements sent in answer to Router Solicitations.");
    let all_nodes = SocketAddrV6::new(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, index);
    let ra = advertisement();
    let mut buf = [0u8; 1500];
    loop {
        let n = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = fd.recv(&mut buf) => r?,
        };
        if is_solicitation(&buf[..n]) {
            match fd.send_to(&ra, std::net::SocketAddr::V6(all_nodes)).await {
                Ok(_) => metrics.inc("herd_ra_sent_total", ""),
                Err(e) => tracing::debug!(error = %e, "cannot send router advertisement"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_advertisement_is_minimal_and_says_not_a_router() {
        let ra = super::advertisement();
        assert_eq!(ra[0], 134);
        assert_eq!(u16::from_be_bytes([ra[6], ra[7]]), 0, "router lifetime 0");
        assert!(super::is_solicitation(&[133, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!super::is_solicitation(&[134, 0, 0, 0, 0, 0, 0, 0]));
    }
}
