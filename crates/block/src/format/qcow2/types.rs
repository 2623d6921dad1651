//! qcow2's on-disk vocabulary: constants, the image geometry, and decoded L1/L2 entries.
//!
//! Guest offsets (positions in the virtual disk) and host offsets (positions in the image
//! or data file) are both `u64` on disk; the helpers here keep the arithmetic between them
//! in one place.

/// Magic number at offset 0: `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// L1/L2/refcount-table entry bit: the referenced cluster has refcount exactly one.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry bit 0: the cluster reads as zeroes (v3, no extended L2).
pub const OFLAG_ZERO: u64 = 1;

/// Host offset bits of an L1 entry.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of a standard L2 entry.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Host offset bits of a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of a standard L2 entry.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Reserved bits of a refcount table entry.
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// QEMU's implementation limit on the L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's implementation limit on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Most snapshots an image may have.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name.
pub const MAX_BACKING_NAME: u32 = 1023;
/// Smallest and largest cluster size exponent QEMU opens.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size exponent (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Incompatible feature bits.
pub mod incompat {
    /// Refcounts may be inconsistent.
    pub const DIRTY: u64 = 1 << 0;
    /// Metadata may be corrupt.
    pub const CORRUPT: u64 = 1 << 1;
    /// Guest data lives in an external data file.
    pub const DATA_FILE: u64 = 1 << 2;
    /// `compression_type` is not deflate.
    pub const COMPRESSION: u64 = 1 << 3;
    /// Extended L2 entries (subclusters).
    pub const EXTL2: u64 = 1 << 4;
    /// Every bit rqemu knows.
    pub const KNOWN: u64 = DIRTY | CORRUPT | DATA_FILE | COMPRESSION | EXTL2;
}

/// Compatible feature bits.
pub mod compat {
    /// Lazy refcounts.
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Auto-clear feature bits.
pub mod autoclear {
    /// The bitmaps extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// The external data file is a consistent raw image.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
    /// Every bit rqemu knows.
    pub const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// Compression types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (QEMU calls it zlib).
    Zlib,
    /// zstd.
    Zstd,
}

impl CompressionType {
    /// Decodes the header byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(CompressionType::Zlib),
            1 => Some(CompressionType::Zstd),
            _ => None,
        }
    }

    /// The header byte.
    pub fn byte(self) -> u8 {
        match self {
            CompressionType::Zlib => 0,
            CompressionType::Zstd => 1,
        }
    }

    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }

    /// Parses QEMU's name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "zlib" => Some(CompressionType::Zlib),
            "zstd" => Some(CompressionType::Zstd),
            _ => None,
        }
    }
}

/// The fixed geometry of an open image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Whether L2 entries are 128-bit with subcluster bitmaps.
    pub extended_l2: bool,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
}

impl Geometry {
    /// Cluster size in bytes.
    pub const fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub const fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// L2 entries per table.
    pub const fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// log2 of L2 entries per table.
    pub const fn l2_bits(&self) -> u32 {
        self.cluster_bits - if self.extended_l2 { 4 } else { 3 }
    }

    /// Bytes of guest space one L2 table maps.
    pub const fn l2_coverage(&self) -> u64 {
        self.l2_entries() << self.cluster_bits
    }

    /// Subcluster size in bytes (the cluster size without extended L2).
    pub const fn subcluster_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / SUBCLUSTERS as u64
        } else {
            self.cluster_size()
        }
    }

    /// Refcount width in bits.
    pub const fn refcount_bits(&self) -> u64 {
        1 << self.refcount_order
    }

    /// Largest representable refcount.
    pub const fn refcount_max(&self) -> u64 {
        if self.refcount_order == 6 {
            u64::MAX
        } else {
            (1 << self.refcount_bits()) - 1
        }
    }

    /// Refcount entries per refcount block.
    pub const fn refblock_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    /// log2 of refcount entries per block.
    pub const fn refblock_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.refcount_order
    }

    /// Offset within its cluster.
    pub const fn offset_in_cluster(&self, offset: u64) -> u64 {
        offset & (self.cluster_size() - 1)
    }

    /// Start of the cluster containing `offset`.
    pub const fn cluster_start(&self, offset: u64) -> u64 {
        offset & !(self.cluster_size() - 1)
    }

    /// Number of clusters needed for `bytes`.
    pub const fn clusters_for(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.cluster_size())
    }

    /// L1 index of a guest offset.
    pub const fn l1_index(&self, guest: u64) -> u64 {
        guest >> (self.l2_bits() + self.cluster_bits)
    }

    /// L2 index of a guest offset.
    pub const fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & (self.l2_entries() - 1)
    }

    /// L1 entries needed for a disk of `size` bytes.
    pub const fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }

    /// Bit position of the sector count in a compressed L2 descriptor.
    pub const fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Mask of the sector count in a compressed descriptor (after shifting).
    pub const fn csize_mask(&self) -> u64 {
        (1 << (self.cluster_bits - 8)) - 1
    }

    /// Mask of the host offset in a compressed descriptor.
    pub const fn compressed_offset_mask(&self) -> u64 {
        (1 << self.csize_shift()) - 1
    }

    /// Subcluster index within its cluster.
    pub const fn subcluster_index(&self, guest: u64) -> u32 {
        (self.offset_in_cluster(guest) / self.subcluster_size()) as u32
    }
}

