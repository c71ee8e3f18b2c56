//! The boot NIC in the initramfs, with the classic socket ioctls (no `ip` binary there): find it by MAC, bring it
//! up, give it its DHCP address and default route, and take it all down again before systemd-networkd builds the
//! machine's real network (the bond) from its config. Also the two block ioctls the installer needs. Like `dm`,
//! the unsafe code is the `ioctl` calls on buffers laid out here.
#![allow(unsafe_code)]

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

/// A network or block-device operation that failed.
pub type NetError = crate::error::SysError;

const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCSIFFLAGS: u64 = 0x8914;
const SIOCSIFADDR: u64 = 0x8916;
const SIOCSIFNETMASK: u64 = 0x891c;
const SIOCADDRT: u64 = 0x890b;
const SIOCSIFMTU: u64 = 0x8922;
const SIOCSIFHWADDR: u64 = 0x8924;
/// `ARPHRD_ETHER`, the hardware address family of an Ethernet `sockaddr`.
const ARPHRD_ETHER: u16 = 1;
const IFF_UP: i16 = 0x1;
const AF_INET: u16 = 2;
/// `sizeof(struct ifreq)`.
const IFREQ: usize = 40;
/// `sizeof(struct rtentry)` on x86-64.
const RTENTRY: usize = 120;

fn ctl_socket() -> Result<OwnedFd, NetError> {
    socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| NetError::sys("socket", e.into()))
}

/// One ioctl on `buf`; `what` names the operation in the error.
fn ioctl(fd: &OwnedFd, request: u64, buf: &mut [u8], what: impl FnOnce() -> String) -> Result<(), NetError> {
    // SAFETY: `buf` is a live, writable buffer of the size the request's structure has (`IFREQ` or `RTENTRY`,
    // checked by the callers' constructors); the kernel reads and writes within that structure.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, buf.as_mut_ptr()) };
    if r < 0 { Err(NetError::last(what())) } else { Ok(()) }
}

fn ifreq(name: &str) -> Result<[u8; IFREQ], NetError> {
    if name.is_empty() || name.len() >= 16 {
        return Err(NetError::Invalid(format!("interface name {name:?}")));
    }
    let mut b = [0u8; IFREQ];
    b[..name.len()].copy_from_slice(name.as_bytes());
    Ok(b)
}

fn sockaddr_in(b: &mut [u8], addr: Ipv4Addr) {
    b[0..2].copy_from_slice(&AF_INET.to_ne_bytes());
    b[4..8].copy_from_slice(&addr.octets());
}

/// The interface whose hardware address is `mac` (lower-case, colon-separated).
pub fn interface_by_mac(mac: &str) -> Option<String> {
    let want = mac.to_ascii_lowercase().replace('-', ":");
    let dir = std::fs::read_dir("/sys/class/net").ok()?;
    for e in dir.filter_map(Result::ok) {
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim() == want {
            return e.file_name().into_string().ok();
        }
    }
    None
}

fn set_up(name: &str, up: bool) -> Result<(), NetError> {
    let fd = ctl_socket()?;
    let mut req = ifreq(name)?;
    ioctl(&fd, SIOCGIFFLAGS, &mut req, || format!("{name}: reading flags"))?;
    let mut flags = i16::from_ne_bytes([req[16], req[17]]);
    if up {
        flags |= IFF_UP;
    } else {
        flags &= !IFF_UP;
    }
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    ioctl(&fd, SIOCSIFFLAGS, &mut req, || format!("{name}: setting flags"))
}

/// Brings `name` up.
pub fn link_up(name: &str) -> Result<(), NetError> {
    set_up(name, true)
}

/// Gives `name` the address `addr/prefix`.
pub fn set_address(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
    let fd = ctl_socket()?;
    let mut req = ifreq(name)?;
    sockaddr_in(&mut req[16..], addr);
    ioctl(&fd, SIOCSIFADDR, &mut req, || format!("{name}: address {addr}"))?;
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
    let mut req = ifreq(name)?;
    sockaddr_in(&mut req[16..], Ipv4Addr::from(mask));
    ioctl(&fd, SIOCSIFNETMASK, &mut req, || format!("{name}: netmask /{prefix}"))
}

