//! The `file` protocol: a node over a host file or block device.
//!
//! Data moves with `pread`/`pwrite` through an engine (`aio=threads`: a worker pool,
//! `aio=io_uring`/`native`: a shared io_uring). Buffered reads and writes first try the
//! call inline with `RWF_NOWAIT`, which succeeds whenever the page cache can serve it
//! without blocking, and only go to the engine when it cannot. With O_DIRECT, requests that
//! are not aligned to the probed block size go through aligned bounce buffers
//! ([`direct`]). Vectored requests go down whole as `preadv`/`pwritev` ([`vectored`]).
//! Zero writes and discards punch holes where the file system allows.
//! Image locking follows QEMU's lock-byte protocol ([`lock`]).

mod direct;
mod engine;
mod lock;
mod threads;
mod uring;
mod vectored;

use std::any::Any;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::info::FormatInfo;
use crate::node::{Alignment, BlockDriver, BlockStatus, HostMapping, Prealloc, WriteFlags};
use crate::options::{AioMode, CacheMode};
use crate::perm::PermRequest;

use crate::iov::{IoBuf, IoBufMut};
use engine::{Engine, IoFuture, Op};
use vectored::IoVecs;

/// How to open a file node.
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Path of the file.
    pub filename: String,
    /// Open for reading only.
    pub read_only: bool,
    /// Cache mode (only `direct` matters at this level; flushes are filtered above).
    pub cache: CacheMode,
    /// Submission engine.
    pub aio: AioMode,
    /// Take QEMU-compatible lock bytes.
    pub locking: bool,
    /// Create the file if it does not exist (used by image creation).
    pub create: bool,
    /// The protocol driver asked for by name (`file`, `host_device`, `host_cdrom`);
    /// `None` for a plain filename, which takes the one that fits the file.
    pub driver: Option<String>,
}

enum EngineKind {
    Threads(Arc<threads::ThreadPool>),
    Uring(Arc<uring::Uring>),
}

impl EngineKind {
    /// Submits to the engine the node uses.
    ///
    /// # Safety
    ///
    /// As [`Engine::submit`].
    unsafe fn submit(&self, fd: RawFd, op: Op) -> IoFuture {
        // SAFETY: the caller keeps Engine::submit's contract.
        unsafe {
            match self {
                EngineKind::Threads(p) => p.submit(fd, op),
                EngineKind::Uring(u) => u.submit(fd, op),
            }
        }
    }
}

/// A node over a host file.
pub struct FileNode {
    file: File,
    filename: String,
    read_only: bool,
    direct: bool,
    align: Alignment,
    engine: EngineKind,
    len: AtomicU64,
    is_block_device: bool,
    locking: bool,
    locked: Mutex<bool>,
    nowait_writes: AtomicBool,
    zero_range: AtomicBool,
    punch_hole: AtomicBool,
    /// O_DIRECT read-modify-write cycles exclude overlapping writes (see [`direct`]).
    rmw: tokio::sync::RwLock<()>,
    /// The last data extent `SEEK_DATA`/`SEEK_HOLE` found, as QEMU's block-status cache
    /// keeps it: status queries inside it need no system call. Writes overlapping it
    /// forget it.
    data_extent: std::sync::Mutex<Option<(u64, u64)>>,
    /// Changes made since open, and how many of them the last flush covered: a flush
    /// with nothing changed since the one before does nothing, as in QEMU.
    write_gen: AtomicU64,
    flushed_gen: AtomicU64,
}

