//! A shared in-memory cache of served files (TFTP NBPs, HTTP boot assets): one copy for every client, checked
//! against size and mtime on each use, emptied when it would exceed its budget. Served bytes are `Bytes`, so a
//! response or a transfer slices them without copying.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::Bytes;

/// Total bytes the cache holds before it is emptied.
const CACHE_BYTES: usize = 192 << 20;

/// A cached file: its size and mtime when read, and its bytes.
type Cached = (u64, SystemTime, Bytes);

/// The cache.
#[derive(Debug, Default)]
pub struct FileCache {
    files: Mutex<HashMap<PathBuf, Cached>>,
    /// Held while a file is read from disk, so a boot storm asking for the same kernel at once reads it once.
    loading: tokio::sync::Mutex<()>,
}

impl FileCache {
    /// The bytes of `path`, or None if it is larger than `max` (the caller streams it instead).
    pub async fn get(&self, path: &Path, max: usize) -> io::Result<Option<Bytes>> {
        let meta = tokio::fs::metadata(path).await?;
        if meta.len() > max as u64 {
            return Ok(None);
        }
        let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some(data) = self.cached(path, meta.len(), mtime) {
            return Ok(Some(data));
        }
        let _loading = self.loading.lock().await;
        // Someone may have loaded it while we waited.
        if let Some(data) = self.cached(path, meta.len(), mtime) {
            return Ok(Some(data));
        }
        let data = Bytes::from(tokio::fs::read(path).await?);
        if let Ok(mut files) = self.files.lock() {
            let total: usize = files.values().map(|(_, _, d)| d.len()).sum();
            if total + data.len() > CACHE_BYTES {
                files.clear();
            }
            files.insert(path.to_owned(), (meta.len(), mtime, data.clone()));
        }
        Ok(Some(data))
    }

    fn cached(&self, path: &Path, len: u64, mtime: SystemTime) -> Option<Bytes> {
        let files = self.files.lock().ok()?;
        let (l, t, data) = files.get(path)?;
        (*l == len && *t == mtime).then(|| data.clone())
    }
}
