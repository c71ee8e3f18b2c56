//! Applies a machine's Ignition config (spec 3.x, the subset herd's provisioner renders and admins use) to a root
//! directory before systemd starts there: directories, files (data: URLs and http(s) sources with their
//! verification hash), links, groups and users (with SSH keys), and systemd units (contents, drop-ins, enable,
//! mask). Everything is written by hand — no chroot, no tools from the new root — and is idempotent, so the same
//! config applies again on every boot.

use std::collections::BTreeSet;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::Digest;

use crate::error::SysError;

/// Why a config could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The config asks for something malformed or that node-init does not do.
    #[error("{0}")]
    Invalid(String),
    /// A file system operation under the root failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// An http(s) source could not be fetched.
    #[error("GET {url}")]
    Fetch {
        /// The source.
        url: String,
        /// What the fetch said.
        #[source]
        source: ureq::Error,
    },
    /// The entry of the config an error happened in (`storage.files[2] /etc/hosts`).
    #[error("{at}")]
    In {
        /// The entry: its JSON path and name.
        at: String,
        /// What went wrong there.
        #[source]
        source: Box<ApplyError>,
    },
}

fn invalid(reason: impl Into<String>) -> ApplyError {
    ApplyError::Invalid(reason.into())
}

/// For `map_err`: the error as one of the entry `at`.
fn within(at: impl Into<String>) -> impl FnOnce(ApplyError) -> ApplyError {
    let at = at.into();
    move |e| ApplyError::In { at, source: Box::new(e) }
}

/// What was applied, for the log and the phone-home.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Files written.
    pub files: usize,
    /// Directories made.
    pub directories: usize,
    /// Links made.
    pub links: usize,
    /// Users created or updated.
    pub users: usize,
    /// Units written, enabled or masked.
    pub units: usize,
}

/// A path inside `root` for an absolute path from the config (refusing `..`).
fn inside(root: &Path, path: &str) -> Result<PathBuf, ApplyError> {
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(invalid(format!("{path:?}: paths must be absolute and must not contain ..")));
    }
    Ok(root.join(path.trim_start_matches('/')))
}

/// The bytes of a `data:` URL (percent-encoded or base64).
pub fn data_url(url: &str) -> Result<Vec<u8>, ApplyError> {
    let rest = url.strip_prefix("data:").ok_or_else(|| invalid("not a data: URL"))?;
    let (meta, data) = rest.split_once(',').ok_or_else(|| invalid("a data: URL without ','"))?;
    if meta.ends_with(";base64") {
        use base64::Engine as _;
        return base64::engine::general_purpose::STANDARD.decode(data).map_err(|e| invalid(format!("base64: {e}")));
    }
    herd_config::node::percent_decode_bytes(data).map_err(invalid)
}

