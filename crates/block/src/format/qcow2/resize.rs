//! Resizing: growing the L1 table (with optional preallocation of the new area, placed
//! as QEMU places it) and shrinking (dropping clusters past the end and trimming the
//! file).

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::node::BlockDriver;
use crate::node::{Prealloc, WriteFlags};

use super::cluster::{CowRegion, L2Meta};
use super::meta::{DiscardType, Meta};
use super::refcount::{rb_get, rb_set};
use super::types::*;
use super::Qcow2;

impl Qcow2 {
    /// Changes the virtual size to `size`.
    pub(super) async fn resize(&self, size: u64, prealloc: Prealloc) -> Result<()> {
        let old = self.size();
        if !size.is_multiple_of(512) {
            return Err(Error::invalid("The new size must be a multiple of 512"));
        }
        // Internal snapshots keep their own L1 tables and sizes: resizing the active
        // state leaves them alone, as QEMU does. Version 2 snapshot entries cannot record
        // their own disk size, so there they forbid resizing.
        {
            let m = self.meta.lock().await;
            if m.h.version < 3 && !m.snapshots.is_empty() {
                return Err(Error::unsupported(
                    "Can't resize a v2 image which has snapshots",
                ));
            }
        }
        if size < old {
            if prealloc != Prealloc::Off {
                return Err(Error::unsupported(
                    "Preallocation can't be used for shrinking an image",
                ));
            }
            self.shrink(size, old).await?;
        } else {
            let mut m = self.meta.lock().await;
            let l1 = m.geo.l1_entries_for(size);
            let r = m
                .grow_l1(l1, true)
                .await
                .map_err(|e| e.context("Failed to grow the L1 table"));
            self.with_meta(&mut m, r).await?;
            drop(m);
            match prealloc {
                Prealloc::Off => {}
                Prealloc::Metadata => self.preallocate_metadata(old, size).await?,
                Prealloc::Falloc | Prealloc::Full => {
                    self.preallocate_data(old, size, prealloc).await?
                }
            }
            // A backing file reaching past the old end would show through the new area:
            // it must read as zeroes instead (zero clusters, zeroes for a partial head).
            if self.backing_node().is_some_and(|b| b.size() > old) {
                self.zero_new_area(old, size).await?;
            }
        }
        let mut m = self.meta.lock().await;
        m.h.size = size;
        m.file
            .write(24, &size.to_be_bytes(), WriteFlags::NONE)
            .await?;
        m.sync().await?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    async fn shrink(&self, size: u64, old: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let start = size.div_ceil(cs) * cs;
        let mut m = self.meta.lock().await;
        if start < old {
            let r = m
                .discard_clusters(start, old - start, DiscardType::Always, true)
                .await;
            self.with_meta(&mut m, r).await.map_err(|e| {
                Error::other(
                    format!("Failed to discard cropped clusters: {e}"),
                    e.errno_value(),
                )
            })?;
        }
        let new_l1 = m.geo.l1_entries_for(size);
        let r = m.shrink_l1(new_l1).await;
        self.with_meta(&mut m, r).await.map_err(|e| {
            Error::other(
                format!("Failed to reduce the number of L2 tables: {e}"),
                e.errno_value(),
            )
        })?;
        let r = m.shrink_reftable().await;
        self.with_meta(&mut m, r).await.map_err(|e| {
            Error::other(
                format!("Failed to discard unused refblocks: {e}"),
                e.errno_value(),
            )
        })?;
        m.flush_caches().await?;
        let file_len = m.file.size();
        if let Some(last) = m.last_used_cluster(file_len).await? {
            let end = (last + 1) * cs;
            if end < file_len {
                if let Err(e) = m.file.truncate(end, false, Prealloc::Off).await {
                    eprintln!("warning: Failed to truncate the tail of the image: {e}");
                }
            }
        }
        Ok(())
    }

    /// `preallocation=metadata`: map every new cluster, writing no data.
    pub(super) async fn preallocate_metadata(&self, from: u64, to: u64) -> Result<()> {
        let mut pos = from;
        let mut last_end = 0u64;
        while pos < to {
            let (host, bytes, metas) = self.reserve(pos, to - pos).await?;
            // Parts of the first and last clusters outside the range keep what they
            // read as now (backing file data), as with any allocating write.
            let cow = self.write_cow(pos, &metas).await;
            let mut m = self.meta.lock().await;
            let mut r = cow;
            for mut meta in metas {
                meta.prealloc = true;
                if r.is_ok() {
                    r = m.link_l2(&meta).await;
                } else {
                    m.alloc_abort(&meta).await;
                }
            }
            self.with_meta(&mut m, r).await?;
            drop(m);
            self.alloc_done.notify_waiters();
            last_end = host + bytes;
            pos += bytes;
        }
        // The file must contain every allocated cluster in full.
        let last_end = last_end.div_ceil(self.geo.cluster_size()) * self.geo.cluster_size();
        let data = self.data().clone();
        if last_end > data.size() {
            data.truncate(last_end, false, Prealloc::Off).await?;
        }
        Ok(())
    }

    /// Makes `[old, new)` read as zeroes after growing.
    async fn zero_new_area(&self, old: u64, new: u64) -> Result<()> {
        let scs = self.geo.subcluster_size();
        let zero_start = old.div_ceil(scs) * scs;
        if new > zero_start {
            let mut m = self.meta.lock().await;
            let r = m
                .zeroize(zero_start, new - zero_start, false, new)
                .await
                .map_err(|e| e.context("Failed to zero out new clusters"));
            self.with_meta(&mut m, r).await?;
        }
        if zero_start > old {
            let len = zero_start.min(new) - old;
            let zeroes = vec![0u8; len as usize];
            // The size is not updated yet: write below the new end directly.
            self.size.store(new, Ordering::Release);
            let r = self.write_guest(old, &zeroes).await;
            self.size.store(old, Ordering::Release);
            r.map_err(|e| e.context("Failed to zero out the new area"))?;
        }
        Ok(())
    }

    /// `preallocation=falloc|full`: new refcount structures and all data clusters in
    /// one contiguous area at the end of the file, then L2 entries pointing into it.
    async fn preallocate_data(&self, from: u64, to: u64, mode: Prealloc) -> Result<()> {
        if self.data_file.is_some() {
            // The data file gets the space first (the metadata pass would otherwise
            // just extend it).
            let d = self.data().clone();
            if d.size() < to {
                d.truncate(to, false, mode).await?;
            }
            return self.preallocate_metadata(from, to).await;
        }
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut m = self.meta.lock().await;
        let file_len = m.file.size();
        let old_file_size = match m.last_used_cluster(file_len).await? {
            Some(last) => (last + 1) * cs,
            None => file_len.div_ceil(cs) * cs,
        };
        let nb_data = (to.div_ceil(cs) * cs - geo.cluster_start(from)) >> geo.cluster_bits;
        let nb_l2 = nb_data.div_ceil(geo.l2_entries()) + 1;
        let r = m
            .refcount_area(old_file_size, nb_data + nb_l2, true, None)
            .await;
        let start = self.with_meta(&mut m, r).await?;
        let got = m.alloc_clusters_at(start, nb_data).await?;
        if got != nb_data {
            return Err(Error::errno(libc::ENOSPC));
        }
        drop(m);
        self.file
            .truncate(start + nb_data * cs, false, mode)
            .await?;
        let mut metas = Vec::new();
        let mut host = start;
        let mut guest = from;
        let mut left = nb_data;
        while left > 0 {
            let n = left.min(geo.l2_entries() - geo.l2_index(guest));
            metas.push(L2Meta {
                offset: geo.cluster_start(guest),
                alloc_offset: host,
                nb_clusters: n,
                keep_old: false,
                cow_start: CowRegion {
                    offset: 0,
                    bytes: geo.offset_in_cluster(guest),
                },
                cow_end: CowRegion {
                    offset: n << geo.cluster_bits,
                    bytes: 0,
                },
                // With subclusters the new area stays unallocated (reading zeroes, or the
                // backing file); only the clusters are reserved.
                prealloc: geo.extended_l2,
                id: 0,
            });
            guest = geo.cluster_start(guest) + (n << geo.cluster_bits);
            host += n << geo.cluster_bits;
            left -= n;
        }
        // The old part of a partial first cluster moves into the new cluster.
        if let Some(first) = metas.first() {
            if first.cow_start.bytes > 0 {
                let mut buf = crate::buffer::AlignedBuf::io(first.cow_start.bytes as usize);
                self.read_guest(first.offset, &mut buf).await?;
                self.file
                    .write(first.alloc_offset, &buf, WriteFlags::NONE)
                    .await?;
            }
        }
        let mut m = self.meta.lock().await;
        for meta in &metas {
            let r = m.link_l2(meta).await;
            self.with_meta(&mut m, r).await?;
        }
        Ok(())
    }
}

impl Meta {
    /// Drops refblocks that no longer count anything but themselves (after a shrink):
    /// the refcount table is rewritten without them first, then they are freed.
    async fn shrink_reftable(&mut self) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let order = geo.refcount_order;
        let mut keep = self.reftable.clone();
        for (i, entry) in self.reftable.clone().into_iter().enumerate() {
            let off = entry & REFT_OFFSET_MASK;
            if off == 0 {
                keep[i] = 0;
                continue;
            }
            self.load_refblock(off).await?;
            let own = (off / cs) >> geo.refblock_bits() == i as u64;
            let Some(block) = self.rb_cache.get(off) else {
                continue;
            };
            let unused = if own {
                let idx = (off / cs) & (geo.refblock_entries() - 1);
                let v = rb_get(block, idx, order);
                rb_set(block, idx, order, 0);
                let zero = block.iter().all(|&b| b == 0);
                rb_set(block, idx, order, v);
                zero
            } else {
                block.iter().all(|&b| b == 0)
            };
            if unused {
                keep[i] = 0;
            }
        }
        let mut bytes = vec![0u8; self.reftable.len() * 8];
        for (i, e) in keep.iter().enumerate() {
            put_be64(&mut bytes, i * 8, *e);
        }
        let table_off = self.h.refcount_table_offset;
        let written = async {
            self.write_meta(table_off, &bytes).await?;
            self.file_dirty = true;
            self.sync().await
        }
        .await;
        let mut r = written;
        for (i, kept) in keep.iter().enumerate() {
            let off = self.reftable[i] & REFT_OFFSET_MASK;
            if off != 0 && *kept == 0 {
                if r.is_ok() {
                    r = self.discard_refblock(off).await;
                }
                self.reftable[i] = 0;
            }
        }
        self.update_max_reftable_index();
        self.process_discards().await;
        r
    }

    /// Frees the cluster of a refblock no longer in the refcount table.
    async fn discard_refblock(&mut self, off: u64) -> Result<()> {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let index = off / cs;
        let holder = self.reftable[(index >> geo.refblock_bits()) as usize] & REFT_OFFSET_MASK;
        self.load_refblock(holder).await?;
        let at = index & (geo.refblock_entries() - 1);
        let order = geo.refcount_order;
        let v = self
            .rb_cache
            .get(holder)
            .map(|b| rb_get(b, at, order))
            .unwrap_or(0);
        if v != 1 {
            return Err(self
                .signal_corruption(true, format!("Invalid refcount: {v}"))
                .await);
        }
        if let Some(b) = self.rb_cache.get(holder) {
            rb_set(b, at, order, 0);
        }
        self.rb_cache.mark_dirty(holder);
        if index < self.free_cluster_index {
            self.free_cluster_index = index;
        }
        self.rb_cache.remove(off);
        self.note_freed(off, cs, DiscardType::Always);
        Ok(())
    }
}
