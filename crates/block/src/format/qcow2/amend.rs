//! Changing an existing image's options (`qemu-img amend`): compatibility level up and
//! down, lazy refcounts, refcount width, external data file name, size. Steps run in
//! QEMU's order: upgrade first (later steps may need v3), downgrade last (after the
//! other steps removed what v2 cannot hold).

use crate::error::{Error, Result};
use crate::node::{BlockDriver, Prealloc, WriteFlags};

use super::meta::{DiscardType, Meta};
use super::types::*;
use super::Qcow2;

/// What to change; `None` leaves an option as it is.
#[derive(Debug, Clone, Default)]
pub struct Amend {
    /// `compat`: 2 or 3.
    pub version: Option<u32>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits`.
    pub refcount_bits: Option<u64>,
    /// `size`.
    pub size: Option<u64>,
    /// `backing_file` (may only restate the current one).
    pub backing_file: Option<String>,
    /// `backing_fmt` (may only restate the current one).
    pub backing_fmt: Option<String>,
    /// `data_file`: the external data file's new name (empty: none recorded).
    pub data_file: Option<String>,
    /// `data_file_raw`.
    pub data_file_raw: Option<bool>,
}

impl Qcow2 {
    /// Applies `a`; `progress` is called with (done, total) as work proceeds.
    pub async fn amend(&self, a: &Amend, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        self.check_writable()?;
        let (old_version, old_order, has_data_file, data_file_raw) = {
            let m = self.meta.lock().await;
            (
                m.h.version,
                m.h.refcount_order,
                m.has_data_file(),
                m.h.autoclear_features & autoclear::DATA_FILE_RAW != 0,
            )
        };
        let new_version = a.version.unwrap_or(old_version);
        let mut refcount_order = old_order;
        if let Some(bits) = a.refcount_bits {
            if bits == 0 || bits > 64 || !bits.is_power_of_two() {
                return Err(Error::invalid(
                    "Refcount width must be a power of two and may not exceed 64 bits",
                ));
            }
            refcount_order = bits.trailing_zeros();
        }
        if a.data_file.is_some() && !has_data_file {
            return Err(Error::invalid(
                "data-file can only be set for images that use an external data file",
            ));
        }
        let raw = a.data_file_raw.unwrap_or(data_file_raw);
        if raw && !data_file_raw {
            return Err(Error::invalid(
                "data-file-raw cannot be set on existing images",
            ));
        }

        if new_version > old_version {
            progress(0, 2);
            let mut m = self.meta.lock().await;
            let r = upgrade(&mut m).await;
            self.with_meta(&mut m, r).await?;
            progress(2, 2);
        }
        if refcount_order != old_order {
            if new_version < 3 && refcount_order != 4 {
                return Err(Error::invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)",
                ));
            }
            let mut m = self.meta.lock().await;
            let r = m.change_refcount_order(refcount_order, progress).await;
            self.with_meta(&mut m, r).await?;
        }
        {
            let mut m = self.meta.lock().await;
            if raw {
                m.h.autoclear_features |= autoclear::DATA_FILE_RAW;
            } else {
                m.h.autoclear_features &= !autoclear::DATA_FILE_RAW;
            }
            if let Some(d) = &a.data_file {
                m.h.data_file = (!d.is_empty()).then(|| d.clone());
            }
            let r = m
                .write_header()
                .await
                .map_err(|e| e.context("Failed to update the image header"));
            self.with_meta(&mut m, r).await?;
            if a.backing_file.is_some() || a.backing_fmt.is_some() {
                let same =
                    a.backing_file == m.h.backing_file && a.backing_fmt == m.h.backing_format;
                if !same {
                    return Err(Error::invalid(
                        "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.",
                    ));
                }
            }
        }
        if let Some(lazy) = a.lazy_refcounts {
            let mut m = self.meta.lock().await;
            if m.lazy_refcounts != lazy {
                let r = set_lazy_refcounts(&mut m, lazy, new_version).await;
                self.with_meta(&mut m, r).await?;
            }
        }
        if let Some(size) = a.size.filter(|&s| s != 0) {
            if size != self.size() {
                self.truncate(size, true, Prealloc::Off).await?;
            }
        }
        if new_version < old_version {
            let mut m = self.meta.lock().await;
            let size = self.size();
            let r = downgrade(&mut m, size, progress).await;
            self.with_meta(&mut m, r).await?;
        }
        Ok(())
    }
}

/// v2 to v3: snapshot entries get the extra data v3 requires, then the header changes.
async fn upgrade(m: &mut Meta) -> Result<()> {
    // v3 requires each snapshot entry to record its VM state size in 64 bits and its
    // disk size: older entries are rewritten complete first.
    if m.snapshots.iter().any(|s| s.extra_len < 16) {
        m.write_snapshots()
            .await
            .map_err(|e| e.context("Failed to update the snapshot table"))?;
    }
    let old = (m.h.version, m.h.header_length);
    m.h.version = 3;
    m.h.header_length = 112;
    m.h.extra_fields = vec![0; 7];
    if let Err(e) = m.write_header().await {
        (m.h.version, m.h.header_length) = old;
        m.h.extra_fields.clear();
        return Err(e.context("Failed to update the image header"));
    }
    Ok(())
}

async fn set_lazy_refcounts(m: &mut Meta, lazy: bool, version: u32) -> Result<()> {
    if lazy {
        if version < 3 {
            return Err(Error::invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)",
            ));
        }
        m.h.compatible_features |= compat::LAZY_REFCOUNTS;
        if let Err(e) = m.write_header().await {
            m.h.compatible_features &= !compat::LAZY_REFCOUNTS;
            return Err(e.context("Failed to update the image header"));
        }
    } else {
        m.mark_clean()
            .await
            .map_err(|e| e.context("Failed to make the image clean"))?;
        m.h.compatible_features &= !compat::LAZY_REFCOUNTS;
        if let Err(e) = m.write_header().await {
            m.h.compatible_features |= compat::LAZY_REFCOUNTS;
            return Err(e.context("Failed to update the image header"));
        }
    }
    m.lazy_refcounts = lazy;
    Ok(())
}

/// v3 to v2: refused where v2 cannot represent the image; otherwise features are
/// cleared and zero clusters turned into what v2 has (unallocated, or zeroed data).
async fn downgrade(m: &mut Meta, size: u64, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    if m.h.refcount_order != 4 {
        return Err(Error::unsupported("compat=0.10 requires refcount_bits=16"));
    }
    if m.has_data_file() {
        return Err(Error::unsupported(
            "Cannot downgrade an image with a data file",
        ));
    }
    if m.snapshots
        .iter()
        .any(|s| s.vm_state_size > u32::MAX as u64 || s.disk_size != size)
    {
        return Err(Error::unsupported(
            "Internal snapshots prevent downgrade of image",
        ));
    }
    if m.h.incompatible_features & incompat::DIRTY != 0 {
        m.mark_clean()
            .await
            .map_err(|e| e.context("Failed to make the image clean"))?;
    }
    if m.h.incompatible_features & !incompat::COMPRESSION != 0 {
        return Err(Error::unsupported(format!(
            "Cannot downgrade an image with incompatible features {:#x} set",
            m.h.incompatible_features
        )));
    }
    m.h.compatible_features = 0;
    m.lazy_refcounts = false;
    m.h.autoclear_features = 0;
    expand_zero_clusters(m, progress)
        .await
        .map_err(|e| e.context("Failed to turn zero into data clusters"))?;
    if m.h.compression_type != 0 {
        if has_compressed_clusters(m).await? {
            return Err(Error::unsupported(
                "Cannot downgrade an image with zstd compression type and existing \
                 compressed clusters",
            ));
        }
        m.h.incompatible_features &= !incompat::COMPRESSION;
        m.h.compression_type = 0;
    }
    let old = (m.h.version, m.h.header_length, m.h.extra_fields.clone());
    m.h.version = 2;
    m.h.header_length = 72;
    m.h.extra_fields.clear();
    if let Err(e) = m.write_header().await {
        (m.h.version, m.h.header_length, m.h.extra_fields) = old;
        return Err(e.context("Failed to update the image header"));
    }
    Ok(())
}

/// The L1 tables to walk: the active one, then each snapshot's.
fn l1_tables(m: &Meta) -> Vec<(u64, u64, bool)> {
    let mut v = vec![(m.h.l1_table_offset, m.h.l1_size as u64, true)];
    for s in &m.snapshots {
        v.push((s.l1_table_offset, s.l1_size as u64, false));
    }
    v
}

/// Replaces zero clusters (which v2 does not have) in every L1 table: unallocated ones
/// become unallocated (no backing file) or a new cluster of zeroes, preallocated ones
/// get their host cluster zeroed and become data.
async fn expand_zero_clusters(m: &mut Meta, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let geo = m.geo;
    let cs = geo.cluster_size();
    let tables = l1_tables(m);
    let total: u64 = tables.iter().map(|t| t.1).sum();
    let mut visited = 0;
    for (l1_off, l1_size, active) in tables {
        if !active && l1_size > 0 {
            let sn = m
                .snapshots
                .iter()
                .find(|s| s.l1_table_offset == l1_off && s.l1_size as u64 == l1_size);
            if let Some(sn) = sn {
                super::snapshot_ops::validate_snapshot_l1_reported(&geo, sn)?;
            }
        }
        if !active {
            // Snapshot L1 tables may point at L2 tables the active one uses, read here
            // from disk: what the active pass changed must be there first.
            m.flush_l2().await?;
            m.l2_cache.clear();
        }
        let l1 = if active {
            m.l1.clone()
        } else {
            super::open::read_u64_table(&m.file, l1_off, l1_size).await?
        };
        for &entry in l1.iter().take(l1_size as usize) {
            visited += 1;
            let l2_off = entry & L1E_OFFSET_MASK;
            if l2_off == 0 {
                progress(visited, total);
                continue;
            }
            if geo.offset_in_cluster(l2_off) != 0 {
                return Err(m
                    .signal_corruption(true, format!("L2 table offset {l2_off:#x} unaligned"))
                    .await);
            }
            let l2_refcount = m.get_refcount(l2_off / cs).await?;
            let mut table = if active {
                None
            } else {
                Some(m.read_table(l2_off).await?)
            };
            let mut dirty = false;
            if active {
                m.load_l2(l2_off).await?;
            }
            for j in 0..geo.l2_entries() {
                let e = match &table {
                    Some(t) => read_entry(t, j as usize, geo.extended_l2),
                    None => m.l2_entry(l2_off, j),
                };
                let ct = e.cluster_type(geo.extended_l2, false);
                let mut host = e.host_offset();
                match ct {
                    ClusterType::ZeroPlain => {
                        if !m.has_backing {
                            set_entry(m, &mut table, l2_off, j, L2Entry::UNALLOCATED);
                            dirty = true;
                            continue;
                        }
                        host = m.alloc_clusters(cs).await?;
                        if l2_refcount > 1 {
                            m.update_refcount(host, cs, l2_refcount - 1, false, DiscardType::Other)
                                .await
                                .map_err(Error::from)?;
                        }
                    }
                    ClusterType::ZeroAlloc => {}
                    _ => continue,
                }
                if geo.offset_in_cluster(host) != 0 {
                    return Err(m
                        .signal_corruption(
                            true,
                            format!("Cluster allocation offset {host:#x} unaligned"),
                        )
                        .await);
                }
                m.file.write_zeroes(host, cs, WriteFlags::NONE).await?;
                m.data_unflushed = true;
                let raw = if l2_refcount == 1 {
                    host | OFLAG_COPIED
                } else {
                    host
                };
                set_entry(m, &mut table, l2_off, j, L2Entry { raw, bitmap: 0 });
                dirty = true;
            }
            if dirty {
                if let Some(t) = &table {
                    m.l2_depends_on_refcounts().await?;
                    m.flush_refblocks().await?;
                    m.write_meta(l2_off, t).await?;
                } else {
                    m.l2_depends_on_refcounts().await?;
                }
            }
            progress(visited, total);
        }
    }
    m.flush_caches().await?;
    m.sync().await
}

/// Sets one L2 entry in the cached active table or in a loaded snapshot table.
fn set_entry(
    m: &mut Meta,
    table: &mut Option<crate::buffer::AlignedBuf>,
    l2_off: u64,
    j: u64,
    e: L2Entry,
) {
    match table {
        Some(t) => write_entry(t, j as usize, m.geo.extended_l2, e),
        None => m.set_l2_entry(l2_off, j, e),
    }
}

/// Whether any L1 table maps a compressed cluster.
async fn has_compressed_clusters(m: &mut Meta) -> Result<bool> {
    let geo = m.geo;
    for (l1_off, l1_size, active) in l1_tables(m) {
        let l1 = if active {
            m.l1.clone()
        } else {
            super::open::read_u64_table(&m.file, l1_off, l1_size).await?
        };
        for &entry in l1.iter().take(l1_size as usize) {
            let l2_off = entry & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let t = m.read_table(l2_off).await?;
            for j in 0..geo.l2_entries() as usize {
                if read_entry(&t, j, geo.extended_l2).is_compressed() {
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Entry `j` of an L2 table held in a buffer.
fn read_entry(t: &[u8], j: usize, extended: bool) -> L2Entry {
    let at = j * if extended { 16 } else { 8 };
    L2Entry {
        raw: be64(t, at),
        bitmap: if extended { be64(t, at + 8) } else { 0 },
    }
}

/// Stores entry `j` into an L2 table held in a buffer.
fn write_entry(t: &mut [u8], j: usize, extended: bool, e: L2Entry) {
    let at = j * if extended { 16 } else { 8 };
    put_be64(t, at, e.raw);
    if extended {
        put_be64(t, at + 8, e.bitmap);
    }
}