fn fetch(url: &str) -> Result<Vec<u8>, ApplyError> {
    let failed = |source| ApplyError::Fetch { url: url.to_owned(), source };
    let mut resp = ureq::get(url).call().map_err(failed)?;
    resp.body_mut().with_config().limit(256 << 20).read_to_vec().map_err(failed)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The contents of a resource (`source` + `verification.hash`).
fn resource(r: &Value) -> Result<Vec<u8>, ApplyError> {
    let Some(source) = r["source"].as_str() else { return Ok(Vec::new()) };
    let bytes = if source.starts_with("data:") {
        data_url(source)?
    } else if source.starts_with("http://") || source.starts_with("https://") {
        fetch(source)?
    } else {
        return Err(invalid(format!("source {source:?}: only data:, http: and https: are supported")));
    };
    if let Some(hash) = r["verification"]["hash"].as_str() {
        let (algo, want) = hash.split_once('-').ok_or_else(|| invalid(format!("verification hash {hash:?}")))?;
        let got = match algo {
            "sha512" => hex(&sha2::Sha512::digest(&bytes)),
            "sha256" => hex(&sha2::Sha256::digest(&bytes)),
            other => return Err(invalid(format!("verification hash algorithm {other:?}"))),
        };
        if !got.eq_ignore_ascii_case(want) {
            return Err(invalid(format!("{source}: {algo} is {got}, the config says {want}")));
        }
    }
    if r["compression"].as_str().is_some_and(|c| !c.is_empty()) {
        return Err(invalid("compressed contents are not supported"));
    }
    Ok(bytes)
}

fn mode_of(v: &Value, default: u32) -> u32 {
    v["mode"].as_u64().map_or(default, |m| (m & 0o7777) as u32)
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SysError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(SysError::with(dir.display().to_string()))?;
    }
    let tmp = path.with_extension("herd-tmp");
    let err = |e: std::io::Error| SysError::sys(path.display().to_string(), e);
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    std::io::Write::write_all(&mut f, bytes).map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(err)?;
    // On disk before it takes the old file's place, and the rename on disk before we go on: a power cut right
    // after the boot must not leave an empty /etc/passwd (ext4 does not flush a new file renamed over one that
    // only a lower overlay layer had).
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

/// Applies `config` under `root`.
pub fn apply(config: &Value, root: &Path) -> Result<Applied, ApplyError> {
    let version = config["ignition"]["version"].as_str().unwrap_or_default();
    if !version.starts_with("3.") {
        return Err(invalid(format!("Ignition version {version:?}: node-init applies spec 3.x")));
    }
    let mut done = Applied::default();
    let empty = Vec::new();
    let list = |v: &Value| v.as_array().unwrap_or(&empty).clone();
    // The entry an error is about: its JSON path and, when it has one, its name.
    let at = |list: &str, i: usize, v: &Value, key: &str| match v[key].as_str() {
        Some(name) => format!("{list}[{i}] {name}"),
        None => format!("{list}[{i}]"),
    };
    for (i, d) in list(&config["storage"]["directories"]).iter().enumerate() {
        directory(root, d).map_err(within(at("storage.directories", i, d, "path")))?;
        done.directories += 1;
    }
    for (i, f) in list(&config["storage"]["files"]).iter().enumerate() {
        file(root, f).map_err(within(at("storage.files", i, f, "path")))?;
        done.files += 1;
    }
    for (i, l) in list(&config["storage"]["links"]).iter().enumerate() {
        link(root, l).map_err(within(at("storage.links", i, l, "path")))?;
        done.links += 1;
    }
    for (i, g) in list(&config["passwd"]["groups"]).iter().enumerate() {
        let name = g["name"].as_str().ok_or_else(|| invalid("a group without a name"));
        name.and_then(|name| ensure_group(root, name, g["gid"].as_u64().map(|n| n as u32))).map_err(within(at(
            "passwd.groups",
            i,
            g,
            "name",
        )))?;
    }
    for (i, u) in list(&config["passwd"]["users"]).iter().enumerate() {
        apply_user(root, u).map_err(within(at("passwd.users", i, u, "name")))?;
        done.users += 1;
    }
    for (i, unit) in list(&config["systemd"]["units"]).iter().enumerate() {
        apply_unit(root, unit).map_err(within(at("systemd.units", i, unit, "name")))?;
        done.units += 1;
    }
    Ok(done)
}

fn directory(root: &Path, d: &Value) -> Result<(), ApplyError> {
    let path = inside(root, d["path"].as_str().unwrap_or_default())?;
    let what = || path.display().to_string();
    std::fs::create_dir_all(&path).map_err(SysError::with(what()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode_of(d, 0o755)))
        .map_err(SysError::with(format!("{}: setting its mode", what())))?;
    Ok(())
}

fn file(root: &Path, f: &Value) -> Result<(), ApplyError> {
    let path = inside(root, f["path"].as_str().unwrap_or_default())?;
    let bytes = resource(&f["contents"])?;
    let overwrite = f["overwrite"].as_bool().unwrap_or(false);
    if path.exists() && !overwrite {
        // Idempotent: the same contents again are fine; different ones are what overwrite=false forbids.
        if std::fs::read(&path).map_err(SysError::with(path.display().to_string()))? != bytes {
            return Err(invalid("the file exists with other contents and overwrite is false"));
        }
        return Ok(());
    }
    Ok(write_file(&path, &bytes, mode_of(f, 0o644))?)
}

fn link(root: &Path, l: &Value) -> Result<(), ApplyError> {
    let path = inside(root, l["path"].as_str().unwrap_or_default())?;
    let target = l["target"].as_str().ok_or_else(|| invalid("a link without a target"))?;
    if l["hard"].as_bool().unwrap_or(false) {
        return Err(invalid("hard links are not supported"));
    }
    if std::fs::read_link(&path).is_ok_and(|t| t == Path::new(target)) {
        return Ok(());
    }
    let what = || path.display().to_string();
    if path.symlink_metadata().is_ok() {
        std::fs::remove_file(&path).map_err(SysError::with(format!("removing {}", what())))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(SysError::with(dir.display().to_string()))?;
    }
    std::os::unix::fs::symlink(target, &path).map_err(SysError::with(what()))?;
    Ok(())
}

/// Lines of a colon-separated database (`/etc/passwd`, `/etc/group`, ...).
fn read_db(path: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split(':').map(str::to_owned).collect())
        .collect()
}

