//! Fuzzes QEMU's option syntax as users and image files write it: `key=value` lists
//! (`,,` escapes, implied first key, bare keys), `json:{...}` filenames, sizes with unit
//! suffixes, C-style numbers, booleans and NBD filenames with their options. The first
//! byte picks the parser, the rest is the string. Any input must give a value or an
//! error, never a panic; lists the printer can write back must read back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rqemu_block::protocol::nbd::addr::NbdOptions;
use rqemu_opts::{bool_opt, parse_c_u64, parse_json_filename, parse_size, KeyVal, SizeError};

/// Whether every key of `kv` can be written by [`KeyVal::to_opt_string`] and read back:
/// option names have no escape for `,` (nor `=`, which ends a name).
fn printable(kv: &KeyVal) -> bool {
    kv.keys().all(|k| !k.contains([',', '=']))
}

/// parse → print → parse gives the same list, and printing is then stable.
fn round_trip(kv: &KeyVal) {
    if !printable(kv) {
        return;
    }
    let printed = kv.to_opt_string();
    let again = KeyVal::parse(&printed, None).expect("a printed list parses");
    assert_eq!(&again, kv, "{printed:?}");
    assert_eq!(again.to_opt_string(), printed);
}

/// The options a NBD node is opened with: a filename, then `,`-separated options.
fn nbd(s: &str) {
    let (filename, opts) = s.split_once('\n').unwrap_or((s, ""));
    let Ok(mut kv) = KeyVal::parse(opts, None) else {
        return;
    };
    if let Ok(o) = NbdOptions::take_from(filename, &mut kv) {
        let _ = o.display_name();
    }
}

/// `parse_size` of a plain decimal number is the number; a suffix multiplies it.
fn size(s: &str, unit: u64) {
    let r = parse_size(s, unit);
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let want = match s.parse::<u64>() {
            Ok(n) => n.checked_mul(unit).ok_or(SizeError::Range),
            Err(_) => Err(SizeError::Range),
        };
        assert_eq!(r, want, "{s:?}");
        if let Ok(n) = s.parse::<u64>() {
            let want = n.checked_mul(1 << 20).ok_or(SizeError::Range);
            assert_eq!(parse_size(&format!("{s}M"), unit), want, "{s:?}M");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    match mode % 8 {
        0 => {
            if let Ok(kv) = KeyVal::parse(s, None) {
                round_trip(&kv);
                let mut kv = kv;
                let child = kv.take_child("file");
                assert!(kv.keys().all(|k| !k.starts_with("file.")));
                let _ = child.to_opt_string();
            }
        }
        1 => {
            if let Ok(kv) = KeyVal::parse(s, Some("file")) {
                round_trip(&kv);
            }
        }
        2 => {
            let json = s.strip_prefix("json:").unwrap_or(s);
            if let Ok(kv) = parse_json_filename(json) {
                round_trip(&kv);
            }
        }
        3 => size(s, 1),
        4 => size(s, 512),
        5 => {
            if let Ok(v) = parse_c_u64(s) {
                // A plain decimal number reads as itself.
                if s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0') {
                    assert_eq!(Ok(v), s.parse::<u64>());
                }
            }
        }
        6 => {
            let _ = bool_opt(s);
        }
        _ => nbd(s),
    }
});
