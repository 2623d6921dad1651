//! Write-zeroes and discard: both turn into L2 entry updates where whole (sub)clusters
//! are covered, and zeroes written as data where they are not.

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::node::BlockDriver;
use crate::node::WriteFlags;

use super::meta::{DiscardType, Meta};
use super::types::*;
use super::Qcow2;

impl Meta {
    /// Discards whole clusters of `[offset, offset + bytes)` (the end may be the image's
    /// unaligned end). `full` makes them unallocated (falling through to the backing
    /// file); otherwise they read as zeroes afterwards where that matters.
    pub async fn discard_clusters(
        &mut self,
        mut offset: u64,
        bytes: u64,
        kind: DiscardType,
        full: bool,
    ) -> Result<()> {
        let geo = self.geo;
        let mut n = geo.clusters_for(bytes);
        let has_backing = self.has_backing;
        self.cache_discards = true;
        let r = async {
            while n > 0 {
                let l2 = self.cluster_table(offset).await?;
                let idx = geo.l2_index(offset);
                let count = n.min(geo.l2_entries() - idx);
                for i in 0..count {
                    let old = self.l2_entry(l2, idx + i);
                    let ct = old.cluster_type(geo.extended_l2, self.has_data_file());
                    let allocated =
                        !matches!(ct, ClusterType::Unallocated | ClusterType::ZeroPlain);
                    let new = if full {
                        L2Entry::UNALLOCATED
                    } else if has_backing || allocated {
                        if geo.extended_l2 {
                            L2Entry {
                                raw: 0,
                                bitmap: BITMAP_ALL_ZERO,
                            }
                        } else {
                            L2Entry {
                                raw: if self.h.version >= 3 { OFLAG_ZERO } else { 0 },
                                bitmap: 0,
                            }
                        }
                    } else {
                        old
                    };
                    if new == old {
                        continue;
                    }
                    self.set_l2_entry(l2, idx + i, new);
                    self.free_any_clusters(old, 1, kind).await;
                }
                n -= count;
                offset += count << geo.cluster_bits;
            }
            Ok(())
        }
        .await;
        self.cache_discards = false;
        self.process_discards().await;
        r
    }

    /// Marks subclusters `[sc, sc + n)` of the cluster at `offset` as zero.
    async fn zero_subclusters(&mut self, offset: u64, sc: u32, n: u32) -> Result<()> {
        let geo = self.geo;
        let l2 = self.cluster_table(offset).await?;
        let idx = geo.l2_index(offset);
        let e = self.l2_entry(l2, idx);
        match e.cluster_type(true, self.has_data_file()) {
            ClusterType::Compressed => return Err(Error::errno(libc::ENOTSUP)),
            ClusterType::Normal | ClusterType::Unallocated => {}
            _ => return Err(Error::errno(libc::EIO)),
        }
        let mut ne = e;
        ne.bitmap |= sub_zero_range(sc, sc + n);
        ne.bitmap &= !sub_alloc_range(sc, sc + n);
        if ne != e {
            self.set_l2_entry(l2, idx, ne);
        }
        Ok(())
    }

    /// Makes whole clusters read as zeroes, deallocating them if `unmap` allows.
    async fn zero_clusters(&mut self, mut offset: u64, nb: u64, unmap: bool) -> Result<()> {
        let geo = self.geo;
        let mut n = nb;
        while n > 0 {
            let l2 = self.cluster_table(offset).await?;
            let idx = geo.l2_index(offset);
            let count = n.min(geo.l2_entries() - idx);
            for i in 0..count {
                let old = self.l2_entry(l2, idx + i);
                let ct = old.cluster_type(geo.extended_l2, self.has_data_file());
                let free = ct == ClusterType::Compressed
                    || (unmap && !matches!(ct, ClusterType::Unallocated | ClusterType::ZeroPlain));
                let mut new = if free { L2Entry::UNALLOCATED } else { old };
                if geo.extended_l2 {
                    new.bitmap = BITMAP_ALL_ZERO;
                } else {
                    new.raw |= OFLAG_ZERO;
                }
                if new == old {
                    continue;
                }
                self.set_l2_entry(l2, idx + i, new);
                if free {
                    self.free_any_clusters(old, 1, DiscardType::Request).await;
                }
            }
            n -= count;
            offset += count << geo.cluster_bits;
        }
        Ok(())
    }

    /// Zeroes `[offset, offset + bytes)` in metadata; it must be subcluster-aligned except
    /// at the image end (`disk_size`).
    pub async fn zeroize(
        &mut self,
        offset: u64,
        bytes: u64,
        unmap: bool,
        disk_size: u64,
    ) -> Result<()> {
        let geo = self.geo;
        if self.h.version < 3 {
            if !self.has_backing {
                return self
                    .discard_clusters(offset, bytes, DiscardType::Request, false)
                    .await;
            }
            return Err(Error::errno(libc::ENOTSUP));
        }
        let cs = geo.cluster_size();
        let end = offset + bytes;
        let head = end.min(offset.div_ceil(cs) * cs) - offset;
        let mut start = offset + head;
        let tail = if end >= disk_size {
            0
        } else {
            end - start.max(geo.cluster_start(end))
        };
        let stop = end - tail;
        self.cache_discards = true;
        let r = async {
            let scs = geo.subcluster_size();
            if head > 0 {
                if geo.extended_l2 {
                    let sc = geo.subcluster_index(offset);
                    self.zero_subclusters(offset, sc, head.div_ceil(scs) as u32)
                        .await?;
                } else {
                    // Partial cluster without subclusters: only at the image end.
                    self.zero_clusters(geo.cluster_start(offset), 1, unmap)
                        .await?;
                }
            }
            if stop > start {
                let nb = geo.clusters_for(stop - start);
                self.zero_clusters(start, nb, unmap).await?;
                start += nb * cs;
            }
            if tail > 0 {
                self.zero_subclusters(stop, 0, tail.div_ceil(scs) as u32)
                    .await?;
            }
            Ok(())
        }
        .await;
        self.cache_discards = false;
        self.process_discards().await;
        r
    }
}

