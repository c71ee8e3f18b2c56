//! TFTP packets (RFC 1350) with options (RFC 2347): parsing what clients send, building what the server sends.

use std::collections::BTreeMap;

/// Transfer mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes as they are.
    Octet,
    /// Text with CR LF line ends (RFC 764).
    Netascii,
}

/// A packet from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientPacket {
    /// Read request: file, mode, options (lowercased names).
    Read { file: String, mode: Mode, options: BTreeMap<String, String> },
    /// Write request (always refused).
    Write { file: String },
    /// Acknowledgement of a block.
    Ack(u16),
    /// The client aborts (code 8 after an OACK is the tsize-probe pattern of PXE ROMs).
    Error { code: u16, message: String },
}

/// Why a packet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than its opcode needs.
    Truncated,
    /// An opcode a client does not send.
    BadOpcode,
    /// A string that is not NUL-terminated UTF-8.
    BadString,
    /// A mode other than octet / netascii (mail is obsolete).
    BadMode,
}

impl ParseError {
    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::BadOpcode => "bad-opcode",
            ParseError::BadString => "bad-string",
            ParseError::BadMode => "bad-mode",
        }
    }
}

/// TFTP error codes.
pub mod code {
    /// Not defined, see message.
    pub const UNDEFINED: u16 = 0;
    /// File not found.
    pub const NOT_FOUND: u16 = 1;
    /// Access violation.
    pub const ACCESS: u16 = 2;
    /// Illegal TFTP operation.
    pub const ILLEGAL: u16 = 4;
    /// Unknown transfer ID.
    pub const UNKNOWN_TID: u16 = 5;
    /// Option negotiation refused (RFC 2347).
    pub const OPTION_REFUSED: u16 = 8;
}

fn strings(mut body: &[u8]) -> Result<Vec<String>, ParseError> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let end = body.iter().position(|&b| b == 0).ok_or(ParseError::BadString)?;
        out.push(std::str::from_utf8(&body[..end]).map_err(|_| ParseError::BadString)?.to_owned());
        body = &body[end + 1..];
    }
    Ok(out)
}

/// Parses a datagram from a client.
pub fn parse(buf: &[u8]) -> Result<ClientPacket, ParseError> {
    if buf.len() < 4 {
        return Err(ParseError::Truncated);
    }
    let opcode = u16::from_be_bytes([buf[0], buf[1]]);
    match opcode {
        1 | 2 => {
            let parts = strings(&buf[2..])?;
            let (file, mode) = match parts.as_slice() {
                [file, mode, ..] => (file.clone(), mode.to_ascii_lowercase()),
                _ => return Err(ParseError::Truncated),
            };
            if opcode == 2 {
                return Ok(ClientPacket::Write { file });
            }
            let mode = match mode.as_str() {
                "octet" => Mode::Octet,
                "netascii" => Mode::Netascii,
                _ => return Err(ParseError::BadMode),
            };
            let mut options = BTreeMap::new();
            for pair in parts[2..].chunks(2) {
                if let [name, value] = pair {
                    options.insert(name.to_ascii_lowercase(), value.clone());
                }
            }
            Ok(ClientPacket::Read { file, mode, options })
        }
        4 => Ok(ClientPacket::Ack(u16::from_be_bytes([buf[2], buf[3]]))),
        5 => {
            let message = buf[4..].split(|&b| b == 0).next().map(|m| String::from_utf8_lossy(m).into_owned());
            Ok(ClientPacket::Error { code: u16::from_be_bytes([buf[2], buf[3]]), message: message.unwrap_or_default() })
        }
        _ => Err(ParseError::BadOpcode),
    }
}

/// Writes a DATA packet header for `block` into `out` (cleared), followed by `data`.
pub fn data(out: &mut Vec<u8>, block: u16, data: &[u8]) {
    out.clear();
    out.extend_from_slice(&3u16.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.extend_from_slice(data);
}

/// An OACK with the accepted options.
pub fn oack(options: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = 6u16.to_be_bytes().to_vec();
    for (name, value) in options {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
    out
}

/// An ERROR packet.
pub fn error(code: u16, message: &str) -> Vec<u8> {
    let mut out = 5u16.to_be_bytes().to_vec();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_read_request_with_options() {
        let p = parse(b"\x00\x01undionly.kpxe\x00octet\x00tsize\x000\x00BLKSIZE\x001468\x00").unwrap();
        let ClientPacket::Read { file, mode, options } = p else { panic!() };
        assert_eq!(file, "undionly.kpxe");
        assert_eq!(mode, Mode::Octet);
        assert_eq!(options["tsize"], "0");
        assert_eq!(options["blksize"], "1468");
    }

    #[test]
    fn parses_acks_errors_and_writes() {
        assert_eq!(parse(b"\x00\x04\x01\x02").unwrap(), ClientPacket::Ack(0x0102));
        assert_eq!(
            parse(b"\x00\x05\x00\x08tsize probe\x00").unwrap(),
            ClientPacket::Error { code: 8, message: "tsize probe".into() }
        );
        assert_eq!(parse(b"\x00\x02x\x00octet\x00").unwrap(), ClientPacket::Write { file: "x".into() });
    }

    #[test]
    fn rejects_malformed_packets() {
        assert_eq!(parse(b"\x00\x01"), Err(ParseError::Truncated));
        assert_eq!(parse(b"\x00\x09abcd"), Err(ParseError::BadOpcode));
        assert_eq!(parse(b"\x00\x01file\x00octet"), Err(ParseError::BadString));
        assert_eq!(parse(b"\x00\x01file\x00mail\x00"), Err(ParseError::BadMode));
        assert_eq!(parse(b"\x00\x01\xff\xfe\x00octet\x00"), Err(ParseError::BadString));
    }

    #[test]
    fn builds_packets() {
        let mut out = Vec::new();
        data(&mut out, 7, b"abc");
        assert_eq!(out, b"\x00\x03\x00\x07abc");
        let mut o = BTreeMap::new();
        o.insert("tsize".to_string(), "42".to_string());
        assert_eq!(oack(&o), b"\x00\x06tsize\x0042\x00");
        assert_eq!(error(1, "nope"), b"\x00\x05\x00\x01nope\x00");
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse(&bytes);
        }
    }
}
