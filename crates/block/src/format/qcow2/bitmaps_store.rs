//! Live persistent dirty bitmaps of an open qcow2 image, handled as QEMU handles them.
//!
//! - **Open** ([`Qcow2::load_bitmaps`]): the bitmap directory is read with QEMU's checks.
//!   A bitmap already marked in use on disk is *inconsistent*: kept as it is, never
//!   tracked, refused by every operation but removal. The others are loaded; when the
//!   image is writable they are marked in use on disk at once, so that a crash leaves
//!   them recognisably stale.
//! - **Writes** ([`Qcow2::track_write`]): every write, write-zeroes and discard sets the
//!   bits of the enabled bitmaps over its range.
//! - **Close** ([`Qcow2::store_bitmaps`]): each bitmap is written to fresh clusters, a
//!   new directory points at them with the in-use flag cleared, and only then are the
//!   old tables freed.
//! - **Operations** for `qemu-img bitmap` and `convert --bitmaps`: add, remove, clear,
//!   enable, disable, merge, with QEMU's messages.
//!
//! The bitmaps live in a list of their own, in QEMU's order (newest first), behind a
//! short-held lock that writes take without the metadata lock.

use std::sync::atomic::Ordering;

use crate::error::{strerror, Error, Result};
use crate::node::BlockDriver;

use super::bitmaps::{self, BitmapEntry};
use super::dirty_bitmap::DirtyBitmap;
use super::header::BitmapsExt;
use super::meta::{DiscardType, Meta};
use super::open::Qcow2Options;
use super::types::*;
use super::Qcow2;

/// A bitmap of an open image.
#[derive(Debug)]
pub(super) struct LiveBitmap {
    /// Name.
    pub name: String,
    /// The bits.
    pub bits: DirtyBitmap,
    /// Tracks writes.
    pub enabled: bool,
    /// Was found in use on disk: its contents are unknown.
    pub inconsistent: bool,
    /// The image is read-only: the bitmap cannot be changed or stored.
    pub readonly: bool,
}

/// What a caller sees of one bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSummary {
    /// Name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Tracks writes.
    pub enabled: bool,
    /// Found in use on disk.
    pub inconsistent: bool,
}

fn not_found(name: &str) -> Error {
    Error::other(format!("Dirty bitmap '{name}' not found"), libc::ENOENT)
}

fn inconsistent(name: &str) -> Error {
    Error::invalid(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

fn readonly(name: &str) -> Error {
    Error::Permission {
        msg: format!("Bitmap '{name}' is readonly and cannot be modified"),
        errno: libc::EPERM,
    }
}

/// The name QEMU gives an anonymous node in messages (`#block` and a number).
pub fn anonymous_node_name() -> String {
    format!("#block1{:02}", std::process::id() % 100)
}

/// QEMU's constraints on a bitmap stored in a qcow2 image; the message says which failed.
fn check_constraints(
    name: &str,
    granularity: u64,
    disk_size: u64,
    cluster_size: u64,
) -> std::result::Result<(), String> {
    let gb = granularity.trailing_zeros();
    if gb > bitmaps::MAX_GRANULARITY_BITS {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << bitmaps::MAX_GRANULARITY_BITS
        ));
    }
    if gb < bitmaps::MIN_GRANULARITY_BITS {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << bitmaps::MIN_GRANULARITY_BITS
        ));
    }
    let bytes = disk_size.div_ceil(granularity).div_ceil(8);
    if bytes > bitmaps::MAX_PHYS_SIZE || bytes.div_ceil(cluster_size) > bitmaps::MAX_TABLE_SIZE {
        return Err("Too much space will be occupied by the bitmap. Use larger granularity".into());
    }
    if name.len() > bitmaps::MAX_NAME_SIZE {
        return Err(format!(
            "Name length exceeds maximum ({} characters)",
            bitmaps::MAX_NAME_SIZE
        ));
    }
    Ok(())
}

