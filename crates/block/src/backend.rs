//! [`BlockBackend`]: the handle a user of the block layer holds (a tool, a guest device,
//! an NBD export). It owns the root node and applies what QEMU applies at that level:
//! request bounds, read-only refusal, write-through (FUA on every write when the cache
//! mode gives no write cache), discard policy and zero detection.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::iov::{IoBuf, IoBufMut};
use crate::node::{BlockStatus, NodeRef, Prealloc, WriteFlags};
use crate::options::{CacheMode, DetectZeroes, DiscardMode};

/// A user's handle on an opened image.
#[derive(Clone)]
pub struct BlockBackend {
    root: NodeRef,
    state: Arc<BackendState>,
}

struct BackendState {
    read_only: bool,
    cache: CacheMode,
    discard: DiscardMode,
    detect_zeroes: DetectZeroes,
    /// Nodes to remove when the backend closes (temporary `-snapshot` overlays).
    temp_files: Vec<std::path::PathBuf>,
}

/// Largest request QEMU's block layer accepts in one call.
pub const MAX_REQUEST_BYTES: u64 = i32::MAX as u64 & !511;

impl BlockBackend {
    /// Wraps an opened root node.
    pub fn new(
        root: NodeRef,
        read_only: bool,
        cache: CacheMode,
        discard: DiscardMode,
        detect_zeroes: DetectZeroes,
    ) -> Self {
        BlockBackend {
            root,
            state: Arc::new(BackendState {
                read_only,
                cache,
                discard,
                detect_zeroes,
                temp_files: Vec::new(),
            }),
        }
    }