/// The uid and gid of user `name` in `root`'s `/etc/passwd`.
pub(crate) fn user_ids(root: &Path, name: &str) -> Option<(u32, u32)> {
    let rows = read_db(&root.join("etc/passwd"));
    let row = rows.iter().find(|r| r[0] == name)?;
    Some((row.get(2)?.parse().ok()?, row.get(3)?.parse().ok()?))
}

fn write_db(path: &Path, rows: &[Vec<String>], mode: u32) -> Result<(), SysError> {
    let text: String = rows.iter().map(|r| r.join(":") + "\n").collect();
    write_file(path, text.as_bytes(), mode)
}

/// The group's gid, creating it (gid given, or the next free one from 1000) if missing.
fn ensure_group(root: &Path, name: &str, gid: Option<u32>) -> Result<u32, ApplyError> {
    let path = root.join("etc/group");
    let mut rows = read_db(&path);
    if let Some(r) = rows.iter().find(|r| r[0] == name) {
        return r.get(2).and_then(|g| g.parse().ok()).ok_or_else(|| invalid(format!("/etc/group: {name} has no gid")));
    }
    let used: BTreeSet<u32> = rows.iter().filter_map(|r| r.get(2)?.parse().ok()).collect();
    let gid = gid.unwrap_or_else(|| (1000..).find(|g| !used.contains(g)).unwrap_or(65000));
    rows.push(vec![name.into(), "x".into(), gid.to_string(), String::new()]);
    write_db(&path, &rows, 0o644)?;
    let gshadow = root.join("etc/gshadow");
    if gshadow.exists() {
        let mut rows = read_db(&gshadow);
        rows.push(vec![name.into(), "!".into(), String::new(), String::new()]);
        write_db(&gshadow, &rows, 0o640)?;
    }
    Ok(gid)
}

