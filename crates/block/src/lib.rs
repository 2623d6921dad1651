//! rqemu's block layer.
//!
//! Images are graphs of nodes ([`node::BlockDriver`]): format nodes (raw, qcow2) over
//! protocol nodes (file), with backing chains. Users hold a [`BlockBackend`] on the root.
//! Every data operation is async; many requests run concurrently on one node.
//!
//! ```text
//!   BlockBackend ── bounds, read-only, write-through, discard policy, zero detection
//!        │
//!   format node (qcow2 | raw) ──backing──▶ format node ── ...
//!        │ file
//!   protocol node (file: threads | io_uring, O_DIRECT bounce, locking)
//! ```
#![warn(missing_docs)]

pub mod backend;
pub mod buffer;
pub mod create;
pub mod crypto;
pub mod error;
pub mod filter;
pub mod format;
pub mod graph;
pub mod info;
pub mod iov;
pub mod node;
pub mod open;
pub mod options;
pub mod perm;
pub mod probe;
pub mod protocol;
pub mod status;
pub mod testing;

pub use backend::BlockBackend;
pub use error::{Error, Result};
pub use node::{BlockDriver, BlockStatus, NodeRef, Prealloc, WriteFlags};
pub use options::{AioMode, CacheMode, DetectZeroes, DiscardMode, OpenOptions};

/// Wraps format-specific data as a JSON value (for printers).
pub fn serde_json_value(m: serde_json::Map<String, serde_json::Value>) -> serde_json::Value {
    serde_json::Value::Object(m)
}

/// Helpers for the unit tests of this crate.
#[cfg(test)]
pub(crate) mod test_util {
    /// Runs `f` to completion on a fresh single-threaded runtime.
    pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("test runtime")
            .block_on(f)
    }
}