/// Adds the default route via `gateway`.
pub fn add_default_route(gateway: Ipv4Addr) -> Result<(), NetError> {
    let fd = ctl_socket()?;
    let mut rt = [0u8; RTENTRY];
    sockaddr_in(&mut rt[8..24], Ipv4Addr::UNSPECIFIED);
    sockaddr_in(&mut rt[24..40], gateway);
    sockaddr_in(&mut rt[40..56], Ipv4Addr::UNSPECIFIED);
    let flags: u16 = 0x1 | 0x2; // RTF_UP | RTF_GATEWAY
    rt[56..58].copy_from_slice(&flags.to_ne_bytes());
    ioctl(&fd, SIOCADDRT, &mut rt, || format!("default route via {gateway}"))
}

/// Takes `name` down.
pub fn link_down(name: &str) -> Result<(), NetError> {
    set_up(name, false)
}

/// Sets the MTU of `name`.
pub fn set_mtu(name: &str, mtu: u32) -> Result<(), NetError> {
    let fd = ctl_socket()?;
    let mut req = ifreq(name)?;
    let mtu = i32::try_from(mtu).map_err(|_| NetError::Invalid(format!("MTU {mtu} is out of range")))?;
    req[16..20].copy_from_slice(&mtu.to_ne_bytes());
    ioctl(&fd, SIOCSIFMTU, &mut req, || format!("{name}: MTU {mtu}"))
}

/// Sets the hardware address of `name` (which must be down, or a bond).
pub fn set_mac(name: &str, mac: [u8; 6]) -> Result<(), NetError> {
    let fd = ctl_socket()?;
    let mut req = ifreq(name)?;
    req[16..18].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
    req[18..24].copy_from_slice(&mac);
    ioctl(&fd, SIOCSIFHWADDR, &mut req, || format!("{name}: hardware address"))
}

/// Removes the address (and with it its routes) and takes `name` down, so networkd starts from a clean link.
pub fn release(name: &str) -> Result<(), NetError> {
    let fd = ctl_socket()?;
    let mut req = ifreq(name)?;
    sockaddr_in(&mut req[16..], Ipv4Addr::UNSPECIFIED);
    // Setting 0.0.0.0 deletes the interface's primary IPv4 address.
    ioctl(&fd, SIOCSIFADDR, &mut req, || format!("{name}: clearing the address"))?;
    set_up(name, false)
}

/// Whether the kernel's random pool is initialized (a non-blocking `getrandom` succeeds). TLS and the DHCP codec
/// draw random numbers and would block until it is.
pub fn entropy_ready() -> bool {
    let mut b = [0u8; 8];
    // SAFETY: the buffer is live and writable for its full length.
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    r == b.len() as isize
}

/// Asks the kernel to re-read a disk's partition table (`BLKRRPART`).
pub fn reread_partitions(disk: &std::fs::File) -> Result<(), NetError> {
    const BLKRRPART: u64 = 0x125f;
    // SAFETY: BLKRRPART takes no argument; the fd is an open block device.
    let r = unsafe { libc::ioctl(disk.as_raw_fd(), BLKRRPART as _, 0) };
    if r < 0 { Err(NetError::last("re-reading the partition table")) } else { Ok(()) }
}

/// Attaches `file` (opened read-only, so the loop device is read-only) to a free loop device; returns its path.
pub fn loop_attach(file: &std::fs::File) -> Result<std::path::PathBuf, NetError> {
    const LOOP_CTL_GET_FREE: u64 = 0x4c82;
    const LOOP_SET_FD: u64 = 0x4c00;
    let ctl = std::fs::File::open("/dev/loop-control").map_err(|e| NetError::sys("/dev/loop-control", e))?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
    let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
    if n < 0 {
        return Err(NetError::last("no free loop device"));
    }
    let path = std::path::PathBuf::from(format!("/dev/loop{n}"));
    let dev = std::fs::File::open(&path).map_err(|e| NetError::sys(path.display().to_string(), e))?;
    // SAFETY: LOOP_SET_FD takes the backing file descriptor as its integer argument.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD as _, file.as_raw_fd()) };
    if r < 0 {
        return Err(NetError::last(format!("{}: attaching", path.display())));
    }
    Ok(path)
}
