//! Opening images: the one place that turns [`OpenOptions`] into a node graph.

use crate::backend::BlockBackend;
use crate::error::{Error, Result};
use crate::options::OpenOptions;

/// Opens the graph `opts` describes and wraps it in a backend.
pub async fn open_backend(opts: &OpenOptions) -> Result<BlockBackend> {
    Err(Error::unsupported(format!(
        "Could not open '{}': not yet supported",
        opts.filename
    )))
}
