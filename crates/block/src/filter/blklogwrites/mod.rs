//! The `blklogwrites` filter: a node over one child (`file`) that passes every request on
//! and records each write, write of zeroes, discard and flush, in the order they
//! complete, in a second child (`log`), in the dm-log-writes layout QEMU's driver of the
//! same name writes (`log.rs`). Options as QEMU's: `log-sector-size` (512 by default),
//! `log-append`, `log-super-update-interval` (4096 entries).
//!
//! A log, replayed up to any entry, is the device as a power cut could have left it
//! (`replay.rs`): everything before the last flush entry, plus any subset of the writes
//! after it, torn or whole. The power-cut tests put this node under a format node and
//! check every such state.
//!
//! Differences from QEMU's driver: a write issued with FUA carries the dm-log-writes FUA
//! flag (QEMU logs it as a plain write); the superblock is written when a new log is
//! opened and when the node closes, so a log always names the entries it holds; requests
//! not aligned to the log sector size are padded here with read-modify-write, as QEMU's
//! generic block layer pads them before they reach its driver; `truncate` passes through
//! unlogged (dm-log-writes has no entry for it).

pub mod log;
pub mod replay;

use std::any::Any;

use async_trait::async_trait;
use rqemu_opts::KeyVal;
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::iov::{IoBuf, IoBufMut};
use crate::node::{Alignment, BlockDriver, BlockStatus, ChildRole, NodeRef, Prealloc, WriteFlags};

/// The options of a blklogwrites node (its children are opened by the caller).
#[derive(Debug, Clone, Copy)]
pub struct BlkLogWritesOptions {
    /// Continue an existing log instead of starting a new one.
    pub append: bool,
    /// `log-sector-size`, if given.
    pub sector_size: Option<u64>,
    /// Entries between superblock updates (besides the one at every flush).
    pub update_interval: u64,
}

impl BlkLogWritesOptions {
    /// Takes `log-append`, `log-sector-size` and `log-super-update-interval` out of `kv`.
    pub fn take_from(kv: &mut KeyVal) -> Result<BlkLogWritesOptions> {
        let append = match kv.take("log-append") {
            None => false,
            Some(v) => rqemu_opts::bool_opt(&v)
                .ok_or_else(|| Error::invalid("Parameter 'log-append' expects 'on' or 'off'"))?,
        };
        let sector_size = match kv.take("log-sector-size") {
            None => None,
            Some(v) => Some(rqemu_opts::parse_size(&v, 1).map_err(|_| {
                Error::invalid(
                    "Parameter 'log-sector-size' expects a non-negative number below 2^64",
                )
            })?),
        };
        let update_interval = match kv.take("log-super-update-interval") {
            None => 4096,
            Some(v) => v.parse::<u64>().map_err(|_| {
                Error::invalid("Parameter 'log-super-update-interval' expects a number")
            })?,
        };
        if append && sector_size.is_some() {
            return Err(Error::invalid(
                "log-append and log-sector-size are mutually exclusive",
            ));
        }
        if update_interval == 0 {
            return Err(Error::invalid("Invalid log superblock update interval 0"));
        }
        Ok(BlkLogWritesOptions {
            append,
            sector_size,
            update_interval,
        })
    }
}

/// Where the log goes on.
struct Cursor {
    /// Log sector the next entry goes to.
    sector: u64,
    /// Entries in the log.
    entries: u64,
}

/// A blklogwrites node.
pub struct BlkLogWritesNode {
    file: NodeRef,
    log: NodeRef,
    sector_size: u32,
    update_interval: u64,
    /// Held while an entry is appended, so the log's order is the order of completion.
    cursor: Mutex<Cursor>,
    /// Held by padded (read-modify-write) requests.
    rmw: Mutex<()>,
}

