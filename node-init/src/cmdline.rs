//! The kernel command line parameters node-init reads (`herd.*`).

use std::collections::BTreeMap;

/// Where the verified root comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsrSource {
    /// An installed disk: the GPT's `USR-A`/`USR-B` slot the bookkeeping picks.
    Slots,
    /// A device holding the squashfs (its hash tree on `hash`, or after the data).
    Device {
        /// The data device.
        data: String,
        /// The hash device.
        hash: Option<String>,
    },
}

/// What happens when the boot cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Stay, showing the reason on the console (the default: a person can read it).
    Halt,
    /// Power off.
    Poweroff,
    /// Reboot after a pause (try the boot server again).
    Reboot,
}

/// A kernel command line node-init cannot boot with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// No root hash: node-init never mounts an unverified root.
    #[error(
        "no herd.verity.roothash= on the kernel command line: node-init mounts only a root whose hash the boot \
         server vouches for"
    )]
    NoRootHash,
    /// A root hash that is not 64 hex digits.
    #[error("herd.verity.roothash: {0:?} is not a SHA-256 in hex")]
    BadRootHash(String),
    /// A parameter with a value it does not take.
    #[error("herd.{key}={value}: use {accepted}")]
    Value {
        /// The parameter (without `herd.`).
        key: &'static str,
        /// What it was given.
        value: String,
        /// What it takes.
        accepted: &'static str,
    },
    /// A parameter another one needs.
    #[error("herd.{with} is set but herd.{missing} is not")]
    Missing {
        /// The parameter given.
        with: &'static str,
        /// The one it needs.
        missing: &'static str,
    },
}

/// The parsed `herd.*` parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `herd.usr=`: `auto` (slots on an installed disk) or a device path.
    pub usr: UsrSource,
    /// `herd.verity.roothash=`: the root hashes this boot trusts, comma-separated (the boot server lists the
    /// images it installed). Required: node-init never mounts an unverified root.
    pub root_hashes: Vec<String>,
    /// `herd.state=`: `tmpfs`, or a device or `PARTLABEL=NAME` for an ext4 file system holding /etc and /var.
    /// Default: the `STATE` partition with slots, tmpfs otherwise.
    pub state: Option<String>,
    /// `herd.failure=`.
    pub on_failure: OnFailure,
    /// `herd.init=`: what to run in the new root (default /sbin/init).
    pub init: String,
    /// Every `herd.*` parameter as given.
    pub all: BTreeMap<String, String>,
}

impl Cmdline {
    /// Parses a command line.
    pub fn parse(text: &str) -> Result<Cmdline, CmdlineError> {
        let mut all = BTreeMap::new();
        for word in text.split_whitespace() {
            if let Some(rest) = word.strip_prefix("herd.") {
                let (k, v) = rest.split_once('=').unwrap_or((rest, ""));
                all.insert(k.to_owned(), v.to_owned());
            }
        }
        let usr = match all.get("usr").map(String::as_str) {
            None | Some("auto") => UsrSource::Slots,
            Some(dev) => UsrSource::Device { data: dev.to_owned(), hash: all.get("usr.hash").cloned() },
        };
        let root_hashes: Vec<String> = all
            .get("verity.roothash")
            .map(|v| v.split(',').filter(|h| !h.is_empty()).map(str::to_ascii_lowercase).collect())
            .unwrap_or_default();
        if root_hashes.is_empty() {
            return Err(CmdlineError::NoRootHash);
        }
        if let Some(bad) = root_hashes.iter().find(|h| h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit())) {
            return Err(CmdlineError::BadRootHash(bad.clone()));
        }
        let on_failure = match all.get("failure").map(String::as_str) {
            None | Some("halt") => OnFailure::Halt,
            Some("poweroff") => OnFailure::Poweroff,
            Some("reboot") => OnFailure::Reboot,
            Some(other) => {
                return Err(CmdlineError::Value {
                    key: "failure",
                    value: other.to_owned(),
                    accepted: "halt, poweroff or reboot",
                });
            }
        };
        Ok(Cmdline {
            usr,
            root_hashes,
            state: all.get("state").cloned(),
            on_failure,
            init: all.get("init").cloned().unwrap_or_else(|| "/sbin/init".into()),
            all,
        })
    }

    /// Whether `hash` is one this boot trusts.
    pub fn trusts(&self, hash: &str) -> bool {
        self.root_hashes.iter().any(|h| h.eq_ignore_ascii_case(hash))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const H: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parameters_parse_with_defaults() {
        let c = Cmdline::parse(&format!("console=ttyS0 herd.verity.roothash={H} herd.failure=poweroff")).unwrap();
        assert_eq!(c.usr, UsrSource::Slots);
        assert!(c.trusts(&H.to_uppercase()));
        assert_eq!(c.on_failure, OnFailure::Poweroff);
        assert_eq!(c.init, "/sbin/init");
        let c =
            Cmdline::parse(&format!("herd.usr=/dev/vda herd.usr.hash=/dev/vdb herd.verity.roothash={H},{H}")).unwrap();
        assert_eq!(c.usr, UsrSource::Device { data: "/dev/vda".into(), hash: Some("/dev/vdb".into()) });
    }

    #[test]
    fn a_missing_or_malformed_root_hash_is_refused_with_the_reason() {
        assert_eq!(Cmdline::parse("herd.usr=/dev/vda").unwrap_err(), CmdlineError::NoRootHash);
        assert!(Cmdline::parse("herd.verity.roothash=abc").unwrap_err().to_string().contains("not a SHA-256"));
        let e = Cmdline::parse(&format!("herd.verity.roothash={H} herd.failure=explode")).unwrap_err();
        assert_eq!(e.to_string(), "herd.failure=explode: use halt, poweroff or reboot");
    }
}
