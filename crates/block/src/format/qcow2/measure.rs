//! Size estimates for `measure`: how large a qcow2 file holding some data would be.
//!
//! The figures are QEMU's: a fully allocated image needs its header cluster, L2 tables
//! for every cluster, an L1 table, refcount structures for all of that (the fixed point
//! of [`refcount_metadata_clusters`]) and the data; an image converted from an input
//! needs the same metadata but only the clusters the input has data in. LUKS encryption
//! adds its header; persistent bitmaps of the input are reported separately.

use crate::create::CreateOptions;
use crate::error::{Error, Result};
use crate::node::NodeRef;
use crate::status::block_status_chain;

use super::refcount::refcount_metadata_clusters;

/// Bytes of an L1 entry.
const L1E_SIZE: u64 = 8;
/// Largest L1 table QEMU accepts, in bytes.
const MAX_L1_SIZE: u64 = 32 << 20;
/// Bytes of a bitmap table entry.
const BITMAP_TABLE_ENTRY_SIZE: u64 = 8;
/// Fixed part of a bitmap directory entry.
const BITMAP_DIR_ENTRY_SIZE: u64 = 24;

/// What `measure` reports for a qcow2 target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// File size needed for the data the input has (or for an empty image).
    pub required: u64,
    /// File size of the image with every cluster allocated.
    pub fully_allocated: u64,
    /// Space the input's persistent bitmaps would take, when both sides support them.
    pub bitmaps: Option<u64>,
}

/// The creation options `measure` looks at, validated with QEMU's checks and messages
/// (in QEMU's order: extended L2, cluster size, version, refcount width, preallocation).
#[derive(Debug, Clone)]
pub struct MeasureParams {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// 2 or 3.
    pub version: u32,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Extended L2 entries (16 bytes each).
    pub extended_l2: bool,
    /// `falloc` or `full` preallocation: every cluster counts as required.
    pub full_prealloc: bool,
    /// A backing file is named: the input's data cannot be assumed shared with it.
    pub has_backing: bool,
    /// Bytes the LUKS header takes in front of the data (0 without LUKS).
    pub luks_payload: u64,
    /// `size`, if given.
    pub size: u64,
}

/// Key length in bytes of a LUKS cipher algorithm, `None` for names QEMU does not know.
fn cipher_key_len(alg: &str) -> Option<u64> {
    Some(match alg {
        "aes-128" | "cast5-128" | "serpent-128" | "twofish-128" | "sm4" => 16,
        "aes-192" | "serpent-192" | "twofish-192" | "3des" => 24,
        "aes-256" | "serpent-256" | "twofish-256" => 32,
        "des" => 8,
        _ => return None,
    })
}

/// Bytes in front of the data of a LUKS image: the partition header and eight key
/// slots of `key_len * 4000` split-key bytes each, every part in 4 KiB units.
fn luks_header_len(key_len: u64) -> u64 {
    const SLOT_ALIGN: u64 = 4096;
    const STRIPES: u64 = 4000;
    const SLOTS: u64 = 8;
    SLOT_ALIGN + SLOTS * (key_len * STRIPES).div_ceil(SLOT_ALIGN) * SLOT_ALIGN
}

impl MeasureParams {
    /// Reads the options; `secret_exists` tells whether an `--object secret` has an id.
    pub fn from_options(
        o: &CreateOptions,
        secret_exists: &dyn Fn(&str) -> bool,
    ) -> Result<MeasureParams> {
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
        let version = match o.get("compat") {
            None | Some("1.1") => 3,
            Some("0.10") => 2,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "Invalid compatibility level: '{v}'"
                )))
            }
        };
        let refcount_bits = match o.get("refcount_bits") {
            None => 16,
            Some(v) => crate::create::parse_number(v).unwrap_or(0),
        };
        if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
            return Err(Error::invalid(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        if version < 3 && refcount_bits != 16 {
            return Err(Error::invalid(
                "Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
            ));
        }
        let full_prealloc = match o.get("preallocation") {
            None | Some("off") | Some("metadata") => false,
            Some("falloc") | Some("full") => true,
            Some(v) => return Err(Error::invalid(format!("invalid parameter value: {v}"))),
        };
        let has_backing = o.has("backing_file");
        let luks_payload = if o.get("encrypt.format") == Some("luks") {
            let alg = o.get("encrypt.cipher-alg").unwrap_or("aes-256");
            let Some(mut key_len) = cipher_key_len(alg) else {
                return Err(Error::invalid(format!(
                    "Parameter 'cipher-alg' does not accept value '{alg}'"
                )));
            };
            match o.get("encrypt.cipher-mode").unwrap_or("xts") {
                "xts" => key_len *= 2,
                "ecb" | "cbc" | "ctr" => {}
                m => {
                    return Err(Error::invalid(format!(
                        "Parameter 'cipher-mode' does not accept value '{m}'"
                    )))
                }
            }
            let Some(secret) = o.get("encrypt.key-secret") else {
                return Err(Error::invalid(
                    "Parameter 'encrypt.key-secret' is required for cipher",
                ));
            };
            if !secret_exists(secret) {
                return Err(Error::invalid(format!("No secret with id '{secret}'")));
            }
            luks_header_len(key_len).div_ceil(cluster_size) * cluster_size
        } else {
            0
        };
        Ok(MeasureParams {
            cluster_size,
            version,
            refcount_order: refcount_bits.trailing_zeros(),
            extended_l2,
            full_prealloc,
            has_backing,
            luks_payload,
            size: o.get_size("size").unwrap_or(0),
        })
    }
}

