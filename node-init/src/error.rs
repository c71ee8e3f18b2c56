//! The error of a system operation in node-init (an ioctl, a device or file it opens): what was being done, and
//! the kernel's answer as the source, so the chain prints each once.

/// A system operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// The kernel refused: what was being done (`eth0: setting flags`), its error as the source.
    #[error("{what}")]
    Sys {
        /// What was being done.
        what: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A value the kernel cannot take (an interface name of 16 bytes or more, a root hash that is not hex).
    #[error("{0}")]
    Invalid(String),
    /// A device or interface that did not appear in time.
    #[error("{what} did not appear within {secs} s")]
    Missing {
        /// What was waited for.
        what: String,
        /// How long.
        secs: u64,
    },
}

impl SysError {
    /// `source` as the cause of `what`.
    pub(crate) fn sys(what: impl Into<String>, source: std::io::Error) -> SysError {
        SysError::Sys { what: what.into(), source }
    }

    /// The last OS error, as the cause of `what`.
    pub(crate) fn last(what: impl Into<String>) -> SysError {
        SysError::sys(what, std::io::Error::last_os_error())
    }

    /// For `map_err`: an I/O error as the cause of `what`.
    pub(crate) fn with(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SysError {
        let what = what.into();
        move |source| SysError::Sys { what, source }
    }
}

/// An error and its sources, once each: `installing to /dev/vda: writing slot a: No space left on device`. What the
/// console, the log and the phone-home carry.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        // A wrapper whose Display is its source's (`#[error(transparent)]` one level down) adds nothing.
        if !text.is_empty() && !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}