impl Qcow2 {
    fn live(&self) -> std::sync::MutexGuard<'_, Vec<LiveBitmap>> {
        self.bitmaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update_tracking(&self, list: &[LiveBitmap]) {
        self.bitmaps_tracking
            .store(list.iter().any(|b| b.enabled), Ordering::Release);
    }

    /// Sets the bits of every enabled bitmap over `[offset, offset + len)`.
    pub(super) fn track_write(&self, offset: u64, len: u64) {
        if !self.bitmaps_tracking.load(Ordering::Acquire) {
            return;
        }
        for b in self.live().iter_mut().filter(|b| b.enabled) {
            b.bits.set_range(offset, len);
        }
    }

    /// Resizes the bitmaps with the disk.
    pub(super) fn resize_bitmaps(&self, size: u64) {
        for b in self.live().iter_mut() {
            b.bits.truncate(size);
        }
    }

    /// Whether the image can hold persistent bitmaps (version 3 only).
    pub fn supports_persistent_bitmaps(&self) -> bool {
        self.version >= 3
    }

    /// The bitmaps of the image, in QEMU's order (newest first).
    pub fn persistent_bitmaps(&self) -> Vec<BitmapSummary> {
        self.live()
            .iter()
            .map(|b| BitmapSummary {
                name: b.name.clone(),
                granularity: b.bits.granularity(),
                enabled: b.enabled,
                inconsistent: b.inconsistent,
            })
            .collect()
    }

    /// Reads the bitmap directory and loads the bitmaps (at open). On a writable image
    /// the loaded bitmaps are marked in use on disk.
    pub(super) async fn load_bitmaps(&self, opts: &Qcow2Options) -> Result<()> {
        let writable = !opts.read_only && !opts.no_io;
        let mut m = self.meta.lock().await;
        let Some(ext) = m.h.bitmaps else {
            return Ok(());
        };
        if m.h.autoclear_features & autoclear::BITMAPS == 0 {
            // Another program changed the image: the bitmaps are stale, and dropped.
            if m.h.version < 3 {
                crate::error::report(
                    "warning: This qcow2 v2 image contains bitmaps, but they may have been \
                     modified by a program without persistent bitmap support; so now they \
                     must all be considered inconsistent",
                );
            } else {
                crate::error::report(
                    "warning: a program lacking bitmap support modified this file, so all \
                     bitmaps are now considered inconsistent",
                );
            }
            eprint!(
                "Some clusters may be leaked, run 'qemu-img check -r' on the image file to fix."
            );
            m.h.bitmaps = None;
            m.overlap.invalidate();
            if writable {
                m.write_header().await?;
            }
            return Ok(());
        }
        if ext.nb_bitmaps > bitmaps::MAX_BITMAPS {
            return Err(Error::invalid(format!(
                "bitmaps_ext: Image has {} bitmaps, exceeding the QEMU supported maximum of {}",
                ext.nb_bitmaps,
                bitmaps::MAX_BITMAPS
            )));
        }
        if ext.nb_bitmaps == 0 {
            return Err(Error::invalid("found bitmaps extension with zero bitmaps"));
        }
        if m.geo.offset_in_cluster(ext.directory_offset) != 0 {
            return Err(Error::invalid(
                "bitmaps_ext: invalid bitmap directory offset",
            ));
        }
        if ext.directory_size > bitmaps::MAX_DIRECTORY_SIZE {
            return Err(Error::invalid(format!(
                "bitmaps_ext: bitmap directory size ({}) exceeds the maximum supported size ({})",
                ext.directory_size,
                bitmaps::MAX_DIRECTORY_SIZE
            )));
        }
        let mut dir = read_directory(&m, &ext).await?;
        let disk_size = m.h.size;
        let mut list = Vec::new();
        let mut needs_update = false;
        for e in dir.iter_mut() {
            let mut bits = DirtyBitmap::new(disk_size, e.granularity_bits as u32);
            let in_use = e.flags & bitmaps::FLAG_IN_USE != 0;
            if !in_use {
                load_bitmap(&m, e, &mut bits).await?;
                e.flags |= bitmaps::FLAG_IN_USE;
                needs_update = true;
            }
            list.insert(
                0,
                LiveBitmap {
                    name: e.name.clone(),
                    bits,
                    enabled: !in_use && e.flags & bitmaps::FLAG_AUTO != 0,
                    inconsistent: in_use,
                    readonly: !writable,
                },
            );
        }
        if needs_update && writable {
            update_dir_in_place(&mut m, &ext, &dir).await.map_err(|e| {
                let errno = e.errno_value();
                Error::other(
                    format!("Can't update bitmap directory: {}", strerror(errno)),
                    errno,
                )
            })?;
        }
        drop(m);
        let mut live = self.live();
        *live = list;
        self.update_tracking(&live);
        Ok(())
    }

