//! Internal snapshots: creating, applying, deleting, and loading one read-only in place
//! of the active state (for `convert -l`).

use crate::error::{Error, Result};
use crate::node::BlockDriver;

use super::meta::{DiscardType, Meta};
use super::snapshot::{Snapshot, EXTRA_DATA_LEN};
use super::types::*;
use super::Qcow2;

/// Largest snapshot table QEMU writes.
const MAX_SNAPSHOTS_SIZE: u64 = 1024 * MAX_SNAPSHOTS as u64;

/// What identifies a new snapshot, beyond the ID rqemu assigns.
#[derive(Debug, Clone, Default)]
pub struct NewSnapshot {
    /// Name (tag).
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock.
    pub vm_clock_nsec: u64,
    /// VM state size.
    pub vm_state_size: u64,
    /// icount, if recorded.
    pub icount: Option<u64>,
}

impl Meta {
    /// Adds `addend` (-1, 0 or 1) to the refcount of every cluster an L1 table references
    /// and brings the COPIED flags of that table in line (QEMU's
    /// `qcow2_update_snapshot_refcount`).
    // The L1 index is needed for messages and the write-back, not only the entry.
    #[allow(clippy::needless_range_loop)]
    pub async fn update_snapshot_refcount(
        &mut self,
        l1_offset: u64,
        l1_size: u64,
        addend: i64,
    ) -> Result<()> {
        let geo = self.geo;
        let active = l1_offset == self.h.l1_table_offset;
        let mut l1 = if active {
            self.l1.clone()
        } else {
            super::open::read_u64_table(&self.file, l1_offset, l1_size).await?
        };
        let mut l1_modified = false;
        self.cache_discards = true;
        let r = async {
            for i in 0..l1_size as usize {
                let old_l2 = l1[i];
                if old_l2 == 0 {
                    continue;
                }
                let mut l2_off = old_l2 & L1E_OFFSET_MASK;
                if geo.offset_in_cluster(l2_off) != 0 {
                    return Err(self
                        .signal_corruption(
                            true,
                            format!("L2 table offset {l2_off:#x} unaligned (L1 index: {i:#x})"),
                        )
                        .await);
                }
                self.load_l2(l2_off).await?;
                for j in 0..geo.l2_entries() {
                    let old = self.l2_entry(l2_off, j);
                    let mut e = old;
                    e.raw &= !OFLAG_COPIED;
                    let refcount;
                    match e.cluster_type(geo.extended_l2, self.has_data_file()) {
                        ClusterType::Compressed => {
                            if addend != 0 {
                                let (off, len) = e.compressed_extent(&geo);
                                self.update_refcount(off, len, addend.unsigned_abs(), addend < 0, DiscardType::Snapshot)
                                    .await
                                    .map_err(rc_err)?;
                            }
                            refcount = 2;
                        }
                        ClusterType::Normal | ClusterType::ZeroAlloc => {
                            let off = e.host_offset();
                            if geo.offset_in_cluster(off) != 0 {
                                return Err(self
                                    .signal_corruption(
                                        true,
                                        format!(
                                            "Cluster allocation offset {off:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {j:#x})"
                                        ),
                                    )
                                    .await);
                            }
                            if addend != 0 {
                                self.update_refcount(off, 1, addend.unsigned_abs(), addend < 0, DiscardType::Snapshot)
                                    .await
                                    .map_err(rc_err)?;
                            }
                            refcount = self.get_refcount(off >> geo.cluster_bits).await?;
                        }
                        ClusterType::ZeroPlain | ClusterType::Unallocated => refcount = 0,
                    }
                    if refcount == 1 {
                        e.raw |= OFLAG_COPIED;
                    }
                    if e != old {
                        if addend > 0 {
                            self.l2_depends_on_refcounts().await?;
                        }
                        self.load_l2(l2_off).await?;
                        self.set_l2_entry(l2_off, j, e);
                    }
                }
                if addend != 0 {
                    self.update_refcount(l2_off, 1, addend.unsigned_abs(), addend < 0, DiscardType::Snapshot)
                        .await
                        .map_err(rc_err)?;
                }
                if self.get_refcount(l2_off >> geo.cluster_bits).await? == 1 {
                    l2_off |= OFLAG_COPIED;
                }
                if l2_off != old_l2 {
                    l1[i] = l2_off;
                    l1_modified = true;
                }
            }
            self.flush_caches().await?;
            self.sync().await
        }
        .await;
        self.cache_discards = false;
        self.process_discards().await;
        r?;
        if addend >= 0 && l1_modified {
            let mut bytes = vec![0u8; (l1_size * 8) as usize];
            for (i, e) in l1.iter().enumerate() {
                put_be64(&mut bytes, i * 8, *e);
            }
            self.write_meta(l1_offset, &bytes).await?;
            self.sync().await?;
            if active {
                self.l1 = l1;
                self.overlap.invalidate();
            }
        }
        Ok(())
    }

