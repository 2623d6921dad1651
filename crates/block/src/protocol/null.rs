//! The `null-co` and `null-aio` drivers: a disk of a given size that stores nothing.
//! Writes succeed and vanish; reads return zeroes (with `read-zeroes=on` the node also
//! says so in its allocation status, as QEMU's does, otherwise the contents count as
//! undefined).

use std::any::Any;

use async_trait::async_trait;
use rqemu_opts::KeyVal;

use crate::error::{Error, Result};
use crate::node::{BlockDriver, BlockStatus, HostMapping, IoBuf, IoBufMut, Prealloc, WriteFlags};

/// QEMU's default size for null devices (1 GiB).
const DEFAULT_SIZE: u64 = 1 << 30;

/// A null node.
pub struct NullNode {
    name: &'static str,
    size: u64,
    read_zeroes: bool,
    read_only: bool,
}

impl NullNode {
    /// Opens a null node of driver `name` from its options (`size`, `read-zeroes`,
    /// `latency-ns`); unknown options are refused as QEMU does.
    pub fn open(name: &'static str, kv: &mut KeyVal, read_only: bool) -> Result<NullNode> {
        let size = match kv.take("size") {
            Some(v) => rqemu_opts::parse_size(&v, 1)
                .map_err(|_| crate::create::size_param_error("size"))?,
            None => DEFAULT_SIZE,
        };
        let read_zeroes = match kv.take("read-zeroes") {
            Some(v) => rqemu_opts::bool_opt(&v)
                .ok_or_else(|| Error::invalid("Parameter 'read-zeroes' expects 'on' or 'off'"))?,
            None => false,
        };
        kv.take("latency-ns");
        kv.take("filename");
        if let Some(k) = kv.keys().next() {
            return Err(Error::invalid(format!(
                "Block protocol '{name}' doesn't support the option '{k}'"
            )));
        }
        Ok(NullNode {
            name,
            size,
            read_zeroes,
            read_only,
        })
    }
}

#[async_trait]
impl BlockDriver for NullNode {
    fn driver_name(&self) -> &'static str {
        self.name
    }

    fn filename(&self) -> String {
        format!("{}://", self.name)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    async fn read(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
        buf.fill(0);
        Ok(())
    }

    async fn write(&self, _offset: u64, _buf: &[u8], _flags: WriteFlags) -> Result<()> {
        Ok(())
    }

    async fn readv(&self, _offset: u64, bufs: &[IoBufMut<'_>]) -> Result<()> {
        crate::iov::fill(bufs, 0);
        Ok(())
    }

    async fn writev(&self, _offset: u64, _bufs: &[IoBuf<'_>], _flags: WriteFlags) -> Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, _offset: u64, _len: u64, _flags: WriteFlags) -> Result<()> {
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
            zero: self.read_zeroes,
            host: Some(HostMapping { node: None, offset }),
            ..Default::default()
        })
    }

    async fn truncate(&self, _size: u64, _exact: bool, _prealloc: Prealloc) -> Result<()> {
        Err(Error::errno(libc::ENOTSUP))
    }
}
