//! Reusable data buffers for the commands that stream an image (convert, commit,
//! rebase): a buffer handed back is reused instead of allocating (and faulting in) fresh
//! memory for every request.

use std::sync::Mutex;

/// A pool of byte buffers.
#[derive(Default)]
pub struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// A buffer of `len` bytes (contents unspecified).
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut v = self
            .0
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        v.resize(len, 0);
        v
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, v: Vec<u8>) {
        if let Ok(mut p) = self.0.lock() {
            p.push(v);
        }
    }
}
