//! Validated newtypes. Each is rejected while deserializing when malformed, with an error that names the rule, so
//! the rest of herd never sees a bad MAC, CIDR or hostname.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::diag::Rule;

/// Why a value did not parse, with the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValueError {
    /// The rule broken (one of the `malformed-*` rules).
    pub rule: Rule,
    /// What is wrong with the value.
    pub message: String,
}

impl ValueError {
    fn new(rule: Rule, message: impl Into<String>) -> Self {
        ValueError { rule, message: message.into() }
    }
}

/// Prefix separating a rule name from the message inside a serde error, so the parser can recover the rule.
pub(crate) const RULE_SEPARATOR: &str = ": ";

/// Implements `Display`-based `Serialize` and `FromStr`-based `Deserialize` (with the rule in the error).
macro_rules! string_newtype_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                raw.parse().map_err(|e: ValueError| {
                    serde::de::Error::custom(format!("{}{RULE_SEPARATOR}{}", e.rule, e.message))
                })
            }
        }
    };
}

/// An Ethernet MAC address of a NIC (unicast, not all zero). Written `52:54:00:12:34:56` (dashes accepted on input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac([u8; 6]);

impl Mac {
    /// A MAC from its six octets; the caller guarantees a unicast, non-zero address.
    pub const fn from_octets(octets: [u8; 6]) -> Self {
        Mac(octets)
    }

    /// The six octets.
    pub const fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for Mac {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || {
            ValueError::new(
                Rule::MalformedMac,
                format!("{s:?} is not a MAC address (expected six hex pairs, like 52:54:00:12:34:56)"),
            )
        };
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut octets = [0u8; 6];
        let mut parts = s.split(sep);
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if octets == [0; 6] {
            return Err(ValueError::new(Rule::MalformedMac, format!("{s:?} is the all-zero MAC, which no NIC has")));
        }
        if octets[0] & 1 == 1 {
            return Err(ValueError::new(
                Rule::MalformedMac,
                format!("{s:?} is a multicast MAC (low bit of the first octet set); a NIC has a unicast MAC"),
            ));
        }
        Ok(Mac(octets))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

string_newtype_serde!(Mac);

/// An IPv4 host address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address(pub Ipv4Addr);

impl FromStr for Address {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        if s.contains('/') {
            return Err(ValueError::new(
                Rule::MalformedAddress,
                format!("{s:?} has a prefix length; write the bare address (the prefix comes from the network)"),
            ));
        }
        s.parse().map(Address).map_err(|_| {
            ValueError::new(Rule::MalformedAddress, format!("{s:?} is not an IPv4 address (expected A.B.C.D)"))
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Ipv4Addr> for Address {
    fn from(a: Ipv4Addr) -> Self {
        Address(a)
    }
}

string_newtype_serde!(Address);

/// An IPv4 network, `A.B.C.D/N`, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    network: Ipv4Addr,
    prefix: u8,
}

impl Cidr {
    /// The network `network/prefix`; fails if host bits are set or the prefix exceeds 32.
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, ValueError> {
        if prefix > 32 {
            return Err(ValueError::new(Rule::MalformedCidr, format!("prefix /{prefix} is longer than 32")));
        }
        let cidr = Cidr { network, prefix };
        if cidr.first() != u32::from(network) {
            return Err(ValueError::new(
                Rule::MalformedCidr,
                format!(
                    "{network}/{prefix} has host bits set; did you mean {}/{prefix}?",
                    Ipv4Addr::from(cidr.first())
                ),
            ));
        }
        Ok(cidr)
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask, e.g. 255.255.0.0 for /16.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.mask())
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) }
    }

    /// First address of the range (the network address), as an integer.
    pub fn first(&self) -> u32 {
        u32::from(self.network) & self.mask()
    }

    /// Last address of the range (the broadcast address), as an integer.
    pub fn last(&self) -> u32 {
        self.first() | !self.mask()
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.last())
    }

    /// Whether `addr` lies in this network (network and broadcast addresses included).
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == self.first()
    }

    /// Whether `addr` is this network's network or broadcast address (for prefixes up to /30).
    pub fn is_reserved(&self, addr: Ipv4Addr) -> bool {
        self.prefix <= 30 && (u32::from(addr) == self.first() || u32::from(addr) == self.last())
    }

    /// Whether the two networks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }
}