/// A decoded L2 entry (with its subcluster bitmap when extended L2 is on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry {
    /// The first 64 bits.
    pub raw: u64,
    /// The subcluster bitmap (0 without extended L2).
    pub bitmap: u64,
}

/// The type of one subcluster (of the whole cluster without extended L2), as QEMU
/// classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScType {
    /// Data at the entry's host cluster.
    Normal,
    /// Compressed data.
    Compressed,
    /// Reads as zeroes, no host cluster.
    ZeroPlain,
    /// Reads as zeroes, with a preallocated host cluster.
    ZeroAlloc,
    /// Unallocated, no host cluster.
    UnallocatedPlain,
    /// Unallocated subcluster of a cluster that has a host cluster.
    UnallocatedAlloc,
    /// The entry contradicts itself.
    Invalid,
}

impl ScType {
    /// Whether reads come from the backing file (or are zero without one).
    pub fn is_unallocated(self) -> bool {
        matches!(self, ScType::UnallocatedPlain | ScType::UnallocatedAlloc)
    }

    /// Whether reads return zeroes.
    pub fn is_zero(self) -> bool {
        matches!(self, ScType::ZeroPlain | ScType::ZeroAlloc)
    }

    /// Whether the entry's host offset is meaningful for this subcluster.
    pub fn has_host(self) -> bool {
        matches!(
            self,
            ScType::Normal | ScType::ZeroAlloc | ScType::UnallocatedAlloc
        )
    }
}

/// The type of a whole cluster, as QEMU classifies L2 entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterType {
    /// Not allocated.
    Unallocated,
    /// Zero flag without host cluster.
    ZeroPlain,
    /// Zero flag with host cluster.
    ZeroAlloc,
    /// Host cluster.
    Normal,
    /// Compressed.
    Compressed,
}

/// Bits of the subcluster bitmap marking every subcluster allocated.
pub const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Bits of the subcluster bitmap marking every subcluster zero.
pub const BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// Allocation bits for subclusters `[from, to)`.
pub fn sub_alloc_range(from: u32, to: u32) -> u64 {
    if to <= from {
        return 0;
    }
    let n = to - from;
    let ones = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    (ones << from) & BITMAP_ALL_ALLOC
}

/// Zero bits for subclusters `[from, to)`.
pub fn sub_zero_range(from: u32, to: u32) -> u64 {
    sub_alloc_range(from, to) << 32
}

impl L2Entry {
    /// An unallocated entry.
    pub const UNALLOCATED: L2Entry = L2Entry { raw: 0, bitmap: 0 };

    /// Whether the entry describes a compressed cluster.
    pub fn is_compressed(&self) -> bool {
        self.raw & OFLAG_COMPRESSED != 0
    }

    /// Host cluster offset of a standard entry (0 if none).
    pub fn host_offset(&self) -> u64 {
        self.raw & L2E_OFFSET_MASK
    }

    /// Whether the COPIED flag is set.
    pub fn copied(&self) -> bool {
        self.raw & OFLAG_COPIED != 0
    }

