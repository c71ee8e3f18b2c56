//! Diagnostics: every problem found in an inventory, located at `FILE:LINE:COL` and named by the rule it breaks.

use std::fmt;
use std::ops::Range;

/// The rules an inventory can break. The kebab-case name is printed in every diagnostic, so admins can grep for it
/// and the golden tests can pin it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// The file is not valid TOML.
    Syntax,
    /// A key the format does not define (every table is `deny_unknown_fields`).
    UnknownKey,
    /// A required key is absent.
    MissingKey,
    /// A value of the wrong TOML type (a string where a table belongs, ...).
    WrongType,
    /// A value of the right type that is not one of the allowed values.
    InvalidValue,
    /// `version` is absent.
    VersionMissing,
    /// `version` names a format this herd does not read.
    VersionUnsupported,
    /// A MAC address that does not parse, or is multicast / all zero.
    MalformedMac,
    /// A network that does not parse as `A.B.C.D/N`, or has host bits set.
    MalformedCidr,
    /// An IPv4 address that does not parse.
    MalformedAddress,
    /// A machine name that is not an RFC 1123 DNS label, or a domain that is not a DNS name.
    MalformedHostname,
    /// A role, rack or label name outside the allowed alphabet or length.
    MalformedName,
    /// A path that must be absolute is not.
    MalformedPath,
    /// A kernel argument that is not one word of plain characters (it goes into an iPXE script).
    MalformedKernelArg,
    /// Two machines with the same name.
    DuplicateName,
    /// One MAC address on two NICs.
    DuplicateMac,
    /// One IPv4 address used twice (machines, BMCs, gateway, provisioner).
    DuplicateAddress,
    /// An address outside the subnet it must live in.
    AddressOutsideSubnet,
    /// A static address inside a dynamic DHCP pool.
    AddressInPool,
    /// The network or broadcast address of a subnet used as a host address.
    AddressReserved,
    /// A pool whose start is after its end.
    PoolInverted,
    /// A pool not entirely inside its subnet.
    PoolOutsideSubnet,
    /// Two pools share addresses.
    PoolOverlap,
    /// Two networks share addresses.
    NetworkOverlap,
    /// A machine without a single MAC address.
    MissingMac,
    /// A bond member that is not one of the machine's MACs.
    BondMemberUnknown,
    /// A bond with fewer than two members.
    BondTooSmall,
    /// The external interface's MAC is not one of the machine's MACs, or is also a bond member.
    ExternalInterface,
    /// A machine uses an external address but the inventory defines no external network.
    MissingNetwork,
    /// A machine names a role that is not defined.
    UnknownRole,
    /// A machine names a rack that is not defined.
    UnknownRack,
    /// The number of etcd members cannot form a sensible quorum (must be 1, 3 or 5).
    EtcdQuorum,
    /// A file the inventory references (a role's unit file) does not exist.
    MissingFile,
    /// A file mode that is not an octal permission string.
    MalformedMode,
}

