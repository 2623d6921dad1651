//! Persistent dirty bitmaps: the bitmap directory as stored on disk. rqemu keeps the
//! bitmaps of an image intact, lists them in `info`, and counts their clusters in
//! `check`.

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
