//! blkdebug's request path: requests are padded to the node's alignment (writes with
//! read-modify-write, firing the `pwritev_rmw_*` events), split by its transfer,
//! write-zeroes and discard limits, checked against the armed rules piece by piece, and
//! passed to the child.

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::node::{BlockStatus, WriteFlags};

use super::config::IoType;
use super::event::Event;
use super::tracked::Tracked;
use super::BlkdebugNode;

/// Largest fallback write of zeroes when no `max-transfer` is set (QEMU's bounce
/// buffer limit).
const MAX_BOUNCE: u64 = 32768 * 512;

impl BlkdebugNode {
    fn align_down(&self, v: u64) -> u64 {
        v / self.limits.align * self.limits.align
    }

    fn align_up(&self, v: u64) -> u64 {
        v.div_ceil(self.limits.align) * self.limits.align
    }

    /// Reads an aligned range from the child in `max-transfer` pieces; what padding
    /// reaches past the child's end reads as zeroes.
    async fn read_aligned(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let step = self.limits.transfer();
        let size = self.child.size();
        let mut done = 0usize;
        while done < buf.len() {
            let n = ((buf.len() - done) as u64).min(step) as usize;
            let at = offset + done as u64;
            self.check(at, n as u64, IoType::Read).await?;
            let avail = size.saturating_sub(at).min(n as u64) as usize;
            if avail > 0 {
                self.child.read(at, &mut buf[done..done + avail]).await?;
            }
            buf[done + avail..done + n].fill(0);
            done += n;
        }
        Ok(())
    }

    /// Writes an aligned range (QEMU's aligned write path with its events).
    async fn write_aligned(
        &self,
        req: &Tracked<'_>,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> Result<()> {
        req.wait().await;
        self.fire(Event::Pwritev).await;
        let res = self.write_pieces(offset, buf, flags).await;
        self.fire(Event::PwritevDone).await;
        res
    }

    async fn write_pieces(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let step = self.limits.transfer();
        let mut done = 0usize;
        while done < buf.len() {
            let n = ((buf.len() - done) as u64).min(step) as usize;
            let at = offset + done as u64;
            self.check(at, n as u64, IoType::Write).await?;
            self.child.write(at, &buf[done..done + n], flags).await?;
            done += n;
        }
        Ok(())
    }

