//! The `nbd` protocol: a node over an export of an NBD server (qemu-nbd, nbdkit, ...).
//!
//! [`addr`] turns QEMU's NBD filenames and options into a server address and export,
//! [`handshake`] negotiates structured replies, the block-status meta context and the
//! export's size, flags and block sizes, [`transport`] runs requests (many in flight on
//! one connection, replies dispatched by cookie from a reader thread), [`reply`] parses
//! replies from the untrusted server with every length and offset checked, and
//! [`status`] maps block status as QEMU's nbd driver does. The node answers like
//! QEMU's: requests past the server's size read zeroes, flush/trim/write-zeroes
//! follow the transmission flags, FUA is emulated with a flush when the server lacks
//! it, and a connection that broke fails every request with EIO.

pub mod addr;
pub mod handshake;
pub mod reply;
pub mod status;
pub mod transport;

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rqemu_opts::KeyVal;

use crate::error::{Error, Result};
use crate::node::{Alignment, BlockDriver, BlockStatus, Prealloc, WriteFlags};

use addr::{NbdOptions, Stream};
use handshake::ExportInfo;
use reply::Body;
use transport::Connection;

pub use addr::is_nbd_filename;

/// Largest request QEMU's client sends (`NBD_MAX_BUFFER_SIZE`).
const MAX_BUFFER: u64 = 32 << 20;

const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// A node over an NBD export.
pub struct NbdNode {
    conn: Mutex<Arc<Connection>>,
    /// Held while a lost connection is being replaced.
    reconnecting: tokio::sync::Mutex<()>,
    /// Read-modify-write cycles for requests not aligned to the server's minimum block
    /// size hold this exclusively; aligned writes share it.
    rmw: tokio::sync::RwLock<()>,
    opts: NbdOptions,
    info: ExportInfo,
    read_only: bool,
    closed: AtomicBool,
}

/// Connects and negotiates, with QEMU's checks of what the server offers.
fn connect(opts: &NbdOptions, read_only: bool, timeout: u64) -> Result<(Connection, ExportInfo)> {
    let mut stream = Stream::connect_retrying(&opts.server, timeout)?;
    let context = opts.x_dirty_bitmap.as_deref().unwrap_or("base:allocation");
    let info = handshake::negotiate(&mut stream, opts.export.as_deref().unwrap_or(""), context)?;
    if opts.x_dirty_bitmap.is_some() && info.context_id.is_none() {
        return Err(Error::other(
            "Could not open image: Invalid argument",
            libc::EINVAL,
        ));
    }
    if !read_only && info.flags & handshake::FLAG_READ_ONLY != 0 {
        return Err(Error::other(
            "Could not open image: Permission denied",
            libc::EACCES,
        ));
    }
    let conn = Connection::new(stream, info.structured)?;
    Ok((conn, info))
}

/// Opens an NBD node from a filename (may be empty) and the driver's options, which
/// are taken out of `kv`; any option left over is refused.
pub fn open(filename: &str, kv: &mut KeyVal, read_only: bool) -> Result<Arc<NbdNode>> {
    let opts = NbdOptions::take_from(filename, kv)?;
    if let Some(k) = kv.keys().next() {
        return Err(Error::invalid(format!(
            "Block protocol 'nbd' doesn't support the option '{k}'"
        )));
    }
    let (conn, info) = connect(&opts, read_only, opts.open_timeout)?;
    Ok(Arc::new(NbdNode {
        conn: Mutex::new(Arc::new(conn)),
        reconnecting: tokio::sync::Mutex::new(()),
        rmw: tokio::sync::RwLock::new(()),
        opts,
        info,
        read_only,
        closed: AtomicBool::new(false),
    }))
}

