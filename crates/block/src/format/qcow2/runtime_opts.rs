//! The qcow2 runtime options (`lazy-refcounts`, `pass-discard-*`, the cache sizes,
//! `cache-clean-interval`, `overlap-check[.*]`): taken from a node's options, then
//! checked against the image's geometry in QEMU's order and with its messages, for
//! open and for `reopen` alike.

use rqemu_opts::KeyVal;

use crate::error::{Error, Result};

use super::types::{Geometry, MIN_CLUSTER_BITS};

/// QEMU's largest default L2 cache.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Fewest tables a cache holds.
const MIN_L2_TABLES: u64 = 2;
const MIN_REFCOUNT_BLOCKS: u64 = 4;

/// The metadata kinds the overlap check can guard, as bits; in QEMU's option order.
pub mod overlap_bits {
    /// The image header.
    pub const MAIN_HEADER: u32 = 1 << 0;
    /// The active L1 table.
    pub const ACTIVE_L1: u32 = 1 << 1;
    /// The active L2 tables.
    pub const ACTIVE_L2: u32 = 1 << 2;
    /// The refcount table.
    pub const REFCOUNT_TABLE: u32 = 1 << 3;
    /// The refcount blocks.
    pub const REFCOUNT_BLOCK: u32 = 1 << 4;
    /// The snapshot table.
    pub const SNAPSHOT_TABLE: u32 = 1 << 5;
    /// The snapshots' L1 tables.
    pub const INACTIVE_L1: u32 = 1 << 6;
    /// The snapshots' L2 tables.
    pub const INACTIVE_L2: u32 = 1 << 7;
    /// The bitmap directory.
    pub const BITMAP_DIRECTORY: u32 = 1 << 8;
    /// What can be checked without reading tables.
    pub const CONSTANT: u32 =
        MAIN_HEADER | ACTIVE_L1 | REFCOUNT_TABLE | SNAPSHOT_TABLE | BITMAP_DIRECTORY;
    /// What can be checked from the tables held in memory (the default).
    pub const CACHED: u32 = CONSTANT | ACTIVE_L2 | REFCOUNT_BLOCK | INACTIVE_L1;
    /// Everything, inactive L2 tables included (these are read from the image).
    pub const ALL: u32 = CACHED | INACTIVE_L2;
}

/// The `overlap-check.<kind>` option names and their bits.
const OVERLAP_KINDS: [(&str, u32); 9] = [
    ("main-header", overlap_bits::MAIN_HEADER),
    ("active-l1", overlap_bits::ACTIVE_L1),
    ("active-l2", overlap_bits::ACTIVE_L2),
    ("refcount-table", overlap_bits::REFCOUNT_TABLE),
    ("refcount-block", overlap_bits::REFCOUNT_BLOCK),
    ("snapshot-table", overlap_bits::SNAPSHOT_TABLE),
    ("inactive-l1", overlap_bits::INACTIVE_L1),
    ("inactive-l2", overlap_bits::INACTIVE_L2),
    ("bitmap-directory", overlap_bits::BITMAP_DIRECTORY),
];

/// Every key this module takes (so that `reopen` can drop the previous values: QEMU
/// does not carry a driver's runtime options from one reopen to the next).
pub fn is_runtime_key(key: &str) -> bool {
    matches!(
        key,
        "lazy-refcounts"
            | "pass-discard-request"
            | "pass-discard-snapshot"
            | "pass-discard-other"
            | "cache-size"
            | "l2-cache-size"
            | "l2-cache-entry-size"
            | "refcount-cache-size"
            | "cache-clean-interval"
            | "overlap-check"
    ) || key.starts_with("overlap-check.")
}

/// The runtime options as given, before they are checked against an image.
#[derive(Clone, Debug, Default)]
pub struct RuntimeOptions {
    /// `lazy-refcounts=on|off` override.
    pub lazy_refcounts: Option<bool>,
    /// `pass-discard-request`, `-snapshot`, `-other`.
    pub pass_discard: [Option<bool>; 3],
    cache_size: Option<u64>,
    l2_cache_size: Option<u64>,
    l2_cache_entry_size: Option<u64>,
    refcount_cache_size: Option<u64>,
    cache_clean_interval: Option<u64>,
    overlap_check: Option<String>,
    overlap_template: Option<String>,
    overlap_kinds: Vec<(u32, bool)>,
}