    /// Registers files to delete once the last clone of this backend is dropped.
    pub fn with_temp_files(mut self, files: Vec<std::path::PathBuf>) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.temp_files = files;
        }
        self
    }

    /// Opens an image as `opts` describes.
    pub async fn open(opts: &crate::options::OpenOptions) -> Result<BlockBackend> {
        crate::open::open_backend(opts).await
    }

    /// The root node.
    pub fn root(&self) -> &NodeRef {
        &self.root
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.root.size()
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.state.read_only
    }

    /// The cache mode the image was opened with.
    pub fn cache_mode(&self) -> CacheMode {
        self.state.cache
    }

    /// Whether the guest should see a volatile write cache (virtio-blk's WCE flag).
    pub fn write_cache_enabled(&self) -> bool {
        self.state.cache.writeback
    }

    fn check_request(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or(Error::errno(libc::EIO))?;
        if end > self.size() || end > i64::MAX as u64 {
            return Err(Error::errno(libc::EIO));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.state.read_only {
            return Err(Error::Permission {
                msg: crate::error::strerror(libc::EPERM),
                errno: libc::EPERM,
            });
        }
        Ok(())
    }

    fn write_flags(&self, mut flags: WriteFlags) -> WriteFlags {
        if !self.state.cache.writeback {
            flags.fua = true;
        }
        flags
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_request(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.root.read(offset, buf).await
    }

    /// Writes `buf` at `offset`; `fua` makes it durable before completion.
    pub async fn write(&self, offset: u64, buf: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_request(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut flags = self.write_flags(WriteFlags {
            fua,
            ..WriteFlags::NONE
        });
        if self.state.detect_zeroes != DetectZeroes::Off && is_zero(buf) {
            flags.may_unmap = self.state.detect_zeroes == DetectZeroes::Unmap
                && self.state.discard == DiscardMode::Unmap;
            return self
                .root
                .write_zeroes(offset, buf.len() as u64, flags)
                .await;
        }
        self.root.write(offset, buf, flags).await
    }

    /// Reads into the raw buffers of `bufs` in turn, as one request at `offset` (see
    /// [`crate::iov`] for the buffers' contract).
    pub async fn readv(&self, offset: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        let len = crate::iov::len(bufs) as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.root.readv(offset, bufs).await
    }

    /// Writes the raw buffers of `bufs` in turn, as one request at `offset`; `fua` makes
    /// it durable before completion. Zero detection looks at private copies of the data.
    pub async fn writev(&self, offset: u64, bufs: &[IoBuf<'_>], fua: bool) -> Result<()> {
        self.check_writable()?;
        let len = crate::iov::len(bufs) as u64;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut flags = self.write_flags(WriteFlags {
            fua,
            ..WriteFlags::NONE
        });
        if self.state.detect_zeroes != DetectZeroes::Off && crate::iov::is_zero(bufs) {
            flags.may_unmap = self.state.detect_zeroes == DetectZeroes::Unmap
                && self.state.discard == DiscardMode::Unmap;
            return self.root.write_zeroes(offset, len, flags).await;
        }
        self.root.writev(offset, bufs, flags).await
    }

    /// Writes zeroes; `may_unmap` lets the range be deallocated if discard is enabled.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let flags = self.write_flags(WriteFlags {
            may_unmap: may_unmap && self.state.discard == DiscardMode::Unmap,
            ..WriteFlags::NONE
        });
        self.root.write_zeroes(offset, len, flags).await
    }

    /// Like [`Self::write_zeroes`] with explicit flags (qemu-io's `-u`, `-f`, `-n`).
    pub async fn write_zeroes_flags(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.check_writable()?;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.root
            .write_zeroes(offset, len, self.write_flags(flags))
            .await
    }

    /// Writes one cluster compressed.
    pub async fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_request(offset, buf.len() as u64)?;
        self.root.write_compressed(offset, buf).await
    }

    /// The regular host file holding the image's bytes one to one, and where byte 0 is
    /// in it (for copy offloading).
    pub fn host_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        self.root.host_fd()
    }

    /// What compresses clusters for [`Self::write_precompressed`] (formats with
    /// compressed clusters only).
    pub fn compressor(&self) -> Option<crate::format::qcow2::compress::Compressor> {
        self.root.compressor()
    }

    /// Stores one cluster compressed beforehand with [`Self::compressor`].
    pub async fn write_precompressed(
        &self,
        offset: u64,
        buf: &[u8],
        compressed: Option<Vec<u8>>,
    ) -> Result<()> {
        self.check_writable()?;
        self.check_request(offset, buf.len() as u64)?;
        self.root.write_precompressed(offset, buf, compressed).await
    }

    /// Discards a range if the discard policy passes discards down.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_request(offset, len)?;
        if self.state.discard == DiscardMode::Ignore || len == 0 {
            return Ok(());
        }
        self.root.discard(offset, len).await
    }

    /// Discards regardless of the policy (qemu-io's `discard`, qemu-img's own use).
    pub async fn discard_always(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_request(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.root.discard(offset, len).await
    }

    /// Reads saved VM state.
    pub async fn load_vmstate(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        self.root.load_vmstate(pos, buf).await
    }

    /// Writes saved VM state.
    pub async fn save_vmstate(&self, pos: u64, buf: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.root.save_vmstate(pos, buf).await?;
        // Without a write cache the state is made durable at once, as QEMU's
        // BlockBackend does.
        if !self.state.cache.writeback {
            self.flush().await?;
        }
        Ok(())
    }

    /// Makes completed writes durable (a no-op with `cache=unsafe`).
    pub async fn flush(&self) -> Result<()> {
        if self.state.cache.no_flush {
            return Ok(());
        }
        self.root.flush().await
    }

    /// Allocation status at `offset` (see [`crate::status`] for whole-chain queries).
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.root.block_status(offset, len).await
    }

    /// Resizes the image.
    pub async fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()> {
        self.check_writable()?;
        self.root.truncate(size, exact, prealloc).await
    }

    /// Writes back metadata and releases the image.
    pub async fn close(&self) -> Result<()> {
        crate::graph::close_tree(&self.root).await
    }
}

impl Drop for BackendState {
    fn drop(&mut self) {
        for f in &self.temp_files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Whether every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u8 -> u128 reinterpretation of the aligned middle part is valid for any
        // bit pattern; align_to guarantees the middle slice is properly aligned.
        unsafe { buf.align_to::<u128>() }
    };
    prefix.iter().all(|&b| b == 0)
        && words.iter().all(|&w| w == 0)
        && suffix.iter().all(|&b| b == 0)
}
