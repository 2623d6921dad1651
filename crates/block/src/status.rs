//! Allocation status across a node and its backing chain: what `qemu-img map`,
//! `convert` and zero detection ask. A node's driver answers for itself; this module adds
//! what QEMU's generic layer adds (unallocated ranges with no backing data read as zero)
//! and walks down the backing chain.

use crate::error::Result;
use crate::node::{BlockStatus, NodeRef};

/// The status of a range as seen from the top of a chain.
#[derive(Debug, Clone)]
pub struct ChainStatus {
    /// The status reported by the layer that provides the content (or the bottom one).
    pub status: BlockStatus,
    /// How many backing levels below the top that layer is.
    pub depth: u32,
}

/// The status of one node at `offset`, with QEMU's generic additions.
pub async fn block_status(node: &NodeRef, offset: u64, len: u64) -> Result<BlockStatus> {
    // QEMU measures nodes in whole 512-byte sectors: the tail of a file whose length is
    // not a multiple of that has a status (a hole) too.
    let size = sector_len(node);
    if offset >= size {
        return Ok(BlockStatus {
            len: 0,
            zero: true,
            ..Default::default()
        });
    }
    let len = len.min(size - offset);
    let mut st = node.block_status(offset, len).await?;
    st.len = st.len.clamp(1, len);
    if st.data || st.zero {
        st.allocated = true;
    } else if node.supports_backing() {
        match node.backing() {
            None => st.zero = true,
            Some(b) => {
                if offset >= sector_len(&b) {
                    st.zero = true;
                }
            }
        }
    }
    if st.recurse && st.data && !st.zero {
        if let Some(h) = &st.host {
            if let Some(file) = &h.node {
                if let Ok(fs) = Box::pin(block_status(file, h.offset, st.len)).await {
                    if fs.len == 0 {
                        st.zero = true;
                    } else {
                        st.len = st.len.min(fs.len);
                        st.zero |= fs.zero;
                    }
                }
            }
        }
    }
    Ok(st)
}

/// A node's length rounded up to whole sectors, as QEMU's block layer reports lengths.
fn sector_len(node: &NodeRef) -> u64 {
    node.size().div_ceil(512) * 512
}

/// The status at `offset` from the top of `top`'s backing chain: the first layer that
/// has data or zeroes for the range, and its depth (like `qemu-img map`).
pub async fn block_status_chain(top: &NodeRef, offset: u64, len: u64) -> Result<ChainStatus> {
    let mut node = top.clone();
    let mut depth = 0;
    let mut len = len;
    loop {
        let st = block_status(&node, offset, len).await?;
        len = st.len.max(1).min(len);
        if st.data || st.zero {
            return Ok(ChainStatus {
                status: BlockStatus { len, ..st },
                depth,
            });
        }
        match node.backing() {
            Some(b) => {
                node = b;
                depth += 1;
            }
            None => {
                return Ok(ChainStatus {
                    status: BlockStatus { len, ..st },
                    depth,
                })
            }
        }
    }
}

/// Whether `[offset, offset + len)` of `node` reads as zeroes according to metadata
/// (no data is read). Ranges past the end count as zero.
pub async fn is_zero(node: &NodeRef, offset: u64, len: u64) -> Result<bool> {
    let end = (offset + len).min(node.size());
    let mut pos = offset;
    while pos < end {
        let cs = block_status_chain(node, pos, end - pos).await?;
        if !cs.status.zero {
            return Ok(false);
        }
        pos += cs.status.len.max(1);
    }
    Ok(true)
}
