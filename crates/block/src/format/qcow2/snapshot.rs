//! The internal snapshot table: entries as stored on disk.
//!
//! Creating, applying and deleting snapshots lives in [`super::snapshot_ops`]; this file
//! only knows the format.

use crate::error::{Error, Result};
use crate::node::NodeRef;

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

/// Largest snapshot table QEMU reads (bytes, counting extra data as kept).
pub const MAX_TABLE_SIZE: u64 = 64 << 20;

/// The snapshot table as read from the image.
#[derive(Debug, Default)]
pub struct Table {
    /// The entries kept.
    pub snapshots: Vec<Snapshot>,
    /// Bytes the kept entries occupy in the image.
    pub extent: u64,
    /// Entries whose oversized extra data was cut to [`MAX_EXTRA_DATA`] (repair only).
    pub extra_dropped: u64,
    /// Entries dropped because the table grew too big (repair only).
    pub overhanging: u32,
}

/// Reads bytes of the table through a window, so that an entry costs no request of its
/// own.
struct Window<'a> {
    file: &'a NodeRef,
    start: u64,
    buf: Vec<u8>,
}

impl Window<'_> {
    const CHUNK: u64 = 1 << 20;

    async fn get(&mut self, offset: u64, len: usize) -> Result<&[u8]> {
        let end = offset + len as u64;
        if offset < self.start || end > self.start + self.buf.len() as u64 {
            let n = (len as u64).max(Self::CHUNK);
            let mut buf = vec![0u8; n as usize];
            self.file.read(offset, &mut buf).await.map_err(|e| {
                Error::other(
                    format!("Failed to read snapshot table: {e}"),
                    e.errno_value(),
                )
            })?;
            self.start = offset;
            self.buf = buf;
        }
        let at = (offset - self.start) as usize;
        Ok(&self.buf[at..at + len])
    }
}

/// Reads `count` entries starting at `offset` as QEMU does: entries whose extra data
/// exceeds [`MAX_EXTRA_DATA`], or a table beyond [`MAX_TABLE_SIZE`], are refused, or
/// with `repair` cut down (the extra data) or dropped (the overhanging entries), each
/// reported on stderr. `image_size` is the disk size of entries without that field.
pub async fn read_table(
    file: &NodeRef,
    offset: u64,
    count: u32,
    image_size: u64,
    repair: bool,
) -> Result<Table> {
    let mut t = Table::default();
    let mut w = Window {
        file,
        start: 0,
        buf: Vec::new(),
    };
    let mut pos = offset;
    let mut table_len = 0u64;
    for i in 0..count {
        let entry_start = pos;
        table_len = table_len.div_ceil(8) * 8;
        pos = pos.div_ceil(8) * 8;
        let fixed: [u8; 40] = w.get(pos, 40).await?.try_into().unwrap_or([0; 40]);
        pos += 40;
        let id_len = be16(&fixed, 12) as u64;
        let name_len = be16(&fixed, 14) as u64;
        let mut extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA_DATA {
            if !repair {
                return Err(Error::other(
                    format!(
                        "Too much extra metadata in snapshot table entry {i}\nYou can force-remove this extra metadata with qemu-img check -r all"
                    ),
                    libc::EFBIG,
                ));
            }
            eprintln!(
                "Discarding too much extra metadata in snapshot table entry {i} ({extra_len} > {MAX_EXTRA_DATA})"
            );
            t.extra_dropped += 1;
        }
        let stored_extra = extra_len as u64;
        extra_len = extra_len.min(MAX_EXTRA_DATA);
        let extra = w.get(pos, extra_len as usize).await?.to_vec();
        pos += stored_extra;
        let mut s = Snapshot {
            l1_table_offset: be64(&fixed, 0),
            l1_size: be32(&fixed, 8),
            id: String::new(),
            name: String::new(),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size: be32(&fixed, 32) as u64,
            disk_size: image_size,
            icount: None,
            unknown_extra: Vec::new(),
            extra_len,
        };
        if extra.len() >= 8 {
            s.vm_state_size = be64(&extra, 0);
        }
        if extra.len() >= 16 {
            s.disk_size = be64(&extra, 8);
        }
        if extra.len() >= 24 {
            let ic = be64(&extra, 16);
            s.icount = (ic != u64::MAX).then_some(ic);
        }
        if extra.len() > 24 {
            s.unknown_extra = extra[24..].to_vec();
        }
        s.id = c_string(w.get(pos, id_len as usize).await?);
        pos += id_len;
        s.name = c_string(w.get(pos, name_len as usize).await?);
        pos += name_len;
        table_len += 40 + extra_len as u64 + id_len + name_len;
        if table_len > MAX_TABLE_SIZE || pos - offset > i32::MAX as u64 {
            let over = count - i;
            if !repair {
                return Err(Error::other(
                    format!(
                        "Snapshot table is too big\nYou can force-remove all {over} overhanging snapshots with qemu-img check -r all"
                    ),
                    libc::EFBIG,
                ));
            }
            eprintln!("Discarding {over} overhanging snapshots (snapshot table is too big)");
            t.overhanging = over;
            t.extent = entry_start - offset;
            return Ok(t);
        }
        t.snapshots.push(s);
    }
    t.extent = pos - offset;
    Ok(t)
}

/// A stored ID or name as QEMU holds it: a C string, ending at the first NUL.
fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
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
    use crate::test_util::block_on;

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
        let len = t.len() as u64;
        let node: NodeRef = std::sync::Arc::new(crate::protocol::mem::MemNode::new(t, true));
        let read = block_on(read_table(&node, 0, 2, 0, false)).unwrap();
        assert_eq!(read.snapshots, vec![s.clone(), s]);
        // The last entry is not padded.
        assert_eq!(read.extent, len - 3);
    }

    #[test]
    fn oversized_extra_data_is_refused_or_cut() {
        let mut bytes = vec![0u8; 40 + 2000];
        put_be32(&mut bytes, 36, 2000);
        let node: NodeRef = std::sync::Arc::new(crate::protocol::mem::MemNode::new(bytes, true));
        let e = block_on(read_table(&node, 0, 1, 0, false)).unwrap_err();
        assert_eq!(e.errno_value(), libc::EFBIG);
        assert!(e
            .to_string()
            .starts_with("Too much extra metadata in snapshot table entry 0\n"));
        let t = block_on(read_table(&node, 0, 1, 0, true)).unwrap();
        assert_eq!(t.extra_dropped, 1);
        assert_eq!(t.snapshots[0].extra_len, MAX_EXTRA_DATA);
        assert_eq!(t.extent, 2040);
    }
}