fn apply_user(root: &Path, u: &Value) -> Result<(), ApplyError> {
    let name = u["name"].as_str().ok_or_else(|| invalid("a user without a name"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(invalid(format!("user name {name:?}: use letters, digits, '-', '_' and '.'")));
    }
    let passwd = root.join("etc/passwd");
    let mut rows = read_db(&passwd);
    let existing = rows.iter().find(|r| r[0] == name).cloned();
    let (uid, gid, home) = match existing {
        Some(r) => (
            r.get(2).and_then(|v| v.parse().ok()).unwrap_or(0u32),
            r.get(3).and_then(|v| v.parse().ok()).unwrap_or(0u32),
            r.get(5).cloned().unwrap_or_default(),
        ),
        None => {
            let used: BTreeSet<u32> = rows.iter().filter_map(|r| r.get(2)?.parse().ok()).collect();
            let uid = u["uid"]
                .as_u64()
                .map(|v| v as u32)
                .unwrap_or_else(|| (1000..).find(|x| !used.contains(x)).unwrap_or(65000));
            let gid = ensure_group(root, name, Some(uid))?;
            let home = u["homeDir"].as_str().map_or(format!("/home/{name}"), str::to_owned);
            let shell = u["shell"].as_str().unwrap_or("/bin/bash").to_owned();
            let gecos = u["gecos"].as_str().unwrap_or_default().to_owned();
            rows.push(vec![name.into(), "x".into(), uid.to_string(), gid.to_string(), gecos, home.clone(), shell]);
            write_db(&passwd, &rows, 0o644)?;
            let shadow = root.join("etc/shadow");
            let mut srows = read_db(&shadow);
            let hash = u["passwordHash"].as_str().unwrap_or("!").to_owned();
            srows.push(vec![
                name.into(),
                hash,
                "19000".into(),
                "0".into(),
                "99999".into(),
                "7".into(),
                String::new(),
                String::new(),
                String::new(),
            ]);
            write_db(&shadow, &srows, 0o640)?;
            (uid, gid, home)
        }
    };
    // Supplementary groups.
    let empty = Vec::new();
    for g in u["groups"].as_array().unwrap_or(&empty).iter().filter_map(Value::as_str) {
        ensure_group(root, g, None)?;
        let path = root.join("etc/group");
        let mut rows = read_db(&path);
        if let Some(r) = rows.iter_mut().find(|r| r[0] == g) {
            while r.len() < 4 {
                r.push(String::new());
            }
            let mut members: Vec<String> = r[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect();
            if !members.iter().any(|m| m == name) {
                members.push(name.to_owned());
                r[3] = members.join(",");
                write_db(&path, &rows, 0o644)?;
            }
        }
    }
    // Home (through the /home → /var/home link of herd's root) and SSH keys.
    let home_dir = inside(root, &home)?;
    let resolved = resolve_in(root, &home_dir);
    let chown_to = |p: &Path| chown(p, Some(uid), Some(gid)).map_err(SysError::with(format!("chown {}", p.display())));
    std::fs::create_dir_all(&resolved).map_err(SysError::with(resolved.display().to_string()))?;
    chown_to(&resolved)?;
    let keys: Vec<&str> =
        u["sshAuthorizedKeys"].as_array().unwrap_or(&empty).iter().filter_map(Value::as_str).collect();
    if !keys.is_empty() {
        let ssh = resolved.join(".ssh");
        std::fs::create_dir_all(&ssh).map_err(SysError::with(ssh.display().to_string()))?;
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))
            .map_err(SysError::with(format!("{}: setting its mode", ssh.display())))?;
        let file = ssh.join("authorized_keys");
        write_file(&file, (keys.join("\n") + "\n").as_bytes(), 0o600)?;
        for p in [&ssh, &file] {
            chown_to(p)?;
        }
    }
    Ok(())
}

/// `path` with symlinks whose targets are absolute re-rooted under `root` (so /home → /var/home lands in root).
fn resolve_in(root: &Path, path: &Path) -> PathBuf {
    let Ok(rel) = path.strip_prefix(root) else { return path.to_owned() };
    let mut out = root.to_owned();
    for c in rel.components() {
        out.push(c);
        if let Ok(target) = std::fs::read_link(&out) {
            out.pop();
            if target.is_absolute() {
                out = root.join(target.strip_prefix("/").unwrap_or(&target));
            } else {
                out.push(target);
            }
        }
    }
    out
}

/// The `[Install]` section of a unit file: its `WantedBy`/`RequiredBy` entries as `TARGET.wants|requires`, and the
/// units `Also=` enables with it.
fn install_dirs(contents: &str) -> (Vec<String>, Vec<String>) {
    let mut section = "";
    let mut out = Vec::new();
    let mut also = Vec::new();
    for line in contents.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section != "[Install]" {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let suffix = match k.trim() {
                "WantedBy" => "wants",
                "RequiredBy" => "requires",
                "Also" => {
                    also.extend(v.split_whitespace().map(str::to_owned));
                    continue;
                }
                _ => continue,
            };
            out.extend(v.split_whitespace().map(|t| format!("{t}.{suffix}")));
        }
    }
    (out, also)
}

