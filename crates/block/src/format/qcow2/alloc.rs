//! Allocation for writes (QEMU's `qcow2_alloc_host_offset` and friends): which host
//! range a guest write goes to, which clusters are new, which parts of them must be
//! copied from the old content, and linking them into the L2 table afterwards.

use crate::error::{Error, Result};

use super::cluster::{needs_new_alloc, CowRegion, L2Meta};
use super::meta::{DiscardType, Meta};
use super::types::*;

/// Largest request QEMU's block layer handles at once.
const MAX_REQUEST_BYTES: u64 = (i32::MAX as u64) & !511;

/// Result of looking for the host range of a write.
pub(super) enum HostRange {
    /// Write `bytes` at `host`; `metas` describe the metadata updates to make after.
    Ready {
        /// Host offset of the first byte.
        host: u64,
        /// Bytes of the request covered (from its start).
        bytes: u64,
        /// Allocations to link once the data is written.
        metas: Vec<L2Meta>,
    },
    /// An in-flight allocation overlaps the start of the request: wait and retry.
    Wait,
}

impl Meta {
    fn overlapping_inflight(&self, start: u64, bytes: u64) -> Option<u64> {
        let cs = self.geo.cluster_size();
        let end = start + bytes;
        let mut limit = bytes;
        for m in &self.inflight {
            let (os, oe) = m.guest_range(cs);
            if end <= os || start >= oe {
                continue;
            }
            if start < os {
                limit = limit.min(os - start);
            } else {
                return Some(0);
            }
        }
        Some(limit)
    }

    /// Finds (allocating where needed) the host range for the guest write
    /// `[offset, offset + bytes)`; the range may be shorter than asked.
    pub async fn alloc_host_offset(&mut self, offset: u64, bytes: u64) -> Result<HostRange> {
        let mut start = offset;
        let mut remaining = bytes;
        let mut cluster_offset: Option<u64> = None;
        let mut host_offset: Option<u64> = None;
        let mut cur_bytes = 0u64;
        let mut metas: Vec<L2Meta> = Vec::new();
        loop {
            if host_offset.is_none() {
                host_offset = cluster_offset;
            }
            start += cur_bytes;
            remaining -= cur_bytes;
            if let Some(c) = cluster_offset.as_mut() {
                *c += cur_bytes;
            }
            if remaining == 0 {
                break;
            }
            cur_bytes = remaining;
            match self.overlapping_inflight(start, cur_bytes) {
                Some(0) if metas.is_empty() => return Ok(HostRange::Wait),
                Some(0) => break,
                Some(n) => cur_bytes = n,
                None => {}
            }
            if self
                .handle_copied(start, &mut cluster_offset, &mut cur_bytes, &mut metas)
                .await?
            {
                continue;
            }
            if cur_bytes == 0 {
                break;
            }
            if self
                .handle_alloc(start, &mut cluster_offset, &mut cur_bytes, &mut metas)
                .await?
            {
                continue;
            }
            break;
        }
        let done = bytes - remaining;
        for m in &mut metas {
            self.next_alloc_id += 1;
            m.id = self.next_alloc_id;
            self.inflight.push(m.clone());
        }
        match host_offset {
            Some(host) if done > 0 => Ok(HostRange::Ready {
                host,
                bytes: done,
                metas,
            }),
            _ => Err(Error::errno(libc::EIO)),
        }
    }

    async fn handle_copied(
        &mut self,
        guest: u64,
        host: &mut Option<u64>,
        bytes: &mut u64,
        metas: &mut Vec<L2Meta>,
    ) -> Result<bool> {
        let geo = self.geo;
        let in_cluster = geo.offset_in_cluster(guest);
        let l2_index = geo.l2_index(guest);
        let nb = geo
            .clusters_for(in_cluster + *bytes)
            .min(geo.l2_entries() - l2_index)
            .min(MAX_REQUEST_BYTES >> geo.cluster_bits);
        let l2 = self.cluster_table(guest).await?;
        let ext = self.has_data_file();
        let e = self.l2_entry(l2, l2_index);
        let cluster = e.host_offset();
        if needs_new_alloc(&e, &geo, ext) {
            return Ok(false);
        }
        if geo.offset_in_cluster(cluster) != 0 {
            let what = if e.raw & OFLAG_ZERO != 0 {
                "Preallocated zero"
            } else {
                "Data"
            };
            return Err(self
                .signal_corruption(
                    true,
                    format!(
                        "{what} cluster offset {cluster:#x} unaligned (guest offset: {guest:#x})"
                    ),
                )
                .await);
        }
        if let Some(h) = *host {
            if geo.cluster_start(h) != cluster {
                *bytes = 0;
                return Ok(false);
            }
        }
        // Count clusters that can be written in place, contiguous on the host.
        let mut keep = 0;
        let mut expected = cluster;
        while keep < nb {
            let e = self.l2_entry(l2, l2_index + keep);
            if needs_new_alloc(&e, &geo, ext) || e.host_offset() != expected {
                break;
            }
            expected += geo.cluster_size();
            keep += 1;
        }
        *bytes = (*bytes).min((keep << geo.cluster_bits) - in_cluster);
        if let Some(m) = self
            .calculate_l2_meta(cluster, guest, *bytes, l2, true)
            .await?
        {
            metas.push(m);
        }
        *host = Some(cluster + in_cluster);
        Ok(true)
    }