impl FileNode {
    /// Opens a host file.
    pub fn open(opts: &FileOptions) -> Result<FileNode> {
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true)
            .write(!opts.read_only)
            .create(opts.create && !opts.read_only);
        let mut flags = libc::O_CLOEXEC;
        if opts.cache.direct {
            flags |= libc::O_DIRECT;
        }
        oo.custom_flags(flags);
        let context = || format!("Could not open '{}'", opts.filename);
        let file = oo
            .open(&opts.filename)
            .map_err(|e| Error::io(context(), &e))?;
        let meta = file.metadata().map_err(|e| Error::io(context(), &e))?;
        let ft = meta.file_type();
        let device = ft.is_block_device() || ft.is_char_device();
        // A plain filename names a device (host_device) or else a regular file (file);
        // a driver asked for by name requires its kind of file.
        let driver = opts
            .driver
            .clone()
            .unwrap_or_else(|| if device { "host_device" } else { "file" }.to_string());
        if driver == "file" && !ft.is_file() {
            return Err(Error::invalid(format!(
                "'file' driver requires '{}' to be a regular file",
                opts.filename
            )));
        }
        if driver != "file" && !device {
            return Err(Error::invalid(format!(
                "'{driver}' driver requires '{}' to be either a character or block device",
                opts.filename
            )));
        }
        let is_block_device = ft.is_block_device();
        let len = if is_block_device {
            block_device_size(file.as_raw_fd()).map_err(|e| Error::io(context(), &e))?
        } else {
            meta.len()
        };
        let engine = match opts.aio {
            AioMode::Threads => EngineKind::Threads(threads::ThreadPool::global().clone()),
            AioMode::IoUring | AioMode::Native => match uring::Uring::global() {
                Ok(u) => EngineKind::Uring(u.clone()),
                Err(errno) => {
                    return Err(Error::Os {
                        context: Some(
                            "Unable to use io_uring: failed to init linux io_uring ring".into(),
                        ),
                        errno,
                    })
                }
            },
        };
        let align = if opts.cache.direct {
            direct::probe_alignment(file.as_raw_fd())
        } else {
            Alignment::BYTE
        };
        Ok(FileNode {
            file,
            filename: opts.filename.clone(),
            read_only: opts.read_only,
            direct: opts.cache.direct,
            align,
            engine,
            len: AtomicU64::new(len),
            is_block_device,
            locking: opts.locking,
            locked: Mutex::new(false),
            nowait_writes: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
            punch_hole: AtomicBool::new(true),
            rmw: tokio::sync::RwLock::new(()),
            data_extent: std::sync::Mutex::new(None),
            write_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
        })
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Takes (or changes) QEMU-compatible lock bytes for the given permissions.
    pub fn set_perm(&self, req: PermRequest) -> Result<()> {
        if !self.locking {
            return Ok(());
        }
        lock::apply(self.fd(), req, &self.filename)?;
        *self.locked.lock().unwrap_or_else(|p| p.into_inner()) = true;
        Ok(())
    }

    /// The end of the cached data extent containing `offset`, if any.
    fn cached_data_end(&self, offset: u64) -> Option<u64> {
        let c = *self.data_extent.lock().unwrap_or_else(|p| p.into_inner());
        c.filter(|&(start, end)| (start..end).contains(&offset))
            .map(|(_, end)| end)
    }