    /// Writes the bitmaps back (at close): fresh clusters for each, a new directory,
    /// then the old tables freed. Bitmaps that are inconsistent or read-only stay as
    /// they are on disk. The bitmaps are released afterwards.
    pub(super) async fn store_bitmaps(&self, m: &mut Meta) -> Result<()> {
        let list = std::mem::take(&mut *self.live());
        self.bitmaps_tracking.store(false, Ordering::Release);
        if !list.iter().any(|b| !b.inconsistent && !b.readonly) {
            return Ok(());
        }
        let r = self.store_list(m, &list).await;
        if r.is_err() {
            // Still in memory: a later close tries again, as QEMU's final close does.
            self.bitmaps_tracking
                .store(list.iter().any(|b| b.enabled), Ordering::Release);
            *self.live() = list;
        }
        r.map_err(|e| {
            Error::other(
                format!(
                    "Lost persistent bitmaps during inactivation of node '{}': {e}",
                    anonymous_node_name()
                ),
                e.errno_value(),
            )
        })
    }

    async fn store_list(&self, m: &mut Meta, list: &[LiveBitmap]) -> Result<()> {
        let cs = m.geo.cluster_size();
        let disk_size = self.size();
        let ext = m.h.bitmaps.filter(|e| e.nb_bitmaps > 0);
        let mut dir = match &ext {
            Some(ext) => read_directory(m, ext).await?,
            None => Vec::new(),
        };
        let mut dir_size = ext.map_or(0, |e| e.directory_size);
        let mut live_of: Vec<Option<usize>> = vec![None; dir.len()];
        let mut drop_tables = Vec::new();
        for (i, b) in list.iter().enumerate() {
            if b.inconsistent || b.readonly {
                continue;
            }
            check_constraints(&b.name, b.bits.granularity(), disk_size, cs).map_err(|msg| {
                Error::invalid(format!(
                    "Bitmap '{}' doesn't satisfy the constraints: {msg}",
                    b.name
                ))
            })?;
            let j = match dir.iter().position(|e| e.name == b.name) {
                None => {
                    if dir.len() as u32 >= bitmaps::MAX_BITMAPS {
                        return Err(Error::invalid("Too many persistent bitmaps"));
                    }
                    dir_size += bitmaps::dir_entry_size(b.name.len(), 0);
                    if dir_size > bitmaps::MAX_DIRECTORY_SIZE {
                        return Err(Error::invalid("Bitmap directory is too large"));
                    }
                    dir.push(BitmapEntry {
                        table_offset: 0,
                        table_size: 0,
                        flags: 0,
                        kind: bitmaps::TYPE_DIRTY_TRACKING,
                        granularity_bits: 0,
                        name: b.name.clone(),
                        extra_data: Vec::new(),
                    });
                    live_of.push(None);
                    dir.len() - 1
                }
                Some(j) => {
                    if dir[j].flags & bitmaps::FLAG_IN_USE == 0 {
                        return Err(Error::invalid(format!(
                            "Bitmap '{}' already exists in the image",
                            b.name
                        )));
                    }
                    drop_tables.push((dir[j].table_offset, dir[j].table_size));
                    dir[j].table_offset = 0;
                    dir[j].table_size = 0;
                    j
                }
            };
            dir[j].flags = if b.enabled { bitmaps::FLAG_AUTO } else { 0 };
            dir[j].granularity_bits = b.bits.granularity_bits() as u8;
            live_of[j] = Some(i);
        }
        let mut written = Vec::new();
        let mut failure = None;
        for (j, e) in dir.iter_mut().enumerate() {
            if let Some(i) = live_of[j] {
                match store_bitmap(m, &list[i]).await {
                    Ok((off, size)) => {
                        e.table_offset = off;
                        e.table_size = size;
                        written.push((off, size));
                    }
                    Err(e) => {
                        let errno = e.errno_value();
                        failure = Some(Error::other(
                            format!(
                                "Failed to write bitmap '{}' to file: {}",
                                list[i].name,
                                strerror(errno)
                            ),
                            errno,
                        ));
                        break;
                    }
                }
            }
        }
        if failure.is_none() {
            if let Err(e) = update_dir(m, &dir).await {
                let errno = e.errno_value();
                failure = Some(Error::other(
                    format!("Failed to update bitmap extension: {}", strerror(errno)),
                    errno,
                ));
            }
        }
        if let Some(e) = failure {
            // The bitmaps this attempt wrote are not referenced: free them, as QEMU does.
            for (off, size) in written {
                free_bitmap_clusters(m, off, size).await;
            }
            return Err(e);
        }
        // The new directory is durable: the old tables can go.
        for (off, size) in drop_tables {
            free_bitmap_clusters(m, off, size).await;
        }
        Ok(())
    }