    async fn handle_alloc(
        &mut self,
        guest: u64,
        host: &mut Option<u64>,
        bytes: &mut u64,
        metas: &mut Vec<L2Meta>,
    ) -> Result<bool> {
        let geo = self.geo;
        let in_cluster = geo.offset_in_cluster(guest);
        let l2_index = geo.l2_index(guest);
        let nb = geo
            .clusters_for(in_cluster + *bytes)
            .min(geo.l2_entries() - l2_index)
            .min(MAX_REQUEST_BYTES >> geo.cluster_bits);
        let l2 = self.cluster_table(guest).await?;
        let ext = self.has_data_file();
        let mut n = 0;
        while n < nb {
            let e = self.l2_entry(l2, l2_index + n);
            if !needs_new_alloc(&e, &geo, ext) {
                break;
            }
            n += 1;
        }
        if n == 0 {
            return Err(Error::errno(libc::EIO));
        }
        let alloc_offset = if ext {
            geo.cluster_start(guest)
        } else {
            match *host {
                None => self.alloc_clusters(n << geo.cluster_bits).await?,
                Some(h) => {
                    let at = geo.cluster_start(h);
                    n = self.alloc_clusters_at(at, n).await?;
                    at
                }
            }
        };
        if n == 0 {
            *bytes = 0;
            return Ok(false);
        }
        let requested = *bytes + in_cluster;
        let avail = n << geo.cluster_bits;
        let nb_bytes = requested.min(avail);
        *host = Some(alloc_offset + in_cluster);
        *bytes = (*bytes).min(nb_bytes - in_cluster);
        if let Some(m) = self
            .calculate_l2_meta(alloc_offset, guest, *bytes, l2, false)
            .await?
        {
            metas.push(m);
        }
        Ok(true)
    }

