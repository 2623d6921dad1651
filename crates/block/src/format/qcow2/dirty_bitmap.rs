//! An in-memory dirty bitmap: one bit per `granularity` bytes of the virtual disk, kept
//! sparse (chunks of words, allocated when a bit in them is first set) so that bitmaps of
//! huge disks at fine granularity cost nothing while clean.
//!
//! Its serialised form is the qcow2 bitmap data layout: bit `n` of the bitmap is bit
//! `n % 8` of byte `n / 8`.

use std::collections::BTreeMap;

/// log2 of the bits in one chunk.
const CHUNK_SHIFT: u32 = 18;
/// Bits in one chunk.
const CHUNK_BITS: u64 = 1 << CHUNK_SHIFT;
/// 64-bit words in one chunk.
const CHUNK_WORDS: usize = (CHUNK_BITS / 64) as usize;

/// A dirty bitmap over a disk of `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    size: u64,
    granularity_bits: u32,
    chunks: BTreeMap<u64, Box<[u64]>>,
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes with `1 << granularity_bits` bytes per bit.
    pub fn new(size: u64, granularity_bits: u32) -> DirtyBitmap {
        DirtyBitmap {
            size,
            granularity_bits: granularity_bits.min(63),
            chunks: BTreeMap::new(),
        }
    }

    /// Bytes of the disk one bit stands for.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// log2 of the granularity.
    pub fn granularity_bits(&self) -> u32 {
        self.granularity_bits
    }

    /// The disk size the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of bits.
    pub fn bit_count(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// Whether no bit is set.
    pub fn is_clean(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Marks the bytes `[offset, offset + len)` dirty (the bits touching them).
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        self.set_bits(first, last + 1);
    }

    /// Sets bits `[first, end)`.
    pub fn set_bits(&mut self, first: u64, end: u64) {
        let end = end.min(self.bit_count());
        let mut bit = first;
        while bit < end {
            let chunk = bit >> CHUNK_SHIFT;
            let chunk_end = ((chunk + 1) << CHUNK_SHIFT).min(end);
            let words = self
                .chunks
                .entry(chunk)
                .or_insert_with(|| vec![0u64; CHUNK_WORDS].into_boxed_slice());
            let mut b = bit - (chunk << CHUNK_SHIFT);
            let e = chunk_end - (chunk << CHUNK_SHIFT);
            while b < e {
                let w = (b / 64) as usize;
                let lo = b % 64;
                let hi = (e - b + lo).min(64);
                let mask = if hi - lo == 64 {
                    u64::MAX
                } else {
                    ((1u64 << (hi - lo)) - 1) << lo
                };
                words[w] |= mask;
                b += hi - lo;
            }
            bit = chunk_end;
        }
    }

    /// Whether bit `n` is set.
    pub fn get(&self, n: u64) -> bool {
        let Some(words) = self.chunks.get(&(n >> CHUNK_SHIFT)) else {
            return false;
        };
        let b = n & (CHUNK_BITS - 1);
        words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.chunks.clear();
    }

    /// The first set bit at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        for (&c, words) in self.chunks.range(from >> CHUNK_SHIFT..) {
            let base = c << CHUNK_SHIFT;
            let start = from.saturating_sub(base);
            let mut w = (start / 64) as usize;
            let mut mask = u64::MAX << (start % 64);
            while w < CHUNK_WORDS {
                let v = words[w] & mask;
                if v != 0 {
                    return Some(base + w as u64 * 64 + v.trailing_zeros() as u64);
                }
                mask = u64::MAX;
                w += 1;
            }
        }
        None
    }

    /// The first clear bit at or after `from` (the bit count if none).
    pub fn next_clean(&self, from: u64) -> u64 {
        let count = self.bit_count();
        let mut bit = from;
        while bit < count {
            let chunk = bit >> CHUNK_SHIFT;
            let Some(words) = self.chunks.get(&chunk) else {
                return bit;
            };
            let b = bit - (chunk << CHUNK_SHIFT);
            let mut w = (b / 64) as usize;
            let mut mask = u64::MAX << (b % 64);
            while w < CHUNK_WORDS {
                let v = !words[w] & mask;
                if v != 0 {
                    return ((chunk << CHUNK_SHIFT) + w as u64 * 64 + v.trailing_zeros() as u64)
                        .min(count);
                }
                mask = u64::MAX;
                w += 1;
            }
            bit = (chunk + 1) << CHUNK_SHIFT;
        }
        count
    }

    /// The dirty byte ranges of the disk, in order, as (offset, length).
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut bit = 0;
        while let Some(start) = self.next_dirty(bit) {
            let end = self.next_clean(start);
            let off = start << self.granularity_bits;
            let end_off = (end << self.granularity_bits).min(self.size);
            out.push((off, end_off - off));
            bit = end;
        }
        out
    }

    /// Sets in `self` every byte range `other` has dirty (granularities may differ).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (off, len) in other.dirty_ranges() {
            self.set_range(off, len);
        }
    }

    /// The 64-bit word holding bits `[64 * w, 64 * w + 64)`.
    fn word(&self, w: u64) -> u64 {
        let chunk = w / CHUNK_WORDS as u64;
        self.chunks
            .get(&chunk)
            .map_or(0, |c| c[(w % CHUNK_WORDS as u64) as usize])
    }

    /// ORs `v` into word `w`.
    fn or_word(&mut self, w: u64, v: u64) {
        if v == 0 {
            return;
        }
        let chunk = w / CHUNK_WORDS as u64;
        let words = self
            .chunks
            .entry(chunk)
            .or_insert_with(|| vec![0u64; CHUNK_WORDS].into_boxed_slice());
        words[(w % CHUNK_WORDS as u64) as usize] |= v;
    }

    /// Serialises bits `[first, first + count)` (`first` a multiple of 64) into `out`,
    /// which must hold `count.div_ceil(8)` bytes; bytes past that are zeroed.
    pub fn serialize_part(&self, first: u64, count: u64, out: &mut [u8]) {
        out.fill(0);
        let count = count.min(self.bit_count().saturating_sub(first));
        let w0 = first / 64;
        let mut bit = first;
        let end = first + count;
        while let Some(b) = self.next_dirty(bit).filter(|&b| b < end) {
            // Copy whole words from the first dirty one on, up to the next clean run.
            let stop = self.next_clean(b).min(end);
            for w in b / 64..stop.div_ceil(64) {
                let mut v = self.word(w);
                let rel_end = end - w * 64;
                if rel_end < 64 {
                    v &= (1u64 << rel_end) - 1;
                }
                let at = ((w - w0) * 8) as usize;
                let bytes = v.to_le_bytes();
                let n = bytes.len().min(out.len().saturating_sub(at));
                out[at..at + n].copy_from_slice(&bytes[..n]);
            }
            bit = stop;
        }
    }

    /// Sets the bits `[first, first + count)` (`first` a multiple of 64) that are set in
    /// the serialised `data`.
    pub fn deserialize_part(&mut self, first: u64, count: u64, data: &[u8]) {
        let count = count
            .min(data.len() as u64 * 8)
            .min(self.bit_count().saturating_sub(first));
        let w0 = first / 64;
        for (i, c) in data[..count.div_ceil(8) as usize].chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            let mut v = u64::from_le_bytes(b);
            let rel_end = count - i as u64 * 64;
            if rel_end < 64 {
                v &= (1u64 << rel_end) - 1;
            }
            self.or_word(w0 + i as u64, v);
        }
    }

    /// Sets bits `[first, first + count)` (a bitmap table entry that reads as all ones).
    pub fn set_part(&mut self, first: u64, count: u64) {
        self.set_bits(first, first + count);
    }

    /// Changes the disk size: bits past the new end are dropped, new bits are clean.
    pub fn truncate(&mut self, size: u64) {
        self.size = size;
        let count = self.bit_count();
        let keep = count.div_ceil(CHUNK_BITS);
        self.chunks.retain(|&c, _| c < keep);
        if let Some(words) = self.chunks.get_mut(&(count >> CHUNK_SHIFT)) {
            let b = count & (CHUNK_BITS - 1);
            let w = (b / 64) as usize;
            if w < CHUNK_WORDS {
                words[w] &= (1u64 << (b % 64)).wrapping_sub(1);
                for x in &mut words[w + 1..] {
                    *x = 0;
                }
            }
        }
        self.chunks.retain(|_, w| w.iter().any(|&x| x != 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_out_to_granularity() {
        let mut b = DirtyBitmap::new(10 << 20, 16);
        b.set_range(65535, 2);
        assert_eq!(b.dirty_ranges(), vec![(0, 131072)]);
        b.set_range(10 << 20, 1);
        b.set_range((10 << 20) - 1, 100);
        assert_eq!(b.dirty_ranges().last(), Some(&((10 << 20) - 65536, 65536)));
    }

    #[test]
    fn long_runs_cross_chunks() {
        let mut b = DirtyBitmap::new(1 << 40, 9);
        b.set_bits(CHUNK_BITS - 3, 2 * CHUNK_BITS + 5);
        assert_eq!(b.next_dirty(0), Some(CHUNK_BITS - 3));
        assert_eq!(b.next_clean(CHUNK_BITS - 3), 2 * CHUNK_BITS + 5);
        assert!(!b.get(CHUNK_BITS - 4));
        assert!(b.get(2 * CHUNK_BITS + 4));
    }

    #[test]
    fn serialisation_round_trips() {
        let mut b = DirtyBitmap::new(100 << 20, 16);
        b.set_range(3 << 20, 1 << 20);
        b.set_range(0, 1);
        let mut buf = vec![0u8; 200];
        b.serialize_part(0, 1600, &mut buf);
        assert_eq!(buf[0], 1);
        assert_eq!(buf[6], 0xff);
        assert_eq!(buf[7], 0xff);
        assert_eq!(buf[8], 0);
        let mut c = DirtyBitmap::new(100 << 20, 16);
        c.deserialize_part(0, 1600, &buf);
        assert_eq!(b, c);
    }

    #[test]
    fn merge_across_granularities() {
        let mut fine = DirtyBitmap::new(1 << 20, 9);
        fine.set_range(1000, 10);
        let mut coarse = DirtyBitmap::new(1 << 20, 16);
        coarse.merge(&fine);
        assert_eq!(coarse.dirty_ranges(), vec![(0, 65536)]);
        let mut fine2 = DirtyBitmap::new(1 << 20, 9);
        fine2.merge(&coarse);
        assert_eq!(fine2.dirty_ranges(), vec![(0, 65536)]);
    }

    #[test]
    fn truncate_drops_tail_bits() {
        let mut b = DirtyBitmap::new(1 << 30, 9);
        b.set_range(0, 1 << 30);
        b.truncate(1000);
        assert_eq!(b.dirty_ranges(), vec![(0, 1000)]);
        b.truncate(1 << 20);
        assert_eq!(b.dirty_ranges(), vec![(0, 1024)]);
    }
}
