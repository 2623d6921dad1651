//! Persistent dirty bitmaps on disk: the bitmap directory and bitmap tables, parsed
//! leniently (for `info` and `check`) or with the checks QEMU makes when it loads them,
//! and serialised back. Loading, tracking and storing live bitmaps is
//! [`super::bitmaps_store`]'s business; the in-memory bitmap is
//! [`super::dirty_bitmap::DirtyBitmap`].

use crate::error::{Error, Result};

use super::types::*;

/// Bitmap flag: not saved correctly.
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Bitmap flag: tracks every write.
pub const FLAG_AUTO: u32 = 1 << 1;
/// Largest directory QEMU accepts.
pub const MAX_DIRECTORY_SIZE: u64 = 64 << 20;
/// Most bitmaps QEMU accepts.
pub const MAX_BITMAPS: u32 = 65535;
/// Host offset bits of a bitmap table entry.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry.
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Table entry flag (without an offset): the cluster reads as all ones.
pub const TABLE_ALL_ONES: u64 = 1;
/// Flags QEMU does not accept (extra data is not supported, so neither is its flag).
pub const RESERVED_FLAGS: u32 = 0xffff_fffc;
/// The only bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Smallest granularity QEMU accepts (log2).
pub const MIN_GRANULARITY_BITS: u32 = 9;
/// Largest granularity QEMU accepts (log2).
pub const MAX_GRANULARITY_BITS: u32 = 31;
/// Longest bitmap name.
pub const MAX_NAME_SIZE: usize = 1023;
/// Most entries in one bitmap table.
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// Most bytes of bitmap data of one bitmap.
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Fixed part of a directory entry.
pub const DIR_ENTRY_FIXED: usize = 24;

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags.
    pub flags: u32,
    /// Type (1: dirty tracking).
    pub kind: u8,
    /// log2 of the granularity.
    pub granularity_bits: u8,
    /// Name.
    pub name: String,
    /// Extra data, preserved.
    pub extra_data: Vec<u8>,
}

/// Parses a bitmap directory.
pub fn parse_directory(buf: &[u8], count: u32) -> Result<Vec<BitmapEntry>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let bad = || Error::invalid("Failed to read bitmap directory");
    for _ in 0..count {
        let fixed = buf.get(pos..pos + 24).ok_or_else(bad)?;
        let name_size = be16(fixed, 18) as usize;
        let extra = be32(fixed, 20) as usize;
        let mut e = BitmapEntry {
            table_offset: be64(fixed, 0),
            table_size: be32(fixed, 8),
            flags: be32(fixed, 12),
            kind: fixed[16],
            granularity_bits: fixed[17],
            name: String::new(),
            extra_data: Vec::new(),
        };
        pos += 24;
        e.extra_data = buf.get(pos..pos + extra).ok_or_else(bad)?.to_vec();
        pos += extra;
        let name = buf.get(pos..pos + name_size).ok_or_else(bad)?;
        e.name = String::from_utf8_lossy(name).into_owned();
        pos += name_size;
        pos = pos.div_ceil(8) * 8;
        out.push(e);
    }
    Ok(out)
}

/// Bytes a directory entry with this name and extra data takes.
pub fn dir_entry_size(name_len: usize, extra_len: usize) -> u64 {
    ((DIR_ENTRY_FIXED + extra_len + name_len) as u64).div_ceil(8) * 8
}

/// QEMU's check of a directory entry: table placement, sizes, flags, type,
/// granularity, and (for a bitmap not in use) a table large enough for a disk of
/// `disk_size` bytes.
pub fn entry_valid(e: &BitmapEntry, cluster_size: u64, disk_size: u64) -> bool {
    let gb = e.granularity_bits as u32;
    let bad = e.table_size == 0
        || e.table_offset == 0
        || !e.table_offset.is_multiple_of(cluster_size)
        || e.table_size as u64 > MAX_TABLE_SIZE
        || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&gb)
        || e.flags & RESERVED_FLAGS != 0
        || e.name.len() > MAX_NAME_SIZE
        || e.kind != TYPE_DIRTY_TRACKING;
    if bad {
        return false;
    }
    let phys = e.table_size as u64 * cluster_size;
    if phys > MAX_PHYS_SIZE {
        return false;
    }
    // A bitmap in use may have been left with the size it had before a resize.
    e.flags & FLAG_IN_USE != 0 || disk_size <= (phys * 8) << gb
}