/// The runtime options resolved for one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// L2 cache size in bytes, when set (rqemu picks its own default otherwise).
    pub l2_cache_size: Option<u64>,
    /// Refcount block cache size in bytes, when set.
    pub refcount_cache_size: Option<u64>,
    /// Which metadata the overlap check guards ([`overlap_bits`]).
    pub overlap_mask: u32,
}

fn bool_param(key: &str, v: &str) -> Result<bool> {
    rqemu_opts::bool_opt(v)
        .ok_or_else(|| Error::invalid(format!("Parameter '{key}' expects 'on' or 'off'")))
}

fn size_param(key: &str, v: &str) -> Result<u64> {
    rqemu_opts::parse_size(v, 1).map_err(|_| {
        Error::invalid(format!(
            "Parameter '{key}' expects a non-negative number below 2^64"
        ))
    })
}

impl RuntimeOptions {
    /// Takes the runtime options out of `kv` (other keys stay for the caller), checking
    /// each value's type.
    pub fn take_from(kv: &mut KeyVal) -> Result<RuntimeOptions> {
        let mut o = RuntimeOptions::default();
        if let Some(v) = kv.take("lazy-refcounts") {
            o.lazy_refcounts = Some(bool_param("lazy-refcounts", &v)?);
        }
        for (i, k) in [
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
        ]
        .iter()
        .enumerate()
        {
            if let Some(v) = kv.take(k) {
                o.pass_discard[i] = Some(bool_param(k, &v)?);
            }
        }
        let mut size = |k: &str| kv.take(k).map(|v| size_param(k, &v)).transpose();
        o.cache_size = size("cache-size")?;
        o.l2_cache_size = size("l2-cache-size")?;
        o.l2_cache_entry_size = size("l2-cache-entry-size")?;
        o.refcount_cache_size = size("refcount-cache-size")?;
        if let Some(v) = kv.take("cache-clean-interval") {
            o.cache_clean_interval = Some(rqemu_opts::parse_c_u64(&v).map_err(|_| {
                Error::invalid("Parameter 'cache-clean-interval' expects a number")
            })?);
        }
        o.overlap_check = kv.take("overlap-check");
        o.overlap_template = kv.take("overlap-check.template");
        for (name, bit) in OVERLAP_KINDS {
            let key = format!("overlap-check.{name}");
            if let Some(v) = kv.take(&key) {
                o.overlap_kinds.push((bit, bool_param(&key, &v)?));
            }
        }
        Ok(o)
    }

    /// Checks the options against the image, in QEMU's order: the cache sizes, the
    /// clean interval, then the overlap check.
    pub fn resolve(&self, geo: &Geometry, disk_size: u64) -> Result<Resolved> {
        let cs = geo.cluster_size();
        let max_l2_cache = (disk_size.div_ceil(cs) * geo.l2_entry_size()).div_ceil(cs) * cs;
        let min_refcount_cache = MIN_REFCOUNT_BLOCKS * cs;
        let mut l2 = self.l2_cache_size;
        let mut rc = self.refcount_cache_size;
        if let Some(combined) = self.cache_size {
            if l2.is_some() && rc.is_some() {
                return Err(Error::invalid(
                    "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time",
                ));
            }
            if l2.is_some_and(|l| l > combined) {
                return Err(Error::invalid("l2-cache-size may not exceed cache-size"));
            }
            if rc.is_some_and(|r| r > combined) {
                return Err(Error::invalid(
                    "refcount-cache-size may not exceed cache-size",
                ));
            }
            match (l2, rc) {
                (Some(l), _) => rc = Some(combined - l),
                (_, Some(r)) => l2 = Some(combined - r),
                _ if combined >= max_l2_cache + min_refcount_cache => {
                    l2 = Some(max_l2_cache);
                    rc = Some(combined - max_l2_cache);
                }
                _ => {
                    let r = combined.min(min_refcount_cache);
                    rc = Some(r);
                    l2 = Some(combined - r);
                }
            }
        }
        let entry = self.l2_cache_entry_size.unwrap_or(cs);
        if entry < 1 << MIN_CLUSTER_BITS || entry > cs || !entry.is_power_of_two() {
            return Err(Error::invalid(format!(
                "L2 cache entry size must be a power of two between {} and the cluster size ({cs})",
                1u64 << MIN_CLUSTER_BITS
            )));
        }
        let l2_tables = l2
            .unwrap_or(DEFAULT_L2_CACHE_MAX.min(max_l2_cache))
            .checked_div(entry)
            .unwrap_or(0)
            .max(MIN_L2_TABLES);
        if l2_tables > i32::MAX as u64 {
            return Err(Error::invalid("L2 cache size too big"));
        }
        let rc_blocks = (rc.unwrap_or(min_refcount_cache) / cs).max(MIN_REFCOUNT_BLOCKS);
        if rc_blocks > i32::MAX as u64 {
            return Err(Error::invalid("Refcount cache size too big"));
        }
        if self.cache_clean_interval.unwrap_or(0) > u32::MAX as u64 {
            return Err(Error::invalid("Cache clean interval too big"));
        }
        Ok(Resolved {
            l2_cache_size: l2,
            refcount_cache_size: rc,
            overlap_mask: self.overlap_mask()?,
        })
    }

