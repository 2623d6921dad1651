//! The qcow2 header and its extensions: parsing with the checks QEMU makes, and
//! serialisation in QEMU's layout (fixed header, extensions in QEMU's order, end marker,
//! then the backing file name).

use crate::error::{Error, Result};

use super::types::*;

/// Header extension types.
pub mod ext {
    /// Backing file format name.
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Bitmaps.
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// The bitmaps extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Directory offset.
    pub directory_offset: u64,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name.
    pub name: String,
}

/// An in-memory qcow2 header with its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Active L1 entries.
    pub l1_size: u32,
    /// Active L1 offset.
    pub l1_table_offset: u64,
    /// Refcount table offset.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Snapshot count.
    pub nb_snapshots: u32,
    /// Snapshot table offset.
    pub snapshots_offset: u64,
    /// Incompatible features.
    pub incompatible_features: u64,
    /// Compatible features.
    pub compatible_features: u64,
    /// Auto-clear features.
    pub autoclear_features: u64,
    /// log2 of refcount bits.
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Compression type byte.
    pub compression_type: u8,
    /// Header bytes past the fields rqemu knows (preserved on rewrite).
    pub extra_fields: Vec<u8>,
    /// Backing file name offset as read (0: none).
    pub backing_file_offset: u64,
    /// Backing file name length as read.
    pub backing_file_size: u32,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing format extension.
    pub backing_format: Option<String>,
    /// External data file name extension.
    pub data_file: Option<String>,
    /// Feature name table as read.
    pub feature_table: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Encryption header pointer (offset, length).
    pub crypto_header: Option<(u64, u64)>,
    /// Extensions rqemu does not know, kept as they were.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

/// Length of a version 2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header rqemu writes (with the compression type and padding).
pub const V3_HEADER_LEN: u32 = 112;

/// The feature names QEMU writes into every v3 image.
pub fn standard_feature_table() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.to_string(),
    };
    vec![
        f(0, 0, "dirty bit"),
        f(0, 1, "corrupt bit"),
        f(0, 2, "external data file"),
        f(0, 3, "compression type"),
        f(0, 4, "extended L2 entries"),
        f(1, 0, "lazy refcounts"),
        f(2, 0, "bitmaps"),
        f(2, 1, "raw external data"),
    ]
}

impl Header {
    /// A fresh header for `create`.
    pub fn new(version: u32, cluster_bits: u32, refcount_order: u32) -> Header {
        Header {
            version,
            cluster_bits,
            size: 0,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            header_length: if version >= 3 {
                V3_HEADER_LEN
            } else {
                V2_HEADER_LEN
            },
            compression_type: 0,
            extra_fields: Vec::new(),
            backing_file_offset: 0,
            backing_file_size: 0,
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_table: Vec::new(),
            bitmaps: None,
            crypto_header: None,
            unknown_extensions: Vec::new(),
        }
    }

