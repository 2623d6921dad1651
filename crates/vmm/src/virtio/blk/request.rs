//! Parsing a virtio-blk request from a descriptor chain, validating everything the guest
//! controls: descriptor order (device-readable before device-writable), the header's
//! length and type, data lengths (whole sectors, at most the block layer's largest request
//! as QEMU's `BDRV_REQUEST_MAX_BYTES`, inside the disk, inside guest memory),
//! the status byte's place, and discard/write-zeroes segments.
//!
//! The parser never touches data buffers; it returns guest ranges the executor uses.

use rqemu_block::backend::MAX_REQUEST_BYTES;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// `VIRTIO_BLK_T_IN`.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = 13;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Length of the ID string returned by GET_ID.
pub const ID_LEN: u32 = 20;

/// One descriptor as the queue delivered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// A guest buffer range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes at `offset` into the data segments.
    Read {
        /// Byte offset.
        offset: u64,
    },
    /// Write the data segments at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
    },
    /// Flush the write cache.
    Flush,
    /// Return the serial number.
    GetId,
    /// Discard a range.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Zero a range (`unmap`: may deallocate).
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
        /// The guest allows deallocation.
        unmap: bool,
    },
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: Kind,
    /// Data buffers (device-writable for reads and GET_ID, readable for writes).
    pub data: Vec<Segment>,
    /// Total bytes of `data`.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request is refused. With a status address, the guest gets an error status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No writable byte for the status: the request is completed with nothing written.
    NoStatus,
    /// The guest gets this status byte at `status`.
    Status {
        /// Where the status byte goes.
        status: GuestAddress,
        /// `S_IOERR` or `S_UNSUPP`.
        code: u8,
    },
}

fn in_memory(mem: &GuestMemoryMmap, addr: u64, len: u32) -> bool {
    len == 0 || mem.get_slice(GuestAddress(addr), len as usize).is_ok()
}

