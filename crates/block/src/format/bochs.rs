//! Bochs growing ("redolog") images, read-only as in QEMU: a 512-byte header, a
//! catalog mapping each extent of the disk to a block in the file (or to nothing), and
//! per extent a bitmap of the sectors it holds followed by the sectors themselves.

use std::any::Any;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::node::{BlockDriver, BlockStatus, ChildRole, NodeRef, Prealloc, WriteFlags};

const MAGIC: &[u8] = b"Bochs Virtual HD Image";
const TYPE: &[u8] = b"Redolog";
const SUBTYPES: [&[u8]; 3] = [b"Undoable", b"Volatile", b"Growing"];
const VERSION_1: u32 = 0x0001_0000;
const VERSION_2: u32 = 0x0002_0000;
const HEADER_SIZE: usize = 512;
/// Largest catalog QEMU reads, in bytes.
const MAX_CATALOG_BYTES: u64 = 0x80_0000;
/// Largest extent QEMU accepts.
const MAX_EXTENT: u32 = 0x80_0000;
/// Catalog value of an extent with no block in the file.
const UNALLOCATED: u32 = 0xffff_ffff;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | u64::from(le32(b, at + 4)) << 32
}

/// A NUL-padded header field equals `want`.
fn field_is(field: &[u8], want: &[u8]) -> bool {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end] == want
}

/// Whether `head` starts a Bochs image QEMU would open.
pub fn probe(head: &[u8]) -> bool {
    head.len() >= HEADER_SIZE
        && field_is(&head[0..32], MAGIC)
        && field_is(&head[32..48], TYPE)
        && SUBTYPES.iter().any(|s| field_is(&head[48..64], s))
        && matches!(le32(head, 64), VERSION_1 | VERSION_2)
}

/// A Bochs image.
pub struct BochsNode {
    file: NodeRef,
    size: u64,
    catalog: Vec<u32>,
    data_offset: u64,
    bitmap_blocks: u64,
    extent_blocks: u64,
    extent_size: u64,
}

impl BochsNode {
    /// Opens the Bochs image in `file`; it can only be read.
    pub async fn open(file: NodeRef, read_only: bool) -> Result<BochsNode> {
        if !read_only {
            return Err(Error::other("Image is read-only", libc::EACCES));
        }
        let mut h = vec![0u8; HEADER_SIZE];
        let n = (file.size() as usize).min(HEADER_SIZE);
        file.read(0, &mut h[..n]).await?;
        if !probe(&h) {
            return Err(Error::invalid("Image not in Bochs format"));
        }
        let disk = if le32(&h, 64) == VERSION_1 {
            le64(&h, 84)
        } else {
            le64(&h, 88)
        };
        let size = disk / 512 * 512;
        let catalog_len = le32(&h, 72) as u64;
        if catalog_len > MAX_CATALOG_BYTES / 4 {
            return Err(Error::other("Catalog size is too large", libc::EFBIG));
        }
        let header_len = le32(&h, 68) as u64;
        let mut raw = vec![0u8; catalog_len as usize * 4];
        file.read(header_len, &mut raw).await?;
        let catalog = raw.chunks_exact(4).map(|c| le32(c, 0)).collect();
        let bitmap = le32(&h, 76);
        let extent = le32(&h, 80);
        if extent < 512 {
            return Err(Error::invalid(format!("Extent size {extent} is too small")));
        }
        if extent > MAX_EXTENT {
            return Err(Error::invalid(format!("Extent size {extent} is too large")));
        }
        let extent_size = extent as u64;
        if catalog_len < (size / 512).div_ceil(extent_size / 512) {
            return Err(Error::invalid(
                "Catalog size is too small for this disk size",
            ));
        }
        Ok(BochsNode {
            file,
            size,
            catalog,
            data_offset: header_len + catalog_len * 4,
            bitmap_blocks: 1 + (bitmap as u64).saturating_sub(1) / 512,
            extent_blocks: 1 + (extent_size - 1) / 512,
            extent_size,
        })
    }

    /// Where the bitmap of extent `index` lies in the file, or `None` when the extent
    /// has no block (it reads as zeroes).
    fn extent_bitmap(&self, index: u64) -> Option<u64> {
        let block = match self.catalog.get(usize::try_from(index).ok()?) {
            Some(&b) if b != UNALLOCATED => b as u64,
            _ => return None,
        };
        // Saturating: a hostile catalog then points past the end of the file.
        Some(
            (self.extent_blocks + self.bitmap_blocks)
                .saturating_mul(512 * block)
                .saturating_add(self.data_offset),
        )
    }