    /// Writes the snapshot list to a new table and points the header at it.
    pub async fn write_snapshots(&mut self) -> Result<()> {
        // QEMU's size: every entry starts 8-aligned; the last is not padded.
        let mut size = 0u64;
        for s in &self.snapshots {
            size = size.div_ceil(8) * 8;
            size += 40
                + EXTRA_DATA_LEN.max(EXTRA_DATA_LEN + s.unknown_extra.len() as u32) as u64
                + s.id.len() as u64
                + s.name.len() as u64;
            if size > MAX_SNAPSHOTS_SIZE {
                return Err(Error::errno(libc::EFBIG));
            }
        }
        let offset = if size > 0 {
            self.alloc_clusters(size).await?
        } else {
            0
        };
        self.flush_caches().await?;
        self.sync().await?;
        if size > 0 {
            let mut bytes = super::snapshot::encode_table(&self.snapshots);
            bytes.truncate(size as usize);
            self.overlap_check_meta(offset, size).await?;
            self.write_meta(offset, &bytes).await?;
            self.sync().await?;
        }
        let mut hdr = [0u8; 12];
        put_be32(&mut hdr, 0, self.snapshots.len() as u32);
        put_be64(&mut hdr, 4, offset);
        self.write_meta(60, &hdr).await?;
        self.sync().await?;
        let (old_off, old_size) = (self.h.snapshots_offset, self.snapshot_table_size());
        self.h.nb_snapshots = self.snapshots.len() as u32;
        self.h.snapshots_offset = offset;
        self.snapshot_extent = size;
        for s in &mut self.snapshots {
            s.extra_len = EXTRA_DATA_LEN + s.unknown_extra.len() as u32;
        }
        if old_size > 0 {
            self.free_clusters(old_off, old_size, DiscardType::Snapshot)
                .await;
        }
        self.overlap.invalidate();
        Ok(())
    }

    /// Bytes the current snapshot table occupies.
    pub fn snapshot_table_size(&self) -> u64 {
        if self.h.nb_snapshots == 0 {
            return 0;
        }
        if self.snapshot_extent > 0 {
            return self.snapshot_extent;
        }
        let mut size = 0u64;
        for s in &self.snapshots {
            size = size.div_ceil(8) * 8;
            size += 40 + s.extra_len as u64 + s.id.len() as u64 + s.name.len() as u64;
        }
        size
    }

    fn find_snapshot(&self, id_or_name: &str) -> Option<usize> {
        self.snapshots
            .iter()
            .position(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().position(|s| s.name == id_or_name))
    }
}

fn rc_err(e: super::refcount::RcError) -> Error {
    Error::from(e)
}

/// QEMU's checks of a snapshot's L1 table size and place.
pub(super) fn validate_snapshot_l1(geo: &Geometry, sn: &Snapshot) -> Result<()> {
    if sn.l1_size as u64 > MAX_L1_BYTES / 8 {
        return Err(Error::other("Snapshot L1 table too large", libc::EFBIG));
    }
    if !super::open::table_offset_valid(geo, sn.l1_table_offset, sn.l1_size as u64, 8) {
        return Err(Error::invalid("Snapshot L1 table offset invalid"));
    }
    Ok(())
}