    /// Notes a change to `[offset, offset + len)` about to be made: the cached data
    /// extent is forgotten where it overlaps, and the returned guard, dropped when the
    /// change is done (or abandoned), gives the next flush something to do.
    #[must_use]
    fn note_change(&self, offset: u64, len: u64) -> ChangeGuard<'_> {
        self.forget_data_extent(offset, len);
        ChangeGuard(&self.write_gen)
    }

    /// Forgets the cached data extent if `[offset, offset + len)` overlaps it.
    fn forget_data_extent(&self, offset: u64, len: u64) {
        let mut c = self.data_extent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((start, end)) = *c {
            if offset < end && offset.saturating_add(len) > start {
                *c = None;
            }
        }
    }

    fn note_end(&self, end: u64) {
        self.len.fetch_max(end, Ordering::AcqRel);
    }

    /// Reads at an offset the caller has made suitable for the file's alignment.
    ///
    /// Large buffered requests are split in two and handed to the engine at once, so
    /// that the copy between page cache and memory (most of their cost) runs on two
    /// cores; small ones first try the inline `RWF_NOWAIT` path.
    async fn pread_full(&self, offset: u64, buf: IoBufMut<'_>) -> Result<()> {
        if !self.direct && buf.len() >= SPLIT_BYTES {
            let half = (buf.len() / 2).next_multiple_of(SPLIT_ALIGN);
            let (a, b) = (buf.range(0, half), buf.range(half, buf.len() - half));
            let (ra, rb) = futures::join!(
                self.pread_part(offset, a, false),
                self.pread_part(offset + half as u64, b, false)
            );
            return ra.and(rb);
        }
        self.pread_part(offset, buf, !self.direct).await
    }

    async fn pread_part(&self, offset: u64, buf: IoBufMut<'_>, inline: bool) -> Result<()> {
        let iov = IoVecs::reading_one(buf);
        let done = self.transfer(offset, iov, inline).await?;
        // Past the end of the file: reads as zeroes, as QEMU pads short reads.
        buf.range(done, buf.len() - done).fill(0);
        Ok(())
    }

    /// Writes at an offset the caller has made suitable for the file's alignment. (Not
    /// split like reads: buffered writes to one file serialise on its inode lock.)
    async fn pwrite_full(&self, offset: u64, buf: IoBuf<'_>) -> Result<()> {
        let inline = !self.direct && self.nowait_writes.load(Ordering::Relaxed);
        self.pwrite_part(offset, buf, inline).await?;
        self.note_end(offset + buf.len() as u64);
        Ok(())
    }

    async fn pwrite_part(&self, offset: u64, buf: IoBuf<'_>, inline: bool) -> Result<()> {
        let iov = IoVecs::writing_one(buf);
        self.transfer(offset, iov, inline).await?;
        Ok(())
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<()> {
        // SAFETY: fallocate carries no pointers.
        let r = unsafe {
            self.engine
                .submit(self.fd(), Op::Fallocate { mode, offset, len })
        }
        .await;
        if r < 0 {
            return Err(Error::errno(-r as i32));
        }
        Ok(())
    }

    async fn write_zero_buffers(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = crate::buffer::AlignedBuf::io(CHUNK.min(len) as usize);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(CHUNK) as usize;
            self.write(pos, &zeroes[..n], WriteFlags::NONE).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Reads one buffer (no iovec array to allocate).
    async fn read_one(&self, offset: u64, buf: IoBufMut<'_>) -> Result<()> {
        if self.direct && !self.is_aligned(offset, buf.len(), buf.as_mut_ptr() as usize) {
            return direct::read_unaligned(self, offset, buf).await;
        }
        self.pread_full(offset, buf).await
    }

    /// Writes one buffer (no iovec array to allocate).
    async fn write_one(&self, offset: u64, buf: IoBuf<'_>, flags: WriteFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EBADF));
        }
        let _change = self.note_change(offset, buf.len() as u64);
        if self.direct {
            if !self.is_aligned(offset, buf.len(), buf.as_ptr() as usize) {
                direct::write_unaligned(self, offset, buf).await?;
            } else {
                let _shared = self.rmw.read().await;
                self.pwrite_full(offset, buf).await?;
            }
        } else {
            self.pwrite_full(offset, buf).await?;
        }
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    fn is_aligned(&self, offset: u64, len: usize, addr: usize) -> bool {
        let a = self.align.request as u64;
        offset.is_multiple_of(a)
            && (len as u64).is_multiple_of(a)
            && addr.is_multiple_of(self.align.memory as usize)
    }

    fn seek(&self, offset: u64, whence: i32) -> std::result::Result<u64, i32> {
        seek(self.fd(), offset, whence)
    }
}

/// `lseek` on `fd` (`SEEK_DATA`, `SEEK_HOLE`, ...): the new position, or the errno
/// (`ENXIO`: no data, or no hole, from `offset` on).
pub fn seek(fd: RawFd, offset: u64, whence: i32) -> std::result::Result<u64, i32> {
    // SAFETY: lseek on a descriptor has no memory-safety requirements.
    let r = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    if r < 0 {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(r as u64)
    }
}

/// Counts a change to the file when the request making it ends (QEMU counts writes as
/// they finish, so that a flush running meanwhile does not claim to cover them).
struct ChangeGuard<'a>(&'a AtomicU64);

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Buffered reads at least this large are split across two engine workers.
const SPLIT_BYTES: usize = 1 << 20;
/// Where split requests are cut (page-aligned, and cluster-aligned for common sizes).
const SPLIT_ALIGN: usize = 64 << 10;