    /// Parses the fixed header at the start of `buf` with QEMU's checks. Extensions and
    /// the backing file name are read separately ([`Self::parse_extensions`],
    /// [`Self::parse_backing_name`]) so errors come in QEMU's order.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize || be32(buf, 0) != MAGIC {
            return Err(Error::invalid("Image is not in qcow2 format"));
        }
        let version = be32(buf, 4);
        if !(2..=3).contains(&version) {
            return Err(Error::unsupported(format!(
                "Unsupported qcow2 version {version}"
            )));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "Unsupported cluster size: 2^{cluster_bits}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header::new(version, cluster_bits, 4);
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        h.size = be64(buf, 24);
        h.crypt_method = be32(buf, 32);
        h.l1_size = be32(buf, 36);
        h.l1_table_offset = be64(buf, 40);
        h.refcount_table_offset = be64(buf, 48);
        h.refcount_table_clusters = be32(buf, 56);
        h.nb_snapshots = be32(buf, 60);
        h.snapshots_offset = be64(buf, 64);
        if version == 2 {
            h.header_length = V2_HEADER_LEN;
        } else {
            if buf.len() < 104 {
                return Err(Error::invalid("qcow2 header too short"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 {
                return Err(Error::invalid("qcow2 header too short"));
            }
            if h.header_length as u64 > cluster_size {
                return Err(Error::invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length as usize > buf.len() {
                return Err(Error::invalid("qcow2 header exceeds cluster size"));
            }
            if h.header_length > 104 {
                h.compression_type = buf[104];
                if h.header_length > 105 {
                    h.extra_fields = buf[105..h.header_length as usize].to_vec();
                }
            }
        }
        if backing_file_offset > cluster_size {
            return Err(Error::invalid("Invalid backing file offset"));
        }
        h.backing_file_offset = backing_file_offset;
        h.backing_file_size = backing_file_size;
        Ok(h)
    }

    /// Where the extension area ends.
    pub fn extensions_end(&self) -> usize {
        if self.backing_file_offset != 0 {
            self.backing_file_offset as usize
        } else {
            1usize << self.cluster_bits
        }
    }

    /// Reads the backing file name from the header cluster.
    pub fn parse_backing_name(&mut self, buf: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let cluster_size = 1u64 << self.cluster_bits;
        let len = self.backing_file_size as u64;
        if len > MAX_BACKING_NAME as u64 || len > cluster_size - self.backing_file_offset {
            return Err(Error::invalid("Backing file name too long"));
        }
        let start = self.backing_file_offset as usize;
        let name = buf
            .get(start..start + len as usize)
            .ok_or_else(|| Error::invalid("Backing file name too long"))?;
        self.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        Ok(())
    }

    /// Parses the header extensions (the area from the header's end to `end`).
    pub fn parse_extensions(&mut self, buf: &[u8], end: usize) -> Result<()> {
        let mut pos = self.header_length as usize;
        let end = end.min(buf.len());
        loop {
            // The area may end without an end marker.
            if pos >= end {
                break;
            }
            if pos + 8 > end {
                return Err(Error::invalid("Header extension too large"));
            }
            let kind = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            pos += 8;
            if len > end - pos {
                return Err(Error::invalid("Header extension too large"));
            }
            if kind == 0 {
                break;
            }
            let data = &buf[pos..pos + len];
            match kind {
                ext::BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(Error::invalid(format!(
                            "ERROR: ext_backing_format: len={len} too large (>={})",
                            16
                        )));
                    }
                    self.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                ext::FEATURE_TABLE => {
                    // Entries are 48 bytes; a short last entry reads as zero-padded, and
                    // an entry without a name ends the table (as QEMU reads it).
                    let mut padded = data.to_vec();
                    padded.resize(data.len().div_ceil(48) * 48, 0);
                    self.feature_table = padded
                        .chunks_exact(48)
                        .map(|c| {
                            let name_end = c[2..].iter().position(|&b| b == 0).unwrap_or(46);
                            FeatureName {
                                kind: c[0],
                                bit: c[1],
                                name: String::from_utf8_lossy(&c[2..2 + name_end]).into_owned(),
                            }
                        })
                        .take_while(|f| !f.name.is_empty())
                        .collect();
                }
                ext::BITMAPS => {
                    if len != 24 {
                        return Err(Error::invalid("bitmaps_ext: Invalid extension length"));
                    }
                    self.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                ext::CRYPTO => {
                    if self.crypt_method != 2 {
                        return Err(Error::invalid(
                            "CRYPTO header extension only expected with LUKS encryption method",
                        ));
                    }
                    if len != 16 {
                        return Err(Error::invalid(format!(
                            "CRYPTO header extension size {len}, but expected size 16"
                        )));
                    }
                    let off = be64(data, 0);
                    let cs = 1u64 << self.cluster_bits;
                    if !off.is_multiple_of(cs) {
                        return Err(Error::invalid(format!(
                            "Encryption header offset '{off}' is not a multiple of cluster size '{cs}'"
                        )));
                    }
                    self.crypto_header = Some((off, be64(data, 8)));
                }
                ext::DATA_FILE => {
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                _ => self.unknown_extensions.push((kind, data.to_vec())),
            }
            pos += len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Serialises the header cluster: header, extensions, end marker, backing name.
    /// Fails if it does not fit into one cluster.
    pub fn serialize(&self) -> Result<Vec<u8>> {
        // QEMU writes the feature name table only into header clusters of 8 KiB or more,
        // keeping small clusters free for other extensions.
        self.serialize_with(self.cluster_bits >= 13)
    }

    fn serialize_with(&self, feature_table: bool) -> Result<Vec<u8>> {
        let cluster_size = 1usize << self.cluster_bits;
        let mut b = vec![0u8; self.header_length.max(V2_HEADER_LEN) as usize];
        put_be32(&mut b, 0, MAGIC);
        put_be32(&mut b, 4, self.version);
        put_be32(&mut b, 20, self.cluster_bits);
        put_be64(&mut b, 24, self.size);
        put_be32(&mut b, 32, self.crypt_method);
        put_be32(&mut b, 36, self.l1_size);
        put_be64(&mut b, 40, self.l1_table_offset);
        put_be64(&mut b, 48, self.refcount_table_offset);
        put_be32(&mut b, 56, self.refcount_table_clusters);
        put_be32(&mut b, 60, self.nb_snapshots);
        put_be64(&mut b, 64, self.snapshots_offset);
        if self.version >= 3 {
            put_be64(&mut b, 72, self.incompatible_features);
            put_be64(&mut b, 80, self.compatible_features);
            put_be64(&mut b, 88, self.autoclear_features);
            put_be32(&mut b, 96, self.refcount_order);
            put_be32(&mut b, 100, self.header_length);
            if self.header_length > 104 {
                b[104] = self.compression_type;
                let extra_end = (105 + self.extra_fields.len()).min(b.len());
                b[105..extra_end].copy_from_slice(&self.extra_fields[..extra_end - 105]);
            }
        }
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, ext::BACKING_FORMAT, f.as_bytes());
        }
        if let Some((off, len)) = self.crypto_header {
            let mut d = [0u8; 16];
            put_be64(&mut d, 0, off);
            put_be64(&mut d, 8, len);
            push_ext(&mut b, ext::CRYPTO, &d);
        }
        if let Some(f) = &self.data_file {
            push_ext(&mut b, ext::DATA_FILE, f.as_bytes());
        }
        if self.version >= 3 && feature_table {
            let mut d = Vec::new();
            for f in standard_feature_table() {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                e[2..2 + f.name.len()].copy_from_slice(f.name.as_bytes());
                d.extend_from_slice(&e);
            }
            push_ext(&mut b, ext::FEATURE_TABLE, &d);
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = [0u8; 24];
            put_be32(&mut d, 0, bm.nb_bitmaps);
            put_be64(&mut d, 8, bm.directory_size);
            put_be64(&mut d, 16, bm.directory_offset);
            push_ext(&mut b, ext::BITMAPS, &d);
        }
        for (kind, data) in &self.unknown_extensions {
            push_ext(&mut b, *kind, data);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let off = b.len();
            b.extend_from_slice(name.as_bytes());
            put_be64(&mut b, 8, off as u64);
            put_be32(&mut b, 16, name.len() as u32);
        }
        if b.len() > cluster_size {
            return Err(Error::other(
                "Header does not fit into the first cluster",
                libc::ENOSPC,
            ));
        }
        Ok(b)
    }

    /// The image's geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            cluster_bits: self.cluster_bits,
            extended_l2: self.incompatible_features & incompat::EXTL2 != 0,
            refcount_order: self.refcount_order,
        }
    }

    /// Name of an incompatible feature bit, from the image's table or rqemu's own.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<String> {
        self.feature_table
            .iter()
            .chain(standard_feature_table().iter())
            .find(|f| f.kind == kind && f.bit == bit)
            .map(|f| f.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_extensions() {
        let mut h = Header::new(3, 16, 4);
        h.size = 1 << 30;
        h.l1_size = 2;
        h.l1_table_offset = 0x30000;
        h.refcount_table_offset = 0x10000;
        h.refcount_table_clusters = 1;
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        let bytes = h.serialize().unwrap();
        let mut cluster = vec![0u8; 65536];
        cluster[..bytes.len()].copy_from_slice(&bytes);
        let mut back = Header::parse(&cluster).unwrap();
        let end = back.extensions_end();
        back.parse_extensions(&cluster, end).unwrap();
        back.parse_backing_name(&cluster).unwrap();
        back.backing_file_offset = 0;
        back.backing_file_size = 0;
        back.feature_table.clear();
        // The seven padding bytes after compression_type come back as extra fields.
        assert_eq!(back.extra_fields, vec![0u8; 7]);
        back.extra_fields.clear();
        assert_eq!(back, h);
        // QEMU puts the backing format first and the name after the end marker.
        assert_eq!(be32(&bytes, 112), ext::BACKING_FORMAT);
        assert_eq!(be64(&bytes, 8), 0x210);
    }

    #[test]
    fn refuses_bad_magic_and_version() {
        assert!(Header::parse(&[0u8; 512]).is_err());
        let mut b = vec![0u8; 512];
        put_be32(&mut b, 0, MAGIC);
        put_be32(&mut b, 4, 4);
        assert!(matches!(Header::parse(&b), Err(Error::Unsupported(_))));
    }
}
