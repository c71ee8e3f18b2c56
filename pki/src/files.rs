//! The files a PKI lives in: keys readable by their owner only (checked on every read), everything written
//! atomically (temp file, fsync, rename, fsync the directory), so a power cut leaves the old file or the new one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A PKI file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Reading, writing or listing failed.
    #[error("{}: {what}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS's answer.
        #[source]
        source: std::io::Error,
    },
    /// A key someone else may read.
    #[error(
        "{} is readable by others (mode {mode:03o}): a private key must be the owner's alone; run `chmod 600 {}` \
         and consider it leaked if others could log in here",
        path.display(),
        path.display()
    )]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> FileError + 'a {
    move |source| FileError::Io { path: path.to_owned(), what, source }
}

/// Refuses a file that anyone but its owner may read or write.
pub fn check_private(path: &Path) -> Result<(), FileError> {
    let mode = fs::metadata(path).map_err(io(path, "cannot read its permissions"))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(FileError::Exposed { path: path.to_owned(), mode });
    }
    Ok(())
}

/// Writes a secret (mode 0600 from its creation), atomically.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic(path, bytes, 0o600)
}

/// Writes a certificate (mode 0644), atomically.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic(path, bytes, 0o644)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io(&tmp, "cannot create"))?;
    f.write_all(bytes).map_err(io(&tmp, "cannot write"))?;
    f.sync_all().map_err(io(&tmp, "cannot sync"))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path, "cannot rename into place"))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "cannot sync the directory"))
}

/// Creates a directory (and its parents) only its owner may enter.
pub(crate) fn make_dir(dir: &Path) -> Result<(), FileError> {
    fs::create_dir_all(dir).map_err(io(dir, "cannot create the directory"))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir, "cannot restrict the directory"))
}

pub(crate) fn read_string(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(io(path, "cannot read"))
}

/// Removes `paths` (all in `dir`), then makes the removals durable (fsync of `dir`).
pub(crate) fn remove_all(dir: &Path, paths: &[PathBuf]) -> Result<(), FileError> {
    for path in paths {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(path, "cannot remove")(e)),
        }
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "cannot sync the directory"))
}

/// Renames `from` to `to` (both in `dir`) and makes it durable.
pub(crate) fn rename(dir: &Path, from: &Path, to: &Path) -> Result<(), FileError> {
    fs::rename(from, to).map_err(io(to, "cannot rename into place"))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "cannot sync the directory"))
}

/// The `.crt` files in `dir` (none if it does not exist), sorted.
pub(crate) fn list(dir: &Path) -> Result<Vec<PathBuf>, FileError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(dir, "cannot list")(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(dir, "cannot list"))?.path();
        if path.extension().is_some_and(|e| e == "crt") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}
