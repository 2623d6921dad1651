//! The node interface: what every format and protocol driver implements.
//!
//! A block graph is built from nodes ([`NodeRef`]): a format node (qcow2, raw) sits on a
//! protocol node (file) through its `file` child and may have a `backing` node. All data
//! operations are async and take byte offsets and lengths; a node serves many requests at
//! once. Drivers that cannot do something return [`Error::Unsupported`]. Vectored
//! requests carry raw buffer descriptors ([`crate::iov`]), never slices, so that guest
//! memory can be read into and written from without being borrowed by Rust code.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, Result};
pub use crate::filter::blkdebug::Event as DebugEvent;
use crate::info::{CheckReport, FormatInfo, RepairMode, SnapshotInfo};
pub use crate::iov::{IoBuf, IoBufMut};

/// A shared handle to a node of the graph.
pub type NodeRef = Arc<dyn BlockDriver>;

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the request completes.
    pub fua: bool,
    /// For write-zeroes: the range may be deallocated (holes, discarded clusters).
    pub may_unmap: bool,
    /// For write-zeroes: fail with ENOTSUP instead of writing explicit zero buffers.
    pub no_fallback: bool,
}

impl WriteFlags {
    /// No flags.
    pub const NONE: WriteFlags = WriteFlags {
        fua: false,
        may_unmap: false,
        no_fallback: false,
    };
    /// Only FUA.
    pub const FUA: WriteFlags = WriteFlags {
        fua: true,
        may_unmap: false,
        no_fallback: false,
    };
}

/// Preallocation modes of `create` and `truncate`, as QEMU names them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Prealloc {
    /// Nothing is preallocated.
    #[default]
    Off,
    /// Format metadata is preallocated (qcow2: L2 tables and cluster mappings).
    Metadata,
    /// Space is reserved with fallocate.
    Falloc,
    /// Space is written with zeroes.
    Full,
}

impl Prealloc {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Option<Prealloc> {
        Some(match s {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => return None,
        })
    }

    /// QEMU's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

/// Where the data of a range lives.
#[derive(Clone)]
pub struct HostMapping {
    /// The node holding the data (a file node, or a qcow2 external data file);
    /// `None` for the node that answered (protocol nodes map to themselves).
    pub node: Option<NodeRef>,
    /// Byte offset in that node.
    pub offset: u64,
}

/// The allocation status of a range starting at the requested offset.
#[derive(Clone, Default)]
pub struct BlockStatus {
    /// Bytes from the requested offset with this status (at least 1, at most the request).
    pub len: u64,
    /// Reads return data from this node or below (not known to be zero).
    pub data: bool,
    /// Reads return zeroes.
    pub zero: bool,
    /// This node determines the content (as opposed to its backing node).
    pub allocated: bool,
    /// The range is a compressed cluster.
    pub compressed: bool,
    /// The answer for data/zero should be refined by asking `host.node`.
    pub recurse: bool,
    /// Where the range is stored, if it is stored contiguously somewhere.
    pub host: Option<HostMapping>,
}

impl BlockStatus {
    /// `len` bytes of allocated data: QEMU's answer for drivers that have no allocation
    /// status of their own.
    pub fn all_data(len: u64) -> BlockStatus {
        BlockStatus {
            len,
            data: true,
            zero: false,
            allocated: true,
            compressed: false,
            recurse: false,
            host: None,
        }
    }
}

impl std::fmt::Debug for BlockStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStatus")
            .field("len", &self.len)
            .field("data", &self.data)
            .field("zero", &self.zero)
            .field("allocated", &self.allocated)
            .field("compressed", &self.compressed)
            .field("recurse", &self.recurse)
            .field("host_offset", &self.host.as_ref().map(|h| h.offset))
            .finish()
    }
}

/// What a child is to its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildRole {
    /// The protocol node under a format node.
    File,
    /// The backing image of an overlay.
    Backing,
    /// An external data file (qcow2 `data_file`).
    DataFile,
    /// The node a filter passes requests to (blkdebug's `image`).
    Image,
    /// One of several equal children (quorum's `children.N`).
    Children,
    /// Where a filter records requests (blklogwrites' `log`).
    Log,
}

impl ChildRole {
    /// QEMU's name of the child.
    pub fn name(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
            ChildRole::DataFile => "data-file",
            ChildRole::Image => "image",
            ChildRole::Children => "children",
            ChildRole::Log => "log",
        }
    }

    /// Whether the child is its parent's primary child: the one requests and debug
    /// events go down to (`file`, or a filter's `image`).
    pub fn is_primary(self) -> bool {
        matches!(self, ChildRole::File | ChildRole::Image)
    }
}

/// Memory and request alignment a node needs (O_DIRECT files need sector alignment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Offsets and lengths must be multiples of this.
    pub request: u32,
    /// Buffer addresses must be multiples of this.
    pub memory: u32,
}

impl Alignment {
    /// No alignment requirement.
    pub const BYTE: Alignment = Alignment {
        request: 1,
        memory: 1,
    };
}