    /// The metadata update (and copy-on-write regions) of a write of `bytes` at
    /// `guest` to host clusters starting at `host_cluster`; `None` when nothing changes.
    async fn calculate_l2_meta(
        &mut self,
        host_cluster: u64,
        guest: u64,
        bytes: u64,
        l2: u64,
        keep_old: bool,
    ) -> Result<Option<L2Meta>> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let scs = geo.subcluster_size();
        let ext = self.has_data_file();
        let l2_index = geo.l2_index(guest);
        let cow_start_to = geo.offset_in_cluster(guest);
        let cow_end_from = cow_start_to + bytes;
        let nb_clusters = geo.clusters_for(cow_end_from);
        let sc_of = |off: u64| -> u32 {
            if geo.extended_l2 {
                ((off % cs) / scs) as u32
            } else {
                0
            }
        };
        let mut skip_cow = keep_old;
        for i in 0..nb_clusters {
            let e = self.l2_entry(l2, l2_index + i);
            let ty = if skip_cow {
                let from = cow_start_to.max(i * cs);
                let to = cow_end_from.min((i + 1) * cs);
                let first_sc = sc_of(from);
                let last_sc = sc_of(to - 1);
                let (t, cnt) = e.sc_run(&geo, first_sc, ext);
                let cnt = if geo.extended_l2 { cnt } else { 1 };
                if t != ScType::Normal || first_sc + cnt <= last_sc {
                    skip_cow = false;
                }
                t
            } else {
                e.sc_type(&geo, 0, ext)
            };
            if ty == ScType::Invalid {
                let l2_off = self.l1[geo.l1_index(guest) as usize] & L1E_OFFSET_MASK;
                return Err(self
                    .signal_corruption(
                        true,
                        format!(
                            "Invalid cluster entry found (L2 offset: {l2_off:#x}, L2 index: {:#x})",
                            l2_index + i
                        ),
                    )
                    .await);
            }
        }
        if skip_cow {
            return Ok(None);
        }
        let sc_bits = if geo.extended_l2 {
            geo.cluster_bits - 5
        } else {
            geo.cluster_bits
        };
        let first = self.l2_entry(l2, l2_index);
        let sc = geo.subcluster_index(guest);
        let sc = if geo.extended_l2 { sc } else { 0 };
        let ty = first.sc_type(&geo, sc, ext);
        let cow_start_from = if !keep_old {
            match ty {
                ScType::Compressed => 0,
                ScType::Normal | ScType::ZeroAlloc | ScType::UnallocatedAlloc => {
                    if geo.extended_l2 {
                        let alloc = (first.bitmap & BITMAP_ALL_ALLOC) as u32;
                        (sc.min(alloc.trailing_zeros()) as u64) << sc_bits
                    } else {
                        0
                    }
                }
                _ => (sc as u64) << sc_bits,
            }
        } else {
            match ty {
                ScType::Normal => cow_start_to,
                _ => (sc as u64) << sc_bits,
            }
        };
        let last_index = l2_index + nb_clusters - 1;
        let last = self.l2_entry(l2, last_index);
        let last_guest = guest + bytes - 1;
        let lsc = if geo.extended_l2 {
            geo.subcluster_index(last_guest)
        } else {
            0
        };
        let lty = last.sc_type(&geo, lsc, ext);
        let cow_end_to = if !keep_old {
            match lty {
                ScType::Compressed => cow_end_from.div_ceil(cs) * cs,
                ScType::Normal | ScType::ZeroAlloc | ScType::UnallocatedAlloc => {
                    let mut to = cow_end_from.div_ceil(cs) * cs;
                    if geo.extended_l2 {
                        let alloc = (last.bitmap & BITMAP_ALL_ALLOC) as u32;
                        let skip = (SUBCLUSTERS - lsc - 1).min(alloc.leading_zeros());
                        to -= (skip as u64) << sc_bits;
                    }
                    to
                }
                _ => cow_end_from.div_ceil(1 << sc_bits) << sc_bits,
            }
        } else {
            match lty {
                ScType::Normal => cow_end_from,
                _ => cow_end_from.div_ceil(1 << sc_bits) << sc_bits,
            }
        };
        Ok(Some(L2Meta {
            offset: geo.cluster_start(guest),
            alloc_offset: host_cluster,
            nb_clusters,
            keep_old,
            cow_start: CowRegion {
                offset: cow_start_from,
                bytes: cow_start_to - cow_start_from,
            },
            cow_end: CowRegion {
                offset: cow_end_from,
                bytes: cow_end_to - cow_end_from,
            },
            prealloc: false,
            id: 0,
        }))
    }

    /// Points the L2 entries at the clusters of `m` (after their data is written) and
    /// drops references to the clusters they replace.
    pub async fn link_l2(&mut self, m: &L2Meta) -> Result<()> {
        self.remove_inflight(m.id);
        if m.nb_clusters == 0 {
            return Ok(());
        }
        let geo = self.geo;
        let cs = geo.cluster_size();
        if self.lazy_refcounts {
            self.mark_dirty().await?;
        }
        self.l2_depends_on_refcounts().await?;
        let l2 = self.cluster_table(m.offset).await?;
        let l2_index = geo.l2_index(m.offset);
        let mut old = Vec::new();
        for i in 0..m.nb_clusters {
            let off = m.alloc_offset + i * cs;
            let e = self.l2_entry(l2, l2_index + i);
            if e.raw != 0 {
                old.push(e);
            }
            let mut ne = L2Entry {
                raw: off | OFLAG_COPIED,
                bitmap: e.bitmap,
            };
            if geo.extended_l2 && !m.prealloc {
                let written_from = m.cow_start.offset.max(i * cs);
                let written_to = (m.cow_end.offset + m.cow_end.bytes).min((i + 1) * cs);
                let scs = geo.subcluster_size();
                let first_sc = ((written_from % cs) / scs) as u32;
                let last_sc = (((written_to - 1) % cs) / scs) as u32;
                ne.bitmap |= sub_alloc_range(first_sc, last_sc + 1);
                ne.bitmap &= !sub_zero_range(first_sc, last_sc + 1);
            }
            self.set_l2_entry(l2, l2_index + i, ne);
        }
        if !m.keep_old && !old.is_empty() {
            for e in old {
                self.free_any_clusters(e, 1, DiscardType::Never).await;
            }
        }
        Ok(())
    }

    /// Frees the clusters of an allocation whose data write failed.
    pub async fn alloc_abort(&mut self, m: &L2Meta) {
        self.remove_inflight(m.id);
        if !self.has_data_file() && !m.keep_old {
            self.free_clusters(
                m.alloc_offset,
                m.nb_clusters << self.geo.cluster_bits,
                DiscardType::Never,
            )
            .await;
        }
    }

    fn remove_inflight(&mut self, id: u64) {
        self.inflight.retain(|x| x.id != id);
    }
}