fn apply_unit(root: &Path, unit: &Value) -> Result<(), ApplyError> {
    let name = unit["name"].as_str().ok_or_else(|| invalid("a unit without a name"))?;
    if name.contains('/') || !name.contains('.') {
        return Err(invalid(format!("unit name {name:?}: give a file name such as web.service")));
    }
    let etc = root.join("etc/systemd/system");
    let path = etc.join(name);
    if unit["mask"].as_bool() == Some(true) {
        let _ = std::fs::remove_file(&path);
        std::fs::create_dir_all(&etc).map_err(SysError::with(etc.display().to_string()))?;
        std::os::unix::fs::symlink("/dev/null", &path).map_err(SysError::with(format!("masking {name}")))?;
        return Ok(());
    }
    if let Some(contents) = unit["contents"].as_str() {
        write_file(&path, contents.as_bytes(), 0o644)?;
    }
    let empty = Vec::new();
    for d in unit["dropins"].as_array().unwrap_or(&empty) {
        let dname = d["name"].as_str().ok_or_else(|| invalid("a drop-in without a name"))?;
        let text = d["contents"].as_str().unwrap_or_default();
        write_file(&etc.join(format!("{name}.d")).join(dname), text.as_bytes(), 0o644)?;
    }
    if let Some(enabled) = unit["enabled"].as_bool() {
        set_enabled(root, name, enabled, 0)?;
    }
    Ok(())
}

