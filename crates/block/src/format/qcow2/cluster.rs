//! Guest-to-host mapping: looking up L2 entries, allocating L2 tables and data clusters
//! for writes (with the copy-on-write regions QEMU computes), and linking new clusters
//! into the L2 tables once their data is written.

use crate::error::{Error, Result};
use crate::node::DebugEvent;

use super::meta::{DiscardType, Meta, TableKind};
use super::types::*;

/// A run of guest bytes with one subcluster type, contiguous on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mapping {
    /// The type of the run.
    pub ty: ScType,
    /// Host byte offset of the run's first byte (normal, zero-alloc, unallocated-alloc),
    /// or the compressed descriptor's byte offset.
    pub host: u64,
    /// Length in bytes.
    pub len: u64,
    /// The raw L2 entry of the first cluster (compressed descriptors need it).
    pub entry: L2Entry,
}

/// A copy-on-write region, as offsets relative to the allocation's first cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct CowRegion {
    /// Start of the region.
    pub offset: u64,
    /// Length of the region.
    pub bytes: u64,
}

/// What a write must do to the metadata once its data is written (QEMU's `QCowL2Meta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct L2Meta {
    /// Guest offset of the first cluster.
    pub offset: u64,
    /// Host offset of the first cluster.
    pub alloc_offset: u64,
    /// Number of clusters.
    pub nb_clusters: u64,
    /// The clusters were already allocated (written in place).
    pub keep_old: bool,
    /// Copy-on-write before the data.
    pub cow_start: CowRegion,
    /// Copy-on-write after the data.
    pub cow_end: CowRegion,
    /// Metadata preallocation: no data, no subcluster bits.
    pub prealloc: bool,
    /// Identifier in the in-flight list.
    pub id: u64,
}

impl L2Meta {
    /// Guest range this allocation covers for dependency checks.
    pub fn guest_range(&self, cluster_size: u64) -> (u64, u64) {
        let start = self.offset + self.cow_start.offset;
        let end = self.offset + self.cow_end.offset + self.cow_end.bytes;
        (
            start & !(cluster_size - 1),
            end.div_ceil(cluster_size) * cluster_size,
        )
    }
}

impl Meta {
    /// The L2 table offset for L1 index `i`, validated.
    pub async fn l2_offset(&mut self, l1_index: u64) -> Result<u64> {
        if l1_index >= self.l1.len() as u64 {
            return Ok(0);
        }
        let off = self.l1[l1_index as usize] & L1E_OFFSET_MASK;
        if off != 0 && self.geo.offset_in_cluster(off) != 0 {
            return Err(self
                .signal_corruption(
                    true,
                    format!("L2 table offset {off:#x} unaligned (L1 index: {l1_index:#x})"),
                )
                .await);
        }
        Ok(off)
    }

    /// Whether the image has an external data file.
    pub fn has_data_file(&self) -> bool {
        self.h.incompatible_features & incompat::DATA_FILE != 0
    }

