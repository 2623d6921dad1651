//! Secrets: QEMU's `--object secret,id=ID,data=...|file=...[,format=raw|base64]`.
//!
//! Objects are process-wide in QEMU; so is this registry. Front ends define secrets as
//! they parse their command lines, drivers look them up by id when they unlock a key.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use base64::Engine;

use super::error::{CryptoError, Result};

fn registry() -> &'static Mutex<HashMap<String, Vec<u8>>> {
    static R: OnceLock<Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Decodes a secret's value: `data` or the contents of `file`, in `format` (`raw`,
/// the default, or `base64`).
pub fn load(data: Option<&str>, file: Option<&str>, format: Option<&str>) -> Result<Vec<u8>> {
    let raw = match (data, file) {
        (Some(_), Some(_)) => {
            return Err(CryptoError::invalid(
                "'data' and 'file' are mutually exclusive",
            ))
        }
        (None, None) => {
            return Err(CryptoError::invalid(
                "Either 'file' or 'data' must be provided",
            ))
        }
        (Some(d), None) => d.as_bytes().to_vec(),
        (None, Some(f)) => std::fs::read(f).map_err(|e| {
            CryptoError::invalid(format!(
                "Unable to read {f}: Failed to open file “{f}”: {}",
                crate::error::strerror(e.raw_os_error().unwrap_or(libc::EIO))
            ))
        })?,
    };
    match format.unwrap_or("raw") {
        "raw" => Ok(raw),
        "base64" => {
            let text: Vec<u8> = raw
                .iter()
                .copied()
                .filter(|c| !c.is_ascii_whitespace())
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(&text)
                .map_err(|_| CryptoError::invalid("Unable to decode base64 data"))
        }
        other => Err(CryptoError::invalid(format!(
            "Parameter 'format' does not accept value '{other}'"
        ))),
    }
}

/// Defines (or redefines) the secret `id`.
pub fn define(id: &str, value: Vec<u8>) {
    if let Ok(mut r) = registry().lock() {
        r.insert(id.to_string(), value);
    }
}

/// The value of secret `id`, or QEMU's error when there is none.
pub fn lookup(id: &str) -> Result<Vec<u8>> {
    registry()
        .lock()
        .ok()
        .and_then(|r| r.get(id).cloned())
        .ok_or_else(|| CryptoError::invalid(format!("No secret with id '{id}'")))
}

/// The value of secret `id` as UTF-8 text (legacy qcow2 AES passwords).
pub fn lookup_utf8(id: &str) -> Result<String> {
    let v = lookup(id)?;
    String::from_utf8(v)
        .map_err(|_| CryptoError::invalid(format!("Data from secret {id} is not valid UTF-8")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(load(Some("abc"), None, None).unwrap(), b"abc");
        assert_eq!(load(Some("YWJj"), None, Some("base64")).unwrap(), b"abc");
        assert!(load(Some("!!"), None, Some("base64")).is_err());
        assert!(load(None, None, None).is_err());
        define("t-sec", b"x".to_vec());
        assert_eq!(lookup("t-sec").unwrap(), b"x");
        assert_eq!(
            lookup("t-none").unwrap_err().to_string(),
            "No secret with id 't-none'"
        );
    }
}
