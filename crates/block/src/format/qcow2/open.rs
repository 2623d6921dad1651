//! Opening a qcow2 image: the header checks QEMU makes (in QEMU's order, with its
//! messages), loading the L1 and refcount tables and the snapshot table, and repairing
//! an image left dirty by lazy refcounts.

use rqemu_opts::KeyVal;

use crate::buffer::AlignedBuf;
use crate::error::{Error, Result};
use crate::node::NodeRef;

use super::cache::TableCache;
use super::header::Header;
use super::meta::Meta;
use super::runtime_opts::RuntimeOptions;
use super::snapshot;
use super::types::*;

/// Options of a qcow2 node (the QEMU runtime options rqemu honours).
#[derive(Clone, Default)]
pub struct Qcow2Options {
    /// Open for reading only.
    pub read_only: bool,
    /// Ignore flushes (`cache=unsafe`).
    pub no_flush: bool,
    /// Opened by `check`: corrupt images may be opened for repair, no repair on open.
    pub check: bool,
    /// Only metadata will be read: the data file need not be there.
    pub no_io: bool,
    /// External data file node (opened by the caller), when the image uses one.
    pub data_file: Option<NodeRef>,
    /// The runtime options (`lazy-refcounts`, caches, overlap check, discards).
    pub runtime: RuntimeOptions,
    /// `encrypt.key-secret`: the id of the secret that unlocks an encrypted image.
    pub key_secret: Option<String>,
    /// `encrypt.format`, checked against the header.
    pub encrypt_format: Option<String>,
}

impl Qcow2Options {
    /// Takes the qcow2 runtime options out of `kv` (unknown keys are left for the caller
    /// to report).
    pub fn take_from(kv: &mut KeyVal) -> Result<Qcow2Options> {
        Ok(Qcow2Options {
            runtime: RuntimeOptions::take_from(kv)?,
            key_secret: kv.take("encrypt.key-secret"),
            encrypt_format: kv.take("encrypt.format"),
            ..Default::default()
        })
    }
}

/// QEMU's table validation: the table must fit below 2^63 and start on a cluster.
pub(super) fn table_offset_valid(
    geo: &Geometry,
    offset: u64,
    entries: u64,
    entry_len: u64,
) -> bool {
    let Some(size) = entries.checked_mul(entry_len) else {
        return false;
    };
    if size > i64::MAX as u64 || (i64::MAX as u64 - size) < offset {
        return false;
    }
    geo.offset_in_cluster(offset) == 0
}

/// Names of the unknown incompatible features set, as QEMU reports them.
fn unsupported_features(h: &Header, unknown: u64) -> String {
    let mut parts = Vec::new();
    let mut rest = unknown;
    for f in &h.feature_table {
        if f.kind == 0 && f.bit < 64 && rest & (1 << f.bit) != 0 {
            parts.push(f.name.clone());
            rest &= !(1 << f.bit);
        }
    }
    if rest != 0 {
        parts.push(format!("Unknown incompatible feature: {rest:x}"));
    }
    parts.join(", ")
}

