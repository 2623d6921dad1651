//! The `raw` format: the guest sees the file's bytes directly, optionally a window of them
//! (`offset=`, `size=`).
//!
//! A raw image whose format was probed rather than named may not have its first sector
//! rewritten into something that probes as another format (QEMU's guard against a guest
//! turning its disk into, say, a qcow2 header that points at host files).

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::node::{
    BlockDriver, BlockStatus, ChildRole, DebugEvent, HostMapping, IoBuf, IoBufMut, NodeRef,
    Prealloc, WriteFlags,
};

/// Bytes at the start of an image that format probing looks at.
pub const PROBE_BYTES: usize = 512;

/// A raw format node.
pub struct RawNode {
    file: NodeRef,
    offset: u64,
    /// Fixed size if `size=` was given, else follows the file.
    fixed_size: Option<u64>,
    probed: bool,
    size_cache: AtomicU64,
}

impl RawNode {
    /// A raw node over `file`; `probed` enables the sector-0 guard.
    pub fn new(file: NodeRef, offset: u64, size: Option<u64>, probed: bool) -> Result<RawNode> {
        let file_len = file.size();
        if offset > file_len && size.is_none() {
            return Err(Error::invalid("The sum of offset and size of the raw node must not exceed the size of the underlying file"));
        }
        if let Some(s) = size {
            if offset.checked_add(s).is_none_or(|end| end > file_len) && !file.read_only() {
                // QEMU allows a window beyond the end only for growable protocols.
            }
        }
        Ok(RawNode {
            size_cache: AtomicU64::new(size.unwrap_or(file_len.saturating_sub(offset))),
            file,
            offset,
            fixed_size: size,
            probed,
        })
    }

    fn current_size(&self) -> u64 {
        match self.fixed_size {
            Some(s) => s,
            None => {
                let s = self.file.size().saturating_sub(self.offset);
                self.size_cache.store(s, Ordering::Relaxed);
                s
            }
        }
    }

    /// With `size=`, requests must stay inside it: writes past it find no space, reads
    /// are invalid (nothing past the window may leak), as in QEMU.
    fn within_size(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        match self.fixed_size {
            Some(size) if offset > size || len > size - offset => Err(Error::errno(if write {
                libc::ENOSPC
            } else {
                libc::EINVAL
            })),
            _ => Ok(()),
        }
    }

    async fn check_sector0(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if !self.probed || offset >= PROBE_BYTES as u64 {
            return Ok(());
        }
        let mut head = vec![0u8; PROBE_BYTES];
        let avail = self.current_size().min(PROBE_BYTES as u64) as usize;
        self.file.read(self.offset, &mut head[..avail]).await?;
        let start = offset as usize;
        let n = buf.len().min(PROBE_BYTES - start);
        head[start..start + n].copy_from_slice(&buf[..n]);
        let probed = crate::probe::probe_format(&head, "");
        if probed != "raw" {
            return Err(Error::Permission {
                msg: crate::error::strerror(libc::EPERM),
                errno: libc::EPERM,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for RawNode {
    fn driver_name(&self) -> &'static str {
        "raw"
    }

    fn filename(&self) -> String {
        self.file.filename()
    }

    fn size(&self) -> u64 {
        // QEMU's block layer counts whole sectors: the tail of a file whose length is not
        // a multiple of 512 is readable (as zeroes past the end) and writable.
        match self.fixed_size {
            Some(s) => s,
            None => self.current_size().div_ceil(512) * 512,
        }
    }

    fn read_only(&self) -> bool {
        self.file.read_only()
    }

    fn alignment(&self) -> crate::node::Alignment {
        self.file.alignment()
    }

    fn children(&self) -> Vec<(ChildRole, NodeRef)> {
        vec![(ChildRole::File, self.file.clone())]
    }

    fn has_zero_init(&self) -> bool {
        self.file.has_zero_init()
    }

    fn host_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        self.file.host_fd().map(|(fd, at)| (fd, at + self.offset))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.within_size(offset, buf.len() as u64, false)?;
        self.file.debug_event(DebugEvent::ReadAio).await;
        self.file.read(self.offset + offset, buf).await
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.within_size(offset, buf.len() as u64, true)?;
        self.check_sector0(offset, buf).await?;
        self.file.debug_event(DebugEvent::WriteAio).await;
        self.file.write(self.offset + offset, buf, flags).await
    }

    async fn readv(&self, offset: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        self.within_size(offset, crate::iov::len(bufs) as u64, false)?;
        self.file.readv(self.offset + offset, bufs).await
    }

    async fn writev(&self, offset: u64, bufs: &[IoBuf<'_>], flags: WriteFlags) -> Result<()> {
        self.within_size(offset, crate::iov::len(bufs) as u64, true)?;
        if self.probed && offset < PROBE_BYTES as u64 {
            let head = crate::iov::sub(bufs, 0, PROBE_BYTES - offset as usize);
            let mut probe = vec![0u8; crate::iov::len(&head)];
            crate::iov::gather(&head, &mut probe);
            self.check_sector0(offset, &probe).await?;
        }
        self.file.writev(self.offset + offset, bufs, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.within_size(offset, len, true)?;
        if self.probed && offset < PROBE_BYTES as u64 {
            let n = (PROBE_BYTES as u64 - offset).min(len) as usize;
            self.check_sector0(offset, &vec![0u8; n]).await?;
        }
        self.file
            .write_zeroes(self.offset + offset, len, flags)
            .await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.within_size(offset, len, true)?;
        self.file.discard(self.offset + offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.file.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut st = self.file.block_status(self.offset + offset, len).await?;
        st.allocated = true;
        st.host = Some(HostMapping {
            node: Some(self.file.clone()),
            offset: self.offset + offset,
        });
        Ok(st)
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()> {
        if self.fixed_size.is_some() || self.offset != 0 {
            return Err(Error::unsupported("Cannot resize fixed-size raw disks"));
        }
        self.file.truncate(size, exact, prealloc).await
    }

    async fn allocated_size(&self) -> Option<u64> {
        self.file.allocated_size().await
    }
}

/// Creates a raw image: the file, emptied, then grown to the size with the requested
/// preallocation.
pub async fn create(filename: &str, o: &crate::create::CreateOptions) -> Result<()> {
    let (size, prealloc) = crate::create::size_and_prealloc(o)?;
    if crate::protocol::nbd::is_nbd_filename(filename) {
        if prealloc != Prealloc::Off {
            return Err(Error::other(
                format!("Unsupported preallocation mode '{}'", prealloc.name()),
                libc::ENOTSUP,
            ));
        }
        return crate::protocol::nbd::create_existing(filename, size)
            .await?
            .close()
            .await;
    }
    let file = crate::format::qcow2::create::create_protocol_node(filename, 0).await?;
    let r = file.truncate(size, false, prealloc).await;
    let _ = file.close().await;
    r
}

#[cfg(test)]
mod raw_path_tests {
    use crate::test_util::{block_on, check_raw_path, create, open, TempPath};

    /// Raw buffers pass through the raw format to the file unchanged.
    #[test]
    fn raw_buffers_pass_through() {
        block_on(async {
            let p = TempPath::new("rawpath.raw");
            create(&p.0, "raw", &[("size", "1M")]).await;
            let b = open(&p.0, "").await;
            check_raw_path(&b).await;
            b.close().await.expect("close");
        });
    }
}