    /// Maps guest `[offset, offset + bytes)` up to the first change of type, of host
    /// contiguity, or the end of the L2 table.
    pub async fn get_host_offset(&mut self, offset: u64, bytes: u64) -> Result<Mapping> {
        let geo = self.geo;
        let in_cluster = geo.offset_in_cluster(offset);
        let l2_index = geo.l2_index(offset);
        let avail = (geo.l2_entries() - l2_index) << geo.cluster_bits;
        let needed = (bytes + in_cluster).min(avail);
        let l1_index = geo.l1_index(offset);
        let l2_off = self.l2_offset(l1_index).await?;
        let unallocated = Mapping {
            ty: ScType::UnallocatedPlain,
            host: 0,
            len: needed - in_cluster,
            entry: L2Entry::UNALLOCATED,
        };
        if l2_off == 0 {
            return Ok(unallocated);
        }
        self.load_l2(l2_off).await?;
        let ext = self.has_data_file();
        let sc = geo.subcluster_index(offset);
        let first = self.l2_entry(l2_off, l2_index);
        let ty = first.sc_type(&geo, sc, ext);
        if self.h.version < 3 && ty.is_zero() {
            return Err(self
                .signal_corruption(
                    true,
                    format!(
                        "Zero cluster entry found in pre-v3 image (L2 offset: {l2_off:#x}, L2 index: {l2_index:#x})"
                    ),
                )
                .await);
        }
        let mut host = 0;
        match ty {
            ScType::Compressed => {
                if ext {
                    return Err(self
                        .signal_corruption(
                            true,
                            format!(
                                "Compressed cluster entry found in image with external data file (L2 offset: {l2_off:#x}, L2 index: {l2_index:#x})"
                            ),
                        )
                        .await);
                }
                host = first.raw & geo.compressed_offset_mask();
            }
            ScType::Normal | ScType::ZeroAlloc | ScType::UnallocatedAlloc => {
                let hc = first.host_offset();
                host = hc + in_cluster;
                if geo.offset_in_cluster(hc) != 0 {
                    return Err(self
                        .signal_corruption(
                            true,
                            format!(
                                "Cluster allocation offset {hc:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {l2_index:#x})"
                            ),
                        )
                        .await);
                }
                if ext && host != offset {
                    return Err(self
                        .signal_corruption(
                            true,
                            format!(
                                "External data file host cluster offset {hc:#x} does not match guest cluster offset: {:#x}, L2 index: {l2_index:#x})",
                                offset - in_cluster
                            ),
                        )
                        .await);
                }
            }
            _ => {}
        }
        // Count contiguous subclusters of the same type.
        let nb_clusters = geo.clusters_for(needed);
        let sc_size = geo.subcluster_size();
        let per_cluster = if geo.extended_l2 { SUBCLUSTERS } else { 1 };
        let mut count: u64 = 0;
        let mut expected = first.host_offset();
        let check_offset = ty.has_host();
        let mut idx = l2_index;
        for i in 0..nb_clusters {
            let first_sc = if i == 0 && geo.extended_l2 {
                geo.subcluster_index(offset)
            } else {
                0
            };
            let e = self.l2_entry(l2_off, l2_index + i);
            idx = l2_index + i;
            let (t, n) = e.sc_run(&geo, first_sc, ext);
            if t == ScType::Invalid {
                return Err(self
                    .signal_corruption(
                        true,
                        format!(
                            "Invalid cluster entry found  (L2 offset: {l2_off:#x}, L2 index: {idx:#x})"
                        ),
                    )
                    .await);
            }
            if i == 0 {
                if t == ScType::Compressed {
                    count = n as u64;
                    break;
                }
            } else if t != ty {
                break;
            } else if check_offset {
                expected += geo.cluster_size();
                if expected != e.host_offset() {
                    break;
                }
            }
            count += n as u64;
            if first_sc + n < per_cluster {
                break;
            }
        }
        let _ = idx;
        let sc_start = if geo.extended_l2 {
            geo.subcluster_index(offset) as u64
        } else {
            0
        };
        let avail = ((count + sc_start) * sc_size).min(needed);
        Ok(Mapping {
            ty,
            host,
            len: avail - in_cluster,
            entry: first,
        })
    }

    /// The L2 table for `offset`, allocated (or copied from a shared one) if needed.
    pub async fn cluster_table(&mut self, offset: u64) -> Result<u64> {
        let l1_index = self.geo.l1_index(offset);
        if l1_index >= self.l1.len() as u64 {
            self.grow_l1(l1_index + 1, false).await?;
        }
        let entry = self.l1[l1_index as usize];
        let l2_off = self.l2_offset(l1_index).await?;
        if entry & OFLAG_COPIED != 0 && l2_off != 0 {
            self.load_l2(l2_off).await?;
            return Ok(l2_off);
        }
        // Allocate a new table (copying a shared one), and free the old reference.
        let new = self.l2_allocate(l1_index).await?;
        if l2_off != 0 {
            self.free_clusters(l2_off, self.geo.cluster_size(), DiscardType::Other)
                .await;
        }
        Ok(new)
    }

