//! Firmware detection and the boot answer: which file a PXE/iPXE/HTTP-boot client is told to load.
//!
//! - Option 93 (client architecture, RFC 4578 + IANA): 0 BIOS; 6 IA32 EFI; 7 and 9 x64 EFI (firmware disagrees on
//!   which, so both); 11 arm64 EFI; 15, 16, 19 HTTP boot (ia32, x64, arm64).
//! - Option 60 `PXEClient...` marks a PXE ROM, `HTTPClient...` an HTTP-boot firmware.
//! - iPXE announces itself by user class 77 = `iPXE` (raw, as iPXE sends it, or RFC 3004 length-prefixed) or by
//!   sending option 175 (its feature flags).
//!
//! Non-iPXE firmware is given the iPXE binary for its architecture (BIOS `undionly.kpxe`, x64 EFI `ipxe.efi` or
//! `snponly.efi`); iPXE is given the URL of its machine's script, which breaks the chainload loop. An architecture
//! herd has no binary for gets **no answer**, never a wrong binary.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;

use herd_inventory::Mac;

/// A client's architecture, from option 93.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    /// 0: x86 BIOS.
    Bios,
    /// 6: 32-bit x86 EFI.
    EfiIa32,
    /// 7 or 9: x64 EFI.
    EfiX64,
    /// 11: arm64 EFI.
    EfiArm64,
    /// 15: 32-bit x86 EFI HTTP boot.
    HttpIa32,
    /// 16: x64 EFI HTTP boot.
    HttpX64,
    /// 19: arm64 EFI HTTP boot.
    HttpArm64,
    /// Anything else.
    Other(u16),
}

impl Arch {
    /// The architecture for an option 93 value.
    pub fn from_code(code: u16) -> Arch {
        match code {
            0 => Arch::Bios,
            6 => Arch::EfiIa32,
            7 | 9 => Arch::EfiX64,
            11 => Arch::EfiArm64,
            15 => Arch::HttpIa32,
            16 => Arch::HttpX64,
            19 => Arch::HttpArm64,
            other => Arch::Other(other),
        }
    }

    /// Whether this is an HTTP-boot architecture (the boot file is a URL, and replies carry 60 = `HTTPClient`).
    pub fn is_http_boot(self) -> bool {
        matches!(self, Arch::HttpIa32 | Arch::HttpX64 | Arch::HttpArm64)
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arch::Bios => f.write_str("bios"),
            Arch::EfiIa32 => f.write_str("efi-ia32"),
            Arch::EfiX64 => f.write_str("efi-x64"),
            Arch::EfiArm64 => f.write_str("efi-arm64"),
            Arch::HttpIa32 => f.write_str("http-ia32"),
            Arch::HttpX64 => f.write_str("http-x64"),
            Arch::HttpArm64 => f.write_str("http-arm64"),
            Arch::Other(n) => write!(f, "arch-{n}"),
        }
    }
}

/// What the client said about itself that matters for booting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// Option 93, if sent.
    pub arch: Option<Arch>,
    /// Option 60 starts with `PXEClient`.
    pub pxe_client: bool,
    /// Option 60 starts with `HTTPClient`.
    pub http_client: bool,
    /// iPXE, by user class or option 175.
    pub ipxe: bool,
    /// Option 97 (client machine identifier, usually type 0 + UUID), echoed in replies.
    pub uuid: Option<Vec<u8>>,
}

impl ClientInfo {
    /// Whether the client wants to network-boot (so it gets boot information, not just an address).
    pub fn wants_boot(&self) -> bool {
        self.pxe_client || self.http_client || self.ipxe
    }
}

/// Whether a user class option (77) says iPXE: raw `iPXE` (what iPXE sends) or RFC 3004 (length-prefixed
/// entries, one of which is `iPXE`).
pub fn user_class_is_ipxe(data: &[u8]) -> bool {
    if data == b"iPXE" {
        return true;
    }
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        if len == 0 || len > tail.len() {
            return false;
        }
        if &tail[..len] == b"iPXE" {
            return true;
        }
        rest = &tail[len..];
    }
    false
}

/// Where the client is told to load its next stage from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootFile {
    /// A file on our TFTP server (siaddr and option 66 name us).
    Tftp(String),
    /// A URL on our HTTP server.
    Http(String),
}

impl BootFile {
    /// The file name or URL as it goes into the reply.
    pub fn as_str(&self) -> &str {
        match self {
            BootFile::Tftp(s) | BootFile::Http(s) => s,
        }
    }
}

/// Why a boot client gets no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoBoot {
    /// herd has no iPXE binary for this architecture.
    #[error("no iPXE binary for architecture {0}; not answering rather than sending a wrong one")]
    UnsupportedArch(Arch),
}

/// What the boot answer depends on besides the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// Base URL of our HTTP server, e.g. `http://10.20.0.2`.
    pub http_base: String,
    /// iPXE binaries present in the assets directory (`undionly.kpxe`, `ipxe.efi`, `snponly.efi`, ...).
    pub binaries: BTreeSet<String>,
    /// Serve `snponly.efi` (uses the firmware's NIC driver) instead of `ipxe.efi` to x64 EFI.
    pub prefer_snponly: bool,
}

