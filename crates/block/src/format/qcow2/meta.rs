//! The metadata state of an open qcow2 image, and the order in which it reaches the disk.
//!
//! [`Meta`] lives behind the image's async mutex: the header, the active L1 table, the
//! refcount table, and the caches of L2 tables and refcount blocks.
//!
//! # Crash consistency
//!
//! Updates become durable in an order that never leaves a reference to an unreferenced
//! cluster on disk:
//!
//! 1. data is written to a newly allocated cluster;
//! 2. the cluster's refcount increase reaches the disk;
//! 3. the L2 entry pointing at it reaches the disk;
//! 4. the L1 entry (for a new L2 table) last.
//!
//! Freeing runs the other way: the L2 entry dropping a reference reaches the disk before
//! the refcount decrease. Two flags record what the dirty caches depend on
//! (`l2_after_refcounts`, `refcounts_after_l2`); before a change that would create the
//! opposite dependency, the cache it would conflict with is written out first, so the two
//! never depend on each other. [`Meta::write_l2_table`] and
//! [`Meta::write_refblock`] are the only places tables are written, and they enforce the
//! order, with an fsync between dependent steps unless the cache mode is `unsafe`.
//! New L2 tables are written (zeroed or copied) before the L1 entry that points at them,
//! and the L1 entry is written through at once. What a completed flush covered is
//! therefore intact after a crash; what it did not may be lost or leak clusters (which
//! `check -r leaks` reclaims), but never corrupts the image.

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::node::{DebugEvent, NodeRef, WriteFlags};

use super::cache::TableCache;
use super::header::Header;
use super::snapshot::Snapshot;
use super::types::*;

/// Lets L2 tables reach the disk before the data and refcount blocks they depend on:
/// a broken ordering, switched on only by the power-cut tests to show they catch it.
#[doc(hidden)]
pub static UNORDERED_L2_FOR_TESTS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Which cache a dirty table belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TableKind {
    /// An L2 table.
    L2,
    /// A refcount block.
    Refblock,
}

/// Why clusters are freed (QEMU's discard types, which `pass-discard-*` filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DiscardType {
    /// Never passed down.
    Never,
    /// Always passed down.
    Always,
    /// A guest discard request.
    Request,
    /// Snapshot deletion.
    Snapshot,
    /// Other metadata operations.
    Other,
}

/// Metadata state of an open image.
pub(super) struct Meta {
    /// The header as last written.
    pub h: Header,
    /// Geometry derived from the header.
    pub geo: Geometry,
    /// The image file.
    pub file: NodeRef,
    /// Active L1 table (host byte order).
    pub l1: Vec<u64>,
    /// Refcount table (host byte order).
    pub reftable: Vec<u64>,
    /// Index of the last used refcount table entry.
    pub max_reftable_index: u64,
    /// Cached L2 tables.
    pub l2_cache: TableCache,
    /// Cached refcount blocks.
    pub rb_cache: TableCache,
    /// Search hint for free clusters.
    pub free_cluster_index: u64,
    /// Where the next compressed cluster may start (0: start a new cluster).
    pub free_byte_offset: u64,
    /// Dirty L2 tables may point at clusters whose refcount is only in the cache.
    pub l2_after_refcounts: bool,
    /// Dirty refcount blocks hold decreases for references dirty L2 tables dropped.
    pub refcounts_after_l2: bool,
    /// Guest data was written to new clusters since the last fsync.
    pub data_unflushed: bool,
    /// Flushes are ignored (`cache=unsafe`).
    pub no_flush: bool,
    /// Metadata was written since the last fsync.
    pub file_dirty: bool,
    /// Internal snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Lazy refcounts are in use (the dirty bit replaces ordered refcount updates).
    pub lazy_refcounts: bool,
    /// Which discard types are passed down to the file.
    pub discard_passthrough: [bool; 4],
    /// Host ranges freed and waiting to be discarded in the file.
    pub pending_discards: Vec<(u64, u64)>,
    /// Data-file ranges waiting to be discarded.
    pub pending_data_discards: Vec<(u64, u64)>,
    /// The external data file, if any.
    pub data_file: Option<NodeRef>,
    /// Collect discards instead of issuing them at once.
    pub cache_discards: bool,
    /// Opened read-only.
    pub read_only: bool,
    /// A fatal corruption was found; the node refuses further requests.
    pub dead: bool,
    /// A non-fatal corruption was already reported.
    pub corruption_reported: bool,
    /// Allocations whose data is being written (QEMU's `cluster_allocs`).
    pub inflight: Vec<super::cluster::L2Meta>,
    /// Counter for in-flight allocation ids.
    pub next_alloc_id: u64,
    /// A backing node is attached.
    pub has_backing: bool,
    /// Bytes the snapshot table occupies in the image, as read or last written (0:
    /// derive it from the entries).
    pub snapshot_extent: u64,
    /// The snapshot table was read by a check (opening in check mode skips it).
    pub snapshots_checked: bool,
    /// Where metadata lives, for overlap checks.
    pub overlap: super::overlap::OverlapIndex,
}

