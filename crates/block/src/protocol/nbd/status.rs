//! Block status: one `NBD_CMD_BLOCK_STATUS` extent turned into a [`BlockStatus`] the way
//! QEMU's nbd driver does.
//!
//! A hole is not data, the zero flag is zero; with `x-dirty-bitmap` the selected
//! context is the bitmap, whose dirty bit lands where `base:allocation` has its hole
//! bit, so dirty ranges read as unallocated (what `qemu-img map` shows for it). Without
//! a negotiated context everything is data.

use crate::error::{Error, Result};
use crate::node::{BlockStatus, HostMapping};

use super::reply::Body;

/// `base:allocation`: the range is a hole.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation`: the range reads as zeroes.
pub const STATE_ZERO: u32 = 2;

/// Status of a whole range when nothing better is known.
pub fn all_data(offset: u64, len: u64) -> BlockStatus {
    BlockStatus {
        len,
        data: true,
        allocated: true,
        host: Some(HostMapping { node: None, offset }),
        ..Default::default()
    }
}

/// Status of the range past the server's size (the block layer rounds sizes up).
pub fn past_end(len: u64) -> BlockStatus {
    BlockStatus {
        len,
        zero: true,
        ..Default::default()
    }
}

/// Collects the reply chunks of one block-status request.
#[derive(Default)]
pub struct Collector {
    extent: Option<(u32, u32)>,
}

impl Collector {
    /// Takes one chunk; `context` is the negotiated context id.
    pub fn take(&mut self, body: Body, context: u32) -> Result<()> {
        match body {
            Body::Status {
                context: c,
                len,
                flags,
            } => {
                if c != context {
                    return Err(Error::other(
                        format!("Protocol error: unexpected context id {c} for block status"),
                        libc::EIO,
                    ));
                }
                if self.extent.is_some() {
                    return Err(Error::other(
                        "Several BLOCK_STATUS chunks in reply",
                        libc::EIO,
                    ));
                }
                self.extent = Some((len, flags));
                Ok(())
            }
            Body::Ok => Ok(()),
            _ => Err(Error::other(
                "Unexpected reply type for CMD_BLOCK_STATUS",
                libc::EIO,
            )),
        }
    }

    /// The status of `[offset, offset + requested)`.
    pub fn finish(self, offset: u64, requested: u64) -> Result<BlockStatus> {
        let Some((len, flags)) = self.extent else {
            return Err(Error::other(
                "Server did not reply with any status extents",
                libc::EIO,
            ));
        };
        // A longer extent than asked for is cut to the request.
        let len = u64::from(len).min(requested);
        let data = flags & STATE_HOLE == 0;
        let zero = flags & STATE_ZERO != 0;
        Ok(BlockStatus {
            len,
            data,
            zero,
            allocated: data || zero,
            host: Some(HostMapping { node: None, offset }),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_like_qemu() {
        let mut c = Collector::default();
        c.take(
            Body::Status {
                context: 1,
                len: 4096,
                flags: STATE_HOLE | STATE_ZERO,
            },
            1,
        )
        .unwrap();
        let s = c.finish(0, 1024).unwrap();
        assert_eq!((s.len, s.data, s.zero), (1024, false, true));
        assert!(Collector::default().finish(0, 1).is_err());
        let mut c = Collector::default();
        assert!(c
            .take(
                Body::Status {
                    context: 2,
                    len: 1,
                    flags: 0
                },
                1
            )
            .is_err());
    }
}
