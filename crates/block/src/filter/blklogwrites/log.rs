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
    if log.len() < HEADER_BYTES {
        return Err(LogError::Short);
    }
    if le64(log, 0) != MAGIC {
        return Err(LogError::Magic);
    }
    let version = le64(log, 8);
    if version != VERSION {
        return Err(LogError::Version(version));
    }
    let nr_entries = le64(log, 16);
    let sector_size = u32::from_le_bytes([log[24], log[25], log[26], log[27]]);
    if !sector_size_valid(sector_size as u64) {
        return Err(LogError::SectorSize(sector_size as u64));
    }
    let ss = sector_size as u64;
    let size = log.len() as u64;
    let mut ops = Vec::new();
    let mut at = ss;
    for index in 0..nr_entries {
        if at.checked_add(HEADER_BYTES as u64).is_none_or(|e| e > size) {
            return Err(LogError::Truncated(index));
        }
        let h = &log[at as usize..at as usize + HEADER_BYTES];
        let (sector, nr, flags, data_len) = (le64(h, 0), le64(h, 8), le64(h, 16), le64(h, 24));
        if flags & !FLAG_MASK != 0 {
            return Err(LogError::Flags { flags, index });
        }
        let data = at + ss;
        let range = |n: u64| -> Result<(u64, u64), LogError> {
            let offset = sector.checked_mul(ss).ok_or(LogError::Range(index))?;
            let len = n.checked_mul(ss).ok_or(LogError::Range(index))?;
            offset.checked_add(len).ok_or(LogError::Range(index))?;
            Ok((offset, len))
        };
        let (op, data_bytes) = if flags & MARK != 0 {
            if data_len > MAX_MARK {
                return Err(LogError::Range(index));
            }
            if data + data_len > size {
                return Err(LogError::Truncated(index));
            }
            let label = &log[data as usize..(data + data_len) as usize];
            (
                Op::Mark(String::from_utf8_lossy(label).into_owned()),
                data_len,
            )
        } else if flags & FLUSH != 0 {
            (Op::Flush, 0)
        } else if flags & DISCARD != 0 {
            let (offset, len) = range(nr)?;
            (Op::Discard { offset, len }, 0)
        } else {
            let (offset, len) = range(nr)?;
            if data.checked_add(len).is_none_or(|e| e > size) {
                return Err(LogError::Truncated(index));
            }
            (
                Op::Write {
                    offset,
                    len,
                    data,
                    fua: flags & FUA != 0,
                },
                len,
            )
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