    fn find<'a>(list: &'a mut [LiveBitmap], name: &str) -> Result<&'a mut LiveBitmap> {
        list.iter_mut()
            .find(|b| b.name == name)
            .ok_or_else(|| not_found(name))
    }

    /// The bitmap `name` if it may be modified (not read-only, not inconsistent).
    fn find_writable<'a>(list: &'a mut [LiveBitmap], name: &str) -> Result<&'a mut LiveBitmap> {
        let b = Self::find(list, name)?;
        if b.readonly {
            return Err(readonly(name));
        }
        if b.inconsistent {
            return Err(inconsistent(name));
        }
        Ok(b)
    }

    /// Adds a persistent bitmap (`qemu-img bitmap --add`): enabled unless `disabled`,
    /// with `granularity` bytes per bit (default: the cluster size within 4k..64k).
    pub async fn bitmap_add(
        &self,
        name: &str,
        granularity: Option<u64>,
        disabled: bool,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(Error::invalid("Bitmap name cannot be empty"));
        }
        let granularity = match granularity {
            Some(g) if g < 512 || !g.is_power_of_two() => {
                return Err(Error::invalid(
                    "Granularity must be power of 2 and at least 512",
                ))
            }
            Some(g) => g,
            None => self.geo.cluster_size().clamp(4096, 65536),
        };
        let m = self.meta.lock().await;
        let mut list = self.live();
        if list.iter().any(|b| b.name == name) {
            return Err(Error::invalid(format!("Bitmap already exists: {name}")));
        }
        let cant = |msg: String| {
            Error::invalid(format!(
                "Can't make bitmap '{name}' persistent in '{}': {msg}",
                anonymous_node_name()
            ))
        };
        if m.h.version < 3 {
            return Err(cant("Cannot store dirty bitmaps in qcow2 v2 files".into()));
        }
        check_constraints(name, granularity, self.size(), self.geo.cluster_size()).map_err(cant)?;
        let count = list.len() + 1;
        let dir_size: u64 = list
            .iter()
            .map(|b| bitmaps::dir_entry_size(b.name.len(), 0))
            .sum::<u64>()
            + bitmaps::dir_entry_size(name.len(), 0);
        if count > bitmaps::MAX_BITMAPS as usize {
            return Err(cant(
                "Maximum number of persistent bitmaps is already reached".into(),
            ));
        }
        if dir_size > bitmaps::MAX_DIRECTORY_SIZE {
            return Err(cant("Not enough space in the bitmap directory".into()));
        }
        list.insert(
            0,
            LiveBitmap {
                name: name.to_string(),
                bits: DirtyBitmap::new(self.size(), granularity.trailing_zeros()),
                enabled: !disabled,
                inconsistent: false,
                readonly: self.read_only,
            },
        );
        self.update_tracking(&list);
        Ok(())
    }

    /// Removes a bitmap, from the image at once if it is stored there.
    pub async fn bitmap_remove(&self, name: &str) -> Result<()> {
        {
            let mut list = self.live();
            let b = Self::find(&mut list, name)?;
            if b.readonly {
                return Err(readonly(name));
            }
        }
        let mut m = self.meta.lock().await;
        if let Some(ext) = m.h.bitmaps.filter(|e| e.nb_bitmaps > 0) {
            let mut dir = read_directory(&m, &ext).await?;
            if let Some(j) = dir.iter().position(|e| e.name == name) {
                let gone = dir.remove(j);
                update_dir(&mut m, &dir).await.map_err(|e| {
                    let errno = e.errno_value();
                    Error::other(
                        format!("Failed to update bitmap extension: {}", strerror(errno)),
                        errno,
                    )
                })?;
                free_bitmap_clusters(&mut m, gone.table_offset, gone.table_size).await;
            }
        }
        drop(m);
        let mut list = self.live();
        list.retain(|b| b.name != name);
        self.update_tracking(&list);
        Ok(())
    }

    /// Clears a bitmap.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        let mut list = self.live();
        Self::find_writable(&mut list, name)?.bits.clear();
        Ok(())
    }

    /// Enables or disables a bitmap.
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let mut list = self.live();
        let b = Self::find(&mut list, name)?;
        if b.inconsistent {
            return Err(inconsistent(name));
        }
        b.enabled = enabled;
        self.update_tracking(&list);
        Ok(())
    }

    /// Checks that `name` can be merged into (it exists and is usable).
    pub fn bitmap_check_target(&self, name: &str) -> Result<()> {
        let mut list = self.live();
        Self::find_writable(&mut list, name).map(|_| ())
    }

    /// The contents of bitmap `name`, to merge elsewhere.
    pub fn bitmap_contents(&self, name: &str) -> Result<DirtyBitmap> {
        let mut list = self.live();
        let b = Self::find(&mut list, name)?;
        if b.inconsistent {
            return Err(inconsistent(name));
        }
        Ok(b.bits.clone())
    }

    /// Merges `source` into bitmap `name` (the disk sizes must match).
    pub fn bitmap_merge(&self, name: &str, source: &DirtyBitmap) -> Result<()> {
        self.bitmap_check_target(name)?;
        let mut list = self.live();
        let b = Self::find(&mut list, name)?;
        if b.bits.size() != source.size() {
            return Err(Error::invalid(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) \
                 and can't be merged",
                b.bits.size(),
                source.size()
            )));
        }
        b.bits.merge(source);
        Ok(())
    }
}