/// Reads `out.len()` bytes from the front of the readable stream `segs`.
fn gather(mem: &GuestMemoryMmap, segs: &[Segment], out: &mut [u8]) -> bool {
    let mut done = 0;
    for s in segs {
        if done == out.len() {
            break;
        }
        let n = (s.len as usize).min(out.len() - done);
        if mem.read_slice(&mut out[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == out.len()
}

/// Skips `skip` bytes of `segs`.
fn after(segs: &[Segment], mut skip: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segs {
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        out.push(Segment {
            addr: GuestAddress(s.addr.0 + skip),
            len: (len - skip) as u32,
        });
        skip = 0;
    }
    out
}

/// Parses a chain for a disk of `capacity` bytes.
pub fn parse(descs: &[Desc], mem: &GuestMemoryMmap, capacity: u64) -> Result<Request, Refusal> {
    // The status byte is the last byte of the last descriptor, which must be writable.
    let last = descs.last().ok_or(Refusal::NoStatus)?;
    if !last.write || last.len == 0 {
        return Err(Refusal::NoStatus);
    }
    let status_addr = last
        .addr
        .checked_add(u64::from(last.len) - 1)
        .ok_or(Refusal::NoStatus)?;
    if !in_memory(mem, status_addr, 1) {
        return Err(Refusal::NoStatus);
    }
    let status = GuestAddress(status_addr);
    let ioerr = Refusal::Status {
        status,
        code: S_IOERR,
    };
    let unsupp = Refusal::Status {
        status,
        code: S_UNSUPP,
    };

    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        let len = if i == descs.len() - 1 {
            d.len - 1
        } else {
            d.len
        };
        if !in_memory(mem, d.addr, len) {
            return Err(ioerr);
        }
        let seg = Segment {
            addr: GuestAddress(d.addr),
            len,
        };
        if d.write {
            if len > 0 {
                writable.push(seg);
            }
        } else {
            if !writable.is_empty() {
                return Err(ioerr); // readable after writable
            }
            readable.push(seg);
        }
    }

    let mut header = [0u8; 16];
    if !gather(mem, &readable, &mut header) {
        return Err(ioerr);
    }
    let rtype = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let payload = after(&readable, 16);
    let sum = |s: &[Segment]| s.iter().map(|x| u64::from(x.len)).sum::<u64>();
    let range_ok = |offset: Option<u64>, len: u64| {
        offset
            .and_then(|o| o.checked_add(len))
            .is_some_and(|end| end <= capacity)
    };

    let (kind, data) = match rtype {
        T_IN | T_OUT => {
            let data = if rtype == T_IN { writable } else { payload };
            let len = sum(&data);
            let offset = sector.checked_mul(SECTOR);
            if len % SECTOR != 0 || len > MAX_REQUEST_BYTES || !range_ok(offset, len) {
                return Err(ioerr);
            }
            let offset = offset.unwrap_or(0);
            let kind = if rtype == T_IN {
                Kind::Read { offset }
            } else {
                Kind::Write { offset }
            };
            (kind, data)
        }
        T_FLUSH => (Kind::Flush, Vec::new()),
        T_GET_ID => {
            if sum(&writable) < u64::from(ID_LEN) {
                return Err(ioerr);
            }
            (Kind::GetId, writable)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            // One segment, as the device advertises (max_*_seg = 1).
            if sum(&payload) != 16 {
                return Err(unsupp);
            }
            let mut seg = [0u8; 16];
            if !gather(mem, &payload, &mut seg) {
                return Err(ioerr);
            }
            let s = u64::from_le_bytes([
                seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7],
            ]);
            let n = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
            let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
            let unmap = flags & 1 != 0;
            if flags & !1 != 0 || (rtype == T_DISCARD && unmap) {
                return Err(unsupp);
            }
            let offset = s.checked_mul(SECTOR);
            let len = u64::from(n) * SECTOR;
            if !range_ok(offset, len) {
                return Err(ioerr);
            }
            let offset = offset.unwrap_or(0);
            let kind = if rtype == T_DISCARD {
                Kind::Discard { offset, len }
            } else {
                Kind::WriteZeroes { offset, len, unmap }
            };
            (kind, Vec::new())
        }
        _ => return Err(unsupp),
    };
    let data_len = sum(&data);
    Ok(Request {
        kind,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        m.write_obj(t, GuestAddress(at)).unwrap();
        m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        m.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    fn d(addr: u64, len: u32, write: bool) -> Desc {
        Desc { addr, len, write }
    }

    #[test]
    fn read_request() {
        let m = mem();
        header(&m, 0x100, T_IN, 2);
        let r = parse(
            &[
                d(0x100, 16, false),
                d(0x1000, 1024, true),
                d(0x200, 1, true),
            ],
            &m,
            1 << 20,
        )
        .unwrap();
        assert_eq!(r.kind, Kind::Read { offset: 1024 });
        assert_eq!(r.data_len, 1024);
        assert_eq!(r.status, GuestAddress(0x200));
        // Status byte sharing the last data descriptor.
        let r = parse(&[d(0x100, 16, false), d(0x1000, 513, true)], &m, 1 << 20).unwrap();
        assert_eq!(r.data_len, 512);
        assert_eq!(r.status, GuestAddress(0x1200));
    }

    #[test]
    fn hostile_chains() {
        let m = mem();
        header(&m, 0x100, T_IN, 0);
        let st = |code| {
            Err(Refusal::Status {
                status: GuestAddress(0x200),
                code,
            })
        };
        assert_eq!(parse(&[], &m, 1 << 20), Err(Refusal::NoStatus));
        assert_eq!(
            parse(&[d(0x100, 16, false)], &m, 1 << 20),
            Err(Refusal::NoStatus)
        );
        assert_eq!(
            parse(&[d(0x100, 16, false), d(0xffff_0000, 1, true)], &m, 1 << 20),
            Err(Refusal::NoStatus)
        );
        // Data outside guest memory, giant lengths, unaligned lengths, beyond the disk.
        assert_eq!(
            parse(
                &[d(0x100, 16, false), d(0xfff0, 512, true), d(0x200, 1, true)],
                &m,
                1 << 20
            ),
            st(S_IOERR)
        );
        assert_eq!(
            parse(
                &[
                    d(0x100, 16, false),
                    d(0x1000, u32::MAX, true),
                    d(0x200, 1, true)
                ],
                &m,
                1 << 20
            ),
            st(S_IOERR)
        );
        assert_eq!(
            parse(
                &[d(0x100, 16, false), d(0x1000, 100, true), d(0x200, 1, true)],
                &m,
                1 << 20
            ),
            st(S_IOERR)
        );
        header(&m, 0x100, T_IN, u64::MAX / 2);
        assert_eq!(
            parse(
                &[d(0x100, 16, false), d(0x1000, 512, true), d(0x200, 1, true)],
                &m,
                1 << 20
            ),
            st(S_IOERR)
        );
        // Short header, readable after writable, unknown type.
        assert_eq!(
            parse(&[d(0x100, 8, false), d(0x200, 1, true)], &m, 1 << 20),
            st(S_IOERR)
        );
        header(&m, 0x100, T_OUT, 0);
        assert_eq!(
            parse(
                &[d(0x1000, 1, true), d(0x100, 16, false), d(0x200, 1, true)],
                &m,
                1 << 20
            ),
            st(S_IOERR)
        );
        header(&m, 0x100, 99, 0);
        assert_eq!(
            parse(&[d(0x100, 16, false), d(0x200, 1, true)], &m, 1 << 20),
            st(S_UNSUPP)
        );
    }

    #[test]
    fn discard_and_zeroes() {
        let m = mem();
        header(&m, 0x100, T_WRITE_ZEROES, 0);
        m.write_obj(8u64, GuestAddress(0x110)).unwrap();
        m.write_obj(16u32, GuestAddress(0x118)).unwrap();
        m.write_obj(1u32, GuestAddress(0x11c)).unwrap();
        let r = parse(&[d(0x100, 32, false), d(0x200, 1, true)], &m, 1 << 20).unwrap();
        assert_eq!(
            r.kind,
            Kind::WriteZeroes {
                offset: 4096,
                len: 8192,
                unmap: true
            }
        );
        header(&m, 0x100, T_DISCARD, 0);
        let st = Err(Refusal::Status {
            status: GuestAddress(0x200),
            code: S_UNSUPP,
        });
        assert_eq!(
            parse(&[d(0x100, 32, false), d(0x200, 1, true)], &m, 1 << 20),
            st
        );
    }
}
