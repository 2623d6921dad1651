//! The `compress` filter: every write to the node below goes in compressed, in whole
//! clusters of that node. Requests that do not cover whole clusters are completed with
//! the clusters' current contents first (QEMU's block layer does this for the filter's
//! cluster-sized request alignment). Everything else passes through.

use std::any::Any;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::node::{BlockDriver, BlockStatus, ChildRole, NodeRef, Prealloc, WriteFlags};

/// A compress filter over a format node that stores compressed clusters.
pub struct CompressNode {
    child: NodeRef,
    cluster: u64,
}

impl CompressNode {
    /// Puts the filter over `child`, which must support compressed writes.
    pub fn new(child: NodeRef) -> Result<CompressNode> {
        let cluster = match (child.compressor(), child.cluster_size()) {
            (Some(_), Some(c)) => c,
            _ => {
                return Err(Error::invalid(
                    "Compression is not supported for underlying format: ".to_string()
                        + child.driver_name(),
                ))
            }
        };
        Ok(CompressNode { child, cluster })
    }

    /// Writes `[offset, offset + data.len())` as whole compressed clusters.
    async fn write_aligned(&self, offset: u64, data: &[u8]) -> Result<()> {
        let size = self.child.size();
        let start = offset / self.cluster * self.cluster;
        let end = (offset + data.len() as u64)
            .div_ceil(self.cluster)
            .saturating_mul(self.cluster)
            .min(size);
        let mut buf = vec![0u8; (end - start) as usize];
        if start < offset {
            let head = (offset - start) as usize;
            self.child.read(start, &mut buf[..head]).await?;
        }
        let tail_from = offset + data.len() as u64;
        if tail_from < end {
            let at = (tail_from - start) as usize;
            self.child.read(tail_from, &mut buf[at..]).await?;
        }
        let at = (offset - start) as usize;
        buf[at..at + data.len()].copy_from_slice(data);
        self.child.write_compressed(start, &buf).await
    }
}

#[async_trait]
impl BlockDriver for CompressNode {
    fn driver_name(&self) -> &'static str {
        "compress"
    }

    fn filename(&self) -> String {
        self.child.filename()
    }

    fn size(&self) -> u64 {
        self.child.size()
    }

    fn read_only(&self) -> bool {
        self.child.read_only()
    }

    fn children(&self) -> Vec<(ChildRole, NodeRef)> {
        vec![(ChildRole::File, self.child.clone())]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.child.read(offset, buf).await
    }

    async fn write(&self, offset: u64, buf: &[u8], flags: WriteFlags) -> Result<()> {
        self.write_aligned(offset, buf).await?;
        if flags.fua {
            self.child.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        self.child.write_zeroes(offset, len, flags).await
    }

    async fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_aligned(offset, buf).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.child.discard(offset, len).await
    }

    async fn flush(&self) -> Result<()> {
        self.child.flush().await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut st = self.child.block_status(offset, len).await?;
        // The child answers for itself: filters pass its status on unchanged.
        st.recurse = false;
        Ok(st)
    }

    async fn truncate(&self, size: u64, exact: bool, prealloc: Prealloc) -> Result<()> {
        self.child.truncate(size, exact, prealloc).await
    }

    async fn close(&self) -> Result<()> {
        self.child.close().await
    }
}