    pub(super) async fn read_padded(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        let (start, aend) = (self.align_down(offset), self.align_up(end));
        let req = self.tracker.begin(start, aend);
        req.wait().await;
        if start == offset && aend == end {
            return self.read_aligned(offset, buf).await;
        }
        let mut bounce = AlignedBuf::io((aend - start) as usize);
        self.read_aligned(start, &mut bounce).await?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&bounce[at..at + buf.len()]);
        Ok(())
    }

    /// Reads the head and tail blocks around `[offset, end)` into `block` (which covers
    /// the padded range), firing the read-modify-write events.
    async fn rmw_read(&self, offset: u64, end: u64, start: u64, block: &mut [u8]) -> Result<()> {
        let align = self.limits.align as usize;
        let aend = start + block.len() as u64;
        let head = start != offset;
        let tail = aend != end;
        if block.len() == align {
            // Head and tail lie in one block: one read.
            if head {
                self.fire(Event::PwritevRmwHead).await;
            }
            if tail {
                self.fire(Event::PwritevRmwTail).await;
            }
            self.read_aligned(start, block).await?;
            if head {
                self.fire(Event::PwritevRmwAfterHead).await;
            }
            if tail {
                self.fire(Event::PwritevRmwAfterTail).await;
            }
            return Ok(());
        }
        if head {
            self.fire(Event::PwritevRmwHead).await;
            self.read_aligned(start, &mut block[..align]).await?;
            self.fire(Event::PwritevRmwAfterHead).await;
        }
        if tail {
            let from = block.len() - align;
            self.fire(Event::PwritevRmwTail).await;
            self.read_aligned(aend - align as u64, &mut block[from..])
                .await?;
            self.fire(Event::PwritevRmwAfterTail).await;
        }
        Ok(())
    }

    pub(super) async fn write_padded(
        &self,
        offset: u64,
        buf: &[u8],
        flags: WriteFlags,
    ) -> Result<()> {
        let end = offset + buf.len() as u64;
        let (start, aend) = (self.align_down(offset), self.align_up(end));
        let req = self.tracker.begin(offset, end);
        if start == offset && aend == end {
            return self.write_aligned(&req, offset, buf, flags).await;
        }
        req.serialise(start, aend).await;
        let mut block = AlignedBuf::io((aend - start) as usize);
        self.rmw_read(offset, end, start, &mut block).await?;
        let at = (offset - start) as usize;
        block[at..at + buf.len()].copy_from_slice(buf);
        self.write_aligned(&req, start, &block, flags).await
    }

    pub(super) async fn write_zeroes_padded(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        let end = offset + len;
        let align = self.limits.align;
        let (start, aend) = (self.align_down(offset), self.align_up(end));
        let req = self.tracker.begin(offset, end);
        let mut pos = offset;
        let mut left = len;
        if start != offset || aend != end {
            req.serialise(start, aend).await;
            if start != offset || aend - start == align {
                // The head block (or the one block the request lies in).
                let blen = align;
                let mut block = AlignedBuf::io(blen as usize);
                let bend = start + blen;
                self.rmw_read(offset, end.min(bend), start, &mut block)
                    .await?;
                let from = (offset - start) as usize;
                let to = (end.min(bend) - start) as usize;
                block[from..to].fill(0);
                self.write_aligned(&req, start, &block, flags_without_zero(flags))
                    .await?;
                if end <= bend {
                    return Ok(());
                }
                left -= bend - offset;
                pos = bend;
            }
        }
        let middle = left / align * align;
        if middle > 0 {
            req.wait().await;
            self.fire(Event::PwritevZero).await;
            let r = self.zero_pieces(pos, middle, flags).await;
            self.fire(Event::PwritevDone).await;
            r?;
            pos += middle;
            left -= middle;
        }
        if left > 0 {
            let mut block = AlignedBuf::io(align as usize);
            self.rmw_read(pos, pos + left, pos, &mut block).await?;
            block[..left as usize].fill(0);
            self.write_aligned(&req, pos, &block, flags_without_zero(flags))
                .await?;
        }
        Ok(())
    }

    /// Write-zeroes split as QEMU splits it for this node's limits; pieces the node does
    /// not take as write-zeroes fall back to writing zeroes.
    async fn zero_pieces(&self, mut offset: u64, mut bytes: u64, flags: WriteFlags) -> Result<()> {
        let zalign = self.limits.opt_write_zero.max(self.limits.align);
        let max_wz = {
            let m = if self.limits.max_write_zero == 0 {
                i32::MAX as u64
            } else {
                self.limits.max_write_zero
            };
            (m / zalign * zalign).max(zalign)
        };
        let max_transfer = if self.limits.max_transfer == 0 {
            MAX_BOUNCE
        } else {
            self.limits.max_transfer.min(MAX_BOUNCE)
        };
        let mut head = offset % zalign;
        let tail = (offset + bytes) % zalign;
        while bytes > 0 {
            let mut num = bytes;
            if head != 0 {
                num = bytes.min(max_transfer).min(zalign - head);
                head = (head + num) % zalign;
            } else if tail != 0 && num > zalign {
                num -= tail;
            }
            num = num.min(max_wz);
            let aligned = offset.is_multiple_of(zalign) && num.is_multiple_of(zalign);
            if aligned {
                self.check(offset, num, IoType::WriteZeroes).await?;
                match self.child.write_zeroes(offset, num, flags).await {
                    Err(e) if e.errno_value() == libc::ENOTSUP && !flags.no_fallback => {
                        self.zero_fallback(offset, num, max_transfer, flags).await?
                    }
                    r => r?,
                }
            } else if flags.no_fallback {
                return Err(Error::errno(libc::ENOTSUP));
            } else {
                self.zero_fallback(offset, num, max_transfer, flags).await?;
            }
            offset += num;
            bytes -= num;
        }
        Ok(())
    }

    async fn zero_fallback(
        &self,
        offset: u64,
        num: u64,
        max_transfer: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        let mut done = 0;
        while done < num {
            let n = (num - done).min(max_transfer);
            let zeroes = AlignedBuf::io(n as usize);
            self.write_pieces(offset + done, &zeroes, flags_without_zero(flags))
                .await?;
            done += n;
        }
        Ok(())
    }

    pub(super) async fn discard_split(&self, offset: u64, len: u64) -> Result<()> {
        let ra = self.limits.align;
        let align = self.limits.opt_discard.max(ra);
        let max = if self.limits.max_discard == 0 {
            u64::MAX / align * align
        } else {
            (self.limits.max_discard / align * align).max(align)
        };
        let req = self.tracker.begin(offset, offset + len);
        req.wait().await;
        let (mut offset, mut bytes) = (offset, len);
        let mut head = offset % align;
        let mut tail = (offset + bytes) % align;
        while bytes > 0 {
            let mut num = bytes;
            if head != 0 {
                num = bytes.min(align - head);
                if num % ra != 0 {
                    num %= ra;
                }
                head = (head + num) % align;
            } else if tail != 0 {
                if num > align {
                    num -= tail;
                } else if !tail.is_multiple_of(ra) && tail > ra {
                    tail %= ra;
                    num -= tail;
                }
            }
            num = num.min(max);
            if num >= ra && offset % ra == 0 {
                self.check(offset, num, IoType::Discard).await?;
                match self.child.discard(offset, num).await {
                    Err(e) if e.errno_value() == libc::ENOTSUP => {}
                    r => r?,
                }
            }
            offset += num;
            bytes -= num;
        }
        Ok(())
    }

    pub(super) async fn block_status_aligned(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let start = self.align_down(offset);
        let end = self
            .align_up(offset + len)
            .min(self.align_up(self.child.size()));
        let alen = end.saturating_sub(start).max(1);
        self.check(start, alen, IoType::BlockStatus).await?;
        let mut st = self.child.block_status(start, alen).await?;
        let head = offset - start;
        st.len = st.len.saturating_sub(head).clamp(1, len.max(1));
        if let Some(h) = st.host.as_mut() {
            h.offset += head;
        }
        Ok(st)
    }
}

fn flags_without_zero(flags: WriteFlags) -> WriteFlags {
    WriteFlags {
        fua: flags.fua,
        may_unmap: false,
        no_fallback: false,
    }
}