/// A format or protocol driver instance: one node of the graph.
#[async_trait]
pub trait BlockDriver: Send + Sync + 'static {
    /// The driver's QEMU name (`qcow2`, `raw`, `file`).
    fn driver_name(&self) -> &'static str;

    /// The node's filename as QEMU shows it (for a format node, its file's name).
    fn filename(&self) -> String;

    /// Current size in bytes (virtual size for formats, file length for protocols).
    fn size(&self) -> u64;

    /// Whether the node was opened read-only.
    fn read_only(&self) -> bool;

    /// Alignment this node needs from its callers.
    fn alignment(&self) -> Alignment {
        Alignment::BYTE
    }

    /// The node's children with their roles, file first.
    fn children(&self) -> Vec<(ChildRole, NodeRef)> {
        Vec::new()
    }

    /// The directory the image's relative names (backing files) are taken from, as
    /// QEMU's `bdrv_dirname`: that of the primary child for formats and filters, the
    /// file's own for a plain file; `None` where no single directory can be named.
    fn dirname(&self) -> Option<String> {
        if let Some((_, c)) = self.children().into_iter().find(|(r, _)| r.is_primary()) {
            return c.dirname();
        }
        let name = self.filename();
        if name.starts_with("json:") || crate::open::is_protocol_name(&name) {
            return None;
        }
        Some(
            name.rfind('/')
                .map_or(String::new(), |i| name[..=i].to_string()),
        )
    }

    /// The backing node, if this node has one open.
    fn backing(&self) -> Option<NodeRef> {
        self.children()
            .into_iter()
            .find(|(r, _)| *r == ChildRole::Backing)
            .map(|(_, n)| n)
    }

    /// Where this node's bytes lie one to one in a regular host file: its descriptor and
    /// the offset of byte 0 (for copy offloading). `None` for anything else.
    fn host_fd(&self) -> Option<(std::os::fd::RawFd, u64)> {
        None
    }

    /// The format's allocation unit, where it has one (QEMU's `bdrv_get_info`).
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// Whether a freshly created node of this kind reads as zeroes without being
    /// written (QEMU's `bdrv_has_zero_init`).
    fn has_zero_init(&self) -> bool {
        false
    }

    /// Whether the driver can have a backing node (unallocated ranges fall through).
    fn supports_backing(&self) -> bool {
        false
    }

    /// Whether the node encrypts its data (`encrypted: yes` in `qemu-img info`).
    fn encrypted(&self) -> bool {
        false
    }

    /// The driver as `Any`, to reach format-specific operations.
    fn as_any(&self) -> &dyn Any;

    /// Announces a debug event to this node (QEMU's `BLKDBG_EVENT`): format drivers
    /// fire them on their `file` child at the points QEMU does. Only blkdebug nodes
    /// react (arming error rules, switching state, stopping at breakpoints).
    async fn debug_event(&self, _ev: DebugEvent) {}

    /// Reads `buf.len()` bytes at `offset`.
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `buf` at `offset`.
    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()>;

    /// Reads into the raw buffers of `bufs` in turn, as one request at `offset` (a
    /// vectored read: QEMU's `preadv`; see [`crate::iov`] for the buffers' contract).
    /// Drivers that can pass vectors down override this; the default reads through a
    /// private bounce buffer of at most [`crate::iov::BOUNCE_BYTES`] ([`readv_bounced`]).
    async fn readv(&self, offset: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        readv_bounced(self, offset, bufs).await
    }

    /// Writes the raw buffers of `bufs` in turn, as one request at `offset` (a vectored
    /// write). The default copies them into a private bounce buffer of at most
    /// [`crate::iov::BOUNCE_BYTES`] and writes that, piece by piece ([`writev_bounced`]).
    async fn writev(&self, offset: u64, bufs: &[IoBuf<'_>], flags: WriteFlags) -> Result<()> {
        writev_bounced(self, offset, bufs, flags).await
    }

    /// Writes `len` zero bytes at `offset`, deallocating if `flags.may_unmap` allows.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()>;

    /// Writes `buf` (a whole cluster, or the image's tail) compressed.
    async fn write_compressed(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(Error::unsupported(
            "Compression is not supported for this image format",
        ))
    }

    /// What compresses clusters for [`Self::write_precompressed`], for formats that
    /// store compressed clusters.
    fn compressor(&self) -> Option<crate::format::qcow2::compress::Compressor> {
        None
    }

    /// Stores one cluster at `offset` whose compressed form `compressed` came from
    /// [`Self::compressor`] (`None`: it did not compress and `buf` is stored as is).
    async fn write_precompressed(
        &self,
        _offset: u64,
        _buf: &[u8],
        _compressed: Option<Vec<u8>>,
    ) -> Result<()> {
        Err(Error::unsupported(
            "Compression is not supported for this image format",
        ))
    }

    /// Makes every block unallocated, so reads fall through to the backing file (what
    /// `qemu-img commit` leaves of the committed overlay).
    async fn make_empty(&self) -> Result<()> {
        Err(Error::errno(libc::ENOTSUP))
    }

    /// Reads saved VM state (stored by formats that can, like qcow2, past the disk).
    async fn load_vmstate(&self, _pos: u64, _buf: &mut [u8]) -> Result<()> {
        Err(Error::errno(libc::ENOTSUP))
    }

    /// Writes saved VM state.
    async fn save_vmstate(&self, _pos: u64, _buf: &[u8]) -> Result<()> {
        Err(Error::errno(libc::ENOTSUP))
    }

    /// Discards `len` bytes at `offset` (a hint; contents become unspecified or zero).
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// Allocation status of the range starting at `offset`, at most `len` bytes long.
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus>;

    /// Changes the size.
    async fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()>;

    /// Writes back cached metadata, clears dirty state and releases the node.
    async fn close(&self) -> Result<()> {
        self.flush().await
    }

    /// Checks the node's own options for a reopen (`options` as the node would be
    /// opened with) without changing anything: a reopen that fails leaves the node as
    /// it was.
    fn check_reopen(&self, _options: &rqemu_opts::KeyVal) -> Result<()> {
        Ok(())
    }

    /// Whether `key` is one of the node's runtime options, which last for one open or
    /// reopen only: a reopen starts from the options without them, as QEMU's does.
    fn is_runtime_option(&self, _key: &str) -> bool {
        false
    }

    /// Bytes the node occupies on its storage (`disk size` in `qemu-img info`).
    async fn allocated_size(&self) -> Option<u64> {
        None
    }

    /// Format-specific information for `qemu-img info`.
    async fn format_info(&self) -> Result<FormatInfo> {
        Ok(FormatInfo::default())
    }

    /// Internal snapshots of the image.
    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(Vec::new())
    }

    /// Consistency check (and repair) of the image's metadata.
    async fn check(&self, _repair: RepairMode) -> Result<CheckReport> {
        Err(Error::unsupported(
            "This image format does not support checks",
        ))
    }
}