/// Parses a bitmap directory of `nb_bitmaps` entries with QEMU's checks and messages.
pub fn load_directory(
    buf: &[u8],
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<BitmapEntry>> {
    let broken = || Error::invalid("Broken bitmap directory");
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        let fixed = buf.get(pos..pos + DIR_ENTRY_FIXED).ok_or_else(broken)?;
        if out.len() as u32 >= nb_bitmaps {
            return Err(Error::invalid(
                "More bitmaps found than specified in header extension",
            ));
        }
        let name_size = be16(fixed, 18) as usize;
        let extra = be32(fixed, 20) as usize;
        let size = dir_entry_size(name_size, extra) as usize;
        if pos + size > buf.len() {
            return Err(broken());
        }
        if extra != 0 {
            return Err(Error::invalid("Bitmap extra data is not supported"));
        }
        let name_bytes = &buf[pos + DIR_ENTRY_FIXED..pos + DIR_ENTRY_FIXED + name_size];
        let e = BitmapEntry {
            table_offset: be64(fixed, 0),
            table_size: be32(fixed, 8),
            flags: be32(fixed, 12),
            kind: fixed[16],
            granularity_bits: fixed[17],
            name: String::from_utf8_lossy(name_bytes).into_owned(),
            extra_data: Vec::new(),
        };
        if !entry_valid(&e, cluster_size, disk_size) {
            return Err(Error::invalid(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                e.name
            )));
        }
        out.push(e);
        pos += size;
    }
    if (out.len() as u32) != nb_bitmaps {
        return Err(Error::invalid(
            "Less bitmaps found than specified in header extension",
        ));
    }
    Ok(out)
}

/// Serialises a bitmap directory.
pub fn serialize_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let start = out.len();
        out.resize(start + DIR_ENTRY_FIXED, 0);
        let f = &mut out[start..];
        put_be64(f, 0, e.table_offset);
        put_be32(f, 8, e.table_size);
        put_be32(f, 12, e.flags);
        f[16] = e.kind;
        f[17] = e.granularity_bits;
        f[18..20].copy_from_slice(&(e.name.len() as u16).to_be_bytes());
        put_be32(f, 20, e.extra_data.len() as u32);
        out.extend_from_slice(&e.extra_data);
        out.extend_from_slice(e.name.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out
}

/// Whether a bitmap table entry is well-formed (QEMU's check).
pub fn table_entry_valid(entry: u64, cluster_size: u64) -> bool {
    if entry & TABLE_RESERVED_MASK != 0 {
        return false;
    }
    let off = entry & TABLE_OFFSET_MASK;
    off == 0 || (entry & TABLE_ALL_ONES == 0 && off.is_multiple_of(cluster_size))
}

/// Entries of the bitmap table of a `disk_size` disk at this granularity: one per
/// cluster of bitmap data.
pub fn table_entries(disk_size: u64, granularity_bits: u32, cluster_size: u64) -> u64 {
    let bits = disk_size.div_ceil(1 << granularity_bits);
    // Bitmap data is serialised in whole 64-bit words.
    (bits.div_ceil(64) * 8).div_ceil(cluster_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: u32) -> BitmapEntry {
        BitmapEntry {
            table_offset: 0x40000,
            table_size: 1,
            flags,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            name: name.into(),
            extra_data: Vec::new(),
        }
    }

    #[test]
    fn directory_round_trips() {
        let list = vec![entry("b0", FLAG_AUTO), entry("bitmap-1", FLAG_IN_USE)];
        let buf = serialize_directory(&list);
        assert_eq!(
            buf.len() as u64,
            dir_entry_size(2, 0) + dir_entry_size(8, 0)
        );
        assert_eq!(buf.len(), 64);
        assert_eq!(load_directory(&buf, 2, 65536, 10 << 20).unwrap(), list);
        assert_eq!(parse_directory(&buf, 2).unwrap(), list);
    }

    #[test]
    fn directory_checks_read_like_qemu() {
        let buf = serialize_directory(&[entry("b0", 0)]);
        let msg = |r: Result<Vec<BitmapEntry>>| r.unwrap_err().to_string();
        assert_eq!(
            msg(load_directory(&buf, 2, 65536, 1 << 20)),
            "Less bitmaps found than specified in header extension"
        );
        assert_eq!(
            msg(load_directory(&buf[..20], 1, 65536, 1 << 20)),
            "Broken bitmap directory"
        );
        // One cluster of bitmap data at 64k granularity covers 32 GiB.
        assert_eq!(
            msg(load_directory(&buf, 1, 65536, 64 << 30)),
            "Bitmap 'b0' doesn't satisfy the constraints"
        );
        let mut bad = entry("x", 4);
        bad.flags = 4;
        assert!(load_directory(&serialize_directory(&[bad]), 1, 65536, 1 << 20).is_err());
    }

    #[test]
    fn table_entries_and_sizes() {
        assert_eq!(table_entries(10 << 20, 16, 65536), 1);
        assert_eq!(table_entries(2 << 40, 9, 65536), 8192);
        assert!(table_entry_valid(1, 65536));
        assert!(!table_entry_valid(0x10001, 65536));
        assert!(!table_entry_valid(0x10200, 65536));
        assert!(!table_entry_valid(2, 65536));
    }
}