/// Reads and validates the metadata of the image in `file`.
pub(super) async fn load(file: &NodeRef, opts: &Qcow2Options) -> Result<Meta> {
    let mut first = AlignedBuf::io(4096);
    file.read(0, &mut first)
        .await
        .map_err(|e| Error::other(format!("Could not read qcow2 header: {e}"), e.errno_value()))?;
    let mut h = Header::parse(&first)?;
    let cs = h.geometry().cluster_size();
    let mut cluster0 = first;
    if cs > 4096 {
        cluster0 = AlignedBuf::io(cs as usize);
        file.read(0, &mut cluster0).await?;
        h = Header::parse(&cluster0)?;
    }
    if h.incompatible_features & !incompat::KNOWN != 0 {
        // Read the feature names (ignoring other extension errors) for the message.
        let mut probe = h.clone();
        let end = probe.extensions_end();
        let _ = probe.parse_extensions(&cluster0, end);
        return Err(Error::unsupported(format!(
            "Unsupported qcow2 feature(s): {}",
            unsupported_features(&probe, h.incompatible_features & !incompat::KNOWN)
        )));
    }
    if h.incompatible_features & incompat::CORRUPT != 0 && !opts.read_only && !opts.check {
        return Err(Error::Permission {
            msg: "qcow2: Image is corrupt; cannot be opened read/write".into(),
            errno: libc::EACCES,
        });
    }
    if h.incompatible_features & incompat::EXTL2 != 0 && h.cluster_bits < 14 {
        return Err(Error::invalid(
            "The cluster size must be at least 16 KiB for images with extended L2 entries",
        ));
    }
    if h.refcount_order > 6 {
        return Err(Error::invalid(
            "Reference count entry width too large; may not exceed 64 bits",
        ));
    }
    let geo = h.geometry();
    if CompressionType::from_byte(h.compression_type).is_none() {
        return Err(Error::unsupported(format!(
            "qcow2: unknown compression type: {}",
            h.compression_type
        )));
    }
    let compression_bit = h.incompatible_features & incompat::COMPRESSION != 0;
    if h.compression_type == 0 && compression_bit {
        return Err(Error::invalid(
            "qcow2: Compression type incompatible feature bit must not be set",
        ));
    }
    if h.compression_type != 0 && !compression_bit {
        return Err(Error::invalid(
            "qcow2: Compression type incompatible feature bit must be set",
        ));
    }
    if h.crypt_method > 2 {
        return Err(Error::invalid(format!(
            "Unsupported encryption method: {}",
            h.crypt_method
        )));
    }
    let header_format = match h.crypt_method {
        1 => Some("aes"),
        2 => Some("luks"),
        _ => None,
    };
    match (header_format, opts.encrypt_format.as_deref()) {
        (None, Some(f)) => {
            return Err(Error::invalid(format!(
                "No encryption in image header, but options specified format '{f}'"
            )))
        }
        (Some(hf), Some(f)) if hf != f => {
            return Err(Error::invalid(format!(
                "Header reported '{hf}' encryption format but options specify '{f}'"
            )))
        }
        _ => {}
    }
    if h.refcount_table_clusters == 0 && !opts.check {
        return Err(Error::invalid(
            "Image does not contain a reference count table",
        ));
    }
    if h.refcount_table_clusters as u64 > MAX_REFTABLE_BYTES / cs {
        return Err(Error::invalid("Reference count table too large"));
    }
    if !table_offset_valid(
        &geo,
        h.refcount_table_offset,
        h.refcount_table_clusters as u64,
        cs,
    ) {
        return Err(Error::invalid("Reference count table offset invalid"));
    }
    // In check mode the snapshot table is examined (and repaired) by the check itself.
    if !opts.check {
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::invalid("Snapshot table too large"));
        }
        if !table_offset_valid(&geo, h.snapshots_offset, h.nb_snapshots as u64, 40) {
            return Err(Error::invalid("Snapshot table offset invalid"));
        }
    }
    if h.l1_size as u64 > MAX_L1_BYTES / 8 {
        return Err(Error::invalid("Active L1 table too large"));
    }
    let vm_state_index = geo.l1_entries_for(h.size);
    if vm_state_index > i32::MAX as u64 {
        return Err(Error::invalid("Image is too big"));
    }
    if (h.l1_size as u64) < vm_state_index {
        return Err(Error::invalid("L1 table is too small"));
    }
    if !table_offset_valid(&geo, h.l1_table_offset, h.l1_size as u64, 8) {
        return Err(Error::invalid("Active L1 table offset invalid"));
    }
    let l1 = read_u64_table(file, h.l1_table_offset, h.l1_size as u64)
        .await
        .map_err(|e| Error::other(format!("Could not read L1 table: {e}"), e.errno_value()))?;
    let reftable_entries = h.refcount_table_clusters as u64 * cs / 8;
    let reftable = read_u64_table(file, h.refcount_table_offset, reftable_entries)
        .await
        .map_err(|e| {
            Error::other(
                format!("Could not initialize refcount handling: {e}"),
                e.errno_value(),
            )
        })?;
    let end = h.extensions_end();
    h.parse_extensions(&cluster0, end)?;
    if h.crypt_method == 2 && h.crypto_header.is_none() {
        return Err(Error::invalid(format!(
            "Missing CRYPTO header for crypt method {}",
            h.crypt_method
        )));
    }
    let has_data_file = h.incompatible_features & incompat::DATA_FILE != 0;
    if !has_data_file && opts.data_file.is_some() {
        return Err(Error::invalid(
            "'data-file' can only be set for images with an external data file",
        ));
    }
    if h.autoclear_features & autoclear::DATA_FILE_RAW != 0 && !has_data_file {
        return Err(Error::invalid("data-file-raw requires a data file"));
    }
    h.parse_backing_name(&cluster0)?;
    let mut snapshot_extent = 0;
    let snapshots = if opts.check {
        Vec::new()
    } else {
        let t =
            snapshot::read_table(file, h.snapshots_offset, h.nb_snapshots, h.size, false).await?;
        snapshot_extent = t.extent;
        t.snapshots
    };

    let rt = opts.runtime.resolve(&geo, h.size)?;
    let l2_bytes = rt.l2_cache_size.unwrap_or_else(|| {
        // QEMU's default: enough to cover the whole disk, at most 32 MiB.
        let needed = vm_state_index * cs;
        needed.clamp(2 * cs, 32 << 20)
    });
    let rb_bytes = rt.refcount_cache_size.unwrap_or((l2_bytes / 4).max(4 * cs));
    let lazy = opts
        .runtime
        .lazy_refcounts
        .unwrap_or(h.compatible_features & compat::LAZY_REFCOUNTS != 0);
    if lazy && h.version < 3 && !opts.read_only {
        return Err(Error::invalid(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level",
        ));
    }
    let mut meta = Meta {
        geo,
        file: file.clone(),
        l1,
        reftable,
        max_reftable_index: 0,
        l2_cache: TableCache::new((l2_bytes / cs) as usize),
        rb_cache: TableCache::new((rb_bytes / cs) as usize),
        free_cluster_index: 0,
        free_byte_offset: 0,
        l2_after_refcounts: false,
        refcounts_after_l2: false,
        data_unflushed: false,
        file_dirty: false,
        no_flush: opts.no_flush,
        snapshots,
        lazy_refcounts: lazy,
        discard_passthrough: [
            // QCOW2_DISCARD_ALWAYS: freed bitmap data, shrunk L1 ranges, check repairs.
            true,
            opts.runtime.pass_discard[0].unwrap_or(true),
            opts.runtime.pass_discard[1].unwrap_or(true),
            opts.runtime.pass_discard[2].unwrap_or(false),
        ],
        pending_discards: Vec::new(),
        pending_data_discards: Vec::new(),
        data_file: opts.data_file.clone(),
        cache_discards: false,
        read_only: opts.read_only,
        dead: false,
        corruption_reported: false,
        inflight: Vec::new(),
        next_alloc_id: 0,
        has_backing: false,
        snapshots_checked: false,
        snapshot_extent,
        overlap: super::overlap::OverlapIndex::with_mask(rt.overlap_mask),
        h,
    };
    meta.update_max_reftable_index();
    Ok(meta)
}

/// Reads `entries` big-endian u64s at `offset`.
pub(super) async fn read_u64_table(file: &NodeRef, offset: u64, entries: u64) -> Result<Vec<u64>> {
    let bytes = entries * 8;
    let mut buf = AlignedBuf::io(bytes.div_ceil(512) as usize * 512);
    file.read(offset, &mut buf[..bytes as usize]).await?;
    Ok(buf[..bytes as usize]
        .chunks_exact(8)
        .map(|c| be64(c, 0))
        .collect())
}