/// Image creation on an NBD export, as QEMU does it for protocol drivers that cannot
/// create: the export must exist and be at least `size` bytes long (it cannot grow), and
/// its first sector is zeroed so that no stale header is probed afterwards.
pub async fn create_existing(filename: &str, size: u64) -> Result<crate::node::NodeRef> {
    let mut kv = KeyVal::new();
    let node = open(filename, &mut kv, false).map_err(|e| {
        Error::other(
            format!(
                "Protocol driver 'nbd' does not support creating new images, so an existing image must be selected as the target; however, opening the given target as an existing image failed: {e}"
            ),
            libc::EINVAL,
        )
    })?;
    node.truncate(size, false, Prealloc::Off).await?;
    let n = node.size().min(512);
    if n > 0 {
        let flags = WriteFlags {
            may_unmap: true,
            ..WriteFlags::NONE
        };
        node.write_zeroes(0, n, flags)
            .await
            .map_err(|e| Error::Os {
                context: Some("Failed to clear the new image's first sector".into()),
                errno: e.errno_value(),
            })?;
    }
    Ok(node)
}

fn protocol_error(msg: &str) -> Error {
    Error::other(msg.to_string(), libc::EIO)
}

impl NbdNode {
    fn current(&self) -> Arc<Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// After a request failed on `failed`: whether a new connection is in place to
    /// retry it on. With `reconnect-delay`, requests wait that long for the server to
    /// come back, as QEMU's do; the same export must be there again.
    async fn reconnected(&self, failed: &Arc<Connection>) -> bool {
        if self.opts.reconnect_delay == 0 || !failed.is_dead() || self.closed.load(Ordering::SeqCst)
        {
            return false;
        }
        let _g = self.reconnecting.lock().await;
        if !Arc::ptr_eq(&self.current(), failed) {
            return true;
        }
        let deadline = Instant::now() + Duration::from_secs(self.opts.reconnect_delay);
        loop {
            if let Ok((conn, info)) = connect(&self.opts, self.read_only, 0) {
                if info.size != self.info.size || info.flags != self.info.flags {
                    conn.close();
                    return false;
                }
                let old = std::mem::replace(
                    &mut *self.conn.lock().unwrap_or_else(|p| p.into_inner()),
                    Arc::new(conn),
                );
                old.close();
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100).min(deadline - now));
        }
    }

    /// Runs one request to completion, again on a new connection when the old one was
    /// lost and comes back. `init` makes the per-attempt state `step` gathers chunks in.
    #[allow(clippy::too_many_arguments)]
    async fn call<S: Send>(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
        init: impl Fn() -> S + Send + Sync,
        mut step: impl FnMut(&mut S, Body) -> Result<()> + Send,
    ) -> Result<S> {
        loop {
            let conn = self.current();
            let mut st = init();
            match conn
                .call(cmd, flags, offset, len, data, |b| step(&mut st, b))
                .await
            {
                Ok(()) => return Ok(st),
                Err(e) => {
                    if !self.reconnected(&conn).await {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// A request whose reply carries nothing but success or an error.
    async fn simple(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<()> {
        self.call(
            cmd,
            flags,
            offset,
            len,
            data,
            || (),
            |_, b| match b {
                Body::Ok => Ok(()),
                _ => Err(protocol_error("Unexpected reply chunk")),
            },
        )
        .await
    }

    /// The aligned range around `[offset, offset + len)` when that is not aligned to
    /// the server's minimum block size (QEMU's request alignment for the node).
    fn widen(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let a = u64::from(self.info.min_block.max(1));
        if a == 1 || (offset.is_multiple_of(a) && len.is_multiple_of(a)) {
            return None;
        }
        Some((offset / a * a, (offset + len).div_ceil(a) * a))
    }

    /// Writes a request aligned to the minimum block size.
    async fn write_aligned(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let max = self.max_transfer() as usize;
        let fl = self.fua_flag(flags);
        for (i, chunk) in buf.chunks(max).enumerate() {
            let off = offset + (i * max) as u64;
            self.simple(reply::CMD_WRITE, fl, off, chunk.len() as u32, Some(chunk))
                .await?;
        }
        self.fua_flush(flags).await
    }

    fn max_transfer(&self) -> u64 {
        match self.info.max_block {
            0 => MAX_BUFFER,
            m => MAX_BUFFER.min(u64::from(m)),
        }
    }

    fn has(&self, flag: u16) -> bool {
        self.info.flags & flag != 0
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EPERM));
        }
        Ok(())
    }

    /// One READ request for `buf` at `offset` (inside the export).
    async fn read_one(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let n = buf.len() as u64;
        let covered = self
            .call(
                reply::CMD_READ,
                0,
                offset,
                n as u32,
                None,
                || 0u64,
                |covered, b| {
                    let (o, len) = match &b {
                        Body::Data { offset: o, data } => (*o, data.len() as u64),
                        Body::Hole { offset: o, len } => (*o, u64::from(*len)),
                        Body::Ok => return Ok(()),
                        _ => return Err(protocol_error("Unexpected reply to a read")),
                    };
                    let outside = || protocol_error("server sent data outside requested range");
                    let start = o.checked_sub(offset).ok_or_else(outside)?;
                    let end = start.checked_add(len).ok_or_else(outside)?;
                    let dst = buf
                        .get_mut(start as usize..end as usize)
                        .ok_or_else(outside)?;
                    match b {
                        Body::Data { data, .. } => dst.copy_from_slice(&data),
                        _ => dst.fill(0),
                    }
                    *covered += len;
                    Ok(())
                },
            )
            .await?;
        if covered < n {
            return Err(protocol_error("server sent less data than requested"));
        }
        Ok(())
    }

    async fn fua_flush(&self, flags: WriteFlags) -> Result<()> {
        if flags.fua && !self.has(handshake::FLAG_SEND_FUA) {
            self.flush().await?;
        }
        Ok(())
    }

    fn fua_flag(&self, flags: WriteFlags) -> u16 {
        if flags.fua && self.has(handshake::FLAG_SEND_FUA) {
            CMD_FLAG_FUA
        } else {
            0
        }
    }

    /// The range `[offset, offset + len)` cut to the export's size.
    fn in_export(&self, offset: u64, len: u64) -> u64 {
        len.min(self.info.size.saturating_sub(offset))
    }
}

#[async_trait]
impl BlockDriver for NbdNode {
    fn driver_name(&self) -> &'static str {
        "nbd"
    }

    fn filename(&self) -> String {
        self.opts.display_name()
    }

    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn alignment(&self) -> Alignment {
        Alignment {
            request: self.info.min_block.max(1),
            memory: 1,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if let Some((start, end)) = self.widen(offset, buf.len() as u64) {
            let mut bounce = vec![0u8; (end - start) as usize];
            self.read(start, &mut bounce).await?;
            let at = (offset - start) as usize;
            buf.copy_from_slice(&bounce[at..at + buf.len()]);
            return Ok(());
        }
        let avail = self.in_export(offset, buf.len() as u64) as usize;
        buf[avail..].fill(0);
        let max = self.max_transfer() as usize;
        let mut done = 0;
        while done < avail {
            let n = (avail - done).min(max);
            self.read_one(offset + done as u64, &mut buf[done..done + n])
                .await?;
            done += n;
        }
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.check_writable()?;
        let len = buf.len() as u64;
        if let Some((start, end)) = self.widen(offset, len) {
            let _g = self.rmw.write().await;
            let mut bounce = vec![0u8; (end - start) as usize];
            self.read(start, &mut bounce).await?;
            let at = (offset - start) as usize;
            bounce[at..at + buf.len()].copy_from_slice(buf);
            return self.write_aligned(start, &bounce, flags).await;
        }
        let _g = self.rmw.read().await;
        self.write_aligned(offset, buf, flags).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.check_writable()?;
        if self.widen(offset, len).is_some() {
            // Unaligned head and tail are written as zero buffers; the rest is aligned.
            let a = u64::from(self.info.min_block);
            let end = offset + len;
            let head_end = offset.next_multiple_of(a).min(end);
            let tail = (end / a * a).max(head_end);
            let plain = WriteFlags {
                may_unmap: false,
                ..flags
            };
            if head_end > offset {
                self.write(offset, &vec![0u8; (head_end - offset) as usize], plain)
                    .await?;
            }
            if tail > head_end {
                self.write_zeroes(head_end, tail - head_end, flags).await?;
            }
            if end > tail {
                self.write(tail, &vec![0u8; (end - tail) as usize], plain)
                    .await?;
            }
            return Ok(());
        }
        let max = self.max_transfer();
        if !self.has(handshake::FLAG_SEND_WRITE_ZEROES) {
            if flags.no_fallback {
                return Err(Error::errno(libc::ENOTSUP));
            }
            let zeroes = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeroes.len() as u64) as usize;
                self.write(offset + done, &zeroes[..n], WriteFlags::NONE)
                    .await?;
                done += n as u64;
            }
            return self.fua_flush(flags).await;
        }
        let mut fl = self.fua_flag(flags);
        if !flags.may_unmap {
            fl |= CMD_FLAG_NO_HOLE;
        }
        if flags.no_fallback {
            if !self.has(FLAG_SEND_FAST_ZERO) {
                return Err(Error::errno(libc::ENOTSUP));
            }
            fl |= CMD_FLAG_FAST_ZERO;
        }
        let _g = self.rmw.read().await;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            self.simple(reply::CMD_WRITE_ZEROES, fl, offset + done, n as u32, None)
                .await?;
            done += n;
        }
        self.fua_flush(flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        if !self.has(handshake::FLAG_SEND_TRIM) {
            return Ok(());
        }
        // A discard is a hint: only whole blocks are passed on.
        let a = u64::from(self.info.min_block.max(1));
        let start = offset.next_multiple_of(a);
        let end = (offset + len) / a * a;
        if end <= start {
            return Ok(());
        }
        let (offset, len) = (start, end - start);
        let _g = self.rmw.read().await;
        let max = (1u64 << 30) / a * a;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            self.simple(reply::CMD_TRIM, 0, offset + done, n as u32, None)
                .await?;
            done += n;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        if self.read_only || !self.has(handshake::FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.simple(reply::CMD_FLUSH, 0, 0, 0, None).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let Some(context) = self.info.context_id else {
            return Ok(status::all_data(offset, len));
        };
        if offset >= self.info.size {
            return Ok(status::past_end(len));
        }
        // Asked for whole blocks; the answer is cut back to the range asked about.
        let (qoff, qend) = self.widen(offset, len).unwrap_or((offset, offset + len));
        let qlen = self
            .in_export(qoff, qend - qoff)
            .min(i32::MAX as u64 & !65535);
        let c = self
            .call(
                reply::CMD_BLOCK_STATUS,
                CMD_FLAG_REQ_ONE,
                qoff,
                qlen as u32,
                None,
                status::Collector::default,
                |c, b| c.take(b, context),
            )
            .await?;
        let mut st = c.finish(qoff, qlen)?;
        let end = (qoff + st.len).min(offset + len);
        if end <= offset {
            return Err(protocol_error(
                "server sent status extent shorter than a block",
            ));
        }
        st.len = end - offset;
        if let Some(h) = st.host.as_mut() {
            h.offset = offset;
        }
        Ok(st)
    }

    async fn truncate(&self, size: u64, exact: bool, _prealloc: Prealloc) -> Result<()> {
        if size != self.info.size && exact {
            return Err(Error::unsupported("Cannot resize NBD nodes"));
        }
        if size > self.info.size {
            return Err(Error::invalid("Cannot grow NBD nodes"));
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // As QEMU closes nodes: a failing flush (a server gone away) is not reported.
        let _ = self.flush().await;
        self.current().close();
        Ok(())
    }
}
