//! Metadata overlap checks: refuse data writes that would land on image metadata (a sign
//! of corrupt mappings), marking the image corrupt as QEMU does.

use std::collections::HashMap;

use crate::error::{Error, Result};

use super::cluster::L2Meta;
use super::meta::Meta;
use super::runtime_opts::overlap_bits;
use super::types::*;

/// Kinds of metadata, in the order (and with the names) QEMU reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum MetaKind {
    Header,
    ActiveL1,
    RefcountTable,
    SnapshotTable,
    InactiveL1,
    ActiveL2,
    InactiveL2,
    RefcountBlock,
    BitmapDirectory,
}

impl MetaKind {
    pub(super) fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "qcow2_header",
            MetaKind::ActiveL1 => "active L1 table",
            MetaKind::ActiveL2 => "active L2 table",
            MetaKind::RefcountTable => "refcount table",
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::SnapshotTable => "snapshot table",
            MetaKind::InactiveL1 => "inactive L1 table",
            MetaKind::InactiveL2 => "inactive L2 table",
            MetaKind::BitmapDirectory => "bitmap directory",
        }
    }

    /// The `overlap-check.*` option that guards this kind.
    fn bit(self) -> u32 {
        match self {
            MetaKind::Header => overlap_bits::MAIN_HEADER,
            MetaKind::ActiveL1 => overlap_bits::ACTIVE_L1,
            MetaKind::ActiveL2 => overlap_bits::ACTIVE_L2,
            MetaKind::RefcountTable => overlap_bits::REFCOUNT_TABLE,
            MetaKind::RefcountBlock => overlap_bits::REFCOUNT_BLOCK,
            MetaKind::SnapshotTable => overlap_bits::SNAPSHOT_TABLE,
            MetaKind::InactiveL1 => overlap_bits::INACTIVE_L1,
            MetaKind::InactiveL2 => overlap_bits::INACTIVE_L2,
            MetaKind::BitmapDirectory => overlap_bits::BITMAP_DIRECTORY,
        }
    }
}

/// Which host clusters hold metadata, rebuilt when the tables change.
pub(super) struct OverlapIndex {
    generation: u64,
    built_for: Option<u64>,
    clusters: HashMap<u64, MetaKind>,
    /// The kinds checked (`overlap-check` and its per-kind options).
    mask: u32,
    /// Host offsets of the snapshots' L2 tables, read when `INACTIVE_L2` is checked.
    inactive_l2: Option<(u64, Vec<u64>)>,
}

impl Default for OverlapIndex {
    fn default() -> Self {
        OverlapIndex::with_mask(overlap_bits::CACHED)
    }
}

impl OverlapIndex {
    /// An index checking the kinds in `mask` ([`overlap_bits`]).
    pub fn with_mask(mask: u32) -> Self {
        OverlapIndex {
            generation: 0,
            built_for: None,
            clusters: HashMap::new(),
            mask,
            inactive_l2: None,
        }
    }

    /// Notes that metadata locations changed.
    pub fn invalidate(&mut self) {
        self.generation += 1;
    }
}

