//! `check` and repair: rebuilds the reference counts from the L1/L2 tables (and every
//! other structure), compares them with the stored ones, and fixes leaks, wrong
//! refcounts, misaligned entries and OFLAG_COPIED mismatches as QEMU does, with QEMU's
//! messages.

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::info::{CheckReport, RepairMode};
use crate::node::Prealloc;

use super::meta::{DiscardType, Meta};
use super::refcount::{rb_get, rb_set};
use super::types::*;
use super::{bitmaps, Qcow2};

/// Counters of one check pass (QEMU's `BdrvCheckResult`).
impl Res {
    /// Adds the error counts of `other` (QEMU's `qcow2_add_check_result` without the
    /// statistics).
    fn add_counts(&mut self, other: &Res) {
        self.corruptions += other.corruptions;
        self.leaks += other.leaks;
        self.check_errors += other.check_errors;
        self.corruptions_fixed += other.corruptions_fixed;
        self.leaks_fixed += other.leaks_fixed;
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Res {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
}

/// The in-memory refcount table: one entry per host cluster, in the image's width.
struct Imrt {
    data: Vec<u8>,
    entries: u64,
    order: u32,
    cluster_size: u64,
}

impl Imrt {
    fn new(entries: u64, order: u32, cluster_size: u64) -> Imrt {
        let mut t = Imrt {
            data: Vec::new(),
            entries: 0,
            order,
            cluster_size,
        };
        t.resize(entries);
        t
    }

    fn bytes_for(&self, entries: u64) -> usize {
        let raw = (entries << self.order).div_ceil(8);
        (raw.div_ceil(self.cluster_size) * self.cluster_size) as usize
    }

    fn resize(&mut self, entries: u64) {
        let n = self.bytes_for(entries);
        if n > self.data.len() {
            self.data.resize(n, 0);
        }
        self.entries = entries;
    }

    fn get(&self, i: u64) -> u64 {
        if i >= self.entries {
            return 0;
        }
        rb_get(&self.data, i, self.order)
    }

    fn set(&mut self, i: u64, v: u64) {
        if i >= self.entries {
            self.resize(i + 1);
        }
        rb_set(&mut self.data, i, self.order, v)
    }
}

/// Reports progress as QEMU's refcount-width change does: `alloc_walks` walks over the
/// `entries` of the old refcount table that allocate, each expecting at least one more
/// (at least three in all), then one that writes; each walk reports before every entry
/// and once at its end.
fn report_walks(entries: u64, alloc_walks: u64, progress: &mut dyn FnMut(u64, u64)) {
    let n = entries.max(1);
    for w in 0..alloc_walks {
        let total = (w + 2).max(3);
        for i in 0..=n {
            progress(w * n + i, total * n);
        }
    }
    for i in 0..=n {
        progress(alloc_walks * n + i, (alloc_walks + 1) * n);
    }
}

/// Messages go to stderr as the check runs, like QEMU's.
fn say(msg: String) {
    eprintln!("{msg}");
}

/// The last refcount block read during a check, decoded lookups without the cache.
#[derive(Default)]
struct RefblockWindow {
    table_index: Option<u64>,
    block: Vec<u8>,
}

impl Meta {
    /// Refcount of cluster `index`, through a one-block window (checks walk clusters in
    /// order, so each block is fetched once).
    async fn refcount_windowed(&mut self, w: &mut RefblockWindow, index: u64) -> Result<u64> {
        let ti = index >> self.geo.refblock_bits();
        if w.table_index != Some(ti) {
            w.table_index = None;
            w.block.clear();
            if ti < self.reftable.len() as u64 {
                let off = self.reftable[ti as usize] & REFT_OFFSET_MASK;
                if off != 0 {
                    // Go through the cache for its corruption checks and dirty state.
                    self.get_refcount(index).await?;
                    if let Some(b) = self.rb_cache.peek(off) {
                        w.block = b.to_vec();
                    }
                }
            }
            w.table_index = Some(ti);
        }
        if w.block.is_empty() {
            return Ok(0);
        }
        let bi = index & (self.geo.refblock_entries() - 1);
        Ok(rb_get(&w.block, bi, self.geo.refcount_order))
    }

    fn inc_refcounts(&self, res: &mut Res, t: &mut Imrt, offset: u64, size: u64, file_len: u64) {
        if size == 0 {
            return;
        }
        let cs = self.geo.cluster_size();
        let end = offset.saturating_add(size);
        if end.saturating_sub(file_len) >= cs {
            say(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            res.corruptions += 1;
            return;
        }
        let start = self.geo.cluster_start(offset);
        let last = self.geo.cluster_start(end - 1);
        let max = self.geo.refcount_max();
        let mut c = start;
        while c <= last {
            let k = c >> self.geo.cluster_bits;
            let rc = t.get(k);
            if rc == max {
                say(format!("ERROR: overflow cluster offset=0x{c:x}"));
                say("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing".into());
                res.corruptions += 1;
            } else {
                t.set(k, rc + 1);
            }
            c += self.geo.cluster_size();
        }
    }

    async fn check_l2(
        &mut self,
        res: &mut Res,
        t: &mut Imrt,
        l2_offset: u64,
        frag_info: bool,
        fix: RepairMode,
        file_len: u64,
    ) -> Result<()> {
        let geo = self.geo;
        let mut table = AlignedBuf::io(geo.cluster_size() as usize);
        if self.file.read(l2_offset, &mut table).await.is_err() {
            say("ERROR: I/O error in check_refcounts_l2".into());
            res.check_errors += 1;
            return Err(Error::errno(libc::EIO));
        }
        let ext = self.has_data_file();
        let esize = geo.l2_entry_size() as usize;
        let mut next_contiguous = 0u64;
        for i in 0..geo.l2_entries() as usize {
            let mut e = L2Entry {
                raw: be64(&table, i * esize),
                bitmap: if geo.extended_l2 {
                    be64(&table, i * esize + 8)
                } else {
                    0
                },
            };
            let ct = e.cluster_type(geo.extended_l2, ext);
            if ct != ClusterType::Compressed && e.raw & L2E_STD_RESERVED_MASK != 0 {
                say(format!(
                    "ERROR found l2 entry with reserved bits set: {:x}",
                    e.raw
                ));
                res.corruptions += 1;
            }
            match ct {
                ClusterType::Compressed => {
                    if e.copied() {
                        say(format!(
                            "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                            e.raw & geo.compressed_offset_mask()
                        ));
                        e.raw &= !OFLAG_COPIED;
                        res.corruptions += 1;
                    }
                    if ext {
                        say(format!(
                            "ERROR compressed cluster {i} with data file, entry=0x{:x}",
                            e.raw
                        ));
                        res.corruptions += 1;
                        continue;
                    }
                    if e.bitmap != 0 {
                        say(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{:x}",
                            e.raw
                        ));
                        res.corruptions += 1;
                        continue;
                    }
                    let host = e.raw & geo.compressed_offset_mask();
                    let sectors = ((e.raw >> geo.csize_shift()) & geo.csize_mask()) + 1;
                    let csize = sectors * 512 - (host & 511);
                    self.inc_refcounts(res, t, host, csize, file_len);
                    if frag_info {
                        res.allocated_clusters += 1;
                        res.compressed_clusters += 1;
                        res.fragmented_clusters += 1;
                    }
                }
                ClusterType::ZeroAlloc | ClusterType::Normal => {
                    let off = e.host_offset();
                    if (e.bitmap >> 32) & e.bitmap & BITMAP_ALL_ALLOC != 0 {
                        res.corruptions += 1;
                        say(format!(
                            "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        ));
                    }
                    if geo.offset_in_cluster(off) != 0 {
                        res.corruptions += 1;
                        let contains_data = if geo.extended_l2 {
                            e.bitmap & BITMAP_ALL_ALLOC != 0
                        } else {
                            e.raw & OFLAG_ZERO == 0
                        };
                        if !contains_data {
                            say(format!(
                                "{} offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                                if fix.errors { "Repairing" } else { "ERROR" }
                            ));
                            if fix.errors {
                                let mut ne = e;
                                if geo.extended_l2 {
                                    ne.bitmap = (e.bitmap | (e.bitmap << 32)) & BITMAP_ALL_ZERO;
                                    ne.raw = 0;
                                } else {
                                    ne.raw = OFLAG_ZERO;
                                }
                                let at = l2_offset + (i * esize) as u64;
                                if self
                                    .overlaps_metadata(at, esize as u64)
                                    .is_some_and(|k| k != super::overlap::MetaKind::ActiveL2)
                                {
                                    say("ERROR: Overlap check failed".into());
                                    res.check_errors += 1;
                                    return Err(Error::errno(libc::EIO));
                                }
                                let mut bytes = [0u8; 16];
                                put_be64(&mut bytes, 0, ne.raw);
                                put_be64(&mut bytes, 8, ne.bitmap);
                                match self.write_meta(at, &bytes[..esize]).await {
                                    Ok(()) => {
                                        let _ = self.sync().await;
                                        self.l2_cache.remove(l2_offset);
                                        res.corruptions -= 1;
                                        res.corruptions_fixed += 1;
                                        continue;
                                    }
                                    Err(err) => {
                                        say(format!(
                                            "ERROR: Failed to overwrite L2 table entry: {err}"
                                        ));
                                        res.check_errors += 1;
                                    }
                                }
                            }
                        } else {
                            say(format!(
                                "ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        }
                    }
                    if frag_info {
                        res.allocated_clusters += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            res.fragmented_clusters += 1;
                        }
                        next_contiguous = off + geo.cluster_size();
                    }
                    if !ext {
                        self.inc_refcounts(res, t, off, geo.cluster_size(), file_len);
                    }
                }
                ClusterType::ZeroPlain => {}
                ClusterType::Unallocated => {
                    if e.bitmap & BITMAP_ALL_ALLOC != 0 {
                        res.corruptions += 1;
                        say(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .into(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn check_l1(
        &mut self,
        res: &mut Res,
        t: &mut Imrt,
        l1_offset: u64,
        l1_size: u64,
        frag_info: bool,
        fix: RepairMode,
        file_len: u64,
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc_refcounts(res, t, l1_offset, l1_size * 8, file_len);
        let l1 = match super::open::read_u64_table(&self.file, l1_offset, l1_size).await {
            Ok(l1) => l1,
            Err(_) => {
                say("ERROR: I/O error in check_refcounts_l1".into());
                res.check_errors += 1;
                return Err(Error::errno(libc::EIO));
            }
        };
        for e in l1 {
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                say(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                res.corruptions += 1;
            }
            let l2 = e & L1E_OFFSET_MASK;
            self.inc_refcounts(res, t, l2, self.geo.cluster_size(), file_len);
            if self.geo.offset_in_cluster(l2) != 0 {
                say(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                res.corruptions += 1;
            }
            Box::pin(self.check_l2(res, t, l2, frag_info, fix, file_len)).await?;
        }
        Ok(())
    }

    async fn check_refblocks(
        &mut self,
        res: &mut Res,
        t: &mut Imrt,
        fix: RepairMode,
        rebuild: &mut bool,
        nb_clusters: &mut u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        for i in 0..self.reftable.len() {
            let entry = self.reftable[i];
            let offset = entry & REFT_OFFSET_MASK;
            let cluster = offset >> self.geo.cluster_bits;
            if entry & REFT_RESERVED_MASK != 0 {
                say(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if self.geo.offset_in_cluster(offset) != 0 {
                say(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= *nb_clusters {
                res.corruptions += 1;
                say(format!(
                    "{} refcount block {i} is outside image",
                    if fix.errors { "Repairing" } else { "ERROR" }
                ));
                if fix.errors {
                    let r = if offset > i64::MAX as u64 - cs {
                        Err(Error::errno(libc::EINVAL))
                    } else {
                        self.file.truncate(offset + cs, false, Prealloc::Off).await
                    };
                    match r {
                        Ok(()) => {
                            let size = self.file.size();
                            *nb_clusters = size.div_ceil(cs);
                            t.resize(*nb_clusters);
                            res.corruptions -= 1;
                            res.corruptions_fixed += 1;
                            self.inc_refcounts(res, t, offset, cs, size);
                            continue;
                        }
                        Err(e) => {
                            *rebuild = true;
                            say(format!(
                                "ERROR could not resize image: {}",
                                crate::error::strerror(e.errno_value())
                            ));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                let file_len = self.file.size();
                self.inc_refcounts(res, t, offset, cs, file_len);
                if t.get(cluster) != 1 {
                    say(format!(
                        "ERROR refcount block {i} refcount={}",
                        t.get(cluster)
                    ));
                    res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    async fn calculate_refcounts(
        &mut self,
        res: &mut Res,
        fix: RepairMode,
        rebuild: &mut bool,
        t: &mut Imrt,
        nb_clusters: &mut u64,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let file_len = self.file.size();
        self.inc_refcounts(res, t, 0, cs, file_len);
        let (l1_off, l1_size) = (self.h.l1_table_offset, self.h.l1_size as u64);
        self.check_l1(res, t, l1_off, l1_size, true, fix, file_len)
            .await?;
        if self.has_data_file() && !self.snapshots.is_empty() {
            say(format!(
                "ERROR {} snapshots in image with data file",
                self.snapshots.len()
            ));
            res.corruptions += 1;
        }
        for sn in self.snapshots.clone() {
            if self.geo.offset_in_cluster(sn.l1_table_offset) != 0 {
                say(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                res.corruptions += 1;
                continue;
            }
            if sn.l1_size as u64 > MAX_L1_BYTES / 8 {
                say(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                res.corruptions += 1;
                continue;
            }
            self.check_l1(
                res,
                t,
                sn.l1_table_offset,
                sn.l1_size as u64,
                false,
                fix,
                file_len,
            )
            .await?;
        }
        let snap_size = self.snapshot_table_size();
        self.inc_refcounts(res, t, self.h.snapshots_offset, snap_size, file_len);
        self.inc_refcounts(
            res,
            t,
            self.h.refcount_table_offset,
            self.reftable.len() as u64 * 8,
            file_len,
        );
        if let Some((off, len)) = self.h.crypto_header {
            self.inc_refcounts(res, t, off, len, file_len);
        }
        self.check_bitmaps(res, t, file_len).await?;
        self.check_refblocks(res, t, fix, rebuild, nb_clusters)
            .await
    }

    async fn check_bitmaps(&mut self, res: &mut Res, t: &mut Imrt, file_len: u64) -> Result<()> {
        let Some(ext) = self.h.bitmaps else {
            return Ok(());
        };
        if self.h.autoclear_features & autoclear::BITMAPS == 0 || ext.nb_bitmaps == 0 {
            return Ok(());
        }
        self.inc_refcounts(res, t, ext.directory_offset, ext.directory_size, file_len);
        if ext.directory_size > bitmaps::MAX_DIRECTORY_SIZE {
            res.corruptions += 1;
            return Err(Error::errno(libc::EINVAL));
        }
        let mut dir = vec![0u8; ext.directory_size as usize];
        let list = match self.file.read(ext.directory_offset, &mut dir).await {
            Ok(()) => bitmaps::parse_directory(&dir, ext.nb_bitmaps),
            Err(e) => Err(e),
        };
        let Ok(list) = list else {
            res.corruptions += 1;
            return Err(Error::errno(libc::EINVAL));
        };
        let cs = self.geo.cluster_size();
        for bm in list {
            self.inc_refcounts(res, t, bm.table_offset, bm.table_size as u64 * 8, file_len);
            let table = match super::open::read_u64_table(
                &self.file,
                bm.table_offset,
                bm.table_size as u64,
            )
            .await
            {
                Ok(tb) => tb,
                Err(_) => {
                    res.corruptions += 1;
                    break;
                }
            };
            for e in table {
                let off = e & bitmaps::TABLE_OFFSET_MASK;
                let bad = (e & !bitmaps::TABLE_OFFSET_MASK & !1) != 0
                    || (off != 0 && (e & 1 != 0 || !off.is_multiple_of(cs)));
                if bad {
                    res.corruptions += 1;
                    continue;
                }
                if off != 0 {
                    self.inc_refcounts(res, t, off, cs, file_len);
                }
            }
        }
        Ok(())
    }

    async fn compare_refcounts(
        &mut self,
        res: &mut Res,
        fix: RepairMode,
        rebuild: &mut bool,
        highest: &mut u64,
        t: &Imrt,
        nb_clusters: u64,
    ) {
        *highest = 0;
        let mut w = RefblockWindow::default();
        for i in 0..nb_clusters {
            let rc1 = match self.refcount_windowed(&mut w, i).await {
                Ok(v) => v,
                Err(e) => {
                    say(format!(
                        "Can't get refcount for cluster {i}: {}",
                        crate::error::strerror(e.errno_value())
                    ));
                    res.check_errors += 1;
                    continue;
                }
            };
            let rc2 = t.get(i);
            if rc1 > 0 || rc2 > 0 {
                *highest = i;
            }
            if rc1 == rc2 {
                continue;
            }
            let mut fixed: Option<bool> = None; // Some(true) = leak fix, Some(false) = corruption fix
            if rc1 == 0 {
                *rebuild = true;
            } else if rc1 > rc2 && fix.leaks {
                fixed = Some(true);
            } else if rc1 < rc2 && fix.errors {
                fixed = Some(false);
            }
            say(format!(
                "{} cluster {i} refcount={rc1} reference={rc2}",
                if fixed.is_some() {
                    "Repairing"
                } else if rc1 < rc2 {
                    "ERROR"
                } else {
                    "Leaked"
                }
            ));
            if let Some(leak) = fixed {
                let (diff, decrease) = if rc1 > rc2 {
                    (rc1 - rc2, true)
                } else {
                    (rc2 - rc1, false)
                };
                let r = self
                    .update_refcount(
                        i << self.geo.cluster_bits,
                        1,
                        diff,
                        decrease,
                        DiscardType::Always,
                    )
                    .await;
                w.table_index = None;
                if r.is_ok() {
                    if leak {
                        res.leaks_fixed += 1;
                    } else {
                        res.corruptions_fixed += 1;
                    }
                    continue;
                }
            }
            if rc1 < rc2 {
                res.corruptions += 1;
            } else {
                res.leaks += 1;
            }
        }
    }

    fn alloc_clusters_imrt(&self, count: u64, t: &mut Imrt, first_free: &mut u64) -> u64 {
        let mut cluster = *first_free;
        let mut first_gap = true;
        let mut contiguous = 0;
        while cluster < t.entries && contiguous < count {
            if t.get(cluster) == 0 {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else if contiguous > 0 {
                contiguous = 0;
            }
            cluster += 1;
        }
        if contiguous < count {
            t.resize(cluster + count - contiguous);
        }
        cluster -= contiguous;
        for i in 0..count {
            t.set(cluster + i, 1);
        }
        cluster << self.geo.cluster_bits
    }

    async fn write_refblocks_imrt(
        &mut self,
        t: &mut Imrt,
        first: u64,
        mut end: u64,
        reftable: &mut Vec<u64>,
    ) -> Result<(bool, u32)> {
        let cs = self.geo.cluster_size();
        let bits = self.geo.refblock_bits();
        let per_block = self.geo.refblock_entries();
        let mut first_free = 0u64;
        let mut grown = false;
        let mut new_blocks = 0;
        let mut cluster = first;
        while cluster < end {
            if t.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> bits;
            let start = index << bits;
            let offset = if (reftable.len() as u64) > index && reftable[index as usize] != 0 {
                reftable[index as usize]
            } else {
                if first_free < start {
                    first_free = start;
                }
                let off = self.alloc_clusters_imrt(1, t, &mut first_free);
                let ci = off / cs;
                if ci >= end {
                    end = ci + 1;
                }
                if reftable.len() as u64 <= index {
                    let entries = ((index + 1) * 8).div_ceil(cs) * cs / 8;
                    reftable.resize(entries as usize, 0);
                    grown = true;
                }
                reftable[index as usize] = off;
                new_blocks += 1;
                off
            };
            if self.overlaps_metadata(offset, cs).is_some() && offset != 0 {
                // QEMU runs its overlap check here; the old structures are about to be
                // replaced, so only the header is off limits.
            }
            if offset < cs {
                return Err(Error::errno(libc::EIO));
            }
            let from = ((start << self.geo.refcount_order) / 8) as usize;
            t.resize(t.entries.max(start + per_block));
            let block = t.data[from..from + cs as usize].to_vec();
            self.write_meta(offset, &block).await?;
            cluster = start + per_block;
        }
        Ok((grown, new_blocks))
    }

    /// Writes refblocks and a refcount table for the counts in `t` into clusters `t`
    /// has free (marking them used); returns the table, its offset and its clusters.
    /// Nothing on disk refers to the new structures yet.
    async fn write_refcount_structure(
        &mut self,
        t: &mut Imrt,
    ) -> Result<(Vec<u64>, u64, u64, u32)> {
        let cs = self.geo.cluster_size();
        self.rb_cache.clear();
        let mut reftable: Vec<u64> = Vec::new();
        let entries = t.entries;
        self.write_refblocks_imrt(t, 0, entries, &mut reftable)
            .await
            .inspect_err(|e| {
                say(format!(
                    "ERROR writing refblock: {}",
                    crate::error::strerror(e.errno_value())
                ))
            })?;
        // How often placing the table needed new refblocks (each costs QEMU one more
        // walk over the refcount table, which its progress shows).
        let mut extra = 0;
        let (reftable_offset, reftable_clusters) = loop {
            let len = reftable.len() as u64 * 8;
            let clusters = len.div_ceil(cs);
            let mut first_free = 0;
            let offset = self.alloc_clusters_imrt(clusters, t, &mut first_free);
            let start = offset / cs;
            let (grown, new_blocks) = self
                .write_refblocks_imrt(t, start, start + clusters, &mut reftable)
                .await?;
            if new_blocks > 0 {
                extra += 1;
            }
            if !grown {
                break (offset, clusters);
            }
        };
        let mut bytes = vec![0u8; reftable.len() * 8];
        for (i, e) in reftable.iter().enumerate() {
            put_be64(&mut bytes, i * 8, *e);
        }
        self.write_meta(reftable_offset, &bytes).await?;
        Ok((reftable, reftable_offset, reftable_clusters, extra))
    }

    /// Makes `reftable` (written by [`Self::write_refcount_structure`]) the image's.
    fn adopt_reftable(&mut self, reftable: Vec<u64>, offset: u64, clusters: u64) {
        self.h.refcount_table_offset = offset;
        self.h.refcount_table_clusters = clusters as u32;
        self.reftable = reftable;
        self.update_max_reftable_index();
        self.overlap.invalidate();
        self.free_cluster_index = 0;
    }

    async fn rebuild_refcount_structure(&mut self, res: &mut Res, t: &mut Imrt) -> Result<()> {
        let (reftable, offset, clusters, _) = self
            .write_refcount_structure(t)
            .await
            .inspect_err(|_| res.check_errors += 1)?;
        let mut hdr = [0u8; 12];
        put_be64(&mut hdr, 0, offset);
        put_be32(&mut hdr, 8, clusters as u32);
        self.write_meta(48, &hdr).await?;
        self.sync().await?;
        self.adopt_reftable(reftable, offset, clusters);
        Ok(())
    }

    /// Rewrites the refcount structures with entries of `1 << new_order` bits
    /// (`amend -o refcount_bits`).
    ///
    /// Crash safety: the new refblocks and table go into clusters nothing uses and are
    /// durable before one header write switches width and table together; until then
    /// the old structures describe the image. Only then are the old structures freed
    /// (in the new ones), so a crash in between leaks clusters at worst.
    pub(super) async fn change_refcount_order(
        &mut self,
        new_order: u32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        self.flush_caches().await?;
        // The new structures take over the refcounts as they are (a wrong one stays
        // wrong, for `check -r` to repair), in the new width.
        let nb = self.file.size().div_ceil(cs);
        let max = if new_order == 6 {
            u64::MAX
        } else {
            (1u64 << (1 << new_order)) - 1
        };
        let mut t = Imrt::new(nb, new_order, cs);
        for i in 0..nb {
            let v = self.get_refcount(i).await?;
            if v > max {
                return Err(Error::other(
                    format!(
                        "Cannot decrease refcount entry width to {} bits: Cluster at offset {:#x} has a refcount of {v}",
                        1u32 << new_order,
                        i * cs
                    ),
                    libc::EINVAL,
                ));
            }
            if v != 0 {
                t.set(i, v);
            }
        }
        let old_geo = self.geo;
        let old_table = (
            self.h.refcount_table_offset,
            self.h.refcount_table_clusters as u64,
        );
        let old_blocks: Vec<u64> = self.reftable.iter().copied().filter(|&o| o != 0).collect();
        self.geo.refcount_order = new_order;
        let written = self.write_refcount_structure(&mut t).await;
        let (reftable, offset, clusters, extra) = match written {
            Ok(w) => w,
            Err(e) => {
                self.geo = old_geo;
                return Err(e);
            }
        };
        self.file_dirty = true;
        self.sync().await?;
        let old_header = (
            self.h.refcount_order,
            self.h.refcount_table_offset,
            self.h.refcount_table_clusters,
        );
        self.h.refcount_order = new_order;
        self.h.refcount_table_offset = offset;
        self.h.refcount_table_clusters = clusters as u32;
        if let Err(e) = self.write_header().await {
            self.geo = old_geo;
            (
                self.h.refcount_order,
                self.h.refcount_table_offset,
                self.h.refcount_table_clusters,
            ) = old_header;
            return Err(e);
        }
        let old_entries = self.reftable.len() as u64;
        self.adopt_reftable(reftable, offset, clusters);
        report_walks(old_entries, 2 + extra as u64, progress);
        for b in old_blocks {
            self.free_clusters(b, cs, DiscardType::Other).await;
        }
        self.free_clusters(old_table.0, old_table.1 * cs, DiscardType::Other)
            .await;
        self.flush_caches().await?;
        self.sync().await
    }

    async fn check_refcounts(&mut self, res: &mut Res, fix: RepairMode) -> Result<()> {
        let cs = self.geo.cluster_size();
        let size = self.file.size();
        let mut nb_clusters = size.div_ceil(cs);
        if nb_clusters > i32::MAX as u64 {
            res.check_errors += 1;
            return Err(Error::errno(libc::EFBIG));
        }
        res.total_clusters = self.h.size.div_ceil(cs);
        let mut t = Imrt::new(nb_clusters, self.geo.refcount_order, cs);
        let mut rebuild = false;
        self.calculate_refcounts(res, fix, &mut rebuild, &mut t, &mut nb_clusters)
            .await?;
        // References just past the end of the file grew the table.
        nb_clusters = nb_clusters.max(t.entries);
        let pre_compare = *res;
        let mut highest = 0;
        self.compare_refcounts(
            res,
            RepairMode::default(),
            &mut rebuild,
            &mut highest,
            &t,
            nb_clusters,
        )
        .await;
        if rebuild && fix.errors {
            let old = *res;
            let mut fresh_leaks = 0;
            say("Rebuilding refcount structure".into());
            self.rebuild_refcount_structure(res, &mut t).await?;
            res.corruptions = 0;
            res.leaks = 0;
            rebuild = false;
            nb_clusters = self.file.size().div_ceil(cs).max(t.entries);
            t = Imrt::new(nb_clusters, self.geo.refcount_order, cs);
            self.calculate_refcounts(
                res,
                RepairMode::default(),
                &mut rebuild,
                &mut t,
                &mut nb_clusters,
            )
            .await?;
            nb_clusters = nb_clusters.max(t.entries);
            if fix.leaks {
                let saved = *res;
                *res = Res::default();
                self.compare_refcounts(
                    res,
                    RepairMode {
                        leaks: true,
                        errors: false,
                    },
                    &mut rebuild,
                    &mut highest,
                    &t,
                    nb_clusters,
                )
                .await;
                if rebuild {
                    say("ERROR rebuilt refcount structure is still broken".into());
                }
                fresh_leaks = res.leaks;
                *res = saved;
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_leaks;
        } else if fix.leaks || fix.errors {
            if rebuild {
                say("ERROR need to rebuild refcount structures".into());
                res.check_errors += 1;
                return Err(Error::errno(libc::EIO));
            }
            if res.leaks > 0 || res.corruptions > 0 {
                *res = pre_compare;
                self.compare_refcounts(res, fix, &mut rebuild, &mut highest, &t, nb_clusters)
                    .await;
            }
        }
        self.flush_refblocks().await?;
        self.check_oflag_copied(res, fix).await?;
        res.image_end_offset = (highest + 1) * cs;
        Ok(())
    }

    async fn check_oflag_copied(&mut self, res: &mut Res, fix: RepairMode) -> Result<()> {
        let repair = if fix.errors {
            true
        } else if fix.leaks {
            res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            false
        };
        let geo = self.geo;
        let ext = self.has_data_file();
        let esize = geo.l2_entry_size() as usize;
        self.flush_l2().await?;
        let mut w = RefblockWindow::default();
        for i in 0..self.l1.len() {
            let l1e = self.l1[i];
            let l2 = l1e & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let Ok(rc) = self.refcount_windowed(&mut w, l2 >> geo.cluster_bits).await else {
                continue;
            };
            if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                res.corruptions += 1;
                say(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}",
                    if repair { "Repairing" } else { "ERROR" }
                ));
                if repair {
                    self.l1[i] = if rc == 1 {
                        l1e | OFLAG_COPIED
                    } else {
                        l1e & !OFLAG_COPIED
                    };
                    if self.write_l1_entry(i as u64).await.is_err() {
                        res.check_errors += 1;
                        return Err(Error::errno(libc::EIO));
                    }
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                }
            }
            let mut table = AlignedBuf::io(geo.cluster_size() as usize);
            if let Err(e) = self.file.read(l2, &mut table).await {
                say(format!("ERROR: Could not read L2 table: {e}"));
                res.check_errors += 1;
                return Err(e);
            }
            let mut dirty = 0;
            for j in 0..geo.l2_entries() as usize {
                let raw = be64(&table, j * esize);
                let e = L2Entry { raw, bitmap: 0 };
                let ct = e.cluster_type(geo.extended_l2, ext);
                if !matches!(ct, ClusterType::Normal | ClusterType::ZeroAlloc) {
                    continue;
                }
                let rc = if ext {
                    1
                } else {
                    match self
                        .refcount_windowed(&mut w, e.host_offset() >> geo.cluster_bits)
                        .await
                    {
                        Ok(v) => v,
                        Err(_) => continue,
                    }
                };
                if (rc == 1) != e.copied() {
                    res.corruptions += 1;
                    say(format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}",
                        if repair { "Repairing" } else { "ERROR" }
                    ));
                    if repair {
                        let nraw = if rc == 1 {
                            raw | OFLAG_COPIED
                        } else {
                            raw & !OFLAG_COPIED
                        };
                        put_be64(&mut table, j * esize, nraw);
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Err(e) = self.write_meta(l2, &table).await {
                    say(format!("ERROR: Could not write L2 table: {e}"));
                    res.check_errors += 1;
                    return Err(e);
                }
                self.l2_cache.remove(l2);
                res.corruptions -= dirty;
                res.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }
}

impl Meta {
    /// Reads the snapshot table in check mode, where opening skipped it (QEMU's
    /// `qcow2_check_read_snapshot_table`).
    async fn check_read_snapshot_table(&mut self, res: &mut Res, fix: RepairMode) -> Result<()> {
        let mut nb = self.h.nb_snapshots;
        if nb > MAX_SNAPSHOTS {
            let overhang = (nb - MAX_SNAPSHOTS) as u64;
            res.corruptions += overhang;
            if !fix.errors {
                crate::error::report("ERROR snapshot table too large");
                say(format!(
                    "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                    nb - MAX_SNAPSHOTS
                ));
                return Err(Error::errno(libc::EFBIG));
            }
            say(format!(
                "Discarding {} overhanging snapshots",
                nb - MAX_SNAPSHOTS
            ));
            self.write_meta(60, &MAX_SNAPSHOTS.to_be_bytes()).await?;
            self.sync().await?;
            nb = MAX_SNAPSHOTS;
            self.h.nb_snapshots = nb;
            res.corruptions -= overhang;
            res.corruptions_fixed += overhang;
        }
        if !super::open::table_offset_valid(&self.geo, self.h.snapshots_offset, nb as u64, 40) {
            res.check_errors += 1;
            crate::error::report("ERROR snapshot table offset invalid");
            self.h.snapshots_offset = 0;
            self.h.nb_snapshots = 0;
            return Err(Error::errno(libc::EINVAL));
        }
        let table = match super::snapshot::read_table(
            &self.file,
            self.h.snapshots_offset,
            nb,
            self.h.size,
            fix.errors,
        )
        .await
        {
            Ok(t) => t,
            Err(e) => {
                res.check_errors += 1;
                crate::error::report(&format!("ERROR failed to read the snapshot table: {e}"));
                self.h.snapshots_offset = 0;
                self.h.nb_snapshots = 0;
                return Err(e);
            }
        };
        self.snapshots = table.snapshots;
        self.snapshot_extent = table.extent;
        res.corruptions += table.extra_dropped + table.overhanging as u64;
        if table.overhanging > 0 {
            let kept = self.snapshots.len() as u32;
            self.write_meta(60, &kept.to_be_bytes()).await?;
            self.sync().await?;
            self.h.nb_snapshots = kept;
            res.corruptions -= table.overhanging as u64;
            res.corruptions_fixed += table.overhanging as u64;
        }
        // Version 3 entries must carry the 64-bit VM state size and the disk size.
        if self.h.version >= 3 {
            for (i, s) in self.snapshots.iter().enumerate() {
                if s.extra_len < 16 {
                    res.corruptions += 1;
                    say(format!(
                        "{} snapshot table entry {i} is incomplete",
                        if fix.errors { "Repairing" } else { "ERROR" }
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Checks (and with `repair`, fixes) the image.
pub async fn check(q: &Qcow2, repair: RepairMode) -> Result<CheckReport> {
    let mut m = q.meta.lock().await;
    let mut res = Res::default();
    // The snapshot table's own faults, counted apart: the refcount check runs on the
    // table as found, and the table is rewritten after it.
    let mut snap_res = Res::default();
    if q.opened_for_check && !m.snapshots_checked {
        m.snapshots_checked = true;
        m.check_read_snapshot_table(&mut snap_res, repair).await?
    }
    // Unflushed metadata would look like inconsistencies; write it first.
    if !q.read_only {
        m.flush_caches().await?;
    }
    let repair = if q.read_only {
        RepairMode::default()
    } else {
        repair
    };
    let r = m.check_refcounts(&mut res, repair).await;
    if let Err(e) = r {
        if res.check_errors == 0 && e.errno_value() != libc::EIO {
            return Err(e);
        }
        res.check_errors = res.check_errors.max(1);
    }
    if snap_res.corruptions > 0 && repair.errors {
        if let Err(e) = m.write_snapshots().await {
            snap_res.check_errors += 1;
            say(format!(
                "ERROR failed to update snapshot table: {}",
                crate::error::strerror(e.errno_value())
            ));
            res.add_counts(&snap_res);
            return Err(e);
        }
        snap_res.corruptions_fixed += snap_res.corruptions;
        snap_res.corruptions = 0;
    }
    res.add_counts(&snap_res);
    if (repair.leaks || repair.errors) && res.check_errors == 0 && res.corruptions == 0 {
        m.mark_clean().await?;
        if m.h.incompatible_features & incompat::CORRUPT != 0 {
            m.h.incompatible_features &= !incompat::CORRUPT;
            m.write_header().await?;
        }
    }
    m.free_cluster_index = 0;
    Ok(CheckReport {
        check_errors: res.check_errors,
        corruptions: res.corruptions,
        leaks: res.leaks,
        corruptions_fixed: res.corruptions_fixed,
        leaks_fixed: res.leaks_fixed,
        image_end_offset: (res.image_end_offset != 0).then_some(res.image_end_offset),
        total_clusters: (res.total_clusters != 0).then_some(res.total_clusters),
        allocated_clusters: (res.allocated_clusters != 0).then_some(res.allocated_clusters),
        fragmented_clusters: (res.fragmented_clusters != 0).then_some(res.fragmented_clusters),
        compressed_clusters: (res.compressed_clusters != 0).then_some(res.compressed_clusters),
        messages: Vec::new(),
    })
}