    /// The cluster type (ignoring subclusters).
    pub fn cluster_type(&self, extended_l2: bool, external_data: bool) -> ClusterType {
        if self.is_compressed() {
            ClusterType::Compressed
        } else if self.raw & OFLAG_ZERO != 0 && !extended_l2 {
            if self.host_offset() != 0 {
                ClusterType::ZeroAlloc
            } else {
                ClusterType::ZeroPlain
            }
        } else if self.host_offset() == 0 {
            if external_data && self.copied() {
                ClusterType::Normal
            } else {
                ClusterType::Unallocated
            }
        } else {
            ClusterType::Normal
        }
    }

    /// The type of subcluster `sc` (of the whole cluster without extended L2).
    pub fn sc_type(&self, geo: &Geometry, sc: u32, external_data: bool) -> ScType {
        let ct = self.cluster_type(geo.extended_l2, external_data);
        if !geo.extended_l2 {
            return match ct {
                ClusterType::Compressed => ScType::Compressed,
                ClusterType::ZeroPlain => ScType::ZeroPlain,
                ClusterType::ZeroAlloc => ScType::ZeroAlloc,
                ClusterType::Normal => ScType::Normal,
                ClusterType::Unallocated => ScType::UnallocatedPlain,
            };
        }
        let alloc = (self.bitmap >> sc) & 1 != 0;
        let zero = (self.bitmap >> (32 + sc)) & 1 != 0;
        match ct {
            ClusterType::Compressed => ScType::Compressed,
            ClusterType::Normal => {
                if (self.bitmap >> 32) & self.bitmap & BITMAP_ALL_ALLOC != 0 {
                    ScType::Invalid
                } else if zero {
                    ScType::ZeroAlloc
                } else if alloc {
                    ScType::Normal
                } else {
                    ScType::UnallocatedAlloc
                }
            }
            ClusterType::Unallocated => {
                if self.bitmap & BITMAP_ALL_ALLOC != 0 {
                    ScType::Invalid
                } else if zero {
                    ScType::ZeroPlain
                } else {
                    ScType::UnallocatedPlain
                }
            }
            // Not reachable with extended L2 (the zero flag is unused there).
            ClusterType::ZeroPlain | ClusterType::ZeroAlloc => ScType::Invalid,
        }
    }

    /// Number of subclusters from `sc` on with the same type (the whole rest of the
    /// cluster without extended L2, or for compressed clusters).
    pub fn sc_run(&self, geo: &Geometry, sc: u32, external_data: bool) -> (ScType, u32) {
        let t = self.sc_type(geo, sc, external_data);
        if t == ScType::Invalid || !geo.extended_l2 || t == ScType::Compressed {
            let n = if geo.extended_l2 { SUBCLUSTERS - sc } else { 1 };
            return (t, n);
        }
        let mut n = 1;
        while sc + n < SUBCLUSTERS && self.sc_type(geo, sc + n, external_data) == t {
            n += 1;
        }
        (t, n)
    }

    /// For compressed entries: the first host sector and the byte length to free.
    pub fn compressed_extent(&self, geo: &Geometry) -> (u64, u64) {
        let host = self.raw & geo.compressed_offset_mask();
        let sectors = ((self.raw >> geo.csize_shift()) & geo.csize_mask()) + 1;
        (host & !511, sectors * 512)
    }
}

/// Reads a big-endian u64 at `at`.
pub fn be64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Reads a big-endian u32 at `at`.
pub fn be32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_be_bytes(b)
}

/// Reads a big-endian u16 at `at`.
pub fn be16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

/// Writes a big-endian u64 at `at`.
pub fn put_be64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u32 at `at`.
pub fn put_be32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes a big-endian u16 at `at`.
pub fn put_be16(buf: &mut [u8], at: usize, v: u16) {
    buf[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_default_image() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
        };
        assert_eq!(g.l2_entries(), 8192);
        assert_eq!(g.l2_coverage(), 512 << 20);
        assert_eq!(g.l1_entries_for(1 << 30), 2);
        assert_eq!(g.refblock_entries(), 32768);
        assert_eq!(g.csize_shift(), 54);
    }

    #[test]
    fn compressed_descriptor() {
        let g = Geometry {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
        };
        let e = L2Entry {
            raw: OFLAG_COMPRESSED | (2 << g.csize_shift()) | 0x50123,
            bitmap: 0,
        };
        assert_eq!(e.sc_type(&g, 0, false), ScType::Compressed);
        assert_eq!(e.compressed_extent(&g), (0x50000, 1536));
    }
}