/// A vectored read served by plain reads of `node` into a private bounce buffer (at most
/// [`crate::iov::BOUNCE_BYTES`] at a time), copied out to `bufs`: what drivers that
/// cannot pass raw buffers down do.
pub async fn readv_bounced<D: BlockDriver + ?Sized>(
    node: &D,
    offset: u64,
    bufs: &[IoBufMut<'_>],
) -> Result<()> {
    let total = crate::iov::len(bufs);
    if total == 0 {
        return Ok(());
    }
    let mut bounce = vec![0u8; total.min(crate::iov::BOUNCE_BYTES)];
    let mut done = 0;
    while done < total {
        let n = (total - done).min(bounce.len());
        node.read(offset + done as u64, &mut bounce[..n]).await?;
        crate::iov::scatter(&crate::iov::sub(bufs, done, n), &bounce[..n]);
        done += n;
    }
    Ok(())
}

/// A vectored write served by plain writes to `node` from a private bounce buffer (at
/// most [`crate::iov::BOUNCE_BYTES`] at a time) that `bufs` are copied into.
pub async fn writev_bounced<D: BlockDriver + ?Sized>(
    node: &D,
    offset: u64,
    bufs: &[IoBuf<'_>],
    flags: WriteFlags,
) -> Result<()> {
    let total = crate::iov::len(bufs);
    if total == 0 {
        return Ok(());
    }
    let mut bounce = vec![0u8; total.min(crate::iov::BOUNCE_BYTES)];
    let mut done = 0;
    while done < total {
        let n = (total - done).min(bounce.len());
        crate::iov::gather(&crate::iov::sub(bufs, done, n), &mut bounce[..n]);
        node.write(offset + done as u64, &bounce[..n], flags)
            .await?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::mem::MemNode;
    use crate::test_util::{block_on, Mapping};

    /// A driver without a raw path of its own (the memory node) serves raw buffers
    /// through the bounded bounce, in several rounds for a request longer than it.
    #[test]
    fn default_raw_path_bounces() {
        let len = crate::iov::BOUNCE_BYTES * 2 + 12345;
        let data: Vec<u8> = (0..len + 4096).map(|i| (i * 31 + 7) as u8).collect();
        let node = MemNode::new(data.clone(), false);
        let mem = Mapping::new(len);
        let bufs = [mem.buf(0, 333), mem.buf(333, len - 333)];
        block_on(node.readv(4096, &bufs)).expect("readv");
        assert!(mem.copy(0, len) == data[4096..4096 + len]);

        let pattern: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        mem.buf(0, len).copy_from(0, &pattern);
        let w = crate::iov::readable(&bufs);
        block_on(node.writev(1000, &w, WriteFlags::NONE)).expect("writev");
        let after = node.contents();
        assert!(after[1000..1000 + len] == pattern[..]);
        assert!(after[..1000] == data[..1000]);
    }
}
