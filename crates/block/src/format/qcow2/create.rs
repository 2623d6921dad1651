//! Creating qcow2 images the way QEMU lays them out: header in cluster 0, refcount
//! table in cluster 1, its first refcount block in cluster 2, then the L1 table, so that
//! `qemu-img info`, `check` and `map` see the same image QEMU would have made.

use std::sync::Arc;

use crate::buffer::AlignedBuf;
use crate::create::CreateOptions;
use crate::error::{Error, Result};
use crate::node::{BlockDriver, NodeRef, Prealloc, WriteFlags};
use crate::perm::{Perm, PermRequest};
use crate::protocol::file::{FileNode, FileOptions};

use super::header::Header;
use super::types::*;
use super::{Qcow2, Qcow2Options};

/// The validated parameters of a qcow2 creation.
#[derive(Debug, Clone)]
pub struct Qcow2CreateParams {
    /// Virtual size.
    pub size: u64,
    /// 2 or 3.
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// Extended L2 entries.
    pub extended_l2: bool,
    /// Compression type.
    pub compression: CompressionType,
    /// Preallocation.
    pub prealloc: Prealloc,
    /// Backing file name and format.
    pub backing: Option<(String, Option<String>)>,
    /// External data file name.
    pub data_file: Option<String>,
    /// The data file stays a valid raw image.
    pub data_file_raw: bool,
    /// Encryption of guest data.
    pub encryption: Option<super::crypt::CreateEncryption>,
}

