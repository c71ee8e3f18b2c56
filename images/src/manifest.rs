//! The image manifest (`images/herd-os.toml`): what goes into an image. Parsing reports `FILE:LINE:COL`; checking
//! asks the host's apt metadata whether every package exists, so a typo fails before anything is built.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version: 1.
    pub version: u32,
    /// Image name.
    pub name: String,
    /// Release (goes into manifest.json and /etc/os-release).
    pub release: String,
    /// Where packages come from.
    pub debian: Debian,
    /// The root filesystem.
    pub root: Root,
    /// The kernel.
    pub kernel: Kernel,
}

/// `[debian]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Debian {
    /// Suite, e.g. `bookworm`.
    pub suite: String,
    /// Mirror URL.
    pub mirror: String,
    /// mmdebstrap variant (`minbase`, `essential`, ...).
    #[serde(default = "minbase")]
    pub variant: String,
}

fn minbase() -> String {
    "minbase".into()
}

/// `[root]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Packages installed on top of the variant.
    pub packages: Vec<String>,
    /// Units the packages enable that must not start at boot (node-init starts them when the node's config
    /// says so, or they are socket-activated).
    #[serde(default)]
    pub disable: Vec<String>,
    /// Paths (relative to the root) removed once the packages are installed: files no node uses that would only
    /// make every install longer (translations, manuals, the packages' debugging tools).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Services that yield the CPU while the machine boots (`StartupCPUWeight=` drop-ins; a template such as
    /// `getty@.service` covers its instances): what the machine needs to join the cluster (etcd, node-init) runs
    /// first, logins and D-Bus fill the gaps. Nothing sysinit.target waits for belongs here (it would hold up
    /// everything after it). Once booted they share the CPU equally.
    #[serde(default)]
    pub background: Vec<String>,
}

/// `[kernel]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// The kernel package.
    pub package: String,
    /// The suite it comes from (e.g. `bookworm-backports`), if not the main one.
    #[serde(default)]
    pub suite: Option<String>,
    /// Modules the initramfs carries.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Kernel command line (herd adds the verity root hash).
    #[serde(default)]
    pub cmdline: String,
    /// Module directories (under `/usr/lib/modules/VERSION/`) left out of the root: hardware no server has.
    #[serde(default)]
    pub trim: Vec<String>,
    /// Modules udev must not load for a device it finds (`blacklist` lines in
    /// `/usr/lib/modprobe.d/herd-blacklist.conf`): hardware a container host does not use, whose drivers only
    /// slow the boot. `modprobe NAME` still loads them.
    #[serde(default)]
    pub blacklist: Vec<String>,
}

/// A manifest problem.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Located problems (syntax, types, unknown keys, rules), one per line: `FILE:LINE:COL: message`.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// A Debian package name (policy 5.6.1): lowercase letters, digits, `+ - .`, at least two characters, starting
/// with a letter or digit.
pub fn valid_package_name(name: &str) -> bool {
    name.len() >= 2
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b))
}

/// Parses and checks a manifest's text (`file` names it in messages). Checks the format, not the packages' existence
/// (see [`unknown_packages`]).
pub fn parse(file: &str, text: &str) -> Result<Manifest, ManifestError> {
    let manifest: Manifest = toml::from_str(text).map_err(|e| {
        let (line, col) = e.span().map_or((1, 1), |s| position(text, s.start));
        ManifestError::Invalid(vec![format!("{file}:{line}:{col}: {}", e.message())])
    })?;
    let mut problems = Vec::new();
    let at = |needle: &str| text.find(needle).map_or((1, 1), |o| position(text, o));
    let mut problem = |needle: &str, msg: String| {
        let (line, col) = at(needle);
        problems.push(format!("{file}:{line}:{col}: {msg}"));
    };
    if manifest.version != 1 {
        problem("version", format!("version {} is not supported; this herd reads version 1", manifest.version));
    }
    // Both go into every slot header, which the provisioner checks the same way when a machine reports it.
    if !crate::slot::is_safe_word(&manifest.name) {
        problem("name", "name must be 1-64 characters of A-Z a-z 0-9 . _ + ~ : -, e.g. herd-os".into());
    }
    if !crate::slot::is_safe_word(&manifest.release) {
        problem("release", "release must be 1-64 characters of A-Z a-z 0-9 . _ + ~ : -, e.g. 2026.11.0".into());
    }
    if manifest.root.packages.is_empty() {
        problem("packages", "root.packages is empty: an image needs at least systemd".into());
    }
    for p in manifest.root.packages.iter().chain(std::iter::once(&manifest.kernel.package)) {
        if !valid_package_name(p) {
            problem(&format!("\"{p}\""), format!("{p:?} is not a Debian package name"));
        }
    }
    if manifest.kernel.package.is_empty() {
        problem("[kernel]", "kernel.package is missing: an image needs a kernel (e.g. linux-image-amd64)".into());
    }
    for r in &manifest.root.remove {
        let escapes = r.split('/').any(|c| c == ".." || c == ".");
        if r.is_empty() || r.starts_with('/') || escapes {
            problem(
                &format!("\"{r}\""),
                format!("root.remove: {r:?} must be a path inside the root, e.g. usr/share/man"),
            );
        }
    }
    for m in &manifest.kernel.blacklist {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            problem(&format!("\"{m}\""), format!("kernel.blacklist: {m:?} is not a module name"));
        }
    }
    for u in &manifest.root.background {
        let name = u.strip_suffix(".service").unwrap_or("");
        let valid = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@:".contains(&b));
        if name.is_empty() || !valid || name.matches('@').count() > 1 {
            problem(&format!("\"{u}\""), format!("root.background: {u:?} is not a service name, e.g. ssh.service"));
        }
    }
    if !manifest.debian.mirror.starts_with("http://") && !manifest.debian.mirror.starts_with("https://") {
        problem("mirror", "debian.mirror must be an http:// or https:// URL".into());
    }
    if problems.is_empty() { Ok(manifest) } else { Err(ManifestError::Invalid(problems)) }
}

