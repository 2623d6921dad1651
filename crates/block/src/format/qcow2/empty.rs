//! Emptying an image (what `qemu-img commit` does to the overlay it committed): every
//! cluster becomes unallocated. Simple v3 images are rebuilt from scratch as QEMU does
//! (header, one-cluster refcount table, one refblock, an empty L1 table, nothing else);
//! others have every cluster discarded.

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::node::{BlockDriver, Prealloc, WriteFlags};

use super::meta::{DiscardType, Meta};
use super::Qcow2;

impl Qcow2 {
    /// Makes every cluster unallocated (reads fall through to the backing file).
    pub async fn make_empty(&self) -> Result<()> {
        self.check_writable()?;
        let mut m = self.meta.lock().await;
        let cs = m.geo.cluster_size();
        let l1_clusters = (m.h.l1_size as u64 * 8).div_ceil(cs);
        let refblock_entries = m.geo.refblock_entries();
        let nb_bitmaps = m.h.bitmaps.as_ref().map_or(0, |b| b.nb_bitmaps);
        let r = if m.h.version >= 3
            && m.snapshots.is_empty()
            && nb_bitmaps == 0
            && 3 + l1_clusters <= refblock_entries
            && m.h.crypt_method != super::crypt::CRYPT_LUKS
            && m.data_file.is_none()
        {
            make_completely_empty(&mut m, l1_clusters).await
        } else {
            let size = self.size();
            m.discard_clusters(0, size, DiscardType::Snapshot, true)
                .await
        };
        self.with_meta(&mut m, r).await
    }
}

/// Rebuilds the image as a fresh one of the same size.
///
/// Crash safety: the dirty bit is set first, so whatever is on disk while the structures
/// are rewritten in place is repaired (refcounts rebuilt) on the next open; the header
/// switches to the new L1 and refcount table in one write; the dirty bit is cleared
/// only once the new structures are complete.
async fn make_completely_empty(m: &mut Meta, l1_clusters: u64) -> Result<()> {
    let cs = m.geo.cluster_size();
    m.flush_caches().await?;
    m.l2_cache.clear();
    m.rb_cache.clear();
    m.mark_dirty().await?;
    // Refcounts no longer describe the file from here until mark_clean.
    m.file
        .write_zeroes(m.h.l1_table_offset, l1_clusters * cs, WriteFlags::NONE)
        .await?;
    m.l1.iter_mut().for_each(|e| *e = 0);
    m.file
        .write_zeroes(cs, (2 + l1_clusters) * cs, WriteFlags::NONE)
        .await?;
    // Refcount table in cluster 1, its only refblock in cluster 2, L1 from cluster 3.
    let mut fields = [0u8; 20];
    fields[..8].copy_from_slice(&(3 * cs).to_be_bytes());
    fields[8..16].copy_from_slice(&cs.to_be_bytes());
    fields[16..].copy_from_slice(&1u32.to_be_bytes());
    m.write_meta(40, &fields).await?;
    m.file_dirty = true;
    m.sync().await?;
    m.h.l1_table_offset = 3 * cs;
    m.h.refcount_table_offset = cs;
    m.h.refcount_table_clusters = 1;
    m.reftable = vec![0; (cs / 8) as usize];
    m.max_reftable_index = 0;
    let mut entry = AlignedBuf::io(8);
    entry.copy_from_slice(&(2 * cs).to_be_bytes());
    m.write_meta(cs, &entry).await?;
    m.file_dirty = true;
    m.sync().await?;
    m.reftable[0] = 2 * cs;
    m.free_cluster_index = 0;
    m.free_byte_offset = 0;
    m.overlap.invalidate();
    let first = m.alloc_clusters(3 * cs + m.h.l1_size as u64 * 8).await?;
    if first != 0 {
        return Err(Error::corrupt("First cluster in emptied image is in use"));
    }
    m.mark_clean().await?;
    m.file
        .truncate((3 + l1_clusters) * cs, false, Prealloc::Off)
        .await
}
