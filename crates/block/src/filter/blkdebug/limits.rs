//! The request limits a blkdebug node imposes on its users (`align`, `max-transfer`,
//! `opt-write-zero`, `max-write-zero`, `opt-discard`, `max-discard`), checked as QEMU
//! checks them.

use rqemu_opts::KeyVal;

use crate::error::{Error, Result};

/// A node's request limits (0: no limit of that kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request alignment (a power of two; 1 if not given).
    pub align: u64,
    /// Largest read or write passed down in one piece.
    pub max_transfer: u64,
    /// Preferred write-zeroes alignment.
    pub opt_write_zero: u64,
    /// Largest write-zeroes request.
    pub max_write_zero: u64,
    /// Preferred discard alignment.
    pub opt_discard: u64,
    /// Largest discard request.
    pub max_discard: u64,
}

fn take_size(kv: &mut KeyVal, key: &str) -> Result<u64> {
    match kv.take(key) {
        None => Ok(0),
        Some(v) => rqemu_opts::parse_size(&v, 1).map_err(|_| {
            Error::invalid(format!(
                "Parameter '{key}' expects a non-negative number below 2^64"
            ))
        }),
    }
}

const INT_MAX: u64 = i32::MAX as u64;

impl Limits {
    /// No limits.
    pub const NONE: Limits = Limits {
        align: 1,
        max_transfer: 0,
        opt_write_zero: 0,
        max_write_zero: 0,
        opt_discard: 0,
        max_discard: 0,
    };

    /// Takes the limit options out of `kv` and checks that they can be met together.
    pub fn take_from(kv: &mut KeyVal) -> Result<Limits> {
        let align = take_size(kv, "align")?;
        let max_transfer = take_size(kv, "max-transfer")?;
        let opt_write_zero = take_size(kv, "opt-write-zero")?;
        let max_write_zero = take_size(kv, "max-write-zero")?;
        let opt_discard = take_size(kv, "opt-discard")?;
        let max_discard = take_size(kv, "max-discard")?;
        let fail = |what: &str, v: u64| {
            Err(Error::invalid(format!(
                "Cannot meet constraints with {what} {v}"
            )))
        };
        if align != 0 && (align >= INT_MAX || !align.is_power_of_two()) {
            return fail("align", align);
        }
        let a = align.max(1);
        if max_transfer != 0 && (max_transfer >= INT_MAX || max_transfer % a != 0) {
            return fail("max-transfer", max_transfer);
        }
        if opt_write_zero != 0 && (opt_write_zero >= INT_MAX || opt_write_zero % a != 0) {
            return fail("opt-write-zero", opt_write_zero);
        }
        if max_write_zero != 0
            && (max_write_zero >= INT_MAX || max_write_zero % opt_write_zero.max(a) != 0)
        {
            return fail("max-write-zero", max_write_zero);
        }
        if opt_discard != 0 && (opt_discard >= INT_MAX || opt_discard % a != 0) {
            return fail("opt-discard", opt_discard);
        }
        if max_discard != 0 && (max_discard >= INT_MAX || max_discard % opt_discard.max(a) != 0) {
            return fail("max-discard", max_discard);
        }
        Ok(Limits {
            align: a,
            max_transfer,
            opt_write_zero,
            max_write_zero,
            opt_discard,
            max_discard,
        })
    }

    /// Largest piece of a read or write (QEMU bounds unlimited transfers by its bounce
    /// buffer size for write-zeroes fallbacks; plain requests are not split).
    pub fn transfer(&self) -> u64 {
        if self.max_transfer == 0 {
            u64::MAX
        } else {
            self.max_transfer
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(s: &str) -> Result<Limits> {
        Limits::take_from(&mut KeyVal::parse(s, None).unwrap())
    }

    #[test]
    fn constraints_are_checked() {
        let l = limits("align=4k,max-transfer=64k").unwrap();
        assert_eq!((l.align, l.max_transfer), (4096, 65536));
        let err = |s: &str| limits(s).unwrap_err().to_string();
        assert_eq!(err("align=3"), "Cannot meet constraints with align 3");
        assert_eq!(
            err("align=4096,max-transfer=1000"),
            "Cannot meet constraints with max-transfer 1000"
        );
        assert_eq!(
            err("opt-write-zero=4096,max-write-zero=512"),
            "Cannot meet constraints with max-write-zero 512"
        );
        assert_eq!(
            err("max-transfer=4G"),
            "Cannot meet constraints with max-transfer 4294967296"
        );
        assert!(limits("align=512,opt-write-zero=15M,max-write-zero=15M").is_ok());
    }
}
