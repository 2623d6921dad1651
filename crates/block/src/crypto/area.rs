//! [`HeaderArea`]: the bytes of a node that hold a LUKS header and its key material,
//! addressed relative to the header's start.

use crate::node::{NodeRef, WriteFlags};

use super::error::{CryptoError, Result};

/// Where a LUKS header lives: `node`, from byte `base` on.
#[derive(Clone)]
pub struct HeaderArea {
    /// The node holding the header.
    pub node: NodeRef,
    /// Offset of the header's first byte in the node.
    pub base: u64,
    /// Length of the area (qcow2 records it); `u64::MAX` when unbounded.
    pub len: u64,
}

impl HeaderArea {
    /// Reads `buf.len()` bytes at `offset` of the area; bytes past the node's end read
    /// as zeroes.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        let at = self.base.saturating_add(offset);
        if at.saturating_add(buf.len() as u64) > i64::MAX as u64 {
            return Err(CryptoError::Io(crate::error::Error::other(
                format!(
                    "Could not read encryption header: {}",
                    crate::error::strerror(libc::EIO)
                ),
                libc::EIO,
            )));
        }
        let avail = self.node.size().saturating_sub(at).min(buf.len() as u64) as usize;
        if avail > 0 {
            self.node.read(at, &mut buf[..avail]).await?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    /// Writes `buf` at `offset` of the area.
    pub async fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        self.node
            .write(self.base + offset, buf, WriteFlags::NONE)
            .await?;
        Ok(())
    }

    fn check(&self, offset: u64, len: usize) -> Result<()> {
        if offset.saturating_add(len as u64) > self.len {
            return Err(CryptoError::invalid(
                "Request for data outside of extension header",
            ));
        }
        Ok(())
    }

    /// Makes the area's writes durable.
    pub async fn flush(&self) -> Result<()> {
        self.node.flush().await?;
        Ok(())
    }
}
