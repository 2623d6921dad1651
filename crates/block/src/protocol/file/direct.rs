//! O_DIRECT support: probing the alignment a file needs, and bounce buffers for requests
//! that do not meet it.
//!
//! An unaligned write becomes a read-modify-write of the covering aligned blocks. While it
//! runs it holds the file's `rmw` lock exclusively; aligned writes hold it shared, so no
//! write can land in a block between our read and our write of it.

use std::os::fd::RawFd;

use crate::buffer::{AlignedBuf, IO_ALIGN};
use crate::error::Result;
use crate::iov::{IoBuf, IoBufMut};
use crate::node::Alignment;

use super::FileNode;

/// Finds the smallest request alignment O_DIRECT reads accept on `fd` (QEMU probes the
/// same way: a read of each candidate size from an aligned buffer).
pub(super) fn probe_alignment(fd: RawFd) -> Alignment {
    let mut buf = AlignedBuf::new(IO_ALIGN, IO_ALIGN);
    for size in [512usize, 1024, 2048, 4096] {
        // SAFETY: buf is valid for writes of IO_ALIGN >= size bytes.
        let r = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), size, 0) };
        if r >= 0 {
            return Alignment {
                request: size as u32,
                memory: IO_ALIGN as u32,
            };
        }
    }
    Alignment {
        request: IO_ALIGN as u32,
        memory: IO_ALIGN as u32,
    }
}

fn covering(node: &FileNode, offset: u64, len: usize) -> (u64, usize) {
    let a = node.align.request as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).div_ceil(a) * a;
    (start, (end - start) as usize)
}

/// Reads through an aligned bounce buffer.
pub(super) async fn read_unaligned(node: &FileNode, offset: u64, buf: IoBufMut<'_>) -> Result<()> {
    let (start, len) = covering(node, offset, buf.len());
    let mut bounce = AlignedBuf::io(len);
    node.pread_full(start, IoBufMut::new(&mut bounce)).await?;
    let skip = (offset - start) as usize;
    buf.copy_from(0, &bounce[skip..skip + buf.len()]);
    Ok(())
}

/// Writes through an aligned bounce buffer, reading partial head and tail blocks first.
pub(super) async fn write_unaligned(node: &FileNode, offset: u64, buf: IoBuf<'_>) -> Result<()> {
    let (start, len) = covering(node, offset, buf.len());
    let skip = (offset - start) as usize;
    let mut bounce = AlignedBuf::io(len);
    let needs_rmw = skip != 0 || len != buf.len();
    let _guard = if needs_rmw {
        let g = node.rmw.write().await;
        let a = node.align.request as usize;
        if skip != 0 {
            node.pread_full(start, IoBufMut::new(&mut bounce[..a]))
                .await?;
        }
        let tail = start + (len - a) as u64;
        if !(skip + buf.len()).is_multiple_of(a) && (len > a || skip == 0) {
            node.pread_full(tail, IoBufMut::new(&mut bounce[len - a..]))
                .await?;
        }
        Guard::Exclusive(g)
    } else {
        Guard::Shared(node.rmw.read().await)
    };
    buf.copy_to(0, &mut bounce[skip..skip + buf.len()]);
    // Like QEMU, a write that ends inside the file's last block grows the file to the
    // block's end.
    node.pwrite_full(start, IoBuf::new(&bounce)).await
}

/// Keeps the `rmw` lock held for the duration of the write.
#[allow(dead_code)]
enum Guard<'a> {
    Exclusive(tokio::sync::RwLockWriteGuard<'a, ()>),
    Shared(tokio::sync::RwLockReadGuard<'a, ()>),
}