/// File size of a qcow2 image of `virtual_size` with every cluster allocated: header,
/// L2 tables, L1 table, refcount structures and data.
pub fn fully_allocated_size(
    virtual_size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> u64 {
    let l2e_size = if extended_l2 { 16 } else { 8 };
    let data = virtual_size.div_ceil(cluster_size) * cluster_size;
    let mut meta = cluster_size;
    let l2_entries =
        (data / cluster_size).div_ceil(cluster_size / l2e_size) * (cluster_size / l2e_size);
    meta += l2_entries * l2e_size;
    let l1_entries = (l2_entries * l2e_size / cluster_size).div_ceil(cluster_size / L1E_SIZE)
        * (cluster_size / L1E_SIZE);
    meta += l1_entries * L1E_SIZE;
    let (blocks, table) = refcount_metadata_clusters(
        (meta + data) / cluster_size,
        cluster_size,
        refcount_order,
        false,
    );
    meta + (blocks + table) * cluster_size + data
}

/// Space persistent bitmaps take in a qcow2 image with `cluster_size` clusters: each
/// bitmap of a `disk_size` disk fully allocated (given its name length and granularity),
/// its table, and the directory.
pub fn bitmaps_size(bitmaps: &[(usize, u64)], disk_size: u64, cluster_size: u64) -> u64 {
    let mut total = 0;
    let mut dir = 0;
    for &(name_len, granularity) in bitmaps {
        let bytes = disk_size.div_ceil(granularity.max(1)).div_ceil(8);
        let clusters = bytes.div_ceil(cluster_size);
        total += clusters * cluster_size;
        total += (clusters * BITMAP_TABLE_ENTRY_SIZE).div_ceil(cluster_size) * cluster_size;
        dir += (BITMAP_DIR_ENTRY_SIZE + name_len as u64).div_ceil(8) * 8;
    }
    total + dir.div_ceil(cluster_size) * cluster_size
}

/// The persistent bitmaps of `node` as (name length, granularity), or `None` when the
/// node cannot store persistent bitmaps (only qcow2 version 3 can).
async fn input_bitmaps(node: &NodeRef) -> Option<Vec<(usize, u64)>> {
    let fi = node.format_info().await.ok()?;
    if fi.type_name != Some("qcow2") || fi.data.get("compat")?.as_str() != Some("1.1") {
        return None;
    }
    let list = match fi.data.get("bitmaps") {
        Some(serde_json::Value::Array(l)) => l.clone(),
        _ => Vec::new(),
    };
    Some(
        list.iter()
            .map(|b| {
                let name = b.get("name").and_then(|n| n.as_str()).unwrap_or("");
                let gran = b
                    .get("granularity")
                    .and_then(|g| g.as_u64())
                    .unwrap_or(65536);
                (name.len(), gran)
            })
            .collect(),
    )
}

/// Measures a qcow2 image created with `p`, holding what `input` holds (if given).
pub async fn measure(p: &MeasureParams, input: Option<&NodeRef>) -> Result<Measurement> {
    let cs = p.cluster_size;
    let l2e_size = if p.extended_l2 { 16 } else { 8 };
    let mut virtual_size = p.size.div_ceil(cs) * cs;
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e_size);
    if l2_tables.saturating_mul(L1E_SIZE) > MAX_L1_SIZE {
        return Err(Error::invalid(
            "The image size is too large (try using a larger cluster size)",
        ));
    }
    let mut required = 0;
    if let Some(node) = input {
        let ssize = node.size().div_ceil(512) * 512;
        virtual_size = ssize.div_ceil(cs) * cs;
        if p.has_backing {
            required = virtual_size;
        } else {
            let mut offset = 0;
            while offset < ssize {
                let st = block_status_chain(node, offset, ssize - offset)
                    .await
                    .map_err(|e| {
                        Error::other(
                            format!(
                                "Unable to get block status: {}",
                                crate::error::strerror(e.errno_value())
                            ),
                            e.errno_value(),
                        )
                    })?
                    .status;
                let mut pnum = st.len.max(1);
                if !st.zero && st.data {
                    pnum = (offset + pnum).div_ceil(cs) * cs - offset;
                    required += offset % cs + pnum;
                }
                offset += pnum;
            }
        }
    }
    if p.full_prealloc {
        required = virtual_size;
    }
    let fully_allocated =
        p.luks_payload + fully_allocated_size(virtual_size, cs, p.refcount_order, p.extended_l2);
    let bitmaps = match input {
        Some(node) if p.version >= 3 => input_bitmaps(node)
            .await
            .map(|list| bitmaps_size(&list, node.size(), cs)),
        _ => None,
    };
    Ok(Measurement {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_images_need_what_qemu_says() {
        // qemu-img measure -O qcow2 --size 1G
        assert_eq!(
            fully_allocated_size(1 << 30, 65536, 4, false),
            1_074_135_040
        );
        // The LUKS header of aes-256-xts (64-byte keys) and aes-128-xts (32-byte keys).
        assert_eq!(luks_header_len(64).div_ceil(65536) * 65536, 2 << 20);
        assert_eq!(luks_header_len(32).div_ceil(65536) * 65536, 1_114_112);
    }

    #[test]
    fn bitmaps_take_whole_clusters() {
        assert_eq!(bitmaps_size(&[], 1 << 30, 65536), 0);
        // 1 GiB at 64 KiB granularity: 2 KiB of bits, one cluster, one table cluster,
        // one directory cluster.
        assert_eq!(bitmaps_size(&[(2, 65536)], 1 << 30, 65536), 3 * 65536);
    }
}
