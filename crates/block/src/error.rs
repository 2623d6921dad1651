//! The block layer's error type.
//!
//! QEMU reports block errors as one sentence, usually ending in the OS's `strerror`, and
//! callers map them to an errno (qemu-io prints `read failed: Input/output error`, NBD and
//! virtio-blk turn it into a status). [`Error`] keeps both: the sentence and the errno.

use std::fmt;
use std::io;

/// A block-layer error: a QEMU-style message and the errno it maps to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS call failed; `context` (if any) says what was being done.
    #[error("{}", os_message(.context.as_deref(), *.errno))]
    Os {
        /// What was being done, e.g. `Could not open 'x.qcow2'`.
        context: Option<String>,
        /// The OS error number.
        errno: i32,
    },
    /// A request or option is invalid (EINVAL).
    #[error("{0}")]
    Invalid(String),
    /// The image or driver cannot do this (ENOTSUP).
    #[error("{0}")]
    Unsupported(String),
    /// Image metadata is corrupt (EIO); qcow2 also sets its corrupt bit.
    #[error("{0}")]
    Corrupt(String),
    /// The node was opened read-only, or a lock or permission forbids it.
    #[error("{msg}")]
    Permission {
        /// The message.
        msg: String,
        /// EPERM, EACCES or EAGAIN (lock conflict).
        errno: i32,
    },
    /// Any other failure with an explicit errno.
    #[error("{msg}")]
    Other {
        /// The message.
        msg: String,
        /// The errno it maps to.
        errno: i32,
    },
}

/// Short alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn os_message(context: Option<&str>, errno: i32) -> String {
    match context {
        Some(c) => format!("{c}: {}", strerror(errno)),
        None => strerror(errno),
    }
}

/// The C library's message for `errno`, as QEMU prints it.
pub fn strerror(errno: i32) -> String {
    let mut buf = [0u8; 256];
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the GNU-compatible
    // `__xpg_strerror_r` (what libc::strerror_r binds to) writes a NUL-terminated string
    // of at most that length and does not retain the pointer.
    let rc = unsafe { libc::strerror_r(errno, buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return format!("Unknown error {errno}");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

impl Error {
    /// An OS error without context.
    pub fn errno(errno: i32) -> Self {
        Error::Os {
            context: None,
            errno,
        }
    }

    /// An OS error from `io::Error` with a context sentence.
    pub fn io(context: impl Into<String>, err: &io::Error) -> Self {
        Error::Os {
            context: Some(context.into()),
            errno: err.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// An OS error from `io::Error` without context.
    pub fn from_io(err: &io::Error) -> Self {
        Error::errno(err.raw_os_error().unwrap_or(libc::EIO))
    }

    /// An `Other` error with a message and errno.
    pub fn other(msg: impl Into<String>, errno: i32) -> Self {
        Error::Other {
            msg: msg.into(),
            errno,
        }
    }

    /// An `Invalid` error.
    pub fn invalid(msg: impl fmt::Display) -> Self {
        Error::Invalid(msg.to_string())
    }

    /// An `Unsupported` error.
    pub fn unsupported(msg: impl fmt::Display) -> Self {
        Error::Unsupported(msg.to_string())
    }

    /// A `Corrupt` error.
    pub fn corrupt(msg: impl fmt::Display) -> Self {
        Error::Corrupt(msg.to_string())
    }

    /// The errno this error maps to.
    pub fn errno_value(&self) -> i32 {
        match self {
            Error::Os { errno, .. } => *errno,
            Error::Invalid(_) => libc::EINVAL,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Corrupt(_) => libc::EIO,
            Error::Permission { errno, .. } => *errno,
            Error::Other { errno, .. } => *errno,
        }
    }

    /// Prefixes the message with `context: ` (for OS errors, replaces an absent context).
    pub fn context(self, context: impl fmt::Display) -> Self {
        match self {
            Error::Os {
                context: None,
                errno,
            } => Error::Os {
                context: Some(context.to_string()),
                errno,
            },
            other => {
                let errno = other.errno_value();
                Error::Other {
                    msg: format!("{context}: {other}"),
                    errno,
                }
            }
        }
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        Error::from_io(&err)
    }
}

static PROGRAM_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the program name messages printed from inside the block layer are prefixed with
/// (QEMU's `error_report` prints the invoking program's name).
pub fn set_program_name(name: &str) {
    let _ = PROGRAM_NAME.set(name.to_string());
}

/// Prints `program: msg` to stderr, as QEMU's `error_report` does.
pub fn report(msg: &str) {
    let prog = PROGRAM_NAME.get().map(String::as_str).unwrap_or("rqemu");
    eprintln!("{prog}: {msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_like_qemu() {
        let e = Error::io(
            "Could not open 'x.qcow2'",
            &io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(
            e.to_string(),
            "Could not open 'x.qcow2': No such file or directory"
        );
        assert_eq!(Error::errno(libc::EIO).to_string(), "Input/output error");
        assert_eq!(e.errno_value(), libc::ENOENT);
    }
}