impl BlkLogWritesNode {
    /// Builds the node over `file`, logging to `log`.
    pub async fn open(
        file: NodeRef,
        log: NodeRef,
        opts: BlkLogWritesOptions,
    ) -> Result<BlkLogWritesNode> {
        let (sector_size, cursor) = if opts.append {
            Self::find_end(&log).await?
        } else {
            let ss = opts.sector_size.unwrap_or(log::DEFAULT_SECTOR_SIZE as u64);
            if !log::sector_size_valid(ss) {
                return Err(Error::invalid(format!("Invalid log sector size {ss}")));
            }
            let ss = ss as u32;
            log.write(0, &log::superblock(0, ss), WriteFlags::NONE)
                .await?;
            (
                ss,
                Cursor {
                    sector: 1,
                    entries: 0,
                },
            )
        };
        Ok(BlkLogWritesNode {
            file,
            log,
            sector_size,
            update_interval: opts.update_interval,
            cursor: Mutex::new(cursor),
            rmw: Mutex::new(()),
        })
    }

    /// Reads an existing log's superblock and walks its entries to where the next goes.
    async fn find_end(log: &NodeRef) -> Result<(u32, Cursor)> {
        if log.size() == 0 {
            return Ok((
                log::DEFAULT_SECTOR_SIZE,
                Cursor {
                    sector: 1,
                    entries: 0,
                },
            ));
        }
        let mut sb = [0u8; log::HEADER_BYTES];
        log.read(0, &mut sb)
            .await
            .map_err(|e| e.context("Could not read log superblock"))?;
        let invalid = |e: log::LogError| Error::invalid(e.to_string());
        let (entries, ss) = log::read_superblock(&sb).map_err(invalid)?;
        let ss = ss as u64;
        let mut sector = 1u64;
        let mut h = [0u8; log::HEADER_BYTES];
        for i in 0..entries {
            log.read(sector.saturating_mul(ss), &mut h)
                .await
                .map_err(|e| e.context(format!("Failed to read log entry {i}")))?;
            let data = log::EntryHeader::read(&h, i)
                .map_err(invalid)?
                .data_bytes(ss)
                .unwrap_or(u64::MAX);
            sector = sector.saturating_add(1).saturating_add(data.div_ceil(ss));
        }
        Ok((ss as u32, Cursor { sector, entries }))
    }

    /// Appends one entry: its header, then `data` (or `zeroes` bytes of zeroes), and
    /// updates the superblock at a flush and every `log-super-update-interval` entries.
    async fn append(
        &self,
        offset: u64,
        len: u64,
        flags: u64,
        data: &[u8],
        zeroes: u64,
    ) -> Result<()> {
        let ss = self.sector_size as u64;
        let mut c = self.cursor.lock().await;
        let at = c.sector * ss;
        let header = log::entry_header(offset / ss, len / ss, flags, self.sector_size);
        let mut entry = header;
        if flags & log::MARK != 0 {
            entry[24..32].copy_from_slice(&(data.len() as u64).to_le_bytes());
        }
        let pad = vec![0u8; (data.len() as u64).next_multiple_of(ss) as usize - data.len()];
        self.log
            .writev(
                at,
                &[IoBuf::new(&entry), IoBuf::new(data), IoBuf::new(&pad)],
                WriteFlags::NONE,
            )
            .await?;
        let mut next = at + ss + data.len() as u64 + pad.len() as u64;
        if zeroes > 0 {
            self.log
                .write_zeroes(next, zeroes, WriteFlags::NONE)
                .await?;
            next += zeroes.next_multiple_of(ss);
        }
        c.sector = next / ss;
        c.entries += 1;
        if flags & log::FLUSH != 0 || c.entries.is_multiple_of(self.update_interval) {
            self.write_super(c.entries).await?;
        }
        Ok(())
    }

    async fn write_super(&self, entries: u64) -> Result<()> {
        self.log
            .write(
                0,
                &log::superblock(entries, self.sector_size),
                WriteFlags::NONE,
            )
            .await?;
        self.log.flush().await
    }

    /// Logs a user mark labelled `label` (dm-log-writes' marks; QEMU's driver has none):
    /// tests put one after each operation they later check against.
    pub async fn mark(&self, label: &str) -> Result<()> {
        self.append(0, 0, log::MARK, label.as_bytes(), 0).await
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        let ss = self.sector_size as u64;
        offset.is_multiple_of(ss) && len.is_multiple_of(ss)
    }

