//! The write log's on-disk format, Linux's dm-log-writes layout as QEMU's `blklogwrites`
//! writes it, and a reader for logs of unknown origin.
//!
//! All fields are little-endian. Sector 0 of the log holds the superblock; every entry
//! takes one log sector for its header, followed by its data rounded up to whole log
//! sectors (writes and written zeroes carry data, flushes and discards none).
//!
//! ```text
//!   superblock  magic u64 | version u64 | nr_entries u64 | sectorsize u32
//!   entry       sector u64 | nr_sectors u64 | flags u64 | data_len u64, then data
//! ```
//!
//! `sector` and `nr_sectors` count log sectors of the logged device. `data_len` stays 0
//! for the entries written here (the data's length follows from `nr_sectors`); a mark
//! entry (dm-log-writes' user marks) carries its label in `data_len` bytes.

use thiserror::Error;

/// The entry is a flush: every write logged before it was durable when it completed.
pub const FLUSH: u64 = 1 << 0;
/// The write was issued with force unit access: durable when it completed.
pub const FUA: u64 = 1 << 1;
/// A discard: no data follows.
pub const DISCARD: u64 = 1 << 2;
/// A user mark: a label, no device data.
pub const MARK: u64 = 1 << 3;
/// Every flag a valid entry may carry.
pub const FLAG_MASK: u64 = FLUSH | FUA | DISCARD | MARK;

/// The superblock's magic number.
pub const MAGIC: u64 = 0x006a_7366_7773_6872;
/// The only log version.
pub const VERSION: u64 = 1;
/// Bytes of the superblock and of an entry header that carry fields.
pub const HEADER_BYTES: usize = 32;
/// The default log sector size.
pub const DEFAULT_SECTOR_SIZE: u32 = 512;
/// Longest mark label a reader accepts.
const MAX_MARK: u64 = 4096;

/// Why a log cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LogError {
    /// The file is shorter than a superblock.
    #[error("Log is too short for its superblock")]
    Short,
    /// The superblock's magic is wrong.
    #[error("Invalid log superblock magic")]
    Magic,
    /// The superblock names another version.
    #[error("Unsupported log version {0}")]
    Version(u64),
    /// The sector size is not a power of two between 32 bytes and 16 MiB.
    #[error("Invalid log sector size {0}")]
    SectorSize(u64),
    /// An entry has flags no log writer sets.
    #[error("Invalid flags 0x{flags:x} in log entry {index}")]
    Flags {
        /// The entry's flags.
        flags: u64,
        /// Its index.
        index: u64,
    },
    /// An entry or its data lies past the end of the log.
    #[error("Log entry {0} lies past the end of the log")]
    Truncated(u64),
    /// An entry's range does not fit in 64 bits.
    #[error("Log entry {0} has an impossible range")]
    Range(u64),
}

/// Whether `size` can be a log sector size (QEMU's check).
pub fn sector_size_valid(size: u64) -> bool {
    size.is_power_of_two() && size >= HEADER_BYTES as u64 && size < (1 << 24)
}

/// The superblock for a log of `nr_entries` entries, padded to `sector_size` bytes.
pub fn superblock(nr_entries: u64, sector_size: u32) -> Vec<u8> {
    let mut b = vec![0u8; sector_size as usize];
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&nr_entries.to_le_bytes());
    b[24..28].copy_from_slice(&sector_size.to_le_bytes());
    b
}

/// An entry header, padded to `sector_size` bytes.
pub fn entry_header(sector: u64, nr_sectors: u64, flags: u64, sector_size: u32) -> Vec<u8> {
    let mut b = vec![0u8; sector_size as usize];
    b[0..8].copy_from_slice(&sector.to_le_bytes());
    b[8..16].copy_from_slice(&nr_sectors.to_le_bytes());
    b[16..24].copy_from_slice(&flags.to_le_bytes());
    b
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Reads a superblock: the number of entries and the sector size, checked.
pub fn read_superblock(b: &[u8]) -> Result<(u64, u32), LogError> {
    if b.len() < HEADER_BYTES {
        return Err(LogError::Short);
    }
    if le64(b, 0) != MAGIC {
        return Err(LogError::Magic);
    }
    let version = le64(b, 8);
    if version != VERSION {
        return Err(LogError::Version(version));
    }
    let sector_size = u32::from_le_bytes([b[24], b[25], b[26], b[27]]);
    if !sector_size_valid(sector_size as u64) {
        return Err(LogError::SectorSize(sector_size as u64));
    }
    Ok((le64(b, 16), sector_size))
}

/// The fields of an entry header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    /// First log sector of the device the entry covers.
    pub sector: u64,
    /// Log sectors it covers.
    pub nr_sectors: u64,
    /// Its flags.
    pub flags: u64,
    /// Bytes of a mark's label.
    pub data_len: u64,
}

impl EntryHeader {
    /// Reads entry `index`'s header from the first [`HEADER_BYTES`] of `b`.
    pub fn read(b: &[u8], index: u64) -> Result<EntryHeader, LogError> {
        if b.len() < HEADER_BYTES {
            return Err(LogError::Truncated(index));
        }
        let h = EntryHeader {
            sector: le64(b, 0),
            nr_sectors: le64(b, 8),
            flags: le64(b, 16),
            data_len: le64(b, 24),
        };
        if h.flags & !FLAG_MASK != 0 {
            return Err(LogError::Flags {
                flags: h.flags,
                index,
            });
        }
        Ok(h)
    }

    /// Bytes of data after the header (before rounding up to log sectors): a mark's
    /// label, a write's data, nothing for flushes and discards. `None` on overflow.
    pub fn data_bytes(&self, sector_size: u64) -> Option<u64> {
        if self.flags & MARK != 0 {
            Some(self.data_len)
        } else if self.flags & (FLUSH | DISCARD) != 0 {
            Some(0)
        } else {
            self.nr_sectors.checked_mul(sector_size)
        }
    }
}