impl Meta {
    fn rebuild_overlap_index(&mut self) {
        let geo = self.geo;
        let cs = geo.cluster_size();
        let mut map: HashMap<u64, MetaKind> = HashMap::new();
        let mask = self.overlap.mask;
        let add_range = |map: &mut HashMap<u64, MetaKind>, off: u64, len: u64, kind: MetaKind| {
            if len == 0 || mask & kind.bit() == 0 {
                return;
            }
            let first = off / cs;
            let last = off.saturating_add(len - 1) / cs;
            // Bound the work for absurd (corrupt) ranges.
            for c in first..=last.min(first + (64 << 20) / cs) {
                let e = map.entry(c).or_insert(kind);
                if kind < *e {
                    *e = kind;
                }
            }
        };
        add_range(&mut map, 0, cs, MetaKind::Header);
        add_range(
            &mut map,
            self.h.l1_table_offset,
            self.l1.len() as u64 * 8,
            MetaKind::ActiveL1,
        );
        for e in &self.l1 {
            let off = e & L1E_OFFSET_MASK;
            if off != 0 {
                add_range(&mut map, off, cs, MetaKind::ActiveL2);
            }
        }
        add_range(
            &mut map,
            self.h.refcount_table_offset,
            self.h.refcount_table_clusters as u64 * cs,
            MetaKind::RefcountTable,
        );
        for e in &self.reftable {
            let off = e & REFT_OFFSET_MASK;
            if off != 0 {
                add_range(&mut map, off, cs, MetaKind::RefcountBlock);
            }
        }
        if self.h.nb_snapshots > 0 {
            let len = self.snapshot_table_size();
            add_range(
                &mut map,
                self.h.snapshots_offset,
                len,
                MetaKind::SnapshotTable,
            );
        }
        for s in &self.snapshots {
            add_range(
                &mut map,
                s.l1_table_offset,
                s.l1_size as u64 * 8,
                MetaKind::InactiveL1,
            );
        }
        if let Some(b) = self
            .h
            .bitmaps
            .filter(|_| self.h.autoclear_features & autoclear::BITMAPS != 0)
        {
            add_range(
                &mut map,
                b.directory_offset,
                b.directory_size,
                MetaKind::BitmapDirectory,
            );
        }
        if let Some((_, tables)) = &self.overlap.inactive_l2 {
            for &off in tables {
                add_range(&mut map, off, cs, MetaKind::InactiveL2);
            }
        }
        self.overlap.clusters = map;
        self.overlap.built_for = Some(self.overlap.generation);
    }

    /// With `overlap-check.inactive-l2`, reads the snapshots' L1 tables (once per change
    /// of the tables) so that their L2 tables are guarded too. A snapshot whose L1 table
    /// is invalid makes every checked write fail, as in QEMU.
    pub(super) async fn load_inactive_l2(&mut self) -> Result<()> {
        if self.overlap.mask & overlap_bits::INACTIVE_L2 == 0
            || self
                .overlap
                .inactive_l2
                .as_ref()
                .is_some_and(|(g, _)| *g == self.overlap.generation)
        {
            return Ok(());
        }
        let mut tables = Vec::new();
        for sn in &self.snapshots {
            if sn.l1_size == 0 {
                continue;
            }
            super::snapshot_ops::validate_snapshot_l1(&self.geo, sn)
                .map_err(|e| Error::errno(e.errno_value()))?;
            let l1 = super::open::read_u64_table(&self.file, sn.l1_table_offset, sn.l1_size as u64)
                .await?;
            tables.extend(
                l1.iter()
                    .map(|e| e & L1E_OFFSET_MASK)
                    .filter(|&off| off != 0),
            );
        }
        self.overlap.inactive_l2 = Some((self.overlap.generation, tables));
        self.overlap.built_for = None;
        Ok(())
    }

    /// The first kind of metadata `[offset, offset + len)` touches.
    pub(super) fn overlaps_metadata(&mut self, offset: u64, len: u64) -> Option<MetaKind> {
        if len == 0 {
            return None;
        }
        if self.overlap.built_for != Some(self.overlap.generation) {
            self.rebuild_overlap_index();
        }
        let cs = self.geo.cluster_size();
        let first = offset / cs;
        let last = offset.saturating_add(len - 1) / cs;
        (first..=last)
            .filter_map(|c| self.overlap.clusters.get(&c).copied())
            .min()
    }

    /// Refuses a data write (and its copy-on-write regions) that overlaps metadata.
    pub(super) async fn overlap_check_data(
        &mut self,
        host: u64,
        bytes: u64,
        metas: &[L2Meta],
    ) -> Result<()> {
        if self.has_data_file() {
            return Ok(());
        }
        self.load_inactive_l2().await?;
        let mut hit = self.overlaps_metadata(host, bytes);
        for m in metas {
            let start = m.alloc_offset + m.cow_start.offset;
            let end = m.alloc_offset + m.cow_end.offset + m.cow_end.bytes;
            if let Some(k) = self.overlaps_metadata(start, end - start) {
                hit = Some(hit.map_or(k, |h| h.min(k)));
            }
        }
        if let Some(kind) = hit {
            return Err(self
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
}
