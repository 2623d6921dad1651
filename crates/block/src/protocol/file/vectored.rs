//! Vectored reads and writes of the file protocol: a whole scatter-gather request in one
//! `preadv`/`pwritev` (inline with `RWF_NOWAIT` where the page cache can serve it,
//! otherwise through the engine: a worker thread or an io_uring `READV`/`WRITEV`).
//!
//! The request's raw buffers ([`crate::iov`]) go to the kernel as iovecs, without a copy.
//! With O_DIRECT that needs every buffer to meet the file's alignment (a guest's
//! page-sized buffers do); otherwise the request goes through a private aligned bounce
//! buffer of at most [`iov::BOUNCE_BYTES`], piece by piece.

use std::marker::PhantomData;
use std::sync::atomic::Ordering;

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::iov::{self, IoBuf, IoBufMut, IoPiece};
use crate::node::{BlockDriver, WriteFlags};

use super::engine::{self, Op};
use super::{FileNode, SPLIT_ALIGN, SPLIT_BYTES};

/// Most iovec entries one system call takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// The iovec array of one request (an array or a vector) and which way it moves, kept
/// across awaits. Built only from raw buffer descriptors valid for `'a`, so the entries
/// always describe memory the kernel may read (and, for a read, write) for `'a`.
pub(super) struct IoVecs<'a, T> {
    iovs: T,
    dir: Dir,
    _bufs: PhantomData<IoBuf<'a>>,
}

// SAFETY: the pointers describe raw buffers (which are Send) valid for 'a; they are only
// used by the system calls of this request.
unsafe impl<T> Send for IoVecs<'_, T> {}

