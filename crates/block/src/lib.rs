//! rqemu's block layer.
//!
//! Images are graphs of nodes ([`node::BlockDriver`]): format nodes (raw, qcow2) over
//! protocol nodes (file), with backing chains. Users hold a [`BlockBackend`] on the root.
//! Every data operation is async; many requests run concurrently on one node.
//!
//! ```text
//!   BlockBackend ── bounds, read-only, write-through, discard policy, zero detection
//!        │
//!   format node (qcow2 | raw) ──backing──▶ format node ── ...
//!        │ file
//!   protocol node (file: threads | io_uring, O_DIRECT bounce, locking)
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod buffer;
pub mod create;
pub mod crypto;
pub mod error;
pub mod filter;
pub mod format;
pub mod graph;
pub mod info;
pub mod iov;
pub mod node;
pub mod open;
pub mod options;
pub mod perm;
pub mod probe;
pub mod protocol;
pub mod status;
pub mod testing;

pub use backend::BlockBackend;
pub use error::{Error, Result};
pub use node::{BlockDriver, BlockStatus, NodeRef, Prealloc, WriteFlags};
pub use options::{AioMode, CacheMode, DetectZeroes, DiscardMode, OpenOptions};

/// Wraps format-specific data as a JSON value (for printers).
pub fn serde_json_value(m: serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    serde_json::Value::Object(m)
}

/// Helpers for the unit tests of this crate.
#[cfg(test)]
pub(crate) mod test_util {
    /// Runs `f` to completion on a fresh single-threaded runtime.
    pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("test runtime")
            .block_on(f)
    }

    /// Anonymous memory no Rust slice covers, as guest memory is: what raw buffer
    /// descriptors are tested over.
    pub struct Mapping {
        ptr: *mut u8,
        len: usize,
    }

    impl Mapping {
        /// `len` bytes (more than zero) of fresh zeroed memory.
        pub fn new(len: usize) -> Mapping {
            // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "mmap");
            Mapping { ptr: p.cast(), len }
        }

        /// A descriptor of the bytes `[start, start + len)`.
        pub fn buf(&self, start: usize, len: usize) -> crate::iov::IoBufMut<'_> {
            assert!(start + len <= self.len);
            // SAFETY: the range lies inside the mapping, which lives as long as the borrow
            // of `self`, and nothing makes a Rust reference to it.
            unsafe { crate::iov::IoBufMut::from_raw(self.ptr.wrapping_add(start), len) }
        }

        /// A copy of the bytes `[start, start + len)`.
        pub fn copy(&self, start: usize, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            self.buf(start, len).readable().copy_to(0, &mut out);
            out
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps the mapping made in `new`; every descriptor of it borrowed
            // `self` and is gone.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    /// Creates the image `path` of `format` with creation options `opts`.
    pub async fn create(path: &str, format: &str, opts: &[(&str, &str)]) {
        let mut o = crate::create::CreateOptions::new(format).expect("format");
        for (k, v) in opts {
            o.set(k, v).expect("creation option");
        }
        crate::create::create(path, &o).await.expect("create");
    }

    /// Opens `path` for writing, with node options in QEMU's `key=value,...` form.
    pub async fn open(path: &str, options: &str) -> crate::BlockBackend {
        crate::BlockBackend::open(&crate::OpenOptions {
            filename: path.to_string(),
            options: if options.is_empty() {
                rqemu_opts::KeyVal::new()
            } else {
                rqemu_opts::KeyVal::parse(options, None).expect("options")
            },
            quiet_probe: true,
            ..Default::default()
        })
        .await
        .expect("open")
    }

    /// Drives raw buffers over [`Mapping`] memory through `b`: vectored writes of
    /// pieces that start and end anywhere (inside clusters, across them), then one
    /// vectored read of the whole disk, both checked against plain reads.
    pub async fn check_raw_path(b: &crate::BlockBackend) {
        use crate::iov::{readable, IoBufMut};
        let size = b.size() as usize;
        let mut model = vec![0u8; size];
        b.read(0, &mut model).await.expect("plain read");
        let writes: &[(usize, &[usize])] = &[
            (0, &[4096, 4096]),
            (65536 - 512, &[512, 1024, 65536 + 7 * 512]),
            (3 * 65536 + 1536, &[3000, 5192, 4096]),
            (size - 65536 - 512, &[65536, 512]),
        ];
        for (n, &(at, lens)) in writes.iter().enumerate() {
            let total: usize = lens.iter().sum();
            let mem = Mapping::new(total);
            let data: Vec<u8> = (0..total).map(|i| (i * 7 + n * 11 + 1) as u8).collect();
            mem.buf(0, total).copy_from(0, &data);
            let mut bufs: Vec<IoBufMut> = Vec::new();
            let mut pos = 0;
            for &l in lens {
                bufs.push(mem.buf(pos, l));
                pos += l;
            }
            b.writev(at as u64, &readable(&bufs), false)
                .await
                .expect("vectored write");
            model[at..at + total].copy_from_slice(&data);
        }
        let mut plain = vec![0u8; size];
        b.read(0, &mut plain).await.expect("plain read");
        assert!(plain == model, "plain read after vectored writes");
        let mem = Mapping::new(size);
        mem.buf(0, size).fill(0xa5);
        let cut = [1000, 65536, 70000, size / 2];
        let mut bufs = Vec::new();
        let mut pos = 0;
        for c in cut {
            bufs.push(mem.buf(pos, c - pos));
            pos = c;
        }
        bufs.push(mem.buf(pos, size - pos));
        b.readv(0, &bufs).await.expect("vectored read");
        assert!(mem.copy(0, size) == model, "vectored read");
    }

    /// A path for a test's file in the temporary directory, removed on drop.
    pub struct TempPath(pub String);

    impl TempPath {
        /// A fresh path named after `tag` and the process.
        pub fn new(tag: &str) -> TempPath {
            let p = std::env::temp_dir().join(format!("rqemu-{tag}-{}", std::process::id()));
            TempPath(p.to_string_lossy().into_owned())
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
