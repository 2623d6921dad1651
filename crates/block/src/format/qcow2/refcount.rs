//! Reference counts: reading and updating them, and allocating host clusters.
//!
//! The allocator behaves like QEMU's so images grow the same way: a free-cluster hint that
//! only moves forward (or back to a freed cluster), refcount blocks placed where they can
//! describe themselves, and a refcount table that grows into a fresh self-describing area
//! at the end of the image. Allocating metadata in the middle of an allocation restarts
//! the search ([`RcError::Again`]), since the new metadata may sit where the caller meant
//! to put its data.

use crate::error::{Error, Result};
use crate::node::DebugEvent;

use super::meta::{DiscardType, Meta, TableKind};
use super::types::*;

/// Errors inside refcount updates.
pub(super) enum RcError {
    /// New refcount metadata was allocated; restart the cluster search.
    Again,
    /// A real error.
    Fail(Error),
}

impl From<Error> for RcError {
    fn from(e: Error) -> Self {
        RcError::Fail(e)
    }
}

impl From<RcError> for Error {
    fn from(e: RcError) -> Self {
        match e {
            RcError::Fail(e) => e,
            RcError::Again => Error::errno(libc::EAGAIN),
        }
    }
}

type RcResult<T> = std::result::Result<T, RcError>;

/// Reads entry `index` of a refcount block with `order` (log2 of the width in bits).
pub(super) fn rb_get(block: &[u8], index: u64, order: u32) -> u64 {
    let i = index as usize;
    match order {
        0 => ((block[i / 8] >> (i % 8)) & 1) as u64,
        1 => ((block[i / 4] >> (2 * (i % 4))) & 3) as u64,
        2 => ((block[i / 2] >> (4 * (i % 2))) & 15) as u64,
        3 => block[i] as u64,
        4 => be16(block, i * 2) as u64,
        5 => be32(block, i * 4) as u64,
        _ => be64(block, i * 8),
    }
}

/// Writes entry `index` of a refcount block.
pub(super) fn rb_set(block: &mut [u8], index: u64, order: u32, value: u64) {
    let i = index as usize;
    match order {
        0 => block[i / 8] = (block[i / 8] & !(1 << (i % 8))) | ((value as u8 & 1) << (i % 8)),
        1 => {
            let s = 2 * (i % 4);
            block[i / 4] = (block[i / 4] & !(3 << s)) | ((value as u8 & 3) << s)
        }
        2 => {
            let s = 4 * (i % 2);
            block[i / 2] = (block[i / 2] & !(15 << s)) | ((value as u8 & 15) << s)
        }
        3 => block[i] = value as u8,
        4 => put_be16(block, i * 2, value as u16),
        5 => put_be32(block, i * 4, value as u32),
        _ => put_be64(block, i * 8, value),
    }
}

/// Refcount blocks and table clusters needed to count `clusters` data clusters plus the
/// refcount metadata itself; `generous` adds room to grow (QEMU's 50 % margin).
/// Returns (refcount blocks, refcount table clusters).
pub fn refcount_metadata_clusters(
    mut clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
    mut generous: bool,
) -> (u64, u64) {
    let blocks_per_table_cluster = cluster_size / 8;
    let refcounts_per_block = (cluster_size * 8) >> refcount_order;
    let mut table = 0u64;
    let mut blocks = 0u64;
    let mut n = 0u64;
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(refcounts_per_block);
        table = blocks.div_ceil(blocks_per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            if generous {
                clusters += table.div_ceil(2);
                n = 0;
                generous = false;
                continue;
            }
            break;
        }
    }
    (blocks, table)
}

impl Meta {
    fn same_refblock(&self, a: u64, b: u64) -> bool {
        let shift = self.geo.cluster_bits + self.geo.refblock_bits();
        a >> shift == b >> shift
    }

    async fn refblock_offset_checked(&mut self, table_index: u64) -> Result<u64> {
        let off = self.reftable[table_index as usize] & REFT_OFFSET_MASK;
        if off != 0 && self.geo.offset_in_cluster(off) != 0 {
            return Err(self
                .signal_corruption(
                    true,
                    format!(
                        "Refblock offset {off:#x} unaligned (reftable index: {table_index:#x})"
                    ),
                )
                .await);
        }
        Ok(off)
    }