/// Reads and checks a manifest file.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read { path: path.into(), source })?;
    parse(&path.display().to_string(), &text)
}

/// The packages (root and kernel) the host's apt metadata does not know (`apt-cache policy`): a manifest naming
/// one would fail half-way through a build. The host must list the manifest's suites (setup-host.sh adds
/// bookworm-backports).
pub fn unknown_packages(manifest: &Manifest) -> std::io::Result<Vec<String>> {
    let wanted: Vec<&String> = manifest.root.packages.iter().chain(std::iter::once(&manifest.kernel.package)).collect();
    let out = std::process::Command::new("apt-cache").arg("policy").args(&wanted).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut known = std::collections::HashSet::new();
    let mut current: Option<&str> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_suffix(':').filter(|l| !l.starts_with(' ')) {
            current = Some(name);
        } else if let Some(candidate) = line.trim().strip_prefix("Candidate:")
            && candidate.trim() != "(none)"
            && let Some(name) = current
        {
            known.insert(name.to_owned());
        }
    }
    Ok(wanted.into_iter().filter(|p| !known.contains(*p)).cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = include_str!("../herd-os.toml");

    #[test]
    fn the_shipped_manifest_parses() {
        let m = parse("herd-os.toml", GOOD).unwrap();
        assert_eq!(m.version, 1);
        assert!(m.root.packages.iter().any(|p| p == "etcd-server"));
        assert_eq!(m.kernel.suite.as_deref(), Some("bookworm-backports"));
    }

    #[test]
    fn problems_are_located() {
        let bad = GOOD.replace("\"etcd-server\"", "\"Etcd_Server\"").replace("version = 1", "version = 2");
        let err = parse("m.toml", &bad).unwrap_err().to_string();
        assert!(err.contains("m.toml:2:1: version 2 is not supported"), "{err}");
        assert!(err.contains("\"Etcd_Server\" is not a Debian package name"), "{err}");
        let line = bad.lines().position(|l| l.contains("Etcd_Server")).unwrap() + 1;
        assert!(err.contains(&format!("m.toml:{line}:")), "{err}");
        let unknown_key = GOOD.replace("[root]", "[root]\nextra = 1");
        let err = parse("m.toml", &unknown_key).unwrap_err().to_string();
        let line = unknown_key.lines().position(|l| l.starts_with("extra")).unwrap() + 1;
        assert!(err.starts_with(&format!("m.toml:{line}:1: unknown field `extra`")), "{err}");
    }

    #[test]
    fn a_manifest_without_a_kernel_says_so() {
        let start = GOOD.find("[kernel]").unwrap();
        let no_section = &GOOD[..start];
        let err = parse("m.toml", no_section).unwrap_err().to_string();
        assert!(err.contains("kernel"), "{err}");
        let empty = GOOD.replace("package = \"linux-image-amd64\"", "package = \"\"");
        let err = parse("m.toml", &empty).unwrap_err().to_string();
        assert!(err.contains("an image needs a kernel"), "{err}");
    }

    #[test]
    fn removals_stay_inside_the_root_and_blacklist_entries_are_module_names() {
        let m = parse("m.toml", GOOD).unwrap();
        assert!(m.kernel.blacklist.iter().any(|b| b == "floppy"), "{:?}", m.kernel.blacklist);
        assert!(m.root.remove.iter().any(|r| r == "usr/share/locale"), "{:?}", m.root.remove);
        let bad = GOOD.replace("\"usr/share/locale\"", "\"../etc\"").replace("\"floppy\"", "\"floppy; rm\"");
        let err = parse("m.toml", &bad).unwrap_err().to_string();
        let line = bad.lines().position(|l| l.contains("../etc")).unwrap() + 1;
        assert!(err.contains(&format!("m.toml:{line}:")), "{err}");
        assert!(err.contains("root.remove: \"../etc\" must be a path inside the root"), "{err}");
        assert!(err.contains("kernel.blacklist: \"floppy; rm\" is not a module name"), "{err}");
    }

    #[test]
    fn background_entries_are_service_names() {
        let m = parse("m.toml", GOOD).unwrap();
        assert!(m.root.background.iter().any(|u| u == "ssh.service"), "{:?}", m.root.background);
        for bad in ["ssh", "../ssh.service", "a@b@.service", ".service", "ssh.socket"] {
            let text = GOOD.replace("\"ssh.service\", \"systemd-logind", &format!("{bad:?}, \"systemd-logind"));
            assert!(text.contains(&format!("{bad:?}")), "{bad}");
            let err = parse("m.toml", &text).unwrap_err().to_string();
            assert!(err.contains(&format!("root.background: {bad:?} is not a service name")), "{bad}: {err}");
        }
    }

    #[test]
    fn package_names_follow_debian_policy() {
        for ok in ["systemd", "g++", "libc6", "docker.io", "0ad"] {
            assert!(valid_package_name(ok), "{ok}");
        }
        for bad in ["", "a", "Systemd", "-x", "a b", "x_y"] {
            assert!(!valid_package_name(bad), "{bad}");
        }
    }
}