    fn overlap_mask(&self) -> Result<u32> {
        let (check, template) = (
            self.overlap_check.as_deref(),
            self.overlap_template.as_deref(),
        );
        if let (Some(c), Some(t)) = (check, template) {
            if c != t {
                return Err(Error::invalid(format!(
                    "Conflicting values for qcow2 options 'overlap-check' ('{c}') and 'overlap-check.template' ('{t}')"
                )));
            }
        }
        let name = check.or(template).unwrap_or("cached");
        let mut mask = match name {
            "none" => 0,
            "constant" => overlap_bits::CONSTANT,
            "cached" => overlap_bits::CACHED,
            "all" => overlap_bits::ALL,
            other => {
                return Err(Error::invalid(format!(
                    "Unsupported value '{other}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
                )))
            }
        };
        for &(bit, on) in &self.overlap_kinds {
            if on {
                mask |= bit;
            } else {
                mask &= !bit;
            }
        }
        Ok(mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(opts: &str, geo: Geometry, size: u64) -> Result<Resolved> {
        let mut kv = KeyVal::parse(opts, None).unwrap();
        RuntimeOptions::take_from(&mut kv)?.resolve(&geo, size)
    }

    fn geo64k() -> Geometry {
        Geometry {
            cluster_bits: 16,
            extended_l2: false,
            refcount_order: 4,
        }
    }

    #[test]
    fn cache_size_rules() {
        let g = geo64k();
        let err = |o: &str| resolve(o, g, 64 << 20).unwrap_err().to_string();
        assert!(
            err("cache-size=1M,l2-cache-size=64k,refcount-cache-size=64k")
                .contains("may not be set at the same time")
        );
        assert_eq!(
            err("cache-size=1M,l2-cache-size=2M"),
            "l2-cache-size may not exceed cache-size"
        );
        assert_eq!(
            err("cache-size=1M,refcount-cache-size=2M"),
            "refcount-cache-size may not exceed cache-size"
        );
        assert!(err("l2-cache-entry-size=33k").starts_with("L2 cache entry size"));
        assert_eq!(
            err("refcount-cache-size=256T"),
            "Refcount cache size too big"
        );
        assert_eq!(
            err("cache-clean-interval=-1"),
            "Cache clean interval too big"
        );
        // The whole L2 cache first, the rest for refcounts.
        let r = resolve("cache-size=1M", g, 64 << 20).unwrap();
        assert_eq!(r.l2_cache_size, Some(64 << 10));
        assert_eq!(r.refcount_cache_size, Some((1 << 20) - (64 << 10)));
    }

    #[test]
    fn overlap_templates_and_kinds() {
        let g = geo64k();
        let r = resolve("", g, 1 << 20).unwrap();
        assert_eq!(r.overlap_mask, overlap_bits::CACHED);
        let r = resolve(
            "overlap-check=none,overlap-check.inactive-l2=on",
            g,
            1 << 20,
        )
        .unwrap();
        assert_eq!(r.overlap_mask, overlap_bits::INACTIVE_L2);
        let e = resolve(
            "overlap-check=constant,overlap-check.template=all",
            g,
            1 << 20,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("Conflicting values"));
        let e = resolve("overlap-check.template=blubb", g, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("Unsupported value 'blubb'"));
    }
}