    /// Allocates an L2 table for L1 index `l1_index`: written to disk (zeroed, or with
    /// the old table's entries) before the L1 entry that points at it.
    async fn l2_allocate(&mut self, l1_index: u64) -> Result<u64> {
        let old = self.l1[l1_index as usize] & L1E_OFFSET_MASK;
        let cs = self.geo.cluster_size();
        let l2_off = self.alloc_clusters(cs).await?;
        if l2_off == 0 {
            return Err(self
                .signal_corruption(
                    true,
                    "Preventing invalid allocation of L2 table at offset 0".into(),
                )
                .await);
        }
        self.flush_refblocks().await?;
        if old != 0 {
            self.file.debug_event(DebugEvent::L2AllocCowRead).await;
            self.load_l2(old).await?;
            let copy = self.l2_cache.peek(old).map(|b| b.to_vec());
            self.new_table(TableKind::L2, l2_off).await?;
            if let (Some(copy), Some(t)) = (copy, self.l2_cache.get(l2_off)) {
                t.copy_from_slice(&copy);
            }
        } else {
            self.new_table(TableKind::L2, l2_off).await?;
        }
        self.file.debug_event(DebugEvent::L2AllocWrite).await;
        self.write_l2_table(l2_off).await?;
        self.sync().await?;
        self.l1[l1_index as usize] = l2_off | OFLAG_COPIED;
        self.overlap.invalidate();
        self.write_l1_entry(l1_index).await?;
        Ok(l2_off)
    }

    /// Grows the active L1 table to at least `min_size` entries (exactly, or with
    /// QEMU's 1.5x steps).
    pub async fn grow_l1(&mut self, min_size: u64, exact: bool) -> Result<()> {
        let cur = self.l1.len() as u64;
        if min_size <= cur {
            return Ok(());
        }
        if min_size > MAX_L1_BYTES / 8 {
            return Err(Error::errno(libc::EFBIG));
        }
        let new_size = if exact {
            min_size
        } else {
            let mut n = cur.max(1);
            while min_size > n {
                n = (n * 3).div_ceil(2);
            }
            n
        };
        if new_size > MAX_L1_BYTES / 8 {
            return Err(Error::errno(libc::EFBIG));
        }
        let bytes = new_size * 8;
        self.file.debug_event(DebugEvent::L1GrowAllocTable).await;
        let new_off = self.alloc_clusters(bytes).await?;
        self.flush_refblocks().await?;
        let mut buf = vec![0u8; bytes as usize];
        for (i, e) in self.l1.iter().enumerate() {
            put_be64(&mut buf, i * 8, *e);
        }
        self.overlap_check_meta(new_off, bytes).await?;
        self.file.debug_event(DebugEvent::L1GrowWriteTable).await;
        self.write_meta(new_off, &buf).await?;
        self.sync().await?;
        let mut hdr = [0u8; 12];
        put_be32(&mut hdr, 0, new_size as u32);
        put_be64(&mut hdr, 4, new_off);
        self.file.debug_event(DebugEvent::L1GrowActivateTable).await;
        self.write_meta(36, &hdr).await?;
        self.sync().await?;
        let old_off = self.h.l1_table_offset;
        let old_size = cur;
        self.h.l1_table_offset = new_off;
        self.h.l1_size = new_size as u32;
        self.l1.resize(new_size as usize, 0);
        self.overlap.invalidate();
        self.free_clusters(old_off, old_size * 8, DiscardType::Other)
            .await;
        Ok(())
    }

    /// Refuses metadata writes into clusters that hold other metadata.
    pub async fn overlap_check_meta(&mut self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
}

/// Whether writing to a cluster with entry `e` needs a new host cluster.
pub(super) fn needs_new_alloc(e: &L2Entry, geo: &Geometry, external_data: bool) -> bool {
    match e.cluster_type(geo.extended_l2, external_data) {
        ClusterType::Normal | ClusterType::ZeroAlloc => !e.copied(),
        _ => true,
    }
}