impl Qcow2CreateParams {
    /// Reads and validates creation options with QEMU's checks and messages.
    pub fn from_options(o: &CreateOptions) -> Result<Qcow2CreateParams> {
        let version = match o.get("compat") {
            None => 3,
            Some("0.10") | Some("v2") => 2,
            Some("1.1") | Some("v3") => 3,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "Parameter 'version' does not accept value '{v}'"
                )))
            }
        };
        let prealloc = match o.get("preallocation") {
            None => Prealloc::Off,
            Some(v) => Prealloc::parse(v).ok_or_else(|| {
                Error::invalid(format!(
                    "Parameter 'preallocation' does not accept value '{v}'"
                ))
            })?,
        };
        let compression = match o.get("compression_type") {
            None => CompressionType::Zlib,
            Some(v) => CompressionType::parse(v).ok_or_else(|| {
                Error::invalid(format!(
                    "Parameter 'compression-type' does not accept value '{v}'"
                ))
            })?,
        };
        let encryption = super::crypt::create_options(o)?;
        let size = o
            .get_size("size")
            .ok_or_else(|| Error::invalid("Image creation needs a size parameter"))?
            .div_ceil(512)
            * 512;
        let extended_l2 = o.get_bool("extended_l2").unwrap_or(false);
        let cluster_size = o.get_size("cluster_size").unwrap_or(65536);
        if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
            return Err(Error::invalid(
                "Cluster size must be a power of two between 512 and 2048k",
            ));
        }
        if extended_l2 && cluster_size < 16384 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
            ));
        }
        let backing_file = o.get("backing_file").map(str::to_string);
        if backing_file.as_deref() == Some("") {
            return Err(Error::invalid(
                "Expected backing file name, got empty string",
            ));
        }
        let backing_fmt = o.get("backing_fmt").map(str::to_string);
        if backing_file.is_some() && prealloc != Prealloc::Off && !extended_l2 {
            return Err(Error::invalid(
                "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            ));
        }
        if backing_fmt.is_some() && backing_file.is_none() {
            return Err(Error::invalid(
                "Backing format cannot be used without backing file",
            ));
        }
        let lazy_refcounts = o.get_bool("lazy_refcounts").unwrap_or(false);
        if version < 3 && lazy_refcounts {
            return Err(Error::invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        let refcount_bits = o
            .get("refcount_bits")
            .map(|v| crate::create::parse_number(v).unwrap_or(0))
            .unwrap_or(16);
        if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
            return Err(Error::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if version < 3 && refcount_bits != 16 {
            return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)",
            ));
        }
        let data_file = o.get("data_file").map(str::to_string);
        let data_file_raw = o.get_bool("data_file_raw").unwrap_or(false);
        if data_file.is_none() && data_file_raw {
            return Err(Error::invalid("data-file-raw requires data-file"));
        }
        if backing_file.is_some() && data_file_raw {
            return Err(Error::invalid(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        let prealloc = if data_file_raw && prealloc == Prealloc::Metadata {
            Prealloc::Full
        } else {
            prealloc
        };
        if version < 3 && data_file.is_some() {
            return Err(Error::invalid(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if version < 3 && compression != CompressionType::Zlib {
            return Err(Error::invalid(
                "Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if version < 3 && extended_l2 {
            return Err(Error::invalid(
                "Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        Ok(Qcow2CreateParams {
            size,
            version,
            cluster_size,
            refcount_bits,
            lazy_refcounts,
            extended_l2,
            compression,
            prealloc,
            backing: backing_file.map(|f| (f, backing_fmt)),
            data_file,
            data_file_raw,
            encryption,
        })
    }
}

/// Opens (creating and emptying) a file for a new image, locked as QEMU locks it.
/// Creates the protocol node an image is laid out in: a new empty file, or an existing
/// NBD export of at least `size` bytes (NBD cannot create).
pub(crate) async fn create_protocol_node(filename: &str, size: u64) -> Result<NodeRef> {
    if crate::protocol::nbd::is_nbd_filename(filename) {
        return crate::protocol::nbd::create_existing(filename, size).await;
    }
    let file = create_file(filename)?;
    file.truncate(0, false, Prealloc::Off).await?;
    Ok(file)
}

pub(crate) fn create_file(filename: &str) -> Result<Arc<FileNode>> {
    let node = FileNode::open(&FileOptions {
        filename: filename.to_string(),
        read_only: false,
        cache: crate::options::CacheMode::WRITEBACK,
        aio: crate::options::AioMode::Threads,
        locking: true,
        create: true,
        driver: None,
    })
    .map_err(|e| match e {
        Error::Os { errno, .. } => Error::Os {
            context: Some(format!("Could not create '{filename}'")),
            errno,
        },
        other => other,
    })?;
    node.set_perm(PermRequest {
        perm: Perm::WRITE.or(Perm::RESIZE),
        shared: Perm(Perm::ALL.0 & !Perm::RESIZE.0),
    })?;
    Ok(Arc::new(node))
}

/// Creates a qcow2 image.
pub async fn create(filename: &str, o: &CreateOptions) -> Result<()> {
    let p = Qcow2CreateParams::from_options(o)?;
    let file_ref = create_protocol_node(filename, 0).await?;
    let data_ref: Option<NodeRef> = match &p.data_file {
        Some(d) => {
            // Like QEMU, the name is taken as it is (relative to the working directory).
            let df = create_file(d)?;
            df.truncate(0, false, Prealloc::Off).await?;
            Some(df)
        }
        None => None,
    };
    let r = create_on(&file_ref, data_ref.clone(), &p).await;
    let _ = file_ref.close().await;
    if let Some(d) = &data_ref {
        let _ = d.close().await;
    }
    r
}

/// Lays out a new image in `file` (which must be empty).
pub async fn create_on(
    file: &NodeRef,
    data_file: Option<NodeRef>,
    p: &Qcow2CreateParams,
) -> Result<()> {
    let cs = p.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let mut h = Header::new(p.version, cluster_bits, p.refcount_bits.trailing_zeros());
    h.refcount_table_offset = cs;
    h.refcount_table_clusters = 1;
    if p.lazy_refcounts {
        h.compatible_features |= compat::LAZY_REFCOUNTS;
    }
    if data_file.is_some() {
        h.incompatible_features |= incompat::DATA_FILE;
    }
    if p.data_file_raw {
        h.autoclear_features |= autoclear::DATA_FILE_RAW;
    }
    if p.compression != CompressionType::Zlib {
        h.incompatible_features |= incompat::COMPRESSION;
        h.compression_type = p.compression.byte();
    }
    if p.extended_l2 {
        h.incompatible_features |= incompat::EXTL2;
    }
    // A minimal header, then a refcount table with one (still empty) refcount block.
    let mut first = h.clone();
    first.version = p.version;
    let mut buf = AlignedBuf::io(cs as usize);
    let hb = minimal_header(&first);
    buf[..hb.len()].copy_from_slice(&hb);
    file.write(0, &buf, WriteFlags::NONE).await?;
    let mut rt = AlignedBuf::io(2 * cs as usize);
    put_be64(&mut rt, 0, 2 * cs);
    file.write(cs, &rt, WriteFlags::NONE).await?;

    let q = Qcow2::open(
        file.clone(),
        Qcow2Options {
            read_only: false,
            no_flush: true,
            data_file: data_file.clone(),
            ..Default::default()
        },
    )
    .await?;
    {
        let mut m = q.meta.lock().await;
        let off = m.alloc_clusters(3 * cs).await.map_err(|e| {
            Error::other(
                format!("Could not allocate clusters for qcow2 header and refcount table: {e}"),
                e.errno_value(),
            )
        })?;
        if off != 0 {
            return Err(Error::corrupt(
                "Huh, first cluster in empty image is already in use?",
            ));
        }
        if let Some(d) = &p.data_file {
            m.h.data_file = Some(d.clone());
        }
        m.write_header().await.map_err(|e| {
            Error::other(
                format!("Could not update qcow2 header: {e}"),
                e.errno_value(),
            )
        })?;
    }
    q.resize(p.size, p.prealloc)
        .await
        .map_err(|e| Error::other(format!("Could not resize image: {e}"), e.errno_value()))?;
    if let Some(d) = &data_file {
        if d.size() < p.size {
            let mode = if p.data_file_raw {
                p.prealloc
            } else {
                Prealloc::Off
            };
            let mode = if mode == Prealloc::Metadata {
                Prealloc::Off
            } else {
                mode
            };
            d.truncate(p.size, false, mode).await?;
        }
    }
    if let Some((name, fmt)) = &p.backing {
        q.change_backing_file(Some(name), fmt.as_deref())
            .await
            .map_err(|e| {
                Error::other(
                    format!(
                        "Could not assign backing file '{name}' with format '{}': {e}",
                        fmt.as_deref().unwrap_or("")
                    ),
                    e.errno_value(),
                )
            })?;
    }
    if let Some(enc) = &p.encryption {
        super::crypt::create(&q, file, enc).await?;
    }
    q.close().await?;
    file.flush().await?;
    Ok(())
}

/// The header fields written before the image is opened the first time.
fn minimal_header(h: &Header) -> Vec<u8> {
    let mut b = vec![0u8; 112];
    put_be32(&mut b, 0, MAGIC);
    put_be32(&mut b, 4, h.version);
    put_be32(&mut b, 20, h.cluster_bits);
    put_be64(&mut b, 48, h.refcount_table_offset);
    put_be32(&mut b, 56, h.refcount_table_clusters);
    put_be64(&mut b, 72, h.incompatible_features);
    put_be64(&mut b, 80, h.compatible_features);
    put_be64(&mut b, 88, h.autoclear_features);
    put_be32(&mut b, 96, h.refcount_order);
    put_be32(&mut b, 100, 112);
    b[104] = h.compression_type;
    b
}

impl Qcow2 {
    /// Rewrites the backing file name and format in the header.
    pub async fn change_backing_file(
        &self,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<()> {
        if name.is_some() && self.data_file_raw {
            return Err(Error::errno(libc::EINVAL));
        }
        if name.is_some_and(|n| n.len() > MAX_BACKING_NAME as usize) {
            return Err(Error::errno(libc::EINVAL));
        }
        let mut m = self.meta.lock().await;
        // What was copied into the image for the new backing file (rebase) must be
        // durable, with the tables that map it, before the header names that file: a
        // power cut in between would leave those clusters reading through it.
        m.flush_caches().await?;
        m.sync().await?;
        let old = (m.h.backing_file.clone(), m.h.backing_format.clone());
        m.h.backing_file = name.map(str::to_string);
        m.h.backing_format = if name.is_some() {
            format.map(str::to_string)
        } else {
            None
        };
        if let Err(e) = m.write_header().await {
            m.h.backing_file = old.0;
            m.h.backing_format = old.1;
            return Err(e);
        }
        Ok(())
    }
}