impl<'a> IoVecs<'a, Vec<libc::iovec>> {
    /// The iovecs a read fills (empty buffers left out).
    pub(super) fn reading(bufs: &[IoBufMut<'a>]) -> Self {
        IoVecs {
            iovs: bufs
                .iter()
                .filter(|b| !b.is_empty())
                .map(|b| iovec(b.as_mut_ptr(), b.len()))
                .collect(),
            dir: Dir::Read,
            _bufs: PhantomData,
        }
    }

    /// The iovecs a write takes its data from (empty buffers left out).
    pub(super) fn writing(bufs: &[IoBuf<'a>]) -> Self {
        IoVecs {
            iovs: bufs
                .iter()
                .filter(|b| !b.is_empty())
                .map(|b| iovec(b.as_ptr().cast_mut(), b.len()))
                .collect(),
            dir: Dir::Write,
            _bufs: PhantomData,
        }
    }
}

impl<'a> IoVecs<'a, [libc::iovec; 1]> {
    /// One buffer a read fills.
    pub(super) fn reading_one(buf: IoBufMut<'a>) -> Self {
        IoVecs {
            iovs: [iovec(buf.as_mut_ptr(), buf.len())],
            dir: Dir::Read,
            _bufs: PhantomData,
        }
    }

    /// One buffer a write takes its data from.
    pub(super) fn writing_one(buf: IoBuf<'a>) -> Self {
        IoVecs {
            iovs: [iovec(buf.as_ptr().cast_mut(), buf.len())],
            dir: Dir::Write,
            _bufs: PhantomData,
        }
    }
}

impl<T: AsMut<[libc::iovec]>> IoVecs<'_, T> {
    /// Where the entries from `first` start and how many one call takes.
    fn chunk(&mut self, first: usize) -> (*const libc::iovec, usize) {
        let rest = &self.iovs.as_mut()[first..];
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
    fn vector_aligned<B: IoPiece>(&self, offset: u64, bufs: &[B]) -> bool {
        let mut ok = offset.is_multiple_of(u64::from(self.align.request));
        for b in bufs {
            ok &= self.is_aligned(0, b.piece_len(), b.addr());
        }
        ok
    }

    /// Vectored read (see the module documentation).
    pub(super) async fn readv_impl(&self, offset: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        let total = iov::len(bufs);
        if self.direct && !self.vector_aligned(offset, bufs) {
            let mut bounce = AlignedBuf::io(total.min(iov::BOUNCE_BYTES));
            let mut done = 0;
            while done < total {
                let n = (total - done).min(bounce.len());
                self.read(offset + done as u64, &mut bounce[..n]).await?;
                iov::scatter(&iov::sub(bufs, done, n), &bounce[..n]);
                done += n;
            }
            return Ok(());
        }
        if !self.direct && total >= SPLIT_BYTES {
            // As for plain reads: two halves at once, so the page-cache copy uses two
            // cores.
            let half = (total / 2).next_multiple_of(SPLIT_ALIGN);
            let (a, b) = iov::split(bufs, half);
            let (ra, rb) = futures::join!(
                self.preadv_part(offset, &a, false),
                self.preadv_part(offset + half as u64, &b, false)
            );
            return ra.and(rb);
        }
        self.preadv_part(offset, bufs, !self.direct).await
    }

    async fn preadv_part(&self, offset: u64, bufs: &[IoBufMut<'_>], inline: bool) -> Result<()> {
        let total = iov::len(bufs);
        let done = self.transfer(offset, IoVecs::reading(bufs), inline).await?;
        if done < total {
            // Past the end of the file: reads as zeroes, as QEMU pads short reads.
            iov::fill(&iov::sub(bufs, done, total - done), 0);
        }
        Ok(())
    }

    /// Vectored write (see the module documentation).
    pub(super) async fn writev_impl(
        &self,
        offset: u64,
        bufs: &[IoBuf<'_>],
        flags: WriteFlags,
    ) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EBADF));
        }
        let total = iov::len(bufs);
        if self.direct && !self.vector_aligned(offset, bufs) {
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
            self.transfer(offset, IoVecs::writing(bufs), inline).await?;
        }
        self.note_end(offset + total as u64);
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Moves a whole vector: inline with `RWF_NOWAIT` while `inline` and the page cache
    /// can serve it, otherwise through the engine; resumes after short transfers and
    /// EINTR. Returns the bytes moved, short only for a read that reaches the end of the
    /// file (a write that moves nothing is an I/O error).
    pub(super) async fn transfer(
        &self,
        offset: u64,
        mut iovs: IoVecs<'_, impl AsMut<[libc::iovec]>>,
        mut inline: bool,
    ) -> Result<usize> {
        let dir = iovs.dir;
        let mut first = 0;
        let mut done = 0usize;
        while first < iovs.iovs.as_mut().len() {
            let (ptr, cnt) = iovs.chunk(first);
            let pos = offset + done as u64;
            let mut n = -libc::EAGAIN as isize;
            if inline {
                // SAFETY: the iovecs describe raw buffers valid for the request (IoVecs is
                // only built from them); a read's buffers are writable by contract, a write
                // only reads through them.
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
                // SAFETY: the iovec array lives in `iovs`, owned by this future and not
                // touched until the operation's future is done; the buffers it describes
                // are raw buffers valid for the request (IoVecs is only built from them)
                // and reached through no Rust reference. The operation's future is awaited
                // right here; if this future is dropped first, that one is dropped before
                // `iovs` (it is the newer value) and its drop waits for the operation.
                let fut = unsafe { self.engine.submit(self.fd(), op) };
                n = fut.await;
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
            advance(iovs.iovs.as_mut(), &mut first, n as usize);
            done += n as usize;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Prealloc;
    use crate::options::{AioMode, CacheMode};
    use crate::protocol::file::FileOptions;
    use crate::test_util::{block_on, Mapping, TempPath};

    /// Raw buffers over memory no Rust slice covers go to the file and back through both
    /// engines: small pieces, a request large enough to be split in two, and a read past
    /// the end of the file (zeroes).
    #[test]
    fn raw_buffers_through_both_engines() {
        const LEN: usize = 3 << 20;
        let src: Vec<u8> = (0..LEN).map(|i| (i * 13 + 5) as u8).collect();
        for aio in [AioMode::Threads, AioMode::IoUring] {
            let path = TempPath::new(&format!("vectored-{aio:?}"));
            let opened = FileNode::open(&FileOptions {
                filename: path.0.clone(),
                read_only: false,
                cache: CacheMode::parse("writeback").expect("cache mode"),
                aio,
                locking: false,
                create: true,
                driver: None,
            });
            let node = match opened {
                Ok(n) => n,
                Err(e) if aio == AioMode::IoUring => {
                    eprintln!("skipped io_uring: {e}");
                    continue;
                }
                Err(e) => panic!("open: {e}"),
            };
            block_on(node.truncate(4 << 20, false, Prealloc::Off)).expect("truncate");
            let mem = Mapping::new(LEN);
            mem.buf(0, LEN).copy_from(0, &src);
            let w = [
                mem.buf(0, 100).readable(),
                mem.buf(100, 1 << 20).readable(),
                mem.buf(100 + (1 << 20), LEN - 100 - (1 << 20)).readable(),
            ];
            block_on(node.writev(4096, &w, WriteFlags::NONE)).expect("writev");
            let mut plain = vec![0u8; LEN];
            block_on(node.read(4096, &mut plain)).expect("read");
            assert!(plain == src, "{aio:?}: plain read of a vectored write");

            let back = Mapping::new(LEN);
            let r = [back.buf(0, 5000), back.buf(5000, LEN - 5000)];
            block_on(node.readv(4096, &r)).expect("readv");
            assert!(back.copy(0, LEN) == src, "{aio:?}: vectored read");

            // The last 1000 bytes of the file, then 3000 past its end.
            let tail = Mapping::new(4096);
            tail.buf(0, 4096).fill(0xee);
            let r = [tail.buf(0, 512), tail.buf(512, 3488)];
            block_on(node.readv((4 << 20) - 1000, &r)).expect("readv at the end");
            let got = tail.copy(0, 4000);
            assert!(got[1000..].iter().all(|&x| x == 0), "{aio:?}: past the end");
            assert_eq!(tail.copy(4000, 96), vec![0xee; 96]);
        }
    }

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
