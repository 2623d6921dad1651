//! Standard output with C stdio's buffering: line-buffered on a terminal, fully buffered
//! otherwise, flushed at exit. QEMU's tools print results with stdio and errors unbuffered
//! to stderr; scripts (and QEMU's own test suite) see the two interleaved accordingly.

use std::io::{IsTerminal, Write};
use std::sync::{Mutex, OnceLock};

struct Out {
    buf: Vec<u8>,
    line_buffered: bool,
}

fn out() -> &'static Mutex<Out> {
    static OUT: OnceLock<Mutex<Out>> = OnceLock::new();
    OUT.get_or_init(|| {
        Mutex::new(Out {
            buf: Vec::with_capacity(8192),
            line_buffered: std::io::stdout().is_terminal(),
        })
    })
}

/// Appends text to stdout's buffer (writing it out as stdio would).
pub fn print(s: &str) {
    let mut o = out().lock().unwrap_or_else(|p| p.into_inner());
    o.buf.extend_from_slice(s.as_bytes());
    if (o.line_buffered && s.contains('\n')) || o.buf.len() >= 4096 {
        let data = std::mem::take(&mut o.buf);
        let _ = std::io::stdout().write_all(&data);
        let _ = std::io::stdout().flush();
    }
}

/// Writes out what is buffered (C's `fflush(stdout)`).
pub fn flush() {
    let mut o = out().lock().unwrap_or_else(|p| p.into_inner());
    let data = std::mem::take(&mut o.buf);
    let _ = std::io::stdout().write_all(&data);
    let _ = std::io::stdout().flush();
}

/// Prints to the buffered stdout.
#[macro_export]
macro_rules! outp {
    ($($arg:tt)*) => { $crate::out::print(&format!($($arg)*)) };
}

/// Prints a line to the buffered stdout.
#[macro_export]
macro_rules! outln {
    () => { $crate::out::print("\n") };
    ($($arg:tt)*) => { $crate::out::print(&format!("{}\n", format!($($arg)*))) };
}