impl BootConfig {
    fn has(&self, file: &str) -> bool {
        self.binaries.contains(file)
    }

    /// The URL of a machine's iPXE script.
    pub fn script_url(&self, mac: Mac) -> String {
        format!("{}/boot/{}.ipxe", self.http_base, mac.to_string().replace(':', "-"))
    }
}

/// The boot file for a client that wants to boot.
pub fn boot_file(client: &ClientInfo, mac: Mac, cfg: &BootConfig) -> Result<BootFile, NoBoot> {
    if client.ipxe {
        return Ok(BootFile::Http(cfg.script_url(mac)));
    }
    // A PXE ROM that omits option 93 predates RFC 4578: a BIOS.
    let arch = client.arch.unwrap_or(Arch::Bios);
    let efi_x64 = if cfg.prefer_snponly && cfg.has("snponly.efi") { "snponly.efi" } else { "ipxe.efi" };
    let (file, http) = match arch {
        Arch::Bios => ("undionly.kpxe", false),
        Arch::EfiX64 => (efi_x64, false),
        Arch::EfiIa32 => ("ipxe-ia32.efi", false),
        Arch::EfiArm64 => ("ipxe-arm64.efi", false),
        Arch::HttpX64 => ("ipxe.efi", true),
        Arch::HttpIa32 => ("ipxe-ia32.efi", true),
        Arch::HttpArm64 => ("ipxe-arm64.efi", true),
        Arch::Other(_) => return Err(NoBoot::UnsupportedArch(arch)),
    };
    if !cfg.has(file) {
        return Err(NoBoot::UnsupportedArch(arch));
    }
    Ok(if http { BootFile::Http(format!("{}/ipxe/{file}", cfg.http_base)) } else { BootFile::Tftp(file.to_owned()) })
}

/// The TFTP server name (option 66, sname) for a boot file: us for TFTP files, none for URLs.
pub fn tftp_server(file: &BootFile, server: Ipv4Addr) -> Option<Ipv4Addr> {
    matches!(file, BootFile::Tftp(_)).then_some(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BootConfig {
        BootConfig {
            http_base: "http://10.0.0.2".into(),
            binaries: ["undionly.kpxe", "ipxe.efi", "snponly.efi"].into_iter().map(String::from).collect(),
            prefer_snponly: false,
        }
    }

    fn mac() -> Mac {
        "52:54:00:00:00:01".parse().unwrap()
    }

    fn pxe(arch: u16) -> ClientInfo {
        ClientInfo { arch: Some(Arch::from_code(arch)), pxe_client: true, ..ClientInfo::default() }
    }

    #[test]
    fn firmware_matrix() {
        let c = cfg();
        assert_eq!(boot_file(&pxe(0), mac(), &c), Ok(BootFile::Tftp("undionly.kpxe".into())));
        assert_eq!(boot_file(&pxe(7), mac(), &c), Ok(BootFile::Tftp("ipxe.efi".into())));
        assert_eq!(boot_file(&pxe(9), mac(), &c), Ok(BootFile::Tftp("ipxe.efi".into())));
        assert_eq!(
            boot_file(&ClientInfo { arch: Some(Arch::HttpX64), http_client: true, ..ClientInfo::default() }, mac(), &c),
            Ok(BootFile::Http("http://10.0.0.2/ipxe/ipxe.efi".into()))
        );
        // No binary for these: no answer rather than a wrong one.
        assert_eq!(boot_file(&pxe(11), mac(), &c), Err(NoBoot::UnsupportedArch(Arch::EfiArm64)));
        assert_eq!(boot_file(&pxe(6), mac(), &c), Err(NoBoot::UnsupportedArch(Arch::EfiIa32)));
        assert_eq!(boot_file(&pxe(42), mac(), &c), Err(NoBoot::UnsupportedArch(Arch::Other(42))));
        // iPXE gets its script whatever its architecture: the loop is broken.
        let ipxe = ClientInfo { ipxe: true, ..pxe(7) };
        assert_eq!(
            boot_file(&ipxe, mac(), &c),
            Ok(BootFile::Http("http://10.0.0.2/boot/52-54-00-00-00-01.ipxe".into()))
        );
        let snp = BootConfig { prefer_snponly: true, ..cfg() };
        assert_eq!(boot_file(&pxe(7), mac(), &snp), Ok(BootFile::Tftp("snponly.efi".into())));
    }

    #[test]
    fn user_class_forms() {
        assert!(user_class_is_ipxe(b"iPXE"));
        assert!(user_class_is_ipxe(b"\x04iPXE"));
        assert!(user_class_is_ipxe(b"\x03abc\x04iPXE"));
        assert!(!user_class_is_ipxe(b"\x05iPXE"));
        assert!(!user_class_is_ipxe(b"gPXE"));
        assert!(!user_class_is_ipxe(b""));
    }
}
