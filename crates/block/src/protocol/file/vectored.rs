//! Vectored reads and writes of the file protocol: a whole scatter-gather request in one
//! `preadv`/`pwritev` (inline with `RWF_NOWAIT` where the page cache can serve it,
//! otherwise through the engine: a worker thread or an io_uring `READV`/`WRITEV`).
//!
//! With O_DIRECT the buffers go to the kernel as they are when every one of them meets the
//! file's alignment (a guest's page-sized buffers do); otherwise the request goes through
//! an aligned bounce buffer of at most [`iov::BOUNCE_BYTES`], piece by piece.

use std::sync::atomic::Ordering;

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::iov;
use crate::node::{BlockDriver, WriteFlags};

use super::engine::{self, Op};
use super::{FileNode, SPLIT_ALIGN, SPLIT_BYTES};

/// Most iovec entries one system call takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// The iovec array of one request (an array or a vector), kept across awaits.
pub(super) struct IoVecs<T>(pub(super) T);

// SAFETY: the pointers describe buffers borrowed by the request's future (and so Send
// with it); they are only used by the system calls of that request.
unsafe impl<T> Send for IoVecs<T> {}

impl<T: AsMut<[libc::iovec]>> IoVecs<T> {
    /// Where the entries from `first` start and how many one call takes.
    fn chunk(&mut self, first: usize) -> (*const libc::iovec, usize) {
        let rest = &self.0.as_mut()[first..];
        (rest.as_ptr(), rest.len().min(IOV_MAX))
    }
}

/// Drops the first `n` bytes of the vector `iovs[*first..]`.
fn advance(iovs: &mut [libc::iovec], first: &mut usize, mut n: usize) {
    while n > 0 && *first < iovs.len() {
        let v = &mut iovs[*first];
        if n >= v.iov_len {
            n -= v.iov_len;
            *first += 1;
        } else {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
            v.iov_len -= n;
            n = 0;
        }
    }
}

/// The iovec entry of one buffer (written through by reads only).
pub(super) fn iovec(base: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    }
}

/// Which way a vector moves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    Read,
    Write,
}

impl FileNode {
    /// Whether every buffer and the offset meet the O_DIRECT alignment.
    fn vector_aligned(&self, offset: u64, bufs: impl Iterator<Item = (usize, usize)>) -> bool {
        let mut ok = offset.is_multiple_of(u64::from(self.align.request));
        for (addr, len) in bufs {
            ok &= self.is_aligned(0, len, addr);
        }
        ok
    }

    /// Vectored read (see the module documentation).
    pub(super) async fn readv_impl(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let total = iov::len_mut(bufs);
        if self.direct
            && !self.vector_aligned(offset, bufs.iter().map(|b| (b.as_ptr() as usize, b.len())))
        {
            let mut bounce = AlignedBuf::io(total.min(iov::BOUNCE_BYTES));
            let mut done = 0;
            while done < total {
                let n = (total - done).min(bounce.len());
                self.read(offset + done as u64, &mut bounce[..n]).await?;
                iov::scatter(&mut iov::sub_mut(bufs, done, n), &bounce[..n]);
                done += n;
            }
            return Ok(());
        }
        if !self.direct && total >= SPLIT_BYTES {
            // As for plain reads: two halves at once, so the page-cache copy uses two
            // cores.
            let half = (total / 2).next_multiple_of(SPLIT_ALIGN);
            let (mut a, mut b) = iov::split_mut(bufs, half);
            let (ra, rb) = futures::join!(
                self.preadv_part(offset, &mut a, false),
                self.preadv_part(offset + half as u64, &mut b, false)
            );
            return ra.and(rb);
        }
        self.preadv_part(offset, bufs, !self.direct).await
    }

    async fn preadv_part(&self, offset: u64, bufs: &mut [&mut [u8]], inline: bool) -> Result<()> {
        let total = iov::len_mut(bufs);
        let iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(|b| iovec(b.as_mut_ptr(), b.len()))
            .collect();
        let done = self
            .transfer(offset, IoVecs(iovs), Dir::Read, inline)
            .await?;
        if done < total {
            // Past the end of the file: reads as zeroes, as QEMU pads short reads.
            iov::fill(&mut iov::sub_mut(bufs, done, total - done), 0);
        }
        Ok(())
    }