/// What one entry did to the logged device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `len` bytes at `offset` were written; the data is at `data` in the log.
    Write {
        /// Byte offset on the device.
        offset: u64,
        /// Bytes written.
        len: u64,
        /// Byte offset of the data in the log.
        data: u64,
        /// Issued with force unit access.
        fua: bool,
    },
    /// `len` bytes at `offset` were discarded.
    Discard {
        /// Byte offset on the device.
        offset: u64,
        /// Bytes discarded.
        len: u64,
    },
    /// A flush completed.
    Flush,
    /// A user mark.
    Mark(String),
}

/// A parsed log: its sector size and its entries in order. The data stays in the log
/// bytes the entries point into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// The log sector size.
    pub sector_size: u32,
    /// The entries, in the order they were logged.
    pub ops: Vec<Op>,
}

/// Reads a whole log. `log` is untrusted: every offset and length is checked against
/// its size before use, and nothing is allocated in proportion to a field's value.
pub fn parse(log: &[u8]) -> Result<Log, LogError> {
    let (nr_entries, sector_size) = read_superblock(log)?;
    let ss = sector_size as u64;
    let size = log.len() as u64;
    let mut ops = Vec::new();
    let mut at = ss;
    for index in 0..nr_entries {
        let start = usize::try_from(at).map_err(|_| LogError::Truncated(index))?;
        let h = EntryHeader::read(log.get(start..).unwrap_or(&[]), index)?;
        let data = at + ss;
        let data_bytes = h.data_bytes(ss).ok_or(LogError::Range(index))?;
        if h.flags & MARK != 0 && data_bytes > MAX_MARK {
            return Err(LogError::Range(index));
        }
        if data.checked_add(data_bytes).is_none_or(|e| e > size) {
            return Err(LogError::Truncated(index));
        }
        let range = || -> Result<(u64, u64), LogError> {
            let offset = h.sector.checked_mul(ss).ok_or(LogError::Range(index))?;
            let len = h.nr_sectors.checked_mul(ss).ok_or(LogError::Range(index))?;
            offset.checked_add(len).ok_or(LogError::Range(index))?;
            Ok((offset, len))
        };
        let op = if h.flags & MARK != 0 {
            let label = &log[data as usize..(data + data_bytes) as usize];
            Op::Mark(String::from_utf8_lossy(label).into_owned())
        } else if h.flags & FLUSH != 0 {
            Op::Flush
        } else if h.flags & DISCARD != 0 {
            let (offset, len) = range()?;
            Op::Discard { offset, len }
        } else {
            let (offset, len) = range()?;
            Op::Write {
                offset,
                len,
                data,
                fua: h.flags & FUA != 0,
            }
        };
        ops.push(op);
        at = data
            .checked_add(data_bytes.div_ceil(ss) * ss)
            .ok_or(LogError::Range(index))?;
    }
    Ok(Log { sector_size, ops })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(entries: &[(u64, u64, u64, &[u8])]) -> Vec<u8> {
        let mut b = superblock(entries.len() as u64, 512);
        for (sector, nr, flags, data) in entries {
            b.extend(entry_header(*sector, *nr, *flags, 512));
            let mut d = data.to_vec();
            d.resize(d.len().div_ceil(512) * 512, 0);
            b.extend(d);
        }
        b
    }

    #[test]
    fn reads_what_was_written() {
        let data = vec![7u8; 1024];
        let log = log_of(&[
            (3, 2, 0, &data),
            (0, 0, FLUSH, &[]),
            (8, 4, DISCARD, &[]),
            (1, 2, FUA, &data),
        ]);
        let l = parse(&log).unwrap();
        assert_eq!(l.sector_size, 512);
        assert_eq!(
            l.ops,
            vec![
                Op::Write {
                    offset: 1536,
                    len: 1024,
                    data: 1024,
                    fua: false
                },
                Op::Flush,
                Op::Discard {
                    offset: 4096,
                    len: 2048
                },
                Op::Write {
                    offset: 512,
                    len: 1024,
                    data: 1024 + 1024 + 512 + 512 + 512,
                    fua: true
                },
            ]
        );
        let Op::Write { data, .. } = l.ops[3] else {
            unreachable!()
        };
        assert!(log[data as usize..data as usize + 1024]
            .iter()
            .all(|&b| b == 7));
    }

    #[test]
    fn refuses_bad_logs() {
        assert_eq!(parse(&[0; 16]), Err(LogError::Short));
        let mut b = superblock(0, 512);
        b[0] ^= 1;
        assert_eq!(parse(&b), Err(LogError::Magic));
        let mut b = superblock(0, 512);
        b[8] = 2;
        assert_eq!(parse(&b), Err(LogError::Version(2)));
        assert_eq!(parse(&superblock(0, 100)), Err(LogError::SectorSize(100)));
        // More entries claimed than present.
        assert_eq!(
            parse(&superblock(u64::MAX, 512)),
            Err(LogError::Truncated(0))
        );
        let b = log_of(&[(0, 0, 1 << 9, &[])]);
        assert_eq!(
            parse(&b),
            Err(LogError::Flags {
                flags: 1 << 9,
                index: 0
            })
        );
        // A write whose data is missing, and one whose range overflows.
        let mut b = log_of(&[(0, 8, 0, &[])]);
        b.truncate(1024);
        assert_eq!(parse(&b), Err(LogError::Truncated(0)));
        let b = log_of(&[(u64::MAX / 256, 1, 0, &[0; 512])]);
        assert_eq!(parse(&b), Err(LogError::Range(0)));
    }
}