    /// Writes and logs an aligned range.
    async fn write_logged(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let res = self.file.write(offset, buf, flags).await;
        let entry = if flags.fua { log::FUA } else { 0 };
        self.append(offset, buf.len() as u64, entry, buf, 0).await?;
        res
    }

    /// Writes an unaligned range: the whole log sectors around it are read, patched and
    /// written (and logged) as one aligned write.
    async fn write_padded(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        let ss = self.sector_size as u64;
        let start = offset / ss * ss;
        let end = (offset + buf.len() as u64).next_multiple_of(ss);
        let _g = self.rmw.lock().await;
        let mut padded = vec![0u8; (end - start) as usize];
        let avail = self.file.size().saturating_sub(start).min(end - start) as usize;
        if avail > 0 {
            self.file.read(start, &mut padded[..avail]).await?;
        }
        let at = (offset - start) as usize;
        padded[at..at + buf.len()].copy_from_slice(buf);
        self.write_logged(start, &padded, flags).await
    }
}

#[async_trait]
impl BlockDriver for BlkLogWritesNode {
    fn driver_name(&self) -> &'static str {
        "blklogwrites"
    }

    fn filename(&self) -> String {
        self.file.filename()
    }

    fn size(&self) -> u64 {
        self.file.size()
    }

    fn read_only(&self) -> bool {
        self.file.read_only()
    }

    fn alignment(&self) -> Alignment {
        self.file.alignment()
    }

    fn children(&self) -> Vec<(ChildRole, NodeRef)> {
        vec![
            (ChildRole::File, self.file.clone()),
            (ChildRole::Log, self.log.clone()),
        ]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn debug_event(&self, ev: crate::node::DebugEvent) {
        self.file.debug_event(ev).await
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read(offset, buf).await
    }

    async fn readv(&self, offset: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        self.file.readv(offset, bufs).await
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        if self.aligned(offset, buf.len() as u64) {
            self.write_logged(offset, buf, flags).await
        } else {
            self.write_padded(offset, buf, flags).await
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let ss = self.sector_size as u64;
        let start = offset.next_multiple_of(ss).min(offset + len);
        let end = ((offset + len) / ss * ss).max(start);
        if start > offset {
            let head = vec![0u8; (start - offset) as usize];
            self.write_padded(offset, &head, flags).await?;
        }
        if end > start {
            let res = self.file.write_zeroes(start, end - start, flags).await;
            let entry = if flags.fua { log::FUA } else { 0 };
            self.append(start, end - start, entry, &[], end - start)
                .await?;
            res?;
        }
        if offset + len > end {
            let tail = vec![0u8; (offset + len - end) as usize];
            self.write_padded(end, &tail, flags).await?;
        }
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // A discard is a hint: the unaligned ends are left alone.
        let ss = self.sector_size as u64;
        let start = offset.next_multiple_of(ss);
        let end = (offset + len) / ss * ss;
        if end <= start {
            return Ok(());
        }
        let res = self.file.discard(start, end - start).await;
        self.append(start, end - start, log::DISCARD, &[], 0)
            .await?;
        res
    }

    async fn flush(&self) -> Result<()> {
        let res = self.file.flush().await;
        self.append(0, 0, log::FLUSH, &[], 0).await?;
        res
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut s = self.file.block_status(offset, len).await?;
        s.recurse = false;
        s.host = None;
        Ok(s)
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()> {
        self.file.truncate(size, exact, prealloc).await
    }

    async fn close(&self) -> Result<()> {
        let res = self.file.close().await;
        let c = self.cursor.lock().await;
        self.write_super(c.entries).await?;
        self.log.close().await?;
        res
    }

    async fn allocated_size(&self) -> Option<u64> {
        self.file.allocated_size().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::log::{parse, Op};
    use super::*;
    use crate::protocol::mem::MemNode;
    use crate::test_util::block_on;

    fn mem(size: usize) -> MemNode {
        MemNode::new(vec![0; size], false)
    }

    /// A node over an in-memory file, logging to another.
    fn mem_node(ss: Option<u64>) -> (BlkLogWritesNode, NodeRef, NodeRef) {
        let file: NodeRef = Arc::new(mem(1 << 20));
        let logf: NodeRef = Arc::new(mem(0));
        let opts = BlkLogWritesOptions {
            append: false,
            sector_size: ss,
            update_interval: 4096,
        };
        let node = block_on(BlkLogWritesNode::open(file.clone(), logf.clone(), opts)).unwrap();
        (node, file, logf)
    }

    fn log_bytes(logf: &NodeRef) -> Vec<u8> {
        let mut b = vec![0u8; logf.size() as usize];
        block_on(logf.read(0, &mut b)).unwrap();
        b
    }

    #[test]
    fn logs_requests_in_order() {
        let (node, file, logf) = mem_node(None);
        block_on(async {
            node.write(4096, &[1u8; 1024], WriteFlags::NONE)
                .await
                .unwrap();
            node.write(10, &[2u8; 5], WriteFlags::FUA).await.unwrap();
            node.write_zeroes(100, 2000, WriteFlags::NONE)
                .await
                .unwrap();
            node.discard(1000, 5000).await.unwrap();
            node.flush().await.unwrap();
            node.mark("done").await.unwrap();
            node.close().await.unwrap();
        });
        let bytes = log_bytes(&logf);
        let l = parse(&bytes).unwrap();
        let kinds: Vec<String> = l
            .ops
            .iter()
            .map(|o| match o {
                Op::Write {
                    offset, len, fua, ..
                } => format!("w {offset} {len} {fua}"),
                Op::Discard { offset, len } => format!("d {offset} {len}"),
                Op::Flush => "f".into(),
                Op::Mark(m) => format!("m {m}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "w 4096 1024 false",
                "w 0 512 true",
                "w 0 512 false",
                "w 512 1536 false",
                "w 2048 512 false",
                "d 1024 4608",
                "f",
                "m done"
            ]
        );
        // The padded write carries what the sector held around the written bytes.
        let Op::Write { data, .. } = l.ops[1] else {
            unreachable!()
        };
        let d = &bytes[data as usize..data as usize + 512];
        assert!(d[10..15].iter().all(|&b| b == 2));
        let mut f = vec![0u8; 15];
        block_on(file.read(0, &mut f)).unwrap();
        assert_eq!(&f[10..], &[2u8; 5]);
    }

    #[test]
    fn appends_to_an_existing_log() {
        let (node, file, logf) = mem_node(Some(4096));
        block_on(async {
            node.write(0, &[1u8; 4096], WriteFlags::NONE).await.unwrap();
            node.flush().await.unwrap();
            node.mark("a mark is walked over too").await.unwrap();
            node.close().await.unwrap();
            let opts = BlkLogWritesOptions {
                append: true,
                sector_size: None,
                update_interval: 1,
            };
            let again = BlkLogWritesNode::open(file, logf.clone(), opts)
                .await
                .unwrap();
            again
                .write(8192, &[3u8; 4096], WriteFlags::NONE)
                .await
                .unwrap();
            again.close().await.unwrap();
        });
        let l = parse(&log_bytes(&logf)).unwrap();
        assert_eq!(l.sector_size, 4096);
        assert_eq!(l.ops.len(), 4);
        assert!(matches!(l.ops[3], Op::Write { offset: 8192, .. }));
    }

    #[test]
    fn options_as_qemu_checks_them() {
        let parse_opts = |s: &str| {
            let mut kv = rqemu_opts::KeyVal::parse(s, None).unwrap();
            BlkLogWritesOptions::take_from(&mut kv).map_err(|e| e.to_string())
        };
        assert!(parse_opts("log-sector-size=4096").is_ok());
        assert_eq!(
            parse_opts("log-append=on,log-sector-size=512").unwrap_err(),
            "log-append and log-sector-size are mutually exclusive"
        );
        assert_eq!(
            parse_opts("log-super-update-interval=0").unwrap_err(),
            "Invalid log superblock update interval 0"
        );
        let file: NodeRef = Arc::new(mem(0));
        let logf: NodeRef = Arc::new(mem(0));
        let opts = BlkLogWritesOptions {
            append: false,
            sector_size: Some(1000),
            update_interval: 1,
        };
        let e = block_on(BlkLogWritesNode::open(file, logf, opts))
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "Invalid log sector size 1000");
    }
}
