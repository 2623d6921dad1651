//! Parsing command arguments as qemu-io does: byte counts with suffixes, patterns, and
//! splitting a command line into words.

use rqemu_cli::outln;

/// qemu-io's `cvtnum`: a byte count with an optional suffix (bytes by default).
pub fn cvtnum(s: &str) -> Result<u64, i32> {
    match rqemu_opts::parse_size(s, 1) {
        Ok(v) if v <= i64::MAX as u64 => Ok(v),
        Ok(_) | Err(rqemu_opts::SizeError::Range) => Err(-libc::ERANGE),
        Err(_) => Err(-libc::EINVAL),
    }
}

/// Prints qemu-io's message for a bad number.
pub fn print_cvtnum_err(rc: i32, arg: &str) {
    if rc == -libc::EINVAL {
        outln!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}");
    } else if rc == -libc::ERANGE {
        outln!("Parsing error: argument too large -- {arg}");
    } else {
        outln!("Parsing error: {arg}");
    }
}

/// Parses a number argument, printing the error and returning `-errno` on failure.
pub fn num(arg: &str) -> Result<u64, i32> {
    cvtnum(arg).inspect_err(|&e| print_cvtnum_err(e, arg))
}

/// Parses a pattern byte (`-P`): decimal, or hex with `0x`, or octal with `0`.
pub fn parse_pattern(s: &str) -> Result<u8, i32> {
    let parsed = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        i64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse::<i64>().ok()
    };
    match parsed {
        Some(v) if (0..=255).contains(&v) => Ok(v as u8),
        _ => {
            outln!("{s} is not a valid pattern byte");
            Err(-libc::EINVAL)
        }
    }
}

/// Splits a command line into words on blanks. Quotes have no meaning: qemu-io keeps
/// them in the word (so `json:{"a":"b"}` reaches the open command whole).
pub fn split_words(line: &str) -> Vec<String> {
    line.split([' ', '\t', '\n', '\r'])
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_words() {
        assert_eq!(cvtnum("64k"), Ok(65536));
        assert_eq!(cvtnum("abc"), Err(-libc::EINVAL));
        assert_eq!(
            split_words("write -P 0x41  0 4k"),
            ["write", "-P", "0x41", "0", "4k"]
        );
        assert_eq!(split_words("read -P \"1\" 0"), ["read", "-P", "\"1\"", "0"]);
        assert_eq!(parse_pattern("0x41"), Ok(0x41));
        assert_eq!(parse_pattern("65"), Ok(65));
    }
}
