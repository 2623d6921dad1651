//! A write-back cache of metadata tables (L2 tables or refcount blocks), one cluster each.
//!
//! Entries are kept by host offset with a use counter for LRU eviction. The cache only
//! holds bytes and dirty flags; the order in which dirty tables reach the disk is decided
//! by [`super::meta::Meta`], which owns both caches and their dependencies.

use std::collections::HashMap;

use crate::buffer::AlignedBuf;

struct Entry {
    data: AlignedBuf,
    /// The dirty byte range, if any (only it is written back).
    dirty: Option<(usize, usize)>,
    last_used: u64,
}

/// Cached tables by host offset.
pub(super) struct TableCache {
    entries: HashMap<u64, Entry>,
    capacity: usize,
    tick: u64,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub(super) fn new(capacity: usize) -> Self {
        TableCache {
            entries: HashMap::new(),
            capacity: capacity.max(2),
            tick: 0,
        }
    }

    /// The table at `offset`, if cached.
    pub(super) fn get(&mut self, offset: u64) -> Option<&mut AlignedBuf> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(&offset).map(|e| {
            e.last_used = tick;
            &mut e.data
        })
    }

    /// Whether `offset` is cached.
    pub(super) fn contains(&self, offset: u64) -> bool {
        self.entries.contains_key(&offset)
    }

    /// Adds a table; the caller must have made room with [`Self::victim`] first.
    pub(super) fn insert(&mut self, offset: u64, data: AlignedBuf, dirty: bool) {
        self.tick += 1;
        let len = data.len();
        self.entries.insert(
            offset,
            Entry {
                data,
                dirty: dirty.then_some((0, len)),
                last_used: self.tick,
            },
        );
    }

    /// Marks a whole cached table dirty.
    pub(super) fn mark_dirty(&mut self, offset: u64) {
        if let Some(e) = self.entries.get_mut(&offset) {
            e.dirty = Some((0, e.data.len()));
        }
    }

    /// Marks bytes `[lo, hi)` of a cached table dirty.
    pub(super) fn mark_dirty_range(&mut self, offset: u64, lo: usize, hi: usize) {
        if let Some(e) = self.entries.get_mut(&offset) {
            e.dirty = Some(match e.dirty {
                Some((a, b)) => (a.min(lo), b.max(hi)),
                None => (lo, hi),
            });
        }
    }

    /// Marks a cached table clean (after it was written).
    pub(super) fn mark_clean(&mut self, offset: u64) {
        if let Some(e) = self.entries.get_mut(&offset) {
            e.dirty = None;
        }
    }

    /// The dirty range of a table rounded out to `align` bytes, with the table's bytes.
    pub(super) fn dirty_part(&self, offset: u64, align: usize) -> Option<(usize, &[u8])> {
        let e = self.entries.get(&offset)?;
        let (lo, hi) = e.dirty?;
        let lo = lo / align * align;
        let hi = hi.div_ceil(align).saturating_mul(align).min(e.data.len());
        Some((lo, &e.data[lo..hi]))
    }

    /// Whether the cache is full, and which entry to evict: the least recently used clean
    /// one, or the least recently used dirty one (which must be written first).
    pub(super) fn victim(&self) -> Option<(u64, bool)> {
        if self.entries.len() < self.capacity {
            return None;
        }
        let clean = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty.is_none())
            .min_by_key(|(_, e)| e.last_used);
        let pick = clean.or_else(|| self.entries.iter().min_by_key(|(_, e)| e.last_used));
        pick.map(|(off, e)| (*off, e.dirty.is_some()))
    }

    /// Drops a table (clean or not) from the cache.
    pub(super) fn remove(&mut self, offset: u64) {
        self.entries.remove(&offset);
    }

    /// Offsets of dirty tables, in ascending order (sequential writes).
    pub(super) fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.dirty.is_some())
            .map(|(o, _)| *o)
            .collect();
        v.sort_unstable();
        v
    }

    /// The bytes of a cached table without touching its LRU position.
    pub(super) fn peek(&self, offset: u64) -> Option<&AlignedBuf> {
        self.entries.get(&offset).map(|e| &e.data)
    }

    /// Drops everything, dirty or not (after metadata was rewritten on disk).
    pub(super) fn clear(&mut self) {
        self.entries.clear();
    }
}