    /// Vectored write (see the module documentation).
    pub(super) async fn writev_impl(
        &self,
        offset: u64,
        bufs: &[&[u8]],
        flags: WriteFlags,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EBADF));
        }
        let total = iov::len(bufs);
        if self.direct
            && !self.vector_aligned(offset, bufs.iter().map(|b| (b.as_ptr() as usize, b.len())))
        {
            let mut bounce = AlignedBuf::io(total.min(iov::BOUNCE_BYTES));
            let mut done = 0;
            while done < total {
                let n = (total - done).min(bounce.len());
                iov::gather(&iov::sub(bufs, done, n), &mut bounce[..n]);
                self.write(offset + done as u64, &bounce[..n], flags)
                    .await?;
                done += n;
            }
            return Ok(());
        }
        let _change = self.note_change(offset, total as u64);
        {
            let _shared = if self.direct {
                Some(self.rmw.read().await)
            } else {
                None
            };
            let inline = !self.direct && self.nowait_writes.load(Ordering::Relaxed);
            self.pwritev_part(offset, bufs, inline).await?;
        }
        self.note_end(offset + total as u64);
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn pwritev_part(&self, offset: u64, bufs: &[&[u8]], inline: bool) -> Result<()> {
        let iovs: Vec<libc::iovec> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| iovec(b.as_ptr().cast_mut(), b.len()))
            .collect();
        self.transfer(offset, IoVecs(iovs), Dir::Write, inline)
            .await?;
        Ok(())
    }

    /// Moves a whole vector: inline with `RWF_NOWAIT` while `inline` and the page cache
    /// can serve it, otherwise through the engine; resumes after short transfers and
    /// EINTR. Returns the bytes moved, short only for a read that reaches the end of the
    /// file (a write that moves nothing is an I/O error).
    pub(super) async fn transfer(
        &self,
        offset: u64,
        mut iovs: IoVecs<impl AsMut<[libc::iovec]>>,
        dir: Dir,
        mut inline: bool,
    ) -> Result<usize> {
        let mut first = 0;
        let mut done = 0usize;
        while first < iovs.0.as_mut().len() {
            let (ptr, cnt) = iovs.chunk(first);
            let pos = offset + done as u64;
            let mut n = -libc::EAGAIN as isize;
            if inline {
                // SAFETY: the iovecs describe live buffers of the request, exclusively
                // borrowed for a read; a write only reads through them.
                n = engine::errno_result(unsafe {
                    match dir {
                        Dir::Read => libc::preadv2(
                            self.fd(),
                            ptr,
                            cnt as libc::c_int,
                            pos as libc::off_t,
                            libc::RWF_NOWAIT,
                        ),
                        Dir::Write => libc::pwritev2(
                            self.fd(),
                            ptr,
                            cnt as libc::c_int,
                            pos as libc::off_t,
                            libc::RWF_NOWAIT,
                        ),
                    }
                });
                let unsupported = n == -libc::EOPNOTSUPP as isize
                    || (dir == Dir::Write && n == -libc::EINVAL as isize);
                if unsupported {
                    if dir == Dir::Write {
                        self.nowait_writes.store(false, Ordering::Relaxed);
                    }
                    inline = false;
                    n = -libc::EAGAIN as isize;
                }
            }
            if n == -libc::EAGAIN as isize {
                let op = match dir {
                    Dir::Read => Op::Readv {
                        iov: ptr,
                        cnt,
                        offset: pos,
                    },
                    Dir::Write => Op::Writev {
                        iov: ptr,
                        cnt,
                        offset: pos,
                    },
                };
                n = self.engine.submit(self.fd(), op).await;
            }
            if n == -libc::EINTR as isize {
                continue;
            }
            if n < 0 {
                return Err(Error::errno(-n as i32));
            }
            if n == 0 {
                match dir {
                    Dir::Read => break,
                    Dir::Write => return Err(Error::errno(libc::EIO)),
                }
            }
            advance(iovs.0.as_mut(), &mut first, n as usize);
            done += n as usize;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_drops_whole_and_partial_entries() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut iovs = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        let mut first = 0;
        advance(&mut iovs, &mut first, 11);
        assert_eq!(first, 1);
        assert_eq!(iovs[1].iov_len, 5);
        assert_eq!(iovs[1].iov_base as usize, b.as_ptr() as usize + 3);
        advance(&mut iovs, &mut first, 5);
        assert_eq!(first, 2);
    }
}