/// Reads and checks the directory `ext` describes.
async fn read_directory(m: &Meta, ext: &BitmapsExt) -> Result<Vec<BitmapEntry>> {
    if ext.directory_size == 0 {
        return Err(Error::invalid("Requested bitmap directory size is zero"));
    }
    if ext.directory_size > bitmaps::MAX_DIRECTORY_SIZE {
        return Err(Error::invalid("Requested bitmap directory size is too big"));
    }
    let mut buf = vec![0u8; ext.directory_size as usize];
    m.file
        .read(ext.directory_offset, &mut buf)
        .await
        .map_err(|e| {
            let errno = e.errno_value();
            Error::other(
                format!("Failed to read bitmap directory: {}", strerror(errno)),
                errno,
            )
        })?;
    bitmaps::load_directory(&buf, ext.nb_bitmaps, m.geo.cluster_size(), m.h.size)
}

/// Reads a bitmap table and checks its entries.
async fn read_table(m: &Meta, offset: u64, size: u32) -> Result<Vec<u64>> {
    let tb = super::open::read_u64_table(&m.file, offset, size as u64).await?;
    if tb
        .iter()
        .any(|&e| !bitmaps::table_entry_valid(e, m.geo.cluster_size()))
    {
        return Err(Error::errno(libc::EINVAL));
    }
    Ok(tb)
}

