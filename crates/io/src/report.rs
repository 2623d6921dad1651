//! qemu-io's output formats: byte counts, durations, the statistics line, hex dumps.

use std::time::Duration;

/// qemu-io's `cvtstr`: `512 bytes`, `4 KiB`, `1.500 KiB`.
pub fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1152921504606846976.0, " EiB"),
        (1125899906842624.0, " PiB"),
        (1099511627776.0, " TiB"),
        (1073741824.0, " GiB"),
        (1048576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let (num, suffix) = match UNITS.iter().find(|(u, _)| value >= *u) {
        Some((u, s)) => (format!("{:.3}", value / u), *s),
        None => (format!("{value:.6}"), " bytes"),
    };
    match num.find(".000") {
        Some(i) => format!("{}{suffix}", &num[..i]),
        None => format!("{num}{suffix}"),
    }
}

/// qemu-io's duration format: `SS.CC sec`, `MM:SS.CC`, `H:MM:SS.CC`.
pub fn timestr(d: Duration, fixed: bool) -> String {
    let secs = d.as_secs();
    let cs = d.subsec_nanos() / 10_000_000;
    if fixed {
        return format!(
            "{}:{:02}:{:02}.{:02}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            cs
        );
    }
    if secs >= 3600 {
        format!(
            "{}:{:02}:{:02}.{:02}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            cs
        )
    } else if secs >= 60 {
        format!("{:02}:{:02}.{:02}", secs / 60, secs % 60, cs)
    } else {
        format!("{:02}.{:02} sec", secs, cs)
    }
}

fn per_sec(v: f64, d: Duration) -> f64 {
    let t = d.as_secs_f64();
    if t == 0.0 {
        0.0
    } else {
        v / t
    }
}

/// The two report lines after an I/O command (or the `-C` machine-readable line).
pub fn report(
    op: &str,
    d: Duration,
    offset: u64,
    count: u64,
    total: u64,
    ops: u64,
    machine: bool,
) -> String {
    if machine {
        return format!(
            "{total},{ops},{},{:.3},{:.3}\n",
            timestr(d, true),
            per_sec(total as f64, d),
            per_sec(ops as f64, d)
        );
    }
    format!(
        "{op} {total}/{count} bytes at offset {offset}\n{}, {ops} ops; {} ({}/sec and {:.4} ops/sec)\n",
        cvtstr(total as f64),
        timestr(d, false),
        cvtstr(per_sec(total as f64, d)),
        per_sec(ops as f64, d)
    )
}

/// qemu-io's `-v` hex dump.
pub fn dump_buffer(buf: &[u8], offset: u64) -> String {
    let mut out = String::new();
    for (i, chunk) in buf.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}:  ", offset + (i * 16) as u64));
        for b in chunk {
            out.push_str(&format!("{b:02x} "));
        }
        out.push(' ');
        for b in chunk {
            out.push(if b.is_ascii_alphanumeric() {
                *b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(cvtstr(0.0), "0 bytes");
    }

    #[test]
    fn report_shape() {
        let r = report("wrote", Duration::from_millis(1), 0, 512, 512, 1, false);
        assert!(r.starts_with("wrote 512/512 bytes at offset 0\n512 bytes, 1 ops; 00.00 sec ("));
    }
}