/// [`validate_snapshot_l1`] for callers that, as QEMU's do, print the table's fault
/// and then fail with its errno alone.
pub(super) fn validate_snapshot_l1_reported(geo: &Geometry, sn: &Snapshot) -> Result<()> {
    validate_snapshot_l1(geo, sn).map_err(|e| {
        crate::error::report(&e.to_string());
        Error::errno(e.errno_value())
    })
}

impl Qcow2 {
    /// Creates an internal snapshot of the current state.
    pub async fn snapshot_create(&self, new: NewSnapshot) -> Result<()> {
        self.check_writable()?;
        let mut m = self.meta.lock().await;
        if m.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::errno(libc::EFBIG));
        }
        if m.has_data_file() {
            return Err(Error::errno(libc::ENOTSUP));
        }
        let next_id = m
            .snapshots
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let l1_size = m.l1.len() as u64;
        let l1_offset = m.alloc_clusters(l1_size * 8).await?;
        let mut bytes = vec![0u8; (l1_size * 8) as usize];
        for (i, e) in m.l1.iter().enumerate() {
            put_be64(&mut bytes, i * 8, *e);
        }
        m.overlap_check_meta(l1_offset, l1_size * 8).await?;
        if !bytes.is_empty() {
            m.write_meta(l1_offset, &bytes).await?;
        }
        let (active_off, active_size) = (m.h.l1_table_offset, l1_size);
        let r = m.update_snapshot_refcount(active_off, active_size, 1).await;
        self.with_meta(&mut m, r).await?;
        m.snapshots.push(Snapshot {
            l1_table_offset: l1_offset,
            l1_size: l1_size as u32,
            id: next_id.to_string(),
            name: new.name,
            date_sec: new.date_sec,
            date_nsec: new.date_nsec,
            vm_clock_nsec: new.vm_clock_nsec,
            vm_state_size: new.vm_state_size,
            disk_size: self.size(),
            icount: new.icount,
            unknown_extra: Vec::new(),
            extra_len: super::snapshot::EXTRA_DATA_LEN,
        });
        if let Err(e) = m.write_snapshots().await {
            m.snapshots.pop();
            return Err(e);
        }
        // The VM state is not needed in the active table any more.
        if new.vm_state_size > 0 {
            let vm = self.vm_state_offset();
            let len = new.vm_state_size.div_ceil(self.geo.cluster_size()) * self.geo.cluster_size();
            let _ = m.discard_clusters(vm, len, DiscardType::Never, false).await;
        }
        m.flush_caches().await
    }

    /// Makes the snapshot with ID or name `id` the current state.
    pub async fn snapshot_goto(&self, id: &str) -> Result<()> {
        self.check_writable()?;
        // Bitmaps would not describe the reverted disk: refused, as QEMU does.
        if !self.persistent_bitmaps().is_empty() {
            return Err(Error::other("Device has active dirty bitmaps", libc::EBUSY));
        }
        let mut m = self.meta.lock().await;
        let Some(idx) = m.find_snapshot(id) else {
            return Err(Error::errno(libc::ENOENT));
        };
        let sn = m.snapshots[idx].clone();
        validate_snapshot_l1_reported(&m.geo, &sn)?;
        if sn.disk_size != self.size() {
            drop(m);
            self.resize_for_snapshot(sn.disk_size).await?;
            m = self.meta.lock().await;
        }
        let r = m.grow_l1(sn.l1_size as u64, true).await;
        self.with_meta(&mut m, r).await?;
        let cur_len = m.l1.len();
        let mut new_l1 =
            super::open::read_u64_table(&m.file, sn.l1_table_offset, sn.l1_size as u64).await?;
        new_l1.resize(cur_len, 0);
        let r = m
            .update_snapshot_refcount(sn.l1_table_offset, sn.l1_size as u64, 1)
            .await;
        self.with_meta(&mut m, r).await?;
        let mut bytes = vec![0u8; cur_len * 8];
        for (i, e) in new_l1.iter().enumerate() {
            put_be64(&mut bytes, i * 8, *e);
        }
        let l1_off = m.h.l1_table_offset;
        m.write_meta(l1_off, &bytes).await?;
        m.sync().await?;
        let r = m.update_snapshot_refcount(l1_off, cur_len as u64, -1).await;
        self.with_meta(&mut m, r).await?;
        m.l1 = new_l1;
        m.l2_cache.clear();
        m.overlap.invalidate();
        let r = m.update_snapshot_refcount(l1_off, cur_len as u64, 0).await;
        self.with_meta(&mut m, r).await
    }

    async fn resize_for_snapshot(&self, size: u64) -> Result<()> {
        // Snapshots block resizing; the size is restored directly.
        let mut m = self.meta.lock().await;
        let l1 = m.geo.l1_entries_for(size);
        m.grow_l1(l1, true).await?;
        m.h.size = size;
        m.write_meta(24, &size.to_be_bytes()).await?;
        m.sync().await?;
        self.size.store(size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Deletes the snapshot matching `id` and/or `name` (either may be absent).
    pub async fn snapshot_delete(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        self.check_writable()?;
        let mut m = self.meta.lock().await;
        let idx = m
            .snapshots
            .iter()
            .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n));
        let Some(idx) = idx else {
            return Err(Error::other("Can't find the snapshot", libc::ENOENT));
        };
        let sn = m.snapshots[idx].clone();
        validate_snapshot_l1(&m.geo, &sn)?;
        m.snapshots.remove(idx);
        if let Err(e) = m.write_snapshots().await {
            m.snapshots.insert(idx, sn);
            return Err(Error::other(
                format!("Failed to remove snapshot from snapshot list: {e}"),
                e.errno_value(),
            ));
        }
        let r = m
            .update_snapshot_refcount(sn.l1_table_offset, sn.l1_size as u64, -1)
            .await
            .map_err(|e| {
                Error::other(
                    format!("Failed to free the cluster and L1 table: {e}"),
                    e.errno_value(),
                )
            });
        self.with_meta(&mut m, r).await?;
        m.free_clusters(
            sn.l1_table_offset,
            sn.l1_size as u64 * 8,
            DiscardType::Snapshot,
        )
        .await;
        let (l1_off, l1_size) = (m.h.l1_table_offset, m.l1.len() as u64);
        let r = m
            .update_snapshot_refcount(l1_off, l1_size, 0)
            .await
            .map_err(|e| {
                Error::other(
                    format!("Failed to update snapshot status in disk: {e}"),
                    e.errno_value(),
                )
            });
        self.with_meta(&mut m, r).await?;
        m.flush_caches().await
    }

    /// Shows the snapshot matching `id`/`name` instead of the current state, read-only,
    /// until the image is closed.
    pub async fn snapshot_load_tmp(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        if !self.read_only {
            return Err(Error::other(
                "Device must be read-only to load snapshots",
                libc::EINVAL,
            ));
        }
        let mut m = self.meta.lock().await;
        let idx = m
            .snapshots
            .iter()
            .position(|s| id.is_none_or(|i| s.id == i) && name.is_none_or(|n| s.name == n));
        let Some(idx) = idx else {
            return Err(Error::other("Can't find snapshot", libc::ENOENT));
        };
        let sn = m.snapshots[idx].clone();
        validate_snapshot_l1(&m.geo, &sn)?;
        let l1 =
            super::open::read_u64_table(&m.file, sn.l1_table_offset, sn.l1_size as u64).await?;
        m.l1 = l1;
        m.h.l1_size = sn.l1_size;
        m.h.l1_table_offset = sn.l1_table_offset;
        m.l2_cache.clear();
        m.overlap.invalidate();
        self.size
            .store(sn.disk_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