/// Loads the bits of the bitmap `e` describes, with QEMU's messages.
async fn load_bitmap(m: &Meta, e: &BitmapEntry, bits: &mut DirtyBitmap) -> Result<()> {
    let failed = |what: String, err: Error| {
        let errno = err.errno_value();
        Error::other(format!("{what}: {}", strerror(errno)), errno)
    };
    let tb = read_table(m, e.table_offset, e.table_size)
        .await
        .map_err(|err| {
            failed(
                format!(
                    "Could not read bitmap_table table from image for bitmap '{}'",
                    e.name
                ),
                err,
            )
        })?;
    load_bitmap_data(m, &tb, bits).await.map_err(|err| {
        failed(
            format!("Could not read bitmap '{}' from image", e.name),
            err,
        )
    })
}

/// Loads the bitmap data the table `tb` points to.
async fn load_bitmap_data(m: &Meta, tb: &[u64], bits: &mut DirtyBitmap) -> Result<()> {
    let cs = m.geo.cluster_size();
    let expect = bitmaps::table_entries(bits.size(), bits.granularity_bits(), cs);
    if expect != tb.len() as u64 {
        return Err(Error::errno(libc::EINVAL));
    }
    let per_cluster = cs * 8;
    let total = bits.bit_count();
    let mut buf = vec![0u8; cs as usize];
    for (i, entry) in tb.iter().enumerate() {
        let first = i as u64 * per_cluster;
        let count = total.saturating_sub(first).min(per_cluster);
        let data = entry & bitmaps::TABLE_OFFSET_MASK;
        if data == 0 {
            if entry & bitmaps::TABLE_ALL_ONES != 0 {
                bits.set_part(first, count);
            }
            continue;
        }
        m.file.read(data, &mut buf).await?;
        bits.deserialize_part(first, count, &buf);
    }
    Ok(())
}

/// Refuses a metadata write that would land on other metadata, as QEMU's overlap check
/// before writing bitmap clusters does.
async fn overlap_check(m: &mut Meta, offset: u64, len: u64) -> Result<()> {
    if let Some(kind) = m.overlaps_metadata(offset, len) {
        return Err(m
            .signal_corruption(
                true,
                format!(
                    "Preventing invalid write on metadata (overlaps with {})",
                    kind.name()
                ),
            )
            .await);
    }
    Ok(())
}

/// Writes one bitmap's data and table to fresh clusters; returns the table's place.
/// Only clusters with a dirty bit are written; the others stay unallocated (zero).
async fn store_bitmap(m: &mut Meta, b: &LiveBitmap) -> Result<(u64, u32)> {
    let mut allocated = Vec::new();
    let r = write_bitmap(m, b, &mut allocated).await;
    if r.is_err() {
        // What a failed store allocated goes back, as in QEMU (a later try needs it).
        for (off, len, discard) in allocated {
            m.free_clusters(off, len, discard).await;
        }
    }
    r
}