fn block_device_size(fd: RawFd) -> std::io::Result<u64> {
    let mut size: u64 = 0;
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    let r = unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

impl FileNode {
    /// Writes zeroes over the first block of a file that just grew from empty, as QEMU
    /// does so that later alignment probing finds allocated blocks: 4 KiB, or one sector
    /// when the file is smaller than that (which then extends it). Failures are ignored.
    fn allocate_first_block(&self, size: u64) {
        let len = if size < 4096 { 512 } else { 4096 };
        let buf = crate::buffer::AlignedBuf::io(len);
        // SAFETY: pwrite from a live buffer of `len` bytes on an open descriptor.
        let n = unsafe { libc::pwrite(self.fd(), buf.as_ptr().cast(), len, 0) };
        if n > 0 && n as u64 > size {
            self.len.store(n as u64, Ordering::Release);
        }
    }
}

#[async_trait]
impl BlockDriver for FileNode {
    fn host_fd(&self) -> Option<(RawFd, u64)> {
        // Whoever holds the descriptor may write through it: flushes must not be skipped.
        self.write_gen.fetch_add(1, Ordering::AcqRel);
        (!self.is_block_device && !self.direct).then(|| (self.fd(), 0))
    }

    fn has_zero_init(&self) -> bool {
        // A regular file grows with zeroes; a device keeps what it held.
        !self.is_block_device
    }

    fn driver_name(&self) -> &'static str {
        if self.is_block_device {
            "host_device"
        } else {
            "file"
        }
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn size(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn alignment(&self) -> Alignment {
        self.align
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_one(offset, IoBufMut::new(buf)).await
    }

    async fn readv(&self, offset: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        match bufs {
            [] => Ok(()),
            [one] => self.read_one(offset, *one).await,
            _ => self.readv_impl(offset, bufs).await,
        }
    }

    async fn writev(&self, offset: u64, bufs: &[IoBuf<'_>], flags: WriteFlags) -> Result<()> {
        match bufs {
            [] => Ok(()),
            [one] => self.write_one(offset, *one, flags).await,
            _ => self.writev_impl(offset, bufs, flags).await,
        }
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.write_one(offset, IoBuf::new(buf), flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EBADF));
        }
        let _change = self.note_change(offset, len);
        let end = offset + len;
        let aligned = self.is_aligned(offset, len as usize, 0);
        let mut done = false;
        if aligned && !self.is_block_device {
            let size = self.size();
            if offset >= size && self.fallocate(0, offset, 0).await.is_ok() {
                // Entirely past the end: growing the file is enough.
                // SAFETY: ftruncate on an open descriptor.
                let r = unsafe { libc::ftruncate(self.fd(), end as libc::off_t) };
                done = r == 0;
            }
            if !done && flags.may_unmap && self.punch_hole.load(Ordering::Relaxed) {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                match self.fallocate(mode, offset, len).await {
                    Ok(()) => {
                        if end > size {
                            // SAFETY: ftruncate on an open descriptor.
                            let r = unsafe { libc::ftruncate(self.fd(), end as libc::off_t) };
                            done = r == 0;
                        } else {
                            done = true;
                        }
                    }
                    Err(e) if e.errno_value() == libc::EOPNOTSUPP => {
                        self.punch_hole.store(false, Ordering::Relaxed)
                    }
                    Err(_) => {}
                }
            }
            if !done && self.zero_range.load(Ordering::Relaxed) {
                match self
                    .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
                    .await
                {
                    Ok(()) => done = true,
                    Err(e) if e.errno_value() == libc::EOPNOTSUPP => {
                        self.zero_range.store(false, Ordering::Relaxed)
                    }
                    Err(_) => {}
                }
            }
            if !done && self.punch_hole.load(Ordering::Relaxed) {
                // Punch and reallocate: zeroes without writing them.
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                if self.fallocate(mode, offset, len).await.is_ok() {
                    done = self.fallocate(0, offset, len).await.is_ok();
                }
            }
        }
        if done {
            self.note_end(end);
            if flags.fua {
                self.flush().await?;
            }
            return Ok(());
        }
        if flags.no_fallback {
            return Err(Error::errno(libc::ENOTSUP));
        }
        self.write_zero_buffers(offset, len).await?;
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EBADF));
        }
        let _change = self.note_change(offset, len);
        if self.is_block_device || !self.punch_hole.load(Ordering::Relaxed) {
            return Ok(());
        }
        let size = self.size();
        if offset >= size {
            return Ok(());
        }
        let len = len.min(size - offset);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len).await {
            Err(e) if e.errno_value() == libc::EOPNOTSUPP => {
                self.punch_hole.store(false, Ordering::Relaxed);
                Ok(())
            }
            other => other,
        }
    }

    async fn flush(&self) -> Result<()> {
        let gen = self.write_gen.load(Ordering::Acquire);
        if self.read_only || self.flushed_gen.load(Ordering::Acquire) == gen {
            return Ok(());
        }
        // SAFETY: fdatasync carries no pointers.
        let r = unsafe { self.engine.submit(self.fd(), Op::Fdatasync) }.await;
        if r < 0 {
            return Err(Error::errno(-r as i32));
        }
        self.flushed_gen.fetch_max(gen, Ordering::AcqRel);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let size = self.size();
        let mut st = BlockStatus {
            len,
            data: true,
            allocated: true,
            host: Some(HostMapping { node: None, offset }),
            ..Default::default()
        };
        if offset >= size {
            st.data = false;
            st.zero = true;
            return Ok(st);
        }
        if self.is_block_device {
            return Ok(st);
        }
        if let Some(end) = self.cached_data_end(offset) {
            st.len = len.min(end - offset);
            return Ok(st);
        }
        match self.seek(offset, libc::SEEK_DATA) {
            Err(libc::ENXIO) => {
                // Only a hole up to the end of the file.
                st.data = false;
                st.zero = true;
                st.len = len;
            }
            Err(_) => {}
            Ok(data) if data > offset => {
                st.data = false;
                st.zero = true;
                st.len = len.min(data - offset);
            }
            Ok(_) => {
                let hole = self.seek(offset, libc::SEEK_HOLE).unwrap_or(size);
                st.len = len.min(hole.saturating_sub(offset).max(1));
                if hole > offset && self.align.request == 1 {
                    *self.data_extent.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((offset, hole));
                }
            }
        }
        // Report in units of the request alignment.
        let a = self.align.request as u64;
        if a > 1 && st.len < len {
            let end = (offset + st.len).div_ceil(a) * a;
            st.len = (end - offset).min(len);
            if !st.zero {
                st.data = true;
            }
        }
        Ok(st)
    }

    async fn truncate(&self, size: u64, _exact: bool, prealloc: Prealloc) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EBADF));
        }
        let _change = self.note_change(0, u64::MAX);
        let cur = self.size();
        if self.is_block_device {
            if size > cur {
                return Err(Error::other("Cannot grow device files", libc::EINVAL));
            }
            return Ok(());
        }
        if prealloc == Prealloc::Metadata {
            return Err(Error::other(
                "Unsupported preallocation mode: metadata",
                libc::ENOTSUP,
            ));
        }
        if size < cur && prealloc != Prealloc::Off {
            return Err(Error::unsupported(
                "Cannot use preallocation for shrinking files",
            ));
        }
        // SAFETY: ftruncate on an open descriptor.
        let r = unsafe { libc::ftruncate(self.fd(), size as libc::off_t) };
        if r < 0 {
            return Err(Error::io(
                "Failed to resize the file",
                &std::io::Error::last_os_error(),
            ));
        }
        self.len.store(size, Ordering::Release);
        if size > cur {
            match prealloc {
                Prealloc::Off | Prealloc::Metadata => {}
                Prealloc::Falloc => {
                    self.fallocate(0, cur, size - cur).await.map_err(|e| {
                        Error::other(
                            format!("Could not preallocate new data: {e}"),
                            e.errno_value(),
                        )
                    })?;
                }
                Prealloc::Full => {
                    self.write_zero_buffers(cur, size - cur).await?;
                }
            }
            if cur == 0 && matches!(prealloc, Prealloc::Off | Prealloc::Falloc) {
                self.allocate_first_block(size);
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        if *locked {
            lock::release(self.fd());
            *locked = false;
        }
        Ok(())
    }

    async fn allocated_size(&self) -> Option<u64> {
        self.file.metadata().ok().map(|m| m.blocks() * 512)
    }

    async fn format_info(&self) -> Result<FormatInfo> {
        Ok(FormatInfo {
            type_name: Some("file"),
            data: Default::default(),
        })
    }
}
