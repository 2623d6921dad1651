//! Sizes with unit suffixes, read the way QEMU's `qemu_strtosz` reads them.
//!
//! Accepted: optional leading whitespace and `+`, a decimal integer (or `0x` hex without a
//! fraction or suffix), an optional decimal fraction, and an optional suffix `B`, `K`, `M`,
//! `G`, `T`, `P`, `E` (either case, powers of 1024). A fraction needs a suffix larger than a
//! byte unless it is zero. Nothing may follow the suffix.

use thiserror::Error;

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    /// Not a size at all.
    #[error("invalid size")]
    Invalid,
    /// A size, but larger than 2^64 - 1.
    #[error("size out of range")]
    Range,
}

fn unit_multiplier(c: u8) -> Option<u64> {
    let shift = match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Parses `s` as a size; a bare number is multiplied by `default_unit` (1 for bytes).
pub fn parse_size(s: &str, default_unit: u64) -> Result<u64, SizeError> {
    let s = s.trim_start();
    let s = s.strip_prefix('+').unwrap_or(s);
    let bytes = s.as_bytes();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| SizeError::Range)?;
        return v.checked_mul(default_unit).ok_or(SizeError::Range);
    }
    let int_end = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    if int_end == 0 {
        return Err(SizeError::Invalid);
    }
    let int_part: u64 = match s[..int_end].parse() {
        Ok(v) => v,
        Err(_) => return Err(SizeError::Range),
    };
    let mut rest = &s[int_end..];
    let mut fraction: Option<&str> = None;
    if let Some(after_dot) = rest.strip_prefix('.') {
        let frac_end = after_dot
            .bytes()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(after_dot.len());
        fraction = Some(&after_dot[..frac_end]);
        rest = &after_dot[frac_end..];
    }
    let mul = match rest.as_bytes() {
        [] => default_unit,
        [c] => unit_multiplier(*c).ok_or(SizeError::Invalid)?,
        _ => return Err(SizeError::Invalid),
    };
    let frac_value: f64 = match fraction {
        Some(digits) if !digits.is_empty() => format!("0.{digits}")
            .parse::<f64>()
            .map_err(|_| SizeError::Invalid)?,
        _ => 0.0,
    };
    if frac_value != 0.0 && mul == 1 {
        return Err(SizeError::Invalid);
    }
    let whole = int_part.checked_mul(mul).ok_or(SizeError::Range)?;
    let extra = (frac_value * mul as f64) as u64;
    whole.checked_add(extra).ok_or(SizeError::Range)
}

/// `qemu_strtou64(value, NULL, 0, ...)`: C's `strtoull` with base detection, the whole
/// string consumed; a negative number wraps (and so is out of range for callers).
pub fn parse_c_u64(value: &str) -> Result<u64, SizeError> {
    let t = value.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(SizeError::Invalid);
    }
    let v = u64::from_str_radix(digits, radix).map_err(|_| SizeError::Range)?;
    Ok(if neg { v.wrapping_neg() } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_qemu_accepts() {
        let cases: &[(&str, u64)] = &[
            ("1G", 1 << 30),
            ("1.5G", 3 << 29),
            ("1g", 1 << 30),
            ("512", 512),
            ("1k", 1024),
            ("1b", 1),
            ("0x100", 256),
            (" 1G", 1 << 30),
            ("+1G", 1 << 30),
            ("00010", 10),
            ("1.0", 1),
            ("1.", 1),
            ("1.0B", 1),
            ("1.0000000001k", 1024),
            ("1.5e", 1729382256910270464),
            ("0xE", 14),
            ("0.5M", 524288),
        ];
        for (s, v) in cases {
            assert_eq!(parse_size(s, 1), Ok(*v), "{s}");
        }
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        for s in [
            "1.5", "1x", "1e3", "1 G", "1G ", "0x", "0x10k", "1kB", "1.5B", "",
        ] {
            assert_eq!(parse_size(s, 1), Err(SizeError::Invalid), "{s}");
        }
        assert_eq!(parse_size("16E", 1), Err(SizeError::Range));
        assert_eq!(parse_size("18446744073709551616", 1), Err(SizeError::Range));
    }
}