impl Meta {
    /// Reads one cluster-sized table at `offset`.
    pub async fn read_table(&self, offset: u64) -> Result<AlignedBuf> {
        let mut buf = AlignedBuf::io(self.geo.cluster_size() as usize);
        self.file.read(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Writes metadata bytes to the image file (and notes that an fsync is due).
    pub async fn write_meta(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.load_inactive_l2().await?;
        self.file_dirty = true;
        self.file.write(offset, bytes, WriteFlags::NONE).await
    }

    /// fsync of the image file, unless flushes are disabled or nothing was written
    /// since the last one.
    pub async fn sync(&mut self) -> Result<()> {
        if self.no_flush || self.read_only || !(self.file_dirty || self.data_unflushed) {
            return Ok(());
        }
        self.file_dirty = false;
        self.data_unflushed = false;
        self.file.flush().await
    }

    /// Writes one dirty L2 table, first making durable what it depends on.
    pub async fn write_l2_table(&mut self, offset: u64) -> Result<()> {
        let ordered = !UNORDERED_L2_FOR_TESTS.load(std::sync::atomic::Ordering::Relaxed);
        if self.l2_after_refcounts && ordered {
            self.flush_refblocks_inner(false).await?;
            self.l2_after_refcounts = false;
        }
        if self.data_unflushed && ordered {
            self.sync().await?;
        }
        if self.l2_cache.dirty_part(offset, 512).is_some() {
            self.load_inactive_l2().await?;
        }
        if let Some((lo, bytes)) = self.l2_cache.dirty_part(offset, 512) {
            self.file.debug_event(DebugEvent::L2Update).await;
            self.file_dirty = true;
            self.file
                .write(offset + lo as u64, bytes, WriteFlags::NONE)
                .await?;
            self.l2_cache.mark_clean(offset);
        }
        Ok(())
    }

    /// Writes one dirty refcount block, first making durable what it depends on.
    pub async fn write_refblock(&mut self, offset: u64) -> Result<()> {
        if self.refcounts_after_l2 {
            self.flush_l2_inner().await?;
            self.refcounts_after_l2 = false;
        }
        if self.rb_cache.dirty_part(offset, 512).is_some() {
            self.load_inactive_l2().await?;
        }
        if let Some((lo, bytes)) = self.rb_cache.dirty_part(offset, 512) {
            self.file.debug_event(DebugEvent::RefblockUpdatePart).await;
            self.file_dirty = true;
            self.file
                .write(offset + lo as u64, bytes, WriteFlags::NONE)
                .await?;
            self.rb_cache.mark_clean(offset);
        }
        Ok(())
    }

    async fn flush_l2_inner(&mut self) -> Result<()> {
        let dirty = self.l2_cache.dirty();
        if dirty.is_empty() {
            return Ok(());
        }
        for off in dirty {
            self.write_l2_table(off).await?;
        }
        self.sync().await
    }

    async fn flush_refblocks_inner(&mut self, _final: bool) -> Result<()> {
        let dirty = self.rb_cache.dirty();
        if dirty.is_empty() {
            return Ok(());
        }
        for off in dirty {
            Box::pin(self.write_refblock(off)).await?;
        }
        self.sync().await
    }

    /// Writes every dirty L2 table (and what they depend on).
    pub async fn flush_l2(&mut self) -> Result<()> {
        self.flush_l2_inner().await
    }

    /// Writes every dirty refcount block (and what they depend on).
    pub async fn flush_refblocks(&mut self) -> Result<()> {
        self.flush_refblocks_inner(false).await
    }

    /// Writes all cached metadata in dependency order. While the dirty bit is set (lazy
    /// refcounts), refcount blocks are left in the cache, as QEMU leaves them.
    pub async fn flush_caches(&mut self) -> Result<()> {
        self.flush_l2().await?;
        if self.h.incompatible_features & incompat::DIRTY == 0 {
            self.flush_refblocks().await?;
        }
        self.process_discards().await;
        Ok(())
    }

    /// Records that dirty L2 tables are about to reference clusters allocated in the
    /// refcount cache; resolves the opposite dependency first.
    pub async fn l2_depends_on_refcounts(&mut self) -> Result<()> {
        if self.lazy_refcounts {
            return Ok(());
        }
        if self.refcounts_after_l2 {
            self.flush_l2_inner().await?;
            self.refcounts_after_l2 = false;
        }
        self.l2_after_refcounts = true;
        Ok(())
    }

    /// Records that refcount decreases are about to follow L2 changes that dropped
    /// references; resolves the opposite dependency first.
    pub async fn refcounts_depend_on_l2(&mut self) -> Result<()> {
        if self.l2_after_refcounts {
            self.flush_refblocks_inner(false).await?;
            self.l2_after_refcounts = false;
        }
        self.refcounts_after_l2 = true;
        Ok(())
    }

    async fn make_room(&mut self, kind: TableKind) -> Result<()> {
        loop {
            let victim = match kind {
                TableKind::L2 => self.l2_cache.victim(),
                TableKind::Refblock => self.rb_cache.victim(),
            };
            let Some((off, dirty)) = victim else {
                return Ok(());
            };
            if dirty {
                match kind {
                    TableKind::L2 => self.write_l2_table(off).await?,
                    TableKind::Refblock => self.write_refblock(off).await?,
                }
            }
            match kind {
                TableKind::L2 => self.l2_cache.remove(off),
                TableKind::Refblock => self.rb_cache.remove(off),
            }
        }
    }

    /// Makes sure the L2 table at `offset` is cached.
    pub async fn load_l2(&mut self, offset: u64) -> Result<()> {
        if self.l2_cache.contains(offset) {
            return Ok(());
        }
        self.make_room(TableKind::L2).await?;
        self.file.debug_event(DebugEvent::L2Load).await;
        let t = self.read_table(offset).await?;
        self.l2_cache.insert(offset, t, false);
        Ok(())
    }

    /// Makes sure the refcount block at `offset` is cached, announcing the load (QEMU
    /// does so for every refcount update, whether or not the block is cached; plain
    /// refcount lookups use [`Meta::load_refblock`]).
    pub async fn load_refblock_for_update(&mut self, offset: u64) -> Result<()> {
        self.file.debug_event(DebugEvent::RefblockLoad).await;
        self.load_refblock(offset).await
    }

    /// Makes sure the refcount block at `offset` is cached.
    pub async fn load_refblock(&mut self, offset: u64) -> Result<()> {
        if self.rb_cache.contains(offset) {
            return Ok(());
        }
        self.make_room(TableKind::Refblock).await?;
        let t = self.read_table(offset).await?;
        self.rb_cache.insert(offset, t, false);
        Ok(())
    }

    /// Puts a new, zeroed table for `offset` into a cache, marked dirty.
    pub async fn new_table(&mut self, kind: TableKind, offset: u64) -> Result<()> {
        self.make_room(kind).await?;
        let t = AlignedBuf::io(self.geo.cluster_size() as usize);
        match kind {
            TableKind::L2 => self.l2_cache.insert(offset, t, true),
            TableKind::Refblock => self.rb_cache.insert(offset, t, true),
        }
        Ok(())
    }

    /// Entry `index` of the cached L2 table at `l2_offset`.
    pub fn l2_entry(&mut self, l2_offset: u64, index: u64) -> L2Entry {
        let ext = self.geo.extended_l2;
        let esize = self.geo.l2_entry_size() as usize;
        match self.l2_cache.get(l2_offset) {
            Some(t) => {
                let at = index as usize * esize;
                L2Entry {
                    raw: be64(t, at),
                    bitmap: if ext { be64(t, at + 8) } else { 0 },
                }
            }
            None => L2Entry::UNALLOCATED,
        }
    }

    /// Sets entry `index` of the cached L2 table at `l2_offset` and marks it dirty.
    pub fn set_l2_entry(&mut self, l2_offset: u64, index: u64, e: L2Entry) {
        let ext = self.geo.extended_l2;
        let esize = self.geo.l2_entry_size() as usize;
        if let Some(t) = self.l2_cache.get(l2_offset) {
            let at = index as usize * esize;
            put_be64(t, at, e.raw);
            if ext {
                put_be64(t, at + 8, e.bitmap);
            }
            self.l2_cache.mark_dirty_range(l2_offset, at, at + esize);
        }
    }

    /// Writes the whole header cluster from `self.h` (extensions, backing name, zero
    /// padding), as QEMU rewrites it.
    pub async fn write_header(&mut self) -> Result<()> {
        let bytes = self.h.serialize()?;
        let mut buf = AlignedBuf::io(self.geo.cluster_size() as usize);
        buf[..bytes.len()].copy_from_slice(&bytes);
        self.write_meta(0, &buf).await?;
        self.file_dirty = true;
        self.sync().await
    }

    /// Writes the L1 entry `index` (write-through, as QEMU does).
    pub async fn write_l1_entry(&mut self, index: u64) -> Result<()> {
        let off = self.h.l1_table_offset + index * 8;
        let bytes = self.l1[index as usize].to_be_bytes();
        self.file.debug_event(DebugEvent::L1Update).await;
        self.write_meta(off, &bytes).await?;
        self.file_dirty = true;
        self.sync().await
    }

    /// Reports a corruption like QEMU: fatal ones mark the image corrupt (if writable)
    /// and make the node refuse further requests.
    pub async fn signal_corruption(&mut self, fatal: bool, msg: String) -> Error {
        let msg = c_hex_zero(&msg);
        if fatal {
            if !self.dead {
                eprintln!(
                    "qcow2: Marking image as corrupt: {msg}; further corruption events will be suppressed"
                );
                if !self.read_only {
                    self.h.incompatible_features |= incompat::CORRUPT;
                    let _ = self.write_header().await;
                }
                self.dead = true;
            }
        } else if !self.corruption_reported {
            eprintln!(
                "qcow2: Image is corrupt: {msg}; further non-fatal corruption events will be suppressed"
            );
            self.corruption_reported = true;
        }
        Error::corrupt(msg)
    }

    /// Sets the dirty bit before the first lazy-refcount write.
    pub async fn mark_dirty(&mut self) -> Result<()> {
        if self.h.incompatible_features & incompat::DIRTY != 0 {
            return Ok(());
        }
        let v = self.h.incompatible_features | incompat::DIRTY;
        self.write_meta(72, &v.to_be_bytes()).await?;
        self.sync().await?;
        self.h.incompatible_features = v;
        Ok(())
    }

    /// Writes all metadata and clears the dirty bit (refcounts become accurate again).
    pub async fn mark_clean(&mut self) -> Result<()> {
        if self.h.incompatible_features & incompat::DIRTY != 0 {
            self.h.incompatible_features &= !incompat::DIRTY;
            self.flush_caches().await?;
            self.sync().await?;
            return self.write_header().await;
        }
        self.flush_caches().await
    }

    /// Index of the last cluster with a reference before `file_len`, if any.
    pub async fn last_used_cluster(&mut self, file_len: u64) -> Result<Option<u64>> {
        let mut i = self.geo.clusters_for(file_len);
        while i > 0 {
            i -= 1;
            if self.get_refcount(i).await? > 0 {
                return Ok(Some(i));
            }
        }
        Err(self
            .signal_corruption(
                true,
                "There are no references in the refcount table.".into(),
            )
            .await)
    }

    /// Drops L1 entries from `new_size` on (their L2 tables must map nothing any more).
    pub async fn shrink_l1(&mut self, new_size: u64) -> Result<()> {
        let cur = self.l1.len() as u64;
        if new_size >= cur {
            return Ok(());
        }
        let zero = vec![0u8; ((cur - new_size) * 8) as usize];
        self.file
            .write(
                self.h.l1_table_offset + new_size * 8,
                &zero,
                WriteFlags::NONE,
            )
            .await?;
        self.sync().await?;
        for i in new_size..cur {
            let off = self.l1[i as usize] & L1E_OFFSET_MASK;
            self.l1[i as usize] = 0;
            if off != 0 {
                self.l2_cache.remove(off);
                self.free_clusters(off, self.geo.cluster_size(), DiscardType::Always)
                    .await;
            }
        }
        self.overlap.invalidate();
        Ok(())
    }

    /// Queues (or issues) the discard of a freed host range.
    pub fn note_freed(&mut self, offset: u64, len: u64, kind: DiscardType) {
        let idx = match kind {
            DiscardType::Never => return,
            DiscardType::Always => 0,
            DiscardType::Request => 1,
            DiscardType::Snapshot => 2,
            DiscardType::Other => 3,
        };
        if !self.discard_passthrough[idx] {
            return;
        }
        if let Some(last) = self.pending_discards.last_mut() {
            if last.0 + last.1 == offset {
                last.1 += len;
                return;
            }
        }
        self.pending_discards.push((offset, len));
    }

    /// Queues the discard of a data-file range (external data files are not refcounted).
    pub fn note_data_file_discard(&mut self, offset: u64, len: u64, kind: DiscardType) {
        let idx = match kind {
            DiscardType::Never => return,
            DiscardType::Always => 0,
            DiscardType::Request => 1,
            DiscardType::Snapshot => 2,
            DiscardType::Other => 3,
        };
        if self.discard_passthrough[idx] {
            self.pending_data_discards.push((offset, len));
        }
    }

    /// Passes queued discards down to the file.
    pub async fn process_discards(&mut self) {
        for (off, len) in std::mem::take(&mut self.pending_discards) {
            let _ = self.file.discard(off, len).await;
        }
        if let Some(d) = self.data_file.clone() {
            for (off, len) in std::mem::take(&mut self.pending_data_discards) {
                let _ = d.discard(off, len).await;
            }
        }
    }
}

/// QEMU formats these messages with C's `%#x`, which prints zero as a bare `0`: a
/// standalone `0x0` in a message becomes `0`.
fn c_hex_zero(msg: &str) -> String {
    let b = msg.as_bytes();
    let mut out = String::with_capacity(msg.len());
    let mut i = 0;
    while i < b.len() {
        let standalone = b[i..].starts_with(b"0x0")
            && (i == 0 || !b[i - 1].is_ascii_alphanumeric())
            && b.get(i + 3).is_none_or(|c| !c.is_ascii_alphanumeric());
        if standalone {
            out.push('0');
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod c_hex_tests {
    #[test]
    fn zero_loses_its_prefix() {
        assert_eq!(
            super::c_hex_zero("L2 offset: 0x40000, L2 index: 0x0)"),
            "L2 offset: 0x40000, L2 index: 0)"
        );
        assert_eq!(super::c_hex_zero("0x0a 0x0"), "0x0a 0");
    }
}
