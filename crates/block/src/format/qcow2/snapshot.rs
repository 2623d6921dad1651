//! The internal snapshot table: entries as stored on disk.
//!
//! Creating, applying and deleting snapshots lives in [`super::snapshot_ops`]; this file
//! only knows the format.

use crate::error::{Error, Result};

use super::types::*;

/// Longest extra data QEMU accepts in one entry.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Extra data QEMU writes: vm_state_size (64-bit), disk size, icount.
pub const EXTRA_DATA_LEN: u32 = 24;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation.
    pub vm_clock_nsec: u64,
    /// VM state size.
    pub vm_state_size: u64,
    /// Virtual disk size when taken.
    pub disk_size: u64,
    /// icount, if recorded.
    pub icount: Option<u64>,
    /// Extra data beyond what rqemu knows, preserved.
    pub unknown_extra: Vec<u8>,
    /// Size of the extra data as the entry stored it (older entries lack fields that
    /// version 3 requires).
    pub extra_len: u32,
}

impl Snapshot {
    /// Bytes this entry takes in the table.
    pub fn encoded_len(&self) -> usize {
        let extra = EXTRA_DATA_LEN as usize + self.unknown_extra.len();
        (40 + extra + self.id.len() + self.name.len()).div_ceil(8) * 8
    }

    /// Appends the encoded entry to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let mut fixed = [0u8; 40];
        put_be64(&mut fixed, 0, self.l1_table_offset);
        put_be32(&mut fixed, 8, self.l1_size);
        put_be16(&mut fixed, 12, self.id.len() as u16);
        put_be16(&mut fixed, 14, self.name.len() as u16);
        put_be32(&mut fixed, 16, self.date_sec);
        put_be32(&mut fixed, 20, self.date_nsec);
        put_be64(&mut fixed, 24, self.vm_clock_nsec);
        put_be32(
            &mut fixed,
            32,
            self.vm_state_size.min(u32::MAX as u64) as u32,
        );
        put_be32(
            &mut fixed,
            36,
            EXTRA_DATA_LEN + self.unknown_extra.len() as u32,
        );
        out.extend_from_slice(&fixed);
        let mut extra = [0u8; 24];
        put_be64(&mut extra, 0, self.vm_state_size);
        put_be64(&mut extra, 8, self.disk_size);
        put_be64(&mut extra, 16, self.icount.unwrap_or(u64::MAX));
        out.extend_from_slice(&extra);
        out.extend_from_slice(&self.unknown_extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        let len = out.len() - start;
        out.resize(start + len.div_ceil(8) * 8, 0);
    }
}

/// Parses `count` entries from the snapshot table bytes. `image_size` is the disk size
/// used for entries without the disk-size field.
pub fn parse_table(buf: &[u8], count: u32, image_size: u64) -> Result<Vec<Snapshot>> {
    let mut snaps = Vec::with_capacity(count.min(4096) as usize);
    let mut pos = 0usize;
    let short = || Error::invalid("Failed to read snapshot table");
    for i in 0..count {
        let fixed = buf.get(pos..pos + 40).ok_or_else(short)?;
        let id_len = be16(fixed, 12) as usize;
        let name_len = be16(fixed, 14) as usize;
        let extra_len = be32(fixed, 36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(Error::invalid(format!(
                "Too much extra metadata in snapshot table entry {i}"
            )));
        }
        let mut s = Snapshot {
            l1_table_offset: be64(fixed, 0),
            l1_size: be32(fixed, 8),
            id: String::new(),
            name: String::new(),
            date_sec: be32(fixed, 16),
            date_nsec: be32(fixed, 20),
            vm_clock_nsec: be64(fixed, 24),
            vm_state_size: be32(fixed, 32) as u64,
            disk_size: image_size,
            icount: None,
            unknown_extra: Vec::new(),
            extra_len,
        };
        pos += 40;
        let extra = buf.get(pos..pos + extra_len as usize).ok_or_else(short)?;
        if extra.len() >= 8 {
            s.vm_state_size = be64(extra, 0);
        }
        if extra.len() >= 16 {
            s.disk_size = be64(extra, 8);
        }
        if extra.len() >= 24 {
            let ic = be64(extra, 16);
            s.icount = (ic != u64::MAX).then_some(ic);
        }
        if extra.len() > 24 {
            s.unknown_extra = extra[24..].to_vec();
        }
        pos += extra_len as usize;
        let id = buf.get(pos..pos + id_len).ok_or_else(short)?;
        s.id = String::from_utf8_lossy(id).into_owned();
        pos += id_len;
        let name = buf.get(pos..pos + name_len).ok_or_else(short)?;
        s.name = String::from_utf8_lossy(name).into_owned();
        pos += name_len;
        pos = pos.div_ceil(8) * 8;
        snaps.push(s);
    }
    Ok(snaps)
}

/// Encodes a whole table.
pub fn encode_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in snaps {
        s.encode(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = Snapshot {
            l1_table_offset: 0x50000,
            l1_size: 2,
            id: "1".into(),
            name: "snap".into(),
            date_sec: 100,
            date_nsec: 5,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: 1 << 30,
            icount: None,
            unknown_extra: vec![],
            extra_len: EXTRA_DATA_LEN,
        };
        let t = encode_table(&[s.clone(), s.clone()]);
        assert_eq!(t.len(), 2 * s.encoded_len());
        assert_eq!(parse_table(&t, 2, 0).unwrap(), vec![s.clone(), s]);
    }
}