impl FromStr for Cidr {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || ValueError::new(Rule::MalformedCidr, format!("{s:?} is not an IPv4 network (expected A.B.C.D/N)"));
        let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
        let network: Ipv4Addr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        Cidr::new(network, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

string_newtype_serde!(Cidr);

fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

/// A machine's short host name: one RFC 1123 DNS label, lowercase, at most 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hostname(String);

impl Hostname {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Hostname {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        if is_dns_label(s) {
            return Ok(Hostname(s.to_owned()));
        }
        let hint = if s.contains('.') {
            "a machine name is one label; the domain comes from [site] domain"
        } else if s.bytes().any(|b| b.is_ascii_uppercase()) {
            "use lowercase"
        } else {
            "use 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"
        };
        Err(ValueError::new(Rule::MalformedHostname, format!("{s:?} is not a valid host name: {hint}")))
    }
}

impl fmt::Display for Hostname {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(Hostname);

/// One kernel command-line argument (`console=ttyS0,115200n8`, `quiet`): 1-255 printable ASCII characters without
/// spaces, quotes, backquotes or any of `$ | & ; # \`, the characters iPXE or a shell would give a meaning in the
/// boot script the argument is written into.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelArg(String);

impl KernelArg {
    /// Characters no kernel argument may contain.
    pub const FORBIDDEN: &'static str = "$|&;#\\'\"`";

    /// The argument as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` may be a kernel argument.
    pub fn is_valid(s: &str) -> bool {
        (1..=255).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_graphic() && !Self::FORBIDDEN.as_bytes().contains(&b))
    }
}

impl FromStr for KernelArg {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        if KernelArg::is_valid(s) {
            return Ok(KernelArg(s.to_owned()));
        }
        Err(ValueError::new(
            Rule::MalformedKernelArg,
            format!(
                "{s:?} is not a kernel argument: one word of 1-255 printable characters, without spaces or any of \
                 {}; give several arguments as several list items",
                KernelArg::FORBIDDEN
            ),
        ))
    }
}

impl fmt::Display for KernelArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(KernelArg);

/// A DNS domain name: dot-separated RFC 1123 labels, at most 253 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainName(String);

impl DomainName {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DomainName {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        if s.len() <= 253 && s.split('.').all(is_dns_label) {
            Ok(DomainName(s.to_owned()))
        } else {
            Err(ValueError::new(
                Rule::MalformedHostname,
                format!("{s:?} is not a DNS domain name (lowercase labels of a-z, 0-9, '-' joined by '.')"),
            ))
        }
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(DomainName);

/// The name of a role or a rack: 1-63 of `a-z 0-9 - _`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if ok {
            Ok(Name(s.to_owned()))
        } else {
            Err(ValueError::new(
                Rule::MalformedName,
                format!("{s:?} is not a valid name: use 1-63 of a-z, 0-9, '-', '_', starting with a letter or digit"),
            ))
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(Name);

/// A label key, as used by unit placement (`MachineMetadata=key=value`): 1-253 of `A-Z a-z 0-9 . _ - /`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey(String);

impl LabelKey {
    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for LabelKey {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if ok {
            Ok(LabelKey(s.to_owned()))
        } else {
            Err(ValueError::new(
                Rule::MalformedName,
                format!("{s:?} is not a valid label key: use 1-253 of A-Z, a-z, 0-9, '.', '_', '-', '/'"),
            ))
        }
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(LabelKey);

/// An absolute device path for installs, such as `/dev/sda` or `/dev/disk/by-path/pci-0000:00:1f.2-ata-1`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevicePath(String);

impl DevicePath {
    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DevicePath {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        if s.starts_with("/dev/") && !s.contains("/../") && !s.ends_with("/..") && !s.contains(char::is_whitespace) {
            Ok(DevicePath(s.to_owned()))
        } else {
            Err(ValueError::new(
                Rule::MalformedPath,
                format!("{s:?} is not a device path: expected an absolute path under /dev/, like /dev/sda"),
            ))
        }
    }
}

impl fmt::Display for DevicePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(DevicePath);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_colons_and_dashes_and_prints_lowercase_colons() {
        let mac: Mac = "0C-C4-7A-00-01-02".parse().unwrap();
        assert_eq!(mac.to_string(), "0c:c4:7a:00:01:02");
        assert_eq!("0c:c4:7a:00:01:02".parse::<Mac>().unwrap(), mac);
    }

    #[test]
    fn mac_rejects_malformed_multicast_and_zero() {
        for bad in ["", "0c:c4:7a:00:01", "0c:c4:7a:00:01:02:03", "0c:c4:7a:00:01:0g", "0c:c4:7a:0:01:02", "zz"] {
            assert_eq!(bad.parse::<Mac>().unwrap_err().rule, Rule::MalformedMac, "{bad}");
        }
        assert!("01:00:5e:00:00:01".parse::<Mac>().unwrap_err().message.contains("multicast"));
        assert!("00:00:00:00:00:00".parse::<Mac>().unwrap_err().message.contains("all-zero"));
    }

    #[test]
    fn cidr_contains_reserved_and_overlap() {
        let net: Cidr = "10.20.0.0/16".parse().unwrap();
        assert!(net.contains("10.20.255.255".parse().unwrap()));
        assert!(!net.contains("10.21.0.0".parse().unwrap()));
        assert!(net.is_reserved("10.20.0.0".parse().unwrap()));
        assert!(net.is_reserved("10.20.255.255".parse().unwrap()));
        assert!(!net.is_reserved("10.20.0.1".parse().unwrap()));
        assert_eq!(net.netmask().to_string(), "255.255.0.0");
        assert!(net.overlaps(&"10.20.7.0/24".parse().unwrap()));
        assert!(!net.overlaps(&"10.21.0.0/16".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("255.1.2.3".parse().unwrap()));
    }

    #[test]
    fn cidr_rejects_host_bits_with_a_suggestion() {
        let err = "10.20.0.1/16".parse::<Cidr>().unwrap_err();
        assert_eq!(err.rule, Rule::MalformedCidr);
        assert!(err.message.contains("did you mean 10.20.0.0/16"), "{}", err.message);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
    }

    #[test]
    fn hostnames_are_single_lowercase_labels() {
        assert!("r01-m01".parse::<Hostname>().is_ok());
        for bad in ["", "-a", "a-", "A1", "a.b", "a_b", &"x".repeat(64)] {
            assert_eq!(bad.parse::<Hostname>().unwrap_err().rule, Rule::MalformedHostname, "{bad}");
        }
        assert!("dc1.example.net".parse::<DomainName>().is_ok());
        assert!("dc1..net".parse::<DomainName>().is_err());
    }

    #[test]
    fn addresses_refuse_prefixes() {
        assert!("10.0.0.1".parse::<Address>().is_ok());
        assert!("10.0.0.1/24".parse::<Address>().unwrap_err().message.contains("prefix"));
        assert!("10.0.0.256".parse::<Address>().is_err());
    }
}