/// Enables or disables `name` as `systemctl enable` would: links in the `[Install]` targets' directories, and the
/// same for its `Also=` units.
fn set_enabled(root: &Path, name: &str, enabled: bool, depth: u8) -> Result<(), ApplyError> {
    let etc = root.join("etc/systemd/system");
    // The unit's file: the config's, or the image's (/etc first, then /usr/lib), as systemctl looks for it.
    let found =
        [etc.join(name), root.join("usr/lib/systemd/system").join(name), root.join("lib/systemd/system").join(name)]
            .into_iter()
            .find(|p| p.exists())
            .ok_or_else(|| invalid(format!("{name} is enabled but no unit file exists for it")))?;
    let text = std::fs::read_to_string(&found).map_err(SysError::with(found.display().to_string()))?;
    let (dirs, also) = install_dirs(&text);
    if enabled && dirs.is_empty() && also.is_empty() {
        return Err(invalid(format!("{name} is enabled but has no [Install] section")));
    }
    let target = Path::new("/").join(found.strip_prefix(root).unwrap_or(&found));
    for dir in dirs {
        let link = etc.join(&dir).join(name);
        let _ = std::fs::remove_file(&link);
        if enabled {
            std::fs::create_dir_all(etc.join(&dir)).map_err(SysError::with(etc.join(&dir).display().to_string()))?;
            std::os::unix::fs::symlink(&target, &link).map_err(SysError::with(format!("enabling {name}")))?;
        }
    }
    if depth < 4 {
        for other in also {
            set_enabled(root, &other, enabled, depth + 1)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn root() -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("herd-ign-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::create_dir_all(dir.join("var/home")).unwrap();
        std::os::unix::fs::symlink("var/home", dir.join("home")).unwrap();
        std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        std::fs::write(dir.join("etc/group"), "root:x:0:\nsudo:x:27:\n").unwrap();
        std::fs::write(dir.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        let units = dir.join("usr/lib/systemd/system");
        std::fs::create_dir_all(&units).unwrap();
        std::fs::write(
            units.join("etcd.service"),
            "[Service]\nExecStart=/usr/bin/etcd\n[Install]\nWantedBy=multi-user.target\n",
        )
        .unwrap();
        std::fs::write(
            units.join("systemd-networkd.service"),
            "[Service]\nExecStart=/x\n[Install]\nWantedBy=multi-user.target\nAlso=systemd-networkd-wait-online.service\n",
        )
        .unwrap();
        std::fs::write(
            units.join("systemd-networkd-wait-online.service"),
            "[Service]\nExecStart=/y\n[Install]\nWantedBy=network-online.target\n",
        )
        .unwrap();
        dir
    }

    fn config() -> Value {
        serde_json::json!({
            "ignition": {"version": "3.3.0"},
            "storage": {
                "files": [
                    {"path": "/etc/hostname", "mode": 420, "overwrite": true, "contents": {"source": "data:,node1%0A"}},
                    {"path": "/etc/herd/b64", "contents": {"source": "data:;base64,aGVsbG8=",
                      "verification": {"hash": "sha256-2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}}}
                ],
                "directories": [{"path": "/var/lib/app", "mode": 448}],
                "links": [{"path": "/etc/localtime", "target": "/usr/share/zoneinfo/UTC"}]
            },
            "passwd": {"users": [{"name": "herd", "groups": ["sudo"], "sshAuthorizedKeys": ["ssh-ed25519 AAAA admin@dc1"]}]},
            "systemd": {"units": [
                {"name": "etcd.service", "enabled": true},
                {"name": "systemd-networkd.service", "enabled": true},
                {"name": "hello.service", "enabled": true, "contents": "[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\n",
                 "dropins": [{"name": "10-env.conf", "contents": "[Service]\nEnvironment=A=1\n"}]},
                {"name": "apt-daily.timer", "mask": true}
            ]}
        })
    }

    #[test]
    fn a_config_applies_and_applies_again_identically() {
        let r = root();
        let done = apply(&config(), &r).unwrap();
        assert_eq!(done, Applied { files: 2, directories: 1, links: 1, users: 1, units: 4 });
        let online = r.join("etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service");
        assert!(online.is_symlink(), "Also= units are enabled with the unit");
        assert_eq!(std::fs::read_to_string(r.join("etc/hostname")).unwrap(), "node1\n");
        assert_eq!(std::fs::read_to_string(r.join("etc/herd/b64")).unwrap(), "hello");
        assert_eq!(std::fs::metadata(r.join("var/lib/app")).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_link(r.join("etc/localtime")).unwrap(), Path::new("/usr/share/zoneinfo/UTC"));
        let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
        assert!(passwd.contains("herd:x:1000:1000::/home/herd:/bin/bash"), "{passwd}");
        let group = std::fs::read_to_string(r.join("etc/group")).unwrap();
        assert!(group.contains("sudo:x:27:herd") && group.contains("herd:x:1000:"), "{group}");
        let keys = r.join("var/home/herd/.ssh/authorized_keys");
        assert_eq!(std::fs::read_to_string(&keys).unwrap(), "ssh-ed25519 AAAA admin@dc1\n");
        assert_eq!(std::fs::metadata(&keys).unwrap().permissions().mode() & 0o777, 0o600);
        let wants = r.join("etc/systemd/system/multi-user.target.wants");
        assert_eq!(
            std::fs::read_link(wants.join("etcd.service")).unwrap(),
            Path::new("/usr/lib/systemd/system/etcd.service")
        );
        assert_eq!(
            std::fs::read_link(wants.join("hello.service")).unwrap(),
            Path::new("/etc/systemd/system/hello.service")
        );
        assert!(r.join("etc/systemd/system/hello.service.d/10-env.conf").exists());
        assert_eq!(std::fs::read_link(r.join("etc/systemd/system/apt-daily.timer")).unwrap(), Path::new("/dev/null"));

        // Every boot applies it again: nothing changes, no user is added twice.
        apply(&config(), &r).unwrap();
        assert_eq!(std::fs::read_to_string(r.join("etc/passwd")).unwrap(), passwd);
        assert_eq!(std::fs::read_to_string(r.join("etc/group")).unwrap(), group);
        std::fs::remove_dir_all(&r).unwrap();
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let r = root();
        let mut c = config();
        c["storage"]["files"][1]["contents"]["verification"]["hash"] = "sha256-00".into();
        assert!(crate::error::chain(&apply(&c, &r).unwrap_err()).contains("the config says 00"));
        let mut c = config();
        c["storage"]["files"][0]["path"] = "/etc/../../escape".into();
        assert!(crate::error::chain(&apply(&c, &r).unwrap_err()).contains("must not contain .."));
        let c = serde_json::json!({"ignition": {"version": "2.2.0"}});
        assert!(crate::error::chain(&apply(&c, &r).unwrap_err()).contains("spec 3.x"));
        let c = serde_json::json!({"ignition": {"version": "3.3.0"}, "systemd": {"units": [{"name": "nothing.service", "enabled": true}]}});
        assert!(crate::error::chain(&apply(&c, &r).unwrap_err()).contains("no unit file"));
        std::fs::remove_dir_all(&r).unwrap();
    }
}