impl Qcow2 {
    /// Whether `[offset, offset + bytes)` reads as zeroes according to metadata alone.
    async fn reads_as_zero(&self, offset: u64, bytes: u64) -> Result<bool> {
        let end = (offset + bytes).min(self.size());
        let mut pos = offset;
        while pos < end {
            let mapping = {
                let mut m = self.meta.lock().await;
                let r = m.get_host_offset(pos, end - pos).await;
                self.with_meta(&mut m, r).await?
            };
            let n = mapping.len.min(end - pos).max(1);
            if mapping.ty.is_unallocated() {
                if let Some(b) = self.backing_node() {
                    if !crate::status::is_zero(&b, pos, n).await? {
                        return Ok(false);
                    }
                }
            } else if !mapping.ty.is_zero() {
                return Ok(false);
            }
            pos += n;
        }
        Ok(true)
    }

    /// Writes zeroes: metadata updates for aligned parts, zero data for the rest.
    pub(super) async fn write_zeroes_guest(
        &self,
        offset: u64,
        len: u64,
        flags: WriteFlags,
    ) -> Result<()> {
        if self.data_file_raw {
            if let Some(d) = &self.data_file {
                d.write_zeroes(offset, len, flags).await?;
            }
        }
        let scs = self.geo.subcluster_size();
        let size = self.size();
        let end = offset + len;
        // Split like QEMU's block layer: an unaligned head up to the first subcluster
        // boundary, then (only when more than one subcluster remains) the aligned bulk
        // and an unaligned tail, even at the image end.
        let head_end = if !offset.is_multiple_of(scs) {
            end.min(offset.div_ceil(scs) * scs)
        } else {
            offset
        };
        let tail_start = if !end.is_multiple_of(scs) && end - head_end > scs {
            end / scs * scs
        } else {
            end
        };
        for (a, b) in [
            (offset, head_end),
            (head_end, tail_start),
            (tail_start, end),
        ] {
            if b <= a {
                continue;
            }
            // What the driver then takes as aligned: an aligned start, and an aligned
            // end or the image's end.
            if a.is_multiple_of(scs) && (b.is_multiple_of(scs) || b == size) {
                self.zero_aligned(a, b - a, flags).await?;
            } else {
                self.zero_partial(a, b - a, flags).await?;
            }
        }
        Ok(())
    }

    async fn zero_aligned(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let r = {
            let mut m = self.meta.lock().await;
            let r = m.zeroize(offset, len, flags.may_unmap, self.size()).await;
            self.with_meta(&mut m, r).await
        };
        match r {
            Err(e) if e.errno_value() == libc::ENOTSUP => {
                self.zero_fallback(offset, len, flags).await
            }
            other => other,
        }
    }

    /// A piece smaller than a subcluster: metadata-only if the rest of the subcluster
    /// already reads as zero, else zero data.
    async fn zero_partial(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        let scs = self.geo.subcluster_size();
        let start = offset / scs * scs;
        let stop = ((offset + len).div_ceil(scs) * scs).min(self.size());
        if self.reads_as_zero(start, offset - start).await?
            && self
                .reads_as_zero(offset + len, stop.saturating_sub(offset + len))
                .await?
        {
            let r = {
                let mut m = self.meta.lock().await;
                let mapping = m.get_host_offset(start, scs).await;
                let mapping = self.with_meta(&mut m, mapping).await?;
                if mapping.ty.is_unallocated() || mapping.ty.is_zero() {
                    let r = m
                        .zeroize(start, stop - start, flags.may_unmap, self.size())
                        .await;
                    Some(self.with_meta(&mut m, r).await)
                } else {
                    None
                }
            };
            match r {
                Some(Ok(())) => return Ok(()),
                Some(Err(e)) if e.errno_value() != libc::ENOTSUP => return Err(e),
                _ => {}
            }
        }
        self.zero_fallback(offset, len, flags).await
    }

    async fn zero_fallback(&self, offset: u64, len: u64, flags: WriteFlags) -> Result<()> {
        if flags.no_fallback {
            return Err(Error::errno(libc::ENOTSUP));
        }
        const CHUNK: u64 = 1 << 20;
        let zeroes = AlignedBuf::io(CHUNK.min(len) as usize);
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(CHUNK) as usize;
            self.write_guest(pos, &zeroes[..n]).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Discards whole clusters in the range (partial clusters are ignored, except the
    /// image's partial last cluster).
    pub(super) async fn discard_guest(&self, offset: u64, len: u64) -> Result<()> {
        // Without zero clusters (v2), discarding would expose the backing file's data.
        if self.version < 3 && self.backing_node().is_some() {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let size = self.size();
        let end = offset + len;
        let start = offset.div_ceil(cs) * cs;
        let stop = if end == size { end } else { end / cs * cs };
        if stop <= start {
            return Ok(());
        }
        if self.data_file_raw {
            if let Some(d) = &self.data_file {
                d.discard(start, stop - start).await?;
            }
        }
        let mut m = self.meta.lock().await;
        let r = m
            .discard_clusters(start, stop - start, DiscardType::Request, false)
            .await;
        self.with_meta(&mut m, r).await
    }
}