    /// Refcount of cluster `index` (0 where no refcount block exists).
    pub async fn get_refcount(&mut self, index: u64) -> Result<u64> {
        let ti = index >> self.geo.refblock_bits();
        if ti >= self.reftable.len() as u64 {
            return Ok(0);
        }
        let rb = self.refblock_offset_checked(ti).await?;
        if rb == 0 {
            return Ok(0);
        }
        self.load_refblock(rb).await?;
        let order = self.geo.refcount_order;
        let bi = index & (self.geo.refblock_entries() - 1);
        Ok(self
            .rb_cache
            .get(rb)
            .map(|b| rb_get(b, bi, order))
            .unwrap_or(0))
    }

    /// Finds `size` bytes worth of free clusters from the hint on, without taking them.
    pub async fn alloc_clusters_noref(&mut self, size: u64) -> Result<u64> {
        let n = self.geo.clusters_for(size).max(1);
        'retry: loop {
            for _ in 0..n {
                let idx = self.free_cluster_index;
                self.free_cluster_index += 1;
                if self.get_refcount(idx).await? != 0 {
                    continue 'retry;
                }
            }
            break;
        }
        if self.free_cluster_index > 0
            && self.free_cluster_index - 1 > (i64::MAX as u64 >> self.geo.cluster_bits)
        {
            return Err(Error::errno(libc::EFBIG));
        }
        Ok((self.free_cluster_index - n) << self.geo.cluster_bits)
    }

    /// Allocates clusters for `size` bytes and takes a reference on them.
    pub async fn alloc_clusters(&mut self, size: u64) -> Result<u64> {
        self.file.debug_event(DebugEvent::ClusterAlloc).await;
        loop {
            let off = self.alloc_clusters_noref(size).await?;
            match self
                .update_refcount(off, size, 1, false, DiscardType::Never)
                .await
            {
                Ok(()) => return Ok(off),
                Err(RcError::Again) => continue,
                Err(RcError::Fail(e)) => return Err(e),
            }
        }
    }

    /// Takes up to `n` free clusters starting exactly at `offset`; returns how many.
    pub async fn alloc_clusters_at(&mut self, offset: u64, n: u64) -> Result<u64> {
        if n == 0 {
            return Ok(0);
        }
        loop {
            let mut idx = offset >> self.geo.cluster_bits;
            let mut free = 0;
            while free < n {
                if self.get_refcount(idx).await? != 0 {
                    break;
                }
                idx += 1;
                free += 1;
            }
            match self
                .update_refcount(
                    offset,
                    free << self.geo.cluster_bits,
                    1,
                    false,
                    DiscardType::Never,
                )
                .await
            {
                Ok(()) => return Ok(free),
                Err(RcError::Again) => continue,
                Err(RcError::Fail(e)) => return Err(e),
            }
        }
    }

    /// Allocates `size` bytes (at most a cluster) for compressed data, packing them after
    /// the previous compressed cluster when they fit.
    pub async fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let mut offset = self.free_byte_offset;
        if offset != 0 {
            let rc = self.get_refcount(offset >> self.geo.cluster_bits).await?;
            if rc == self.geo.refcount_max() {
                offset = 0;
            }
        }
        let mut free_in_cluster = cs - self.geo.offset_in_cluster(offset);
        loop {
            if offset == 0 || free_in_cluster < size {
                let new_cluster = self.alloc_clusters_noref(cs).await?;
                if new_cluster == 0 {
                    return Err(self
                        .signal_corruption(
                            true,
                            "Preventing invalid allocation of compressed cluster at offset 0"
                                .into(),
                        )
                        .await);
                }
                if offset == 0 || offset.div_ceil(cs) * cs != new_cluster {
                    offset = new_cluster;
                    free_in_cluster = cs;
                } else {
                    free_in_cluster += cs;
                }
            }
            match self
                .update_refcount(offset, size, 1, false, DiscardType::Never)
                .await
            {
                Ok(()) => break,
                Err(RcError::Again) => {
                    offset = 0;
                    continue;
                }
                Err(RcError::Fail(e)) => return Err(e),
            }
        }
        self.free_byte_offset = offset + size;
        if self.geo.offset_in_cluster(self.free_byte_offset) == 0 {
            self.free_byte_offset = 0;
        }
        Ok(offset)
    }

    /// Drops one reference from each cluster of the range.
    pub async fn free_clusters(&mut self, offset: u64, size: u64, kind: DiscardType) {
        self.file.debug_event(DebugEvent::ClusterFree).await;
        if let Err(RcError::Fail(e)) = self.update_refcount(offset, size, 1, true, kind).await {
            eprintln!("qcow2_free_clusters failed: {e}");
        }
    }

    /// Frees whatever an L2 entry references (`n` clusters for standard entries).
    pub async fn free_any_clusters(&mut self, e: L2Entry, n: u64, kind: DiscardType) {
        if self.has_data_file() {
            // Data file clusters are not refcounted; only the discard is passed on.
            let ct = e.cluster_type(self.geo.extended_l2, true);
            if matches!(ct, ClusterType::Normal | ClusterType::ZeroAlloc) {
                self.note_data_file_discard(e.host_offset(), n << self.geo.cluster_bits, kind);
            }
            return;
        }
        if e.is_compressed() {
            let (off, len) = e.compressed_extent(&self.geo);
            self.free_clusters(off, len, kind).await;
            return;
        }
        let host = e.host_offset();
        if host == 0 {
            return;
        }
        if self.geo.offset_in_cluster(host) != 0 {
            let _ = self
                .signal_corruption(false, format!("Cannot free unaligned cluster {host:#x}"))
                .await;
            return;
        }
        self.free_clusters(host, n << self.geo.cluster_bits, kind)
            .await;
    }

    /// Adds (or with `decrease`, subtracts) `addend` to the refcount of every cluster
    /// touching `[offset, offset + length)`. On failure the changes made are undone.
    pub async fn update_refcount(
        &mut self,
        offset: u64,
        length: u64,
        addend: u64,
        decrease: bool,
        kind: DiscardType,
    ) -> RcResult<()> {
        if length == 0 {
            return Ok(());
        }
        if decrease {
            self.refcounts_depend_on_l2().await?;
        }
        let cs = self.geo.cluster_size();
        let start = self.geo.cluster_start(offset);
        let last = self.geo.cluster_start(offset + length - 1);
        let order = self.geo.refcount_order;
        let max = self.geo.refcount_max();
        let mut cur = start;
        let mut result = Ok(());
        while cur <= last {
            let idx = cur >> self.geo.cluster_bits;
            let rb = match Box::pin(self.alloc_refcount_block(idx)).await {
                Ok(rb) => rb,
                Err(e) => {
                    if matches!(e, RcError::Again) {
                        // The caller restarts its search; try the same clusters first.
                        self.free_cluster_index =
                            self.free_cluster_index.min(start >> self.geo.cluster_bits);
                    }
                    result = Err(e);
                    break;
                }
            };
            let bi = idx & (self.geo.refblock_entries() - 1);
            let Some(block) = self.rb_cache.get(rb) else {
                result = Err(RcError::Fail(Error::errno(libc::EIO)));
                break;
            };
            let rc = rb_get(block, bi, order);
            let new = if decrease {
                rc.checked_sub(addend)
            } else {
                rc.checked_add(addend).filter(|v| *v <= max)
            };
            let Some(new) = new else {
                result = Err(RcError::Fail(Error::errno(libc::EINVAL)));
                break;
            };
            rb_set(block, bi, order, new);
            let byte = ((bi << order) / 8) as usize;
            let width = (1usize << order).div_ceil(8);
            self.rb_cache.mark_dirty_range(rb, byte, byte + width);
            if new == 0 {
                if idx < self.free_cluster_index {
                    self.free_cluster_index = idx;
                }
                // A freed cluster may have held a cached table: forget it.
                if cur != rb {
                    self.rb_cache.remove(cur);
                }
                self.l2_cache.remove(cur);
                self.note_freed(cur, cs, kind);
            }
            cur += cs;
        }
        if !self.cache_discards {
            self.process_discards().await;
        }
        if result.is_err() && cur > start {
            // Undo what was done before the failure.
            let _ = Box::pin(self.update_refcount(
                offset,
                cur - offset,
                addend,
                !decrease,
                DiscardType::Never,
            ))
            .await;
        }
        result
    }

    /// The refcount block for cluster `index`, allocating it (and growing the refcount
    /// table) if needed. Returns `Again` after allocating.
    async fn alloc_refcount_block(&mut self, index: u64) -> RcResult<u64> {
        // Fired for every lookup, whether or not a block has to be allocated, as QEMU
        // does.
        self.file.debug_event(DebugEvent::RefblockAlloc).await;
        let ti = index >> self.geo.refblock_bits();
        if ti < self.reftable.len() as u64 {
            let rb = self.refblock_offset_checked(ti).await?;
            if rb != 0 {
                self.load_refblock_for_update(rb).await?;
                return Ok(rb);
            }
        }
        // The refcount table will change; it may not run ahead of the L2 tables that
        // depend on the current state.
        self.flush_l2().await?;
        let cs = self.geo.cluster_size();
        let new_block = self.alloc_clusters_noref(cs).await?;
        if new_block == 0 {
            return Err(RcError::Fail(
                self.signal_corruption(
                    true,
                    "Preventing invalid allocation of refcount block at offset 0".into(),
                )
                .await,
            ));
        }
        if self.same_refblock(new_block, index << self.geo.cluster_bits) {
            // The new block describes itself.
            self.new_table(TableKind::Refblock, new_block).await?;
            let bi = (new_block >> self.geo.cluster_bits) & (self.geo.refblock_entries() - 1);
            let order = self.geo.refcount_order;
            if let Some(b) = self.rb_cache.get(new_block) {
                rb_set(b, bi, order, 1);
            }
        } else {
            // Described by another block; this recurses at most twice.
            Box::pin(self.update_refcount(new_block, cs, 1, false, DiscardType::Never)).await?;
            self.flush_refblocks().await?;
            self.new_table(TableKind::Refblock, new_block).await?;
        }
        self.file.debug_event(DebugEvent::RefblockAllocWrite).await;
        self.write_refblock(new_block).await?;
        self.sync().await?;

        if ti < self.reftable.len() as u64 {
            let entry_off = self.h.refcount_table_offset + ti * 8;
            self.file.debug_event(DebugEvent::RefblockAllocHookup).await;
            self.file
                .write(
                    entry_off,
                    &new_block.to_be_bytes(),
                    crate::node::WriteFlags::NONE,
                )
                .await?;
            self.sync().await?;
            self.reftable[ti as usize] = new_block;
            self.max_reftable_index = self.max_reftable_index.max(ti);
            self.overlap.invalidate();
            return Err(RcError::Again);
        }

        // Grow the refcount table into a new self-describing area at the end.
        let blocks_used = (index + 1)
            .max((new_block >> self.geo.cluster_bits) + 1)
            .div_ceil(self.geo.refblock_entries());
        let meta_offset = (blocks_used * self.geo.refblock_entries()) << self.geo.cluster_bits;
        self.refcount_area(meta_offset, 0, false, Some((ti, new_block)))
            .await?;
        Err(RcError::Again)
    }

    /// Creates a new refcount table and refcount blocks at `start` (which must be past
    /// everything in use) covering themselves and `additional` clusters beyond them.
    /// Returns the offset after the new structures.
    pub async fn refcount_area(
        &mut self,
        start: u64,
        additional: u64,
        exact: bool,
        new_refblock: Option<(u64, u64)>,
    ) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let (total_blocks, _) = refcount_metadata_clusters(
            start / cs + additional,
            cs,
            self.geo.refcount_order,
            !exact,
        );
        if total_blocks * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::errno(libc::EFBIG));
        }
        let area_index = (start / cs) / self.geo.refblock_entries();
        let mut table_size = if exact {
            total_blocks
        } else {
            total_blocks + total_blocks.div_ceil(2)
        };
        let per_cluster = cs / 8;
        table_size = table_size.div_ceil(per_cluster) * per_cluster;
        let table_clusters = table_size * 8 / cs;
        if table_size * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::errno(libc::EFBIG));
        }
        let mut new_table = vec![0u64; table_size as usize];
        let keep = (self.max_reftable_index + 1).min(table_size) as usize;
        let keep = keep.min(self.reftable.len());
        new_table[..keep].copy_from_slice(&self.reftable[..keep]);
        if let Some((idx, off)) = new_refblock {
            new_table[idx as usize] = off;
        }
        let additional_blocks = (area_index..total_blocks)
            .filter(|&i| new_table[i as usize] == 0)
            .count() as u64;
        let table_offset = start + additional_blocks * cs;
        let end_offset = table_offset + table_clusters * cs;
        let order = self.geo.refcount_order;
        let mut block_offset = start;
        for i in area_index..total_blocks {
            let rb = if new_table[i as usize] != 0 {
                let rb = new_table[i as usize];
                self.load_refblock(rb).await?;
                rb
            } else {
                self.new_table(TableKind::Refblock, block_offset).await?;
                new_table[i as usize] = block_offset;
                block_offset += cs;
                new_table[i as usize]
            };
            let first_covered = i * self.geo.refblock_entries() * cs;
            if first_covered < end_offset {
                let j0 = if first_covered < start {
                    (start - first_covered) / cs
                } else {
                    0
                };
                let end_index =
                    ((end_offset - first_covered) / cs).min(self.geo.refblock_entries());
                if let Some(b) = self.rb_cache.get(rb) {
                    for j in j0..end_index {
                        rb_set(b, j, order, 1);
                    }
                }
                self.rb_cache.mark_dirty(rb);
            }
        }
        self.file
            .debug_event(DebugEvent::RefblockAllocWriteBlocks)
            .await;
        self.flush_refblocks().await?;
        let mut bytes = vec![0u8; (table_size * 8) as usize];
        for (i, e) in new_table.iter().enumerate() {
            put_be64(&mut bytes, i * 8, *e);
        }
        self.file
            .debug_event(DebugEvent::RefblockAllocWriteTable)
            .await;
        self.write_meta(table_offset, &bytes).await?;
        self.sync().await?;
        let mut hdr = [0u8; 12];
        put_be64(&mut hdr, 0, table_offset);
        put_be32(&mut hdr, 8, table_clusters as u32);
        self.file
            .debug_event(DebugEvent::RefblockAllocSwitchTable)
            .await;
        self.write_meta(48, &hdr).await?;
        self.sync().await?;
        let old_offset = self.h.refcount_table_offset;
        let old_size = self.reftable.len() as u64;
        self.h.refcount_table_offset = table_offset;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.reftable = new_table;
        self.update_max_reftable_index();
        self.free_clusters(old_offset, old_size * 8, DiscardType::Other)
            .await;
        Ok(end_offset)
    }

    /// Recomputes the index of the last used refcount table entry.
    pub fn update_max_reftable_index(&mut self) {
        self.overlap.invalidate();
        let mut i = self.reftable.len().saturating_sub(1);
        while i > 0 && self.reftable[i] & REFT_OFFSET_MASK == 0 {
            i -= 1;
        }
        self.max_reftable_index = i as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_refcounts() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            rb_set(&mut b, 3, order, max);
            rb_set(&mut b, 2, order, 1);
            assert_eq!(rb_get(&b, 3, order), max, "order {order}");
            assert_eq!(rb_get(&b, 2, order), 1);
            assert_eq!(rb_get(&b, 4, order), 0);
        }
    }

    #[test]
    fn metadata_size_fixed_point() {
        // 1 GiB of 64 KiB clusters, 16-bit refcounts: one block covers 32768 clusters.
        let (blocks, table) = refcount_metadata_clusters(16384, 65536, 4, false);
        assert_eq!((blocks, table), (1, 1));
    }
}