/// [`store_bitmap`]'s work; every allocation is noted in `allocated`.
async fn write_bitmap(
    m: &mut Meta,
    b: &LiveBitmap,
    allocated: &mut Vec<(u64, u64, DiscardType)>,
) -> Result<(u64, u32)> {
    let cs = m.geo.cluster_size();
    let bits = &b.bits;
    let tb_size = bitmaps::table_entries(bits.size(), bits.granularity_bits(), cs);
    if tb_size > bitmaps::MAX_TABLE_SIZE || tb_size * cs > bitmaps::MAX_PHYS_SIZE {
        return Err(Error::invalid(format!("Bitmap '{}' is too big", b.name)));
    }
    let mut tb = vec![0u64; tb_size as usize];
    let per_cluster = cs * 8;
    let total = bits.bit_count();
    let mut buf = vec![0u8; cs as usize];
    let mut from = 0;
    while let Some(dirty) = bits.next_dirty(from) {
        let cluster = dirty / per_cluster;
        let first = cluster * per_cluster;
        let count = (total - first).min(per_cluster);
        let off = m.alloc_clusters(cs).await.map_err(|e| {
            let errno = e.errno_value();
            Error::other(
                format!(
                    "Failed to allocate clusters for bitmap '{}': {}",
                    b.name,
                    strerror(errno)
                ),
                errno,
            )
        })?;
        allocated.push((off, cs, DiscardType::Always));
        tb[cluster as usize] = off;
        bits.serialize_part(first, count, &mut buf);
        overlap_check(m, off, cs).await?;
        m.write_meta(off, &buf).await?;
        from = first + count;
    }
    let len = tb_size * 8;
    let tb_off = m.alloc_clusters(len).await?;
    allocated.push((tb_off, len, DiscardType::Other));
    overlap_check(m, tb_off, len).await?;
    let bytes: Vec<u8> = tb.iter().flat_map(|e| e.to_be_bytes()).collect();
    m.write_meta(tb_off, &bytes).await?;
    Ok((tb_off, tb_size as u32))
}

/// Puts a new directory in place of the old one.
///
/// Crash consistency: the directory goes to fresh clusters and, with the refcounts that
/// claim them, is made durable before the header points at it; the old directory is
/// freed only after the header no longer does. A crash leaves either directory intact
/// (and at worst leaked clusters).
async fn update_dir(m: &mut Meta, dir: &[BitmapEntry]) -> Result<()> {
    let old = m.h.bitmaps.filter(|e| e.nb_bitmaps > 0);
    if dir.is_empty() {
        m.h.autoclear_features &= !autoclear::BITMAPS;
        m.h.bitmaps = None;
    } else {
        if dir.len() > bitmaps::MAX_BITMAPS as usize {
            return Err(Error::errno(libc::EINVAL));
        }
        let bytes = bitmaps::serialize_directory(dir);
        let off = m.alloc_clusters(bytes.len() as u64).await?;
        overlap_check(m, off, bytes.len() as u64).await?;
        m.write_meta(off, &bytes).await?;
        m.flush_caches().await?;
        m.sync().await?;
        m.h.autoclear_features |= autoclear::BITMAPS;
        m.h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: dir.len() as u32,
            directory_size: bytes.len() as u64,
            directory_offset: off,
        });
    }
    m.overlap.invalidate();
    m.write_header().await?;
    if let Some(o) = old {
        m.free_clusters(o.directory_offset, o.directory_size, DiscardType::Other)
            .await;
    }
    Ok(())
}

/// Rewrites the directory where it is (to set the in-use flags).
///
/// Crash consistency: the bitmaps bit is cleared in the header (durably) before the
/// directory is touched, and set again only once the new directory is durable, so a
/// torn directory is never taken for a valid one.
async fn update_dir_in_place(m: &mut Meta, ext: &BitmapsExt, dir: &[BitmapEntry]) -> Result<()> {
    let bytes = bitmaps::serialize_directory(dir);
    if bytes.len() as u64 != ext.directory_size {
        return Err(Error::errno(libc::EINVAL));
    }
    m.h.autoclear_features &= !autoclear::BITMAPS;
    m.write_header().await?;
    m.write_meta(ext.directory_offset, &bytes).await?;
    m.sync().await?;
    m.h.autoclear_features |= autoclear::BITMAPS;
    m.write_header().await
}

/// Frees a bitmap's data clusters and table (nothing if the table cannot be read).
async fn free_bitmap_clusters(m: &mut Meta, offset: u64, size: u32) {
    if offset == 0 {
        return;
    }
    let Ok(tb) = read_table(m, offset, size).await else {
        return;
    };
    let cs = m.geo.cluster_size();
    for e in tb {
        let data = e & bitmaps::TABLE_OFFSET_MASK;
        if data != 0 {
            m.free_clusters(data, cs, DiscardType::Always).await;
        }
    }
    m.free_clusters(offset, size as u64 * 8, DiscardType::Other)
        .await;
}