impl Rule {
    /// Every rule, for listing in `--help` texts and documentation.
    pub const ALL: &'static [Rule] = &[
        Rule::Syntax,
        Rule::UnknownKey,
        Rule::MissingKey,
        Rule::WrongType,
        Rule::InvalidValue,
        Rule::VersionMissing,
        Rule::VersionUnsupported,
        Rule::MalformedMac,
        Rule::MalformedCidr,
        Rule::MalformedAddress,
        Rule::MalformedHostname,
        Rule::MalformedName,
        Rule::MalformedPath,
        Rule::MalformedKernelArg,
        Rule::DuplicateName,
        Rule::DuplicateMac,
        Rule::DuplicateAddress,
        Rule::AddressOutsideSubnet,
        Rule::AddressInPool,
        Rule::AddressReserved,
        Rule::PoolInverted,
        Rule::PoolOutsideSubnet,
        Rule::PoolOverlap,
        Rule::NetworkOverlap,
        Rule::MissingMac,
        Rule::BondMemberUnknown,
        Rule::BondTooSmall,
        Rule::ExternalInterface,
        Rule::MissingNetwork,
        Rule::UnknownRole,
        Rule::UnknownRack,
        Rule::EtcdQuorum,
        Rule::MissingFile,
        Rule::MalformedMode,
    ];

    /// The kebab-case name printed in diagnostics.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Syntax => "syntax",
            Rule::UnknownKey => "unknown-key",
            Rule::MissingKey => "missing-key",
            Rule::WrongType => "wrong-type",
            Rule::InvalidValue => "invalid-value",
            Rule::VersionMissing => "version-missing",
            Rule::VersionUnsupported => "version-unsupported",
            Rule::MalformedMac => "malformed-mac",
            Rule::MalformedCidr => "malformed-cidr",
            Rule::MalformedAddress => "malformed-address",
            Rule::MalformedHostname => "malformed-hostname",
            Rule::MalformedName => "malformed-name",
            Rule::MalformedPath => "malformed-path",
            Rule::MalformedKernelArg => "malformed-kernel-arg",
            Rule::DuplicateName => "duplicate-name",
            Rule::DuplicateMac => "duplicate-mac",
            Rule::DuplicateAddress => "duplicate-address",
            Rule::AddressOutsideSubnet => "address-outside-subnet",
            Rule::AddressInPool => "address-in-pool",
            Rule::AddressReserved => "address-reserved",
            Rule::PoolInverted => "pool-inverted",
            Rule::PoolOutsideSubnet => "pool-outside-subnet",
            Rule::PoolOverlap => "pool-overlap",
            Rule::NetworkOverlap => "network-overlap",
            Rule::MissingMac => "missing-mac",
            Rule::BondMemberUnknown => "bond-member-unknown",
            Rule::BondTooSmall => "bond-too-small",
            Rule::ExternalInterface => "external-interface",
            Rule::MissingNetwork => "missing-network",
            Rule::UnknownRole => "unknown-role",
            Rule::UnknownRack => "unknown-rack",
            Rule::EtcdQuorum => "etcd-quorum",
            Rule::MissingFile => "missing-file",
            Rule::MalformedMode => "malformed-mode",
        }
    }

    /// The rule with this kebab-case name.
    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.iter().copied().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One problem in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as the user named it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The rule broken.
    pub rule: Rule,
    /// What is wrong and, where it helps, what to do.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}: {}", self.file, self.line, self.column, self.rule, self.message)
    }
}

/// All problems found in one inventory, sorted by position. Returned instead of an [`crate::Inventory`] when there
/// is at least one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// Maps byte offsets of one source text to 1-based line and column numbers.
#[derive(Debug)]
pub(crate) struct SourceMap<'a> {
    file: &'a str,
    src: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> SourceMap<'a> {
    pub(crate) fn new(file: &'a str, src: &'a str) -> Self {
        let line_starts = std::iter::once(0).chain(src.match_indices('\n').map(|(i, _)| i + 1)).collect();
        SourceMap { file, src, line_starts }
    }

    /// The line and column (both 1-based, column in characters) of a byte offset.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.src.len());
        let line = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let start = self.line_starts[line];
        let column = self.src.get(start..offset).map_or(offset - start, |s| s.chars().count());
        (line + 1, column + 1)
    }

    pub(crate) fn diagnostic(&self, span: Range<usize>, rule: Rule, message: impl Into<String>) -> Diagnostic {
        let (line, column) = self.position(span.start);
        Diagnostic { file: self.file.to_owned(), line, column, rule, message: message.into() }
    }

    /// `FILE:LINE:COL` of a byte offset, for messages that point at a second place ("first used at ...").
    pub(crate) fn locate(&self, span: &Range<usize>) -> String {
        let (line, column) = self.position(span.start);
        format!("{}:{line}:{column}", self.file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let map = SourceMap::new("f", "ab\nçd\n");
        assert_eq!(map.position(0), (1, 1));
        assert_eq!(map.position(1), (1, 2));
        assert_eq!(map.position(3), (2, 1));
        // 'ç' is two bytes: the 'd' after it is the second character of line 2.
        assert_eq!(map.position(5), (2, 2));
        assert_eq!(map.position(999), (3, 1));
    }

    #[test]
    fn every_rule_name_round_trips() {
        for rule in Rule::ALL {
            assert_eq!(Rule::from_name(rule.as_str()), Some(*rule));
        }
    }
}
