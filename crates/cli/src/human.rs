//! Numbers printed the way QEMU prints them.

/// C's `%0.<prec>g` for a non-negative finite value.
pub fn fmt_g(v: f64, prec: usize) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let exp = format!("{:.*e}", prec.saturating_sub(1), v);
    let e: i32 = exp
        .rsplit('e')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let s = if e < -4 || e >= prec as i32 {
        let (mant, ex) = exp.split_once('e').unwrap_or((&exp, "0"));
        let mant = strip_zeros(mant);
        let exn: i32 = ex.parse().unwrap_or(0);
        format!("{mant}e{}{:02}", if exn < 0 { '-' } else { '+' }, exn.abs())
    } else {
        let decimals = (prec as i32 - 1 - e).max(0) as usize;
        strip_zeros(&format!("{v:.decimals$}"))
    };
    s
}

fn strip_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// QEMU's `size_to_str`: three significant digits and a binary unit (`1.5 MiB`).
pub fn size_to_str(val: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = val as f64 / (1000.0 / 1024.0);
    // frexp: scaled = m * 2^e with m in [0.5, 1)
    let e = if scaled == 0.0 {
        0
    } else {
        scaled.log2().floor() as i32 + 1
    };
    let i = ((e - 1).max(0) / 10).min(6) as usize;
    let div = (1u64 << (i * 10)) as f64;
    format!("{} {}B", fmt_g(val as f64 / div, 3), SUFFIXES[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1073741824), "1 GiB");
        assert_eq!(size_to_str(200704), "196 KiB");
        assert_eq!(size_to_str(197120), "192 KiB");
        assert_eq!(size_to_str(1023), "0.999 KiB");
        assert_eq!(size_to_str(1536 * 1024), "1.5 MiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
    }

    #[test]
    fn g_format() {
        assert_eq!(fmt_g(12.3456, 3), "12.3");
        assert_eq!(fmt_g(99.96, 3), "100");
        assert_eq!(fmt_g(0.5, 3), "0.5");
        assert_eq!(fmt_g(1234.0, 3), "1.23e+03");
    }
}