    /// Reads `buf` from the extent whose bitmap is at `bitmap`, starting `at` bytes into
    /// the extent: one read of the bitmap bytes it needs, then one read per run of
    /// sectors the bitmap marks present (the rest reads as zeroes).
    async fn read_extent(&self, bitmap: u64, at: u64, buf: &mut [u8]) -> Result<()> {
        let first = at / 512;
        let last = (at + buf.len() as u64 - 1) / 512;
        let mut bits = vec![0u8; (last / 8 - first / 8 + 1) as usize];
        self.file
            .read(bitmap.saturating_add(first / 8), &mut bits)
            .await?;
        let present = |s: u64| bits[(s / 8 - first / 8) as usize] >> (s % 8) & 1 == 1;
        let data = bitmap.saturating_add(512 * self.bitmap_blocks);
        let mut s = first;
        while s <= last {
            let set = present(s);
            let mut e = s;
            while e < last && present(e + 1) == set {
                e += 1;
            }
            let lo = (s * 512).max(at) - at;
            let hi = ((e + 1) * 512).min(at + buf.len() as u64) - at;
            let run = &mut buf[lo as usize..hi as usize];
            if set {
                self.file.read(data.saturating_add(at + lo), run).await?;
            } else {
                run.fill(0);
            }
            s = e + 1;
        }
        Ok(())
    }
}

fn read_only() -> Error {
    Error::errno(libc::EACCES)
}

#[async_trait]
impl BlockDriver for BochsNode {
    fn driver_name(&self) -> &'static str {
        "bochs"
    }

    fn filename(&self) -> String {
        self.file.filename()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn children(&self) -> Vec<(ChildRole, NodeRef)> {
        vec![(ChildRole::File, self.file.clone())]
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let at = pos % self.extent_size;
            let n = ((self.extent_size - at) as usize).min(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            match self.extent_bitmap(pos / self.extent_size) {
                Some(bitmap) => self.read_extent(bitmap, at, chunk).await?,
                None => chunk.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    async fn write(&self, _offset: u64, _buf: &[u8], _flags: WriteFlags) -> Result<()> {
        Err(read_only())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: WriteFlags) -> Result<()> {
        Err(read_only())
    }

    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn allocated_size(&self) -> Option<u64> {
        self.file.allocated_size().await
    }

    async fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::all_data(len))
    }

    async fn truncate(&self, _size: u64, _exact: bool, _prealloc: Prealloc) -> Result<()> {
        Err(Error::unsupported(
            "Image format driver does not support resize",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::block_on;

    /// A one-extent growing image of `sectors` sectors with sector 1 holding 0xab.
    fn image(sectors: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..MAGIC.len()].copy_from_slice(MAGIC);
        h[32..32 + TYPE.len()].copy_from_slice(TYPE);
        h[48..55].copy_from_slice(b"Growing");
        h[64..68].copy_from_slice(&VERSION_2.to_le_bytes());
        h[68..72].copy_from_slice(&512u32.to_le_bytes());
        h[72..76].copy_from_slice(&1u32.to_le_bytes());
        h[76..80].copy_from_slice(&512u32.to_le_bytes());
        h[80..84].copy_from_slice(&(sectors as u32 * 512).to_le_bytes());
        h[88..96].copy_from_slice(&(sectors * 512).to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes()); // catalog: extent 0 -> block 0
        let mut bitmap = vec![0u8; 512];
        bitmap[0] = 0b10;
        h.extend_from_slice(&bitmap);
        for s in 0..sectors {
            h.extend(std::iter::repeat_n(if s == 1 { 0xab } else { 0xee }, 512));
        }
        h
    }

    #[test]
    fn reads_allocated_sectors_and_zeroes() {
        let file: NodeRef = std::sync::Arc::new(crate::protocol::mem::MemNode::new(image(4), true));
        let b = block_on(BochsNode::open(file, true)).unwrap();
        assert_eq!(b.size(), 2048);
        let mut buf = vec![1u8; 2048];
        block_on(b.read(0, &mut buf)).unwrap();
        assert!(buf[..512].iter().all(|&x| x == 0));
        assert!(buf[512..1024].iter().all(|&x| x == 0xab));
        assert!(buf[1024..].iter().all(|&x| x == 0));
    }

    #[test]
    fn hostile_headers_are_refused() {
        let mut img = image(4);
        img[80..84].copy_from_slice(&100u32.to_le_bytes());
        let file: NodeRef = std::sync::Arc::new(crate::protocol::mem::MemNode::new(img, true));
        let e = block_on(BochsNode::open(file, true)).err().unwrap();
        assert_eq!(e.to_string(), "Extent size 100 is too small");
        let mut img = image(4);
        img[72..76].copy_from_slice(&u32::MAX.to_le_bytes());
        let file: NodeRef = std::sync::Arc::new(crate::protocol::mem::MemNode::new(img, true));
        let e = block_on(BochsNode::open(file, true)).err().unwrap();
        assert_eq!(e.to_string(), "Catalog size is too large");
    }
}
