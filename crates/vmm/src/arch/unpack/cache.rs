//! Unpacked kernels kept for the next boot.
//!
//! Decompressing a distribution kernel's xz payload is most of what happens before the
//! guest runs (half a second of CPU on real hardware, several seconds under emulation).
//! The decompressed stream is therefore kept as a sparse file (pages of zeroes are
//! holes) under `$XDG_CACHE_HOME/rqemu/kernels` (or `~/.cache/rqemu/kernels`;
//! `RQEMU_KERNEL_CACHE` names another directory, or `off`), named after the kernel
//! file's identity: device, inode, size, modification and change times. A later boot of
//! the same file streams the entry instead; an entry of the wrong length is ignored.
//! Entries are written to a temporary name, synced and renamed into place, so readers
//! never see half of one; the newest [`KEEP`] are kept.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rqemu_block::backend::is_zero;

use super::stream::PAGE;

/// Entries kept.
pub const KEEP: usize = 4;
/// Age after which a temporary file is taken for an interrupted writer's.
const STALE: Duration = Duration::from_secs(3600);
const SUFFIX: &str = ".kernel";

/// A cache directory.
pub struct Cache {
    dir: PathBuf,
}

/// An entry being written.
pub struct Entry {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
    dir: PathBuf,
}

/// The name of the entry for a kernel file with this metadata.
pub fn key(meta: &std::fs::Metadata) -> String {
    format!(
        "v1-{:x}-{:x}-{:x}-{}.{:09}-{}.{:09}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

impl Cache {
    /// The user's cache, if there is a place for one.
    pub fn from_env() -> Option<Cache> {
        let dir = match std::env::var_os("RQEMU_KERNEL_CACHE") {
            Some(v) if v.is_empty() || v == "off" => return None,
            Some(v) => PathBuf::from(v),
            None => match std::env::var_os("XDG_CACHE_HOME") {
                Some(x) if !x.is_empty() => PathBuf::from(x).join("rqemu/kernels"),
                _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache/rqemu/kernels"),
            },
        };
        Some(Cache { dir })
    }

    /// A cache in `dir`.
    pub fn at(dir: &Path) -> Cache {
        Cache {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}{SUFFIX}"))
    }

    /// The entry for `key`, if there is one of `total` bytes (marked as just used).
    pub fn lookup(&self, key: &str, total: u64) -> Option<File> {
        let file = File::open(self.path(key)).ok()?;
        if file.metadata().ok()?.len() != total {
            return None;
        }
        let _ = file.set_modified(SystemTime::now());
        Some(file)
    }

    /// A new entry for `key` (none if the directory cannot be written).
    pub fn entry(&self, key: &str) -> Option<Entry> {
        std::fs::create_dir_all(&self.dir).ok()?;
        let tmp = self.dir.join(format!(
            ".{key}.{}.{:x}.tmp",
            std::process::id(),
            super::random()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ok()?;
        Some(Entry {
            file,
            tmp,
            path: self.path(key),
            dir: self.dir.clone(),
        })
    }
}

impl Entry {
    /// Writes `data` at `pos`, leaving pages of zeroes as holes.
    pub fn write(&mut self, pos: u64, data: &[u8]) -> std::io::Result<()> {
        let mut at = 0usize;
        while at < data.len() {
            let off = pos + at as u64;
            let n = (PAGE - (off % PAGE as u64) as usize).min(data.len() - at);
            let piece = &data[at..at + n];
            if !is_zero(piece) {
                self.file.write_all_at(piece, off)?;
            }
            at += n;
        }
        Ok(())
    }

    /// Makes the entry visible (`total` bytes long), then drops the oldest entries
    /// beyond [`KEEP`]. Failures only lose the entry.
    pub fn commit(self, total: u64) {
        let ok = self.file.set_len(total).is_ok()
            && self.file.sync_all().is_ok()
            && std::fs::rename(&self.tmp, &self.path).is_ok();
        if ok {
            prune(&self.dir);
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        // After a commit the temporary name is gone already.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Removes all but the [`KEEP`] most recently used entries, and what an interrupted
/// writer left behind more than an hour ago.
fn prune(dir: &Path) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    let mut entries = Vec::new();
    for e in list.flatten() {
        let Some(modified) = e.metadata().ok().and_then(|m| m.modified().ok()) else {
            continue;
        };
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(SUFFIX) {
            entries.push((modified, e.path()));
        } else if name.ends_with(".tmp")
            && now.duration_since(modified).is_ok_and(|age| age > STALE)
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse(e.0));
    for (_, path) in entries.into_iter().skip(KEEP) {
        let _ = std::fs::remove_file(path);
    }
}
