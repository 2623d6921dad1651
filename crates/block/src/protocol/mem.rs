//! An in-memory protocol node: the bytes of an "image file" held in a vector. Used by
//! tests and fuzzers to open images without touching the file system.

use std::any::Any;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::error::{Error, Result};
use crate::node::{BlockDriver, BlockStatus, HostMapping, Prealloc, WriteFlags};

/// Largest size a memory node may grow to (hostile metadata must not make it huge).
pub const MAX_MEM_NODE: u64 = 256 << 20;

/// A node over bytes in memory.
pub struct MemNode {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemNode {
    /// A node holding `data`.
    pub fn new(data: Vec<u8>, read_only: bool) -> MemNode {
        MemNode {
            data: Mutex::new(data),
            read_only,
        }
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn grow(&self, v: &mut Vec<u8>, end: u64) -> Result<()> {
        if end > MAX_MEM_NODE {
            return Err(Error::errno(libc::EFBIG));
        }
        if end as usize > v.len() {
            v.resize(end as usize, 0);
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDriver for MemNode {
    fn driver_name(&self) -> &'static str {
        "file"
    }

    fn filename(&self) -> String {
        "memory".into()
    }

    fn size(&self) -> u64 {
        let len = self.data.lock().unwrap_or_else(|p| p.into_inner()).len() as u64;
        len.div_ceil(512) * 512
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let v = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let start = (offset as usize).min(v.len());
        let end = (offset.saturating_add(buf.len() as u64) as usize).min(v.len());
        let n = end - start;
        buf[..n].copy_from_slice(&v[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    async fn write(&self, offset: u64, buf: &[u8], _flags: WriteFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EBADF));
        }
        let mut v = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or(Error::errno(libc::EINVAL))?;
        self.grow(&mut v, end)?;
        v[offset as usize..end as usize].copy_from_slice(buf);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: WriteFlags) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EBADF));
        }
        let mut v = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset.checked_add(len).ok_or(Error::errno(libc::EINVAL))?;
        self.grow(&mut v, end)?;
        v[offset as usize..end as usize].fill(0);
        Ok(())
    }

    async fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus {
            len,
            data: true,
            allocated: true,
            host: Some(HostMapping { node: None, offset }),
            ..Default::default()
        })
    }

    async fn truncate(&self, size: u64, _exact: bool, _prealloc: Prealloc) -> Result<()> {
        if self.read_only {
            return Err(Error::errno(libc::EBADF));
        }
        let mut v = self.data.lock().unwrap_or_else(|p| p.into_inner());
        if size > MAX_MEM_NODE {
            return Err(Error::errno(libc::EFBIG));
        }
        v.resize(size as usize, 0);
        Ok(())
    }
}
